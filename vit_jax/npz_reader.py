"""Reading untrusted `.npz` checkpoints: headers first, bounded, validated.

Files are read without unpickling anything: a checkpoint is data and must
not be able to run code. Every array's shape and dtype is read from its .npy
header and checked (sizes against the zip directory and a limit, float dtypes,
the expected tree when one is given) before any data is read; the data is then
read in bounded pieces and checked finite (`load_flat`). Every layout that
`vit_jax.checkpoint_layouts` knows is normalised to the published one on the
way in, so the checks sit in one place whatever the file's layout.
"""

from __future__ import annotations

import dataclasses
import math
import os
import zipfile
import zlib
from typing import Callable, Mapping, Optional

import numpy as np

from vit_jax import storage
from vit_jax.checkpoint_layouts import (
    BIG_VISION_PREFIX, OPT_TARGET_PREFIX, _normalize_names, _strip_prefixes)
from vit_jax.model_fit import check_params
from vit_jax.param_trees import Params, PathLike, _as_flat, _to_numpy, unflatten


# ---------------------------------------------------------------------------
# Reading .npz files: headers first, bounded, validated
# ---------------------------------------------------------------------------

# An .npz is a zip of .npy files whose headers declare each array's shape and
# dtype, so everything a load will allocate is known from the headers and the
# zip directory before one byte of data is read. Files that cannot be right are
# refused at that point, with a message naming the file and the array, instead
# of ending in a MemoryError, an OOM kill or a silently wrong model.
MAX_NPZ_BYTES_ENV = 'VIT_JAX_MAX_NPZ_BYTES'
# The cap follows the machine (half its physical memory, as predict's image-size
# limit does): ViT-H/14 is 2.5 GB in float32, and a bad file must not exhaust an
# ordinary machine.
DEFAULT_MAX_NPZ_BYTES = 8 * 2**30  # where the machine's memory cannot be read


def machine_memory_limit() -> int:
  """Half of this machine's physical memory: the default cap of one load, and of the
  memory `vit_jax.predict` lets one attention layer take."""
  try:
    return os.sysconf('SC_PHYS_PAGES') * os.sysconf('SC_PAGE_SIZE') // 2
  except (ValueError, OSError, AttributeError):
    return DEFAULT_MAX_NPZ_BYTES
# No limit is put on the compression ratio: the memory a load takes is bounded
# by the declared sizes, which must equal what the zip holds and stay under the
# limit above, and legitimate arrays (zero-initialised heads, all-zero test
# models) compress without bound, so a ratio says nothing a size does not.
# Data is read and checked in pieces of this size, so checking costs no more
# memory than the arrays themselves plus one piece.
_CHUNK_BYTES = 16 * 2**20


@dataclasses.dataclass(frozen=True)
class ArraySpec:
  """Shape and dtype of one stored array, as its .npy header declares them."""
  shape: tuple[int, ...]
  dtype: np.dtype

  @property
  def ndim(self) -> int:
    return len(self.shape)

  @property
  def size(self) -> int:
    return math.prod(self.shape)

  @property
  def nbytes(self) -> int:
    return self.size * self.dtype.itemsize


@dataclasses.dataclass(frozen=True)
class _Member:
  info: zipfile.ZipInfo
  spec: ArraySpec
  fortran_order: bool
  data_offset: int  # bytes of .npy header before the data


def format_bytes(n: float) -> str:
  """1536 -> '1.5 KiB'."""
  for unit in ('B', 'KiB', 'MiB', 'GiB', 'TiB'):
    if abs(n) < 1024 or unit == 'TiB':
      return f'{n:.0f} {unit}' if unit == 'B' else f'{n:.1f} {unit}'
    n /= 1024
  return f'{n} B'  # unreachable


def _parse_bytes(text: str) -> int:
  """'8G', '512MiB', '1e9' -> bytes (binary units)."""
  units = {'': 1, 'K': 2**10, 'M': 2**20, 'G': 2**30, 'T': 2**40}
  t = text.strip().upper().removesuffix('IB').removesuffix('B')
  suffix = t[-1:] if t[-1:] in units and t[-1:] else ''
  return int(float(t[:len(t) - len(suffix)]) * units[suffix])


def _limit(value: Optional[float], env: str, default: float, parse) -> float:
  if value is not None:
    return value
  text = os.environ.get(env)
  if not text:
    return default
  try:
    return parse(text)
  except ValueError:
    raise ValueError(f'{env}={text!r} is not a number') from None


def max_npz_bytes(value: Optional[int] = None) -> int:
  """The load size limit: `value`, else $VIT_JAX_MAX_NPZ_BYTES ('16G' works), else half the
  machine's physical memory (`machine_memory_limit`)."""
  return int(_limit(value, MAX_NPZ_BYTES_ENV, machine_memory_limit(), _parse_bytes))


def _not_a_zip_reason(path: str) -> str:
  """Why `path` is not a readable zip, from its first bytes."""
  with storage.open(path, 'rb') as f:
    head = f.read(16)
  if not head:
    return 'the file is empty'
  if head.startswith(b'\x93NUMPY'):
    return ('it holds a single .npy array (np.save), not an .npz archive of named '
            'arrays (np.savez)')
  if head[:1] == b'\x80' and len(head) > 1 and head[1] <= 5:
    return ('it is a Python pickle, not an npz (zip) file; pickles are never loaded '
            '(allow_pickle=False), since unpickling can run code')
  if head.startswith(b'PK'):
    return 'the file is truncated or its zip directory is corrupt'
  return f'it is not an npz (zip) file (it starts with {head[:8]!r})'


def _open_zip(path: str) -> zipfile.ZipFile:
  if not storage.exists(path):
    raise FileNotFoundError(f'Checkpoint file {path!r} does not exist')
  if storage.isdir(path):
    raise ValueError(f'Cannot read checkpoint {path!r}: it is a directory, not an .npz file')
  try:
    if storage.is_remote(path):  # seekable: the directory and each array are ranged reads
      return storage.ObjectZipFile(path)
    return zipfile.ZipFile(path)
  except (zipfile.BadZipFile, EOFError):
    raise ValueError(f'Cannot read checkpoint {path!r}: {_not_a_zip_reason(path)}') from None
  except zipfile.LargeZipFile as e:
    raise ValueError(f'Cannot read checkpoint {path!r}: {e}') from None


_CORRUPT = (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError)


def _read_header(zf: zipfile.ZipFile, info: zipfile.ZipInfo, key: str,
                 where: str) -> _Member:
  try:
    with zf.open(info) as f:
      version = np.lib.format.read_magic(f)
      if version == (1, 0):
        shape, fortran_order, dtype = np.lib.format.read_array_header_1_0(f)
      elif version == (2, 0):
        shape, fortran_order, dtype = np.lib.format.read_array_header_2_0(f)
      else:
        # 3.0 only adds utf-8 field names, i.e. structured arrays: never parameters.
        raise ValueError(f'.npy format version {version[0]}.{version[1]} is not supported')
      offset = f.tell()
  except ValueError as e:
    raise ValueError(f'{where}: array {key!r} has no valid .npy header ({e})') from None
  except _CORRUPT as e:
    raise ValueError(f'{where}: array {key!r} is truncated or corrupt '
                     f'({type(e).__name__}: {e})') from None
  if dtype.hasobject:
    raise ValueError(
        f'{where}: array {key!r} holds Python objects ({dtype}); reading it would need '
        'unpickling, which is never done (allow_pickle=False): a checkpoint is data '
        'and must not be able to run code')
  if dtype.fields is not None or dtype.subdtype is not None:
    raise ValueError(f'{where}: array {key!r} has a structured dtype {dtype}; '
                     'parameters are plain arrays')
  if any(d < 0 for d in shape):
    raise ValueError(f'{where}: array {key!r} declares a negative shape {shape}')
  return _Member(info, ArraySpec(tuple(shape), dtype), fortran_order, offset)


def _scan_npz(zf: zipfile.ZipFile, where: str, max_bytes: int,
              skip: Optional[Callable[[str], bool]] = None) -> dict[str, _Member]:
  """Every array's header, with the sizes checked; reads no array data. Arrays whose
  key `skip` accepts are left out (their data will not be read)."""
  members: dict[str, _Member] = {}
  for info in zf.infolist():
    name = info.filename
    if skip is not None and name.endswith('.npy') and skip(
        name[:-len('.npy')].split(OPT_TARGET_PREFIX, 1)[-1]):
      continue
    if info.is_dir() or not name.endswith('.npy'):
      if name.endswith('data.pkl'):
        # torch.save's zip: its member names are internal (an archive folder named
        # after whatever file it was first written to); the user's file is `where`.
        raise ValueError(f'{where} is a PyTorch file (torch.save), not an .npz of named '
                         'arrays: convert it first, e.g. python -m vit_jax.convert --from '
                         'timm --to npz --model MODEL --input FILE.pth --output FILE.npz')
      hint = ''

      raise ValueError(f'{where}: zip member {name!r} is not an .npy array, so this is '
                       f'not an .npz of named arrays{hint}')
    key = name[:-len('.npy')]
    if key in members:
      raise ValueError(f'{where}: the archive holds {name!r} twice')
    if info.flag_bits & 0x1:
      raise ValueError(f'{where}: array {key!r} is encrypted')
    member = _read_header(zf, info, key, where)
    nbytes = member.spec.nbytes
    if nbytes > max_bytes:
      raise ValueError(
          f'{where}: array {key!r} declares shape {member.spec.shape} {member.spec.dtype}, '
          f'{format_bytes(nbytes)}, more than the {format_bytes(max_bytes)} limit for '
          f'loading (raise it with ${MAX_NPZ_BYTES_ENV} or max_bytes=)')
    # The zip directory's uncompressed size bounds what decompression can
    # produce (zipfile stops there); the header's declared size must be exactly it.
    stored = info.file_size - member.data_offset
    if stored != nbytes:
      raise ValueError(
          f'{where}: array {key!r} declares shape {member.spec.shape} {member.spec.dtype} '
          f'({nbytes:,} bytes) but its zip member holds {stored:,} bytes of data')
    members[key] = member
  total = sum(m.spec.nbytes for m in members.values())
  if total > max_bytes:
    raise ValueError(
        f'{where}: its {len(members)} arrays declare {format_bytes(total)}, more than the '
        f'{format_bytes(max_bytes)} limit for loading (raise it with ${MAX_NPZ_BYTES_ENV} '
        'or max_bytes=)')
  return members


_KIND_NAMES = {'b': 'boolean', 'i': 'integer', 'u': 'unsigned integer', 'c': 'complex',
               'V': 'raw bytes', 'S': 'bytes', 'U': 'string', 'M': 'datetime',
               'm': 'timedelta'}


def _check_float_dtype(key: str, dtype: np.dtype, where: str) -> None:
  if dtype.kind == 'f':
    return
  kind = _KIND_NAMES.get(dtype.kind, dtype.kind)
  hint = ''
  if dtype.kind == 'V' and dtype.itemsize in (1, 2):
    hint = ' (bfloat16 or float8 saved without its type? store it as float32)'
  raise ValueError(
      f'{where}: array {key!r} has {kind} dtype {dtype}{hint}; parameters must be '
      f'floating point (a {kind} array would be cast to floats silently and give a '
      'wrong model)')


def _check_finite(key: str, values: np.ndarray, shape: tuple, where: str,
                  order: str = 'C') -> None:
  """ValueError unless every value of the 1-D `values` is finite; bounded memory."""
  step = max(1, _CHUNK_BYTES // max(values.dtype.itemsize, 1))
  bad, first = 0, None
  for start in range(0, values.size, step):
    finite = np.isfinite(values[start:start + step])
    if not finite.all():
      where_bad = np.flatnonzero(~finite)
      bad += where_bad.size
      if first is None:
        first = start + int(where_bad[0])
  if bad:
    index = tuple(int(i) for i in np.unravel_index(first, shape, order=order))
    raise ValueError(
        f'{where}: array {key!r} {shape} has {bad:,} non-finite value(s) (first: '
        f'{values[first]} at index {index}); weights must be finite')


def check_weights(params_or_flat: Mapping, source: str = 'params') -> None:
  """ValueError unless every array is floating point and finite, naming the first bad key.

  The check `load` applies to files, for trees already in memory (state dicts
  read from torch files, trees handed to `load_pretrained`).
  """
  flat = _as_flat(params_or_flat)
  for key, value in flat.items():
    array = _to_numpy(value)
    _check_float_dtype(key, array.dtype, source)
    _check_finite(key, np.ravel(array, order='K'), array.shape, source,
                  order='F' if array.flags.f_contiguous and not array.flags.c_contiguous
                  else 'C')


def _read_member(zf: zipfile.ZipFile, key: str, member: _Member, where: str) -> np.ndarray:
  """One array's data, read piece by piece into its final buffer and checked finite."""
  spec = member.spec
  try:
    values = np.empty(spec.size, spec.dtype)
  except MemoryError:
    raise MemoryError(f'{where}: not enough memory for array {key!r} '
                      f'({format_bytes(spec.nbytes)})') from None
  try:
    with zf.open(member.info) as f:
      f.read(member.data_offset)
      buffer = memoryview(values.view(np.uint8)) if spec.size else memoryview(b'')
      pos = 0
      while pos < spec.nbytes:
        n = f.readinto(buffer[pos:pos + _CHUNK_BYTES])
        if not n:
          raise EOFError(f'{spec.nbytes - pos:,} bytes short')
        pos += n
      f.read(1)  # at the end of the member: zipfile checks its CRC
  except _CORRUPT as e:
    raise ValueError(f'{where}: array {key!r} is truncated or corrupt '
                     f'({type(e).__name__}: {e})') from None
  order = 'F' if member.fortran_order else 'C'
  _check_finite(key, values, spec.shape, where, order)
  if not spec.dtype.isnative:
    values = values.astype(spec.dtype.newbyteorder('='))
  if member.fortran_order:
    return values.reshape(spec.shape[::-1]).transpose()
  return values.reshape(spec.shape)


def _placeholder(spec: ArraySpec) -> np.ndarray:
  """An array of `spec`'s shape and dtype that takes no memory (all strides 0)."""
  return np.lib.stride_tricks.as_strided(np.zeros(1, spec.dtype), shape=spec.shape,
                                         strides=(0,) * spec.ndim, writeable=False)


def _scan_checkpoint(path: str, max_bytes: Optional[int], without_head: bool = False
                     ) -> tuple[zipfile.ZipFile, dict[str, _Member], bool]:
  """(open zip, the members kept after the layout's prefixes, big_vision?); no data read."""
  where = f'Checkpoint {path!r}'
  zf = _open_zip(path)
  try:
    members = _scan_npz(zf, where, max_npz_bytes(max_bytes),
                        skip=_is_head if without_head else None)
    if not members:
      raise ValueError(f'{where} contains no arrays')
    kept, big_vision = _strip_prefixes(members, path)
    if not kept:
      raise ValueError(f'{where} has no arrays under {BIG_VISION_PREFIX!r} / '
                       f'{OPT_TARGET_PREFIX!r}')
    for key, member in kept.items():
      _check_float_dtype(key, member.spec.dtype, where)
  except BaseException:
    zf.close()
    raise
  return zf, kept, big_vision


def _specs_of(kept: dict[str, _Member], path: str, big_vision: bool) -> dict[str, ArraySpec]:
  normalized = _normalize_names({k: _placeholder(m.spec) for k, m in kept.items()},
                                path, big_vision)
  return {k: ArraySpec(tuple(v.shape), v.dtype) for k, v in normalized.items()}


def read_npz_specs(path: PathLike, *,
                   max_bytes: Optional[int] = None) -> dict[str, ArraySpec]:
  """{key: ArraySpec} of a checkpoint, in the published layout, from its headers alone.

  Applies every check of `load_flat` that needs no array data (sizes, limits,
  dtypes); reads no data, so it costs the same for a 3 GB file as for a 3 kB one.
  """
  path = os.fspath(path)
  zf, kept, big_vision = _scan_checkpoint(path, max_bytes)
  with zf:
    return _specs_of(kept, path, big_vision)


def _is_head(key: str) -> bool:
  """A classification-head array, in the published, big_vision or BiT layout."""
  parts = key.split('/')
  return 'head' in parts[:-1]


def load_flat(path: PathLike, expected: Optional[Mapping] = None, *,
              max_bytes: Optional[int] = None,
              without_head: bool = False) -> dict[str, np.ndarray]:
  """The checkpoint at `path` as {'/'-joined path: array}, in the published layout.

  Before any array data is read, the .npy headers and the zip directory are
  checked: each array's declared size (shape x itemsize) must equal its stored
  size in the zip directory (which bounds what decompression can produce); the
  total must be at most `max_bytes` (default: $VIT_JAX_MAX_NPZ_BYTES, else
  half the machine's memory); every array must be floating point (int/bool refused); and with
  `expected` (a tree of anything with a `.shape`, e.g. `abstract_params`), every
  key and shape must match it (`check_params`). The data is then read in 16 MiB
  pieces straight into the arrays and checked finite, so peak memory is the
  arrays plus one piece. Arrays that the layout drops (an optimizer state
  beside `opt/target/`) are never read, nor, with `without_head`, the
  classification head (fine-tuning with a new head): neither counts towards
  `max_bytes`.

  Raises:
    FileNotFoundError: no such file.
    ValueError: any check above, or a file that is truncated, corrupt, not an
      .npz (zip), or holds object (pickled) arrays; the message names the file
      and the array.
  """
  path = os.fspath(path)
  where = f'Checkpoint {path!r}'
  zf, kept, big_vision = _scan_checkpoint(path, max_bytes, without_head)
  with zf:
    if expected is not None:
      try:
        specs = unflatten(_specs_of(kept, path, big_vision))
      except ValueError as e:
        raise ValueError(f'{where}: {e}') from None
      check_params(specs, expected, source='checkpoint',
                   title=f'Checkpoint {path!r} does not fit the model:')
    flat = {key: _read_member(zf, key, member, where) for key, member in kept.items()}
  return _normalize_names(flat, path, big_vision)


def load(path: PathLike, expected: Optional[Mapping] = None, *,
         max_bytes: Optional[int] = None) -> Params:
  """Loads an .npz checkpoint into a nested params dict of numpy arrays.

  Every check of `load_flat` applies (sizes, limits, float dtypes, finite
  values, and the keys and shapes of `expected` if given).

  Raises:
    FileNotFoundError: no such file.
    ValueError: the file is truncated, not an .npz, holds pickled objects,
      non-float or non-finite arrays, declares more than the limits, or its
      keys do not form a tree. The message names the file.
  """
  flat = load_flat(path, expected, max_bytes=max_bytes)
  try:
    return unflatten(flat)
  except ValueError as e:
    raise ValueError(f'Checkpoint {os.fspath(path)!r}: {e}') from None
