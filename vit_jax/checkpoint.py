"""Reading, writing and adapting parameter checkpoints in the published layout.

A checkpoint is a flat `.npz`: one array per parameter, keyed by its '/'-joined
path in the Flax params tree (`Transformer/encoderblock_0/LayerNorm_0/scale`),
exactly as the released `ViT-B_16.npz` files are. `load` also reads two layouts
found in the wild and normalises them to ours:

- `opt/target/...`: old dumps of a whole optimizer state; the prefix is dropped.
- `params/...` (big_vision): the prefix is dropped and big_vision's module names
  (`MultiHeadDotProductAttention_0`, `LayerNorm_1`, `MlpBlock_0`, top-level
  `pos_embedding`, layers stacked under `Transformer/encoderblock/` when scanned)
  are renamed to ours.
- `resnet/...` (the BiT-M release, `BiT-M-R50x1.npz` ...): renamed to our
  ResNetV2 tree (`bit_to_params`); `save(..., layout='bit')` writes it back
  (`params_to_bit`), so a round trip is exact.

`load_pretrained` turns a pre-trained tree into the starting point of a
fine-tuning run, the way the paper does: a fresh zero-initialised head for a new
class count, no representation layer unless the new model has one, and position
embeddings resampled in 2-D when the resolution (so the patch grid) changes --
by default linearly with corner alignment, as the reference implementation's
`scipy.ndimage.zoom(order=1)` does (`resize_posemb`).
Anything else that does not fit is an error naming the keys and both shapes.

Files are read without unpickling anything: a checkpoint is data and must
not be able to run code. Every array's shape and dtype is read from its .npy
header and checked (sizes against the zip directory and a limit, float dtypes,
the expected tree when one is given) before any data is read; the data is then
read in bounded pieces and checked finite (`load_flat`).

Why one module of this size: everything that reads an untrusted file sits behind
the same header-first, bounded reader, and every layout (published, big_vision,
optimizer dumps, BiT-M) maps onto the one tree that `load_pretrained` adapts;
splitting the layouts from the reader would put the checks in two places.
"""

from __future__ import annotations

import dataclasses
import errno
import math
import os
import re
import shutil
import sys
import tempfile
import traceback
import zipfile
import zlib
from typing import Any, Mapping, Optional, Union

from absl import logging
import numpy as np

from vit_jax import storage

PathLike = Union[str, os.PathLike]
Params = dict

SEP = '/'
POSEMB_KEY = 'Transformer/posembed_input/pos_embedding'
HEAD_KEYS = ('head/kernel', 'head/bias')
# Prefixes that other tools put in front of the published keys.
OPT_TARGET_PREFIX = 'opt/target/'
BIG_VISION_PREFIX = 'params/'
# Every key of a BiT-M release file starts with this.
BIT_PREFIX = 'resnet/'
# `save` layouts: ours (the published ViT files'), or the BiT-M release's.
LAYOUTS = ('published', 'bit')


# ---------------------------------------------------------------------------
# Trees <-> flat dicts
# ---------------------------------------------------------------------------

def _is_leaf(x: Any) -> bool:
  return not isinstance(x, Mapping)


def flatten(tree: Mapping, sep: str = SEP) -> dict[str, Any]:
  """{'a': {'b': x}} -> {'a/b': x}. Leaves are kept as they are."""
  flat = {}

  def visit(node, prefix):
    for key, value in node.items():
      if not isinstance(key, str) or not key or sep in key:
        raise ValueError(f'Invalid parameter name {key!r} under {prefix!r}')
      path = f'{prefix}{sep}{key}' if prefix else key
      if _is_leaf(value):
        flat[path] = value
      else:
        visit(value, path)

  if not isinstance(tree, Mapping):
    raise TypeError(f'Expected a nested dict of arrays, got {type(tree).__name__}')
  visit(tree, '')
  return flat


def unflatten(flat: Mapping[str, Any], sep: str = SEP) -> dict:
  """{'a/b': x} -> {'a': {'b': x}}; a key that is both a leaf and a prefix is an error."""
  tree: dict = {}
  for path, value in flat.items():
    parts = path.split(sep)
    if any(not p for p in parts):
      raise ValueError(f'Invalid parameter path {path!r} (empty component)')
    node = tree
    for depth, part in enumerate(parts[:-1]):
      child = node.setdefault(part, {})
      if not isinstance(child, dict):
        raise ValueError(
            f'Parameter path {path!r} conflicts with the array stored at '
            f'{sep.join(parts[:depth + 1])!r}')
      node = child
    if parts[-1] in node:
      raise ValueError(f'Parameter path {path!r} is both an array and a module')
    node[parts[-1]] = value
  return tree


def _to_numpy(x: Any) -> np.ndarray:
  """A host numpy array for anything array-like (jax, numpy, torch on CPU)."""
  if hasattr(x, 'detach'):  # a torch tensor, without importing torch
    x = x.detach().cpu()
    if str(x.dtype) == 'torch.bfloat16':
      x = x.float()
    return x.numpy()
  return np.asarray(x)


# ---------------------------------------------------------------------------
# Reading .npz files: headers first, bounded, validated
# ---------------------------------------------------------------------------

# An .npz is a zip of .npy files whose headers declare each array's shape and
# dtype, so everything a load will allocate is known from the headers and the
# zip directory before one byte of data is read. Files that cannot be right are
# refused at that point, with a message naming the file and the array, instead
# of ending in a MemoryError, an OOM kill or a silently wrong model.
MAX_NPZ_BYTES_ENV = 'VIT_JAX_MAX_NPZ_BYTES'
# ViT-H/14 is 2.5 GB in float32; 8 GiB leaves room for the largest published
# files while keeping a bad file from exhausting an ordinary machine.
DEFAULT_MAX_NPZ_BYTES = 8 * 2**30
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
  """The load size limit: `value`, else $VIT_JAX_MAX_NPZ_BYTES ('16G' works), else 8 GiB."""
  return int(_limit(value, MAX_NPZ_BYTES_ENV, DEFAULT_MAX_NPZ_BYTES, _parse_bytes))


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
      return zipfile.ZipFile(storage.open(path, 'rb'))
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


def _scan_npz(zf: zipfile.ZipFile, where: str, max_bytes: int) -> dict[str, _Member]:
  """Every array's header, with the sizes checked; reads no array data."""
  members: dict[str, _Member] = {}
  for info in zf.infolist():
    name = info.filename
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


def _select_prefix(flat: dict[str, Any], prefix: str, source: str) -> dict[str, Any]:
  """The entries under `prefix`, without it; others (optimizer state, step) are dropped."""
  kept = {k[len(prefix):]: v for k, v in flat.items() if k.startswith(prefix)}
  dropped = len(flat) - len(kept)
  logging.info('%s: reading the %d arrays under %r%s', source, len(kept), prefix,
               f', ignoring {dropped} others' if dropped else '')
  return kept


def _strip_prefixes(flat: dict[str, Any], source: str) -> tuple[dict[str, Any], bool]:
  """(the entries under opt/target/ and/or params/, prefixes dropped; big_vision?)."""
  if any(k.startswith(OPT_TARGET_PREFIX) for k in flat):
    flat = _select_prefix(flat, OPT_TARGET_PREFIX, source)
  big_vision = False
  if any(k.startswith(BIG_VISION_PREFIX) for k in flat):
    flat = _select_prefix(flat, BIG_VISION_PREFIX, source)
    big_vision = True
  return flat, big_vision


def _is_group_norm(key: str) -> bool:
  parts = key.split(SEP)
  return len(parts) >= 2 and parts[-1] in ('scale', 'bias') and parts[-2].startswith('gn')


_BIG_VISION_BLOCK_RENAMES = {
    'MultiHeadDotProductAttention_0': 'MultiHeadDotProductAttention_1',
    'LayerNorm_1': 'LayerNorm_2',
    'MlpBlock_0': 'MlpBlock_3',
}


def _is_big_vision(flat: Mapping[str, Any]) -> bool:
  return ('pos_embedding' in flat
          or any(k.startswith('Transformer/encoderblock/') for k in flat)
          or any('/MultiHeadDotProductAttention_0/' in k for k in flat
                 if k.startswith('Transformer/')))


def _from_big_vision(flat: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """big_vision ViT names -> ours (unstacks scanned layers, moves pos_embedding)."""
  out = {}
  for key, value in flat.items():
    parts = key.split(SEP)
    if len(parts) > 2 and parts[0] == 'Transformer' and parts[1] == 'encoderblock':
      # Scanned layers: one array with a leading layer axis.
      parts[2] = _BIG_VISION_BLOCK_RENAMES.get(parts[2], parts[2])
      for i in range(value.shape[0]):
        out[SEP.join(['Transformer', f'encoderblock_{i}'] + parts[2:])] = value[i]
      continue
    if len(parts) > 2 and parts[0] == 'Transformer' and parts[1].startswith('encoderblock_'):
      parts[2] = _BIG_VISION_BLOCK_RENAMES.get(parts[2], parts[2])
    elif key == 'pos_embedding':
      parts = POSEMB_KEY.split(SEP)
    out[SEP.join(parts)] = value
  posemb = flat.get('pos_embedding')
  if posemb is not None and 'cls' in out and posemb.ndim == 3:
    n = posemb.shape[1]
    if math.isqrt(n) ** 2 == n:
      # big_vision adds position embeddings to the patches only, before the
      # class token is prepended; a zero row for the class token is the same function.
      logging.info('big_vision checkpoint: prepending a zero position embedding '
                   'for the class token (%d -> %d tokens)', n, n + 1)
      zero = np.zeros((1, 1, posemb.shape[2]), posemb.dtype)
      out[POSEMB_KEY] = np.concatenate([zero, posemb], axis=1)
  return out


# BiT-M layout <-> our ResNetV2 tree. A BiT unit names its three (norm, conv)
# pairs a, b, c; each norm precedes its conv (pre-activation), so a's norm is our
# gn1 (which feeds conv1 and the projection), b's is gn2, c's is gn3.
_BIT_CONV = 'standardized_conv2d'
_BIT_GN_PARAMS = {'gamma': 'scale', 'beta': 'bias'}
_GN_BIT_PARAMS = {v: k for k, v in _BIT_GN_PARAMS.items()}
_BIT_UNIT_PARTS = {'a': '1', 'b': '2', 'c': '3'}
_UNIT_BIT_PARTS = {v: k for k, v in _BIT_UNIT_PARTS.items()}
_BIT_UNIT_RE = re.compile(
    r'block(\d+)/unit(\d+)/(?:([abc])/(?:group_norm/(gamma|beta)|' + _BIT_CONV +
    r'/kernel)|a/proj/' + _BIT_CONV + r'/kernel)')
_OUR_UNIT_RE = re.compile(r'block(\d+)/unit(\d+)/(?:(gn|conv)([123])/(scale|bias|kernel)|'
                          r'conv_proj/kernel)')


def is_bit_layout(flat: Mapping[str, Any]) -> bool:
  """True for the key set of a BiT-M release file (`resnet/...`)."""
  return any(k.startswith(BIT_PREFIX) for k in flat)


def _squeeze_leading(key: str, value: Any, ndim: int, source: str) -> Any:
  """`value` without leading unit axes, down to `ndim` axes (a view, no copy)."""
  shape = tuple(value.shape)
  extra = len(shape) - ndim
  if extra < 0 or any(d != 1 for d in shape[:extra]):
    raise ValueError(f'Checkpoint {source!r}: BiT array {key!r} has shape {shape}; '
                     f'expected {ndim} axes after leading 1s')
  # reshape of a zero-stride placeholder stays a view, so header-only reads stay free.
  return value.reshape(shape[extra:])


def bit_to_params(flat: Mapping[str, Any], source: str = 'params') -> dict[str, Any]:
  """A BiT-M layout flat dict (`resnet/...`) -> our ResNetV2 flat dict.

  GroupNorm parameters become (C,) and the 1x1-conv head (1, 1, C, K) a Dense
  kernel (C, K): the same function. A key outside the layout is an error naming
  it, since silently dropping weights would give a different model.
  """
  out: dict[str, Any] = {}
  unknown = []

  def put(key: str, new_key: str, value: Any) -> None:
    if new_key in out:
      raise ValueError(f'Checkpoint {source!r}: BiT keys {key!r} and another both map to '
                       f'{new_key!r}')
    out[new_key] = value

  for key, value in flat.items():
    if not key.startswith(BIT_PREFIX):
      unknown.append(key)
      continue
    rest = key[len(BIT_PREFIX):]
    if rest == f'root_block/{_BIT_CONV}/kernel':
      put(key, 'conv_root/kernel', value)
    elif rest in ('group_norm/gamma', 'group_norm/beta'):
      put(key, f'norm_pre_head/{_BIT_GN_PARAMS[rest.split(SEP)[-1]]}',
          _squeeze_leading(key, value, 1, source))
    elif rest == 'head/conv2d/kernel':
      put(key, 'head/kernel', _squeeze_leading(key, value, 2, source))
    elif rest == 'head/conv2d/bias':
      put(key, 'head/bias', _squeeze_leading(key, value, 1, source))
    else:
      match = _BIT_UNIT_RE.fullmatch(rest)
      if match is None:
        unknown.append(key)
        continue
      block, unit, part, gn_param = match.groups()
      prefix = f'block{int(block)}/unit{int(unit)}'
      if part is None:
        put(key, f'{prefix}/conv_proj/kernel', value)
      elif gn_param is not None:
        put(key, f'{prefix}/gn{_BIT_UNIT_PARTS[part]}/{_BIT_GN_PARAMS[gn_param]}',
            _squeeze_leading(key, value, 1, source))
      else:
        put(key, f'{prefix}/conv{_BIT_UNIT_PARTS[part]}/kernel', value)
  if unknown:
    raise ValueError(
        f'Checkpoint {source!r} is in the BiT layout ({BIT_PREFIX}...) but '
        f'{len(unknown)} key(s) are not BiT ResNetV2 parameters: {sorted(unknown)[:8]}')
  return out


def params_to_bit(params_or_flat: Mapping) -> dict[str, np.ndarray]:
  """Our ResNetV2 params (nested or flat) -> the BiT-M layout; inverse of `bit_to_params`."""
  flat = _as_flat(params_or_flat)
  out: dict[str, np.ndarray] = {}
  unknown = []
  for key, value in flat.items():
    array = _to_numpy(value)
    if key == 'conv_root/kernel':
      new_key = f'root_block/{_BIT_CONV}/kernel'
    elif key in ('norm_pre_head/scale', 'norm_pre_head/bias'):
      new_key = f'group_norm/{_GN_BIT_PARAMS[key.split(SEP)[-1]]}'
    elif key == 'head/kernel':
      new_key = 'head/conv2d/kernel'
      array = array.reshape((1, 1) + array.shape)
    elif key == 'head/bias':
      new_key = 'head/conv2d/bias'
    else:
      match = _OUR_UNIT_RE.fullmatch(key)
      if match is None:
        unknown.append(key)
        continue
      block, unit, kind, index, param = match.groups()
      # The release numbers units with two digits: unit01 ... unit36.
      prefix = f'block{int(block)}/unit{int(unit):02d}'
      if kind is None:
        new_key = f'{prefix}/a/proj/{_BIT_CONV}/kernel'
      elif kind == 'gn' and param in _GN_BIT_PARAMS:
        new_key = f'{prefix}/{_UNIT_BIT_PARTS[index]}/group_norm/{_GN_BIT_PARAMS[param]}'
      elif kind == 'conv' and param == 'kernel':
        new_key = f'{prefix}/{_UNIT_BIT_PARTS[index]}/{_BIT_CONV}/kernel'
      else:
        unknown.append(key)
        continue
    out[BIT_PREFIX + new_key] = array
  if unknown:
    raise ValueError(f"layout='bit' needs a BiT ResNetV2 tree; {len(unknown)} key(s) have "
                     f'no place in it: {sorted(unknown)[:8]}')
  return out


@dataclasses.dataclass(frozen=True)
class ResNetArchitecture:
  """Depth and width of a ResNetV2 tree, read off its keys and shapes."""
  num_layers: tuple[int, ...]  # units per block
  root_kernel: tuple[int, ...]  # conv_root/kernel's shape: (7, 7, 3, 64 * width_factor)

  @property
  def depth(self) -> int:
    # Three convs per bottleneck unit, plus the root conv and the head.
    return 3 * sum(self.num_layers) + 2

  @property
  def root_width(self) -> int:
    return self.root_kernel[-1]

  @property
  def name(self) -> str:
    """'R50x1', 'R152x4'; a root width that is no multiple of 64 is spelt out."""
    if self.root_width % 64 == 0:
      return f'R{self.depth}x{self.root_width // 64}'
    return f'R{self.depth} (root width {self.root_width})'

  def describe(self) -> str:
    return (f'{self.name} (units per block {self.num_layers}, conv_root/kernel '
            f'{self.root_kernel})')


def resnet_architecture(params_or_flat: Mapping) -> Optional[ResNetArchitecture]:
  """The ResNetV2 depth and width a tree (ours or BiT layout) holds; None if not one."""
  flat = _as_flat(params_or_flat)
  if is_bit_layout(flat):
    flat = bit_to_params(flat)
  root = flat.get('conv_root/kernel')
  if root is None or len(root.shape) != 4:
    return None
  units: dict[int, set[int]] = {}
  for key in flat:
    match = re.fullmatch(r'block(\d+)/unit(\d+)/.+', key)
    if match:
      units.setdefault(int(match.group(1)), set()).add(int(match.group(2)))
  if not units:
    return None
  num_layers = []
  for block in range(1, max(units) + 1):
    # A hole in the numbering (unit3 without unit2) is not a depth; report the count
    # of units numbered 1..n and let the key check name the strays.
    present = units.get(block, set())
    count = 0
    while count + 1 in present:
      count += 1
    num_layers.append(count)
  return ResNetArchitecture(tuple(num_layers), tuple(int(d) for d in root.shape))


def bit_preset_name(params_or_flat: Mapping) -> Optional[str]:
  """The BiT preset ('BiT-R50x3') whose depth and width a tree has; None if none."""
  from vit_jax.configs import models as models_config  # pylint: disable=g-import-not-at-top
  arch = resnet_architecture(params_or_flat)
  if arch is None:
    return None
  for name in models_config.names():
    config = models_config.get_config(name)
    if config.get('model_type') != 'resnet':
      continue
    width = int(config.width * config.width_factor)
    if tuple(config.num_layers) == arch.num_layers and width == arch.root_width:
      return name
  return None


def _check_resnet_fit(restored: Mapping[str, Any], init: Mapping[str, Any],
                      source: str) -> None:
  """One clear error when a ResNet checkpoint has another depth or width than the model."""
  ckpt, model = resnet_architecture(restored), resnet_architecture(init)
  if ckpt is None or model is None or ckpt == model:
    return
  preset = bit_preset_name(restored)
  hint = f'; the preset for this file is {preset!r}' if preset else ''
  raise ValueError(f'Checkpoint {source!r} is a ResNet {ckpt.describe()} but the model is '
                   f'{model.describe()}{hint}')


def normalize_layout(flat: dict[str, Any], source: str = 'params') -> dict[str, Any]:
  """Puts other layouts' keys in the published layout (see the module docstring).

  Also reshapes GroupNorm scales/biases stored as (1, 1, 1, C) by old hybrid
  checkpoints to the (C,) of Flax linen, and renames a BiT-M file's keys
  (`resnet/...`) to our ResNetV2 tree (`bit_to_params`).
  """
  flat, big_vision = _strip_prefixes(flat, source)
  return _normalize_names(flat, source, big_vision)


def _normalize_names(flat: dict[str, Any], source: str, big_vision: bool) -> dict[str, Any]:
  if big_vision or _is_big_vision(flat):
    logging.info('%s: renaming big_vision module names to the published layout', source)
    flat = _from_big_vision(flat)
  if is_bit_layout(flat):
    logging.info('%s: renaming the BiT layout (%s...) to the ResNetV2 tree', source,
                 BIT_PREFIX)
    flat = bit_to_params(flat, source)
  for key, value in list(flat.items()):
    if _is_group_norm(key) and value.ndim > 1 and value.shape[-1] == value.size:
      logging.info('%s: reshaping GroupNorm %s %s -> (%d,)', source, key, value.shape, value.size)
      flat[key] = value.reshape(-1)
  return flat


def _placeholder(spec: ArraySpec) -> np.ndarray:
  """An array of `spec`'s shape and dtype that takes no memory (all strides 0)."""
  return np.lib.stride_tricks.as_strided(np.zeros(1, spec.dtype), shape=spec.shape,
                                         strides=(0,) * spec.ndim, writeable=False)


def _scan_checkpoint(path: str, max_bytes: Optional[int]) -> tuple[zipfile.ZipFile, dict[str, _Member], bool]:
  """(open zip, the members kept after the layout's prefixes, big_vision?); no data read."""
  where = f'Checkpoint {path!r}'
  zf = _open_zip(path)
  try:
    members = _scan_npz(zf, where, max_npz_bytes(max_bytes))
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


def load_flat(path: PathLike, expected: Optional[Mapping] = None, *,
              max_bytes: Optional[int] = None) -> dict[str, np.ndarray]:
  """The checkpoint at `path` as {'/'-joined path: array}, in the published layout.

  Before any array data is read, the .npy headers and the zip directory are
  checked: each array's declared size (shape x itemsize) must equal its stored
  size in the zip directory (which bounds what decompression can produce); the
  total must be at most `max_bytes` (default: $VIT_JAX_MAX_NPZ_BYTES, else
  8 GiB); every array must be floating point (int/bool refused); and with
  `expected` (a tree of anything with a `.shape`, e.g. `abstract_params`), every
  key and shape must match it (`check_params`). The data is then read in 16 MiB
  pieces straight into the arrays and checked finite, so peak memory is the
  arrays plus one piece. Arrays that the layout drops (an optimizer state
  beside `opt/target/`) are never read.

  Raises:
    FileNotFoundError: no such file.
    ValueError: any check above, or a file that is truncated, corrupt, not an
      .npz (zip), or holds object (pickled) arrays; the message names the file
      and the array.
  """
  path = os.fspath(path)
  where = f'Checkpoint {path!r}'
  zf, kept, big_vision = _scan_checkpoint(path, max_bytes)
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


def _savable(key: str, value: Any) -> np.ndarray:
  array = _to_numpy(value)
  if array.dtype == object:
    raise ValueError(f'Parameter {key!r} is an object array; only numeric arrays can be saved')
  if array.dtype.name == 'bfloat16' or array.dtype.name.startswith('float8'):
    # Not native numpy dtypes: np.load would give them back as raw bytes.
    # float32 holds every such value exactly.
    logging.info('Saving %s (%s) as float32', key, array.dtype)
    array = array.astype(np.float32)
  if array.dtype.kind not in 'biuf':
    raise ValueError(f'Parameter {key!r} has unsupported dtype {array.dtype}')
  return array


def _umask() -> int:
  """The process umask, read without changing it where Linux allows."""
  try:
    with open('/proc/self/status', encoding='ascii') as f:
      for line in f:
        if line.startswith('Umask:'):
          return int(line.split()[1], 8)
  except (OSError, ValueError, IndexError):
    pass
  mask = os.umask(0o022)  # the portable way has to set it to read it
  os.umask(mask)
  return mask


def save(params: Mapping, path: PathLike, layout: str = 'published') -> None:
  """Writes `params` (nested dict of arrays) as a flat .npz.

  `layout='published'` (default) writes our keys, the published ViT files'
  layout; `layout='bit'` writes a ResNetV2 tree in the BiT-M release's layout
  (`params_to_bit`), which `load` reads back to the same tree bit for bit.

  The file is written to a temporary name in the same directory and renamed
  over `path` only once complete, so a crash never leaves a half-written file.
  It gets the permissions of any newly created file (0666 less the umask;
  usually 0644). A full disk raises OSError(ENOSPC) naming `path`.
  """
  path = os.fspath(path)
  if layout not in LAYOUTS:
    raise ValueError(f'Unknown checkpoint layout {layout!r}; valid layouts: '
                     f'{", ".join(repr(l) for l in LAYOUTS)}')
  flat = {k: _savable(k, v) for k, v in flatten(params).items()}
  if layout == 'bit':
    flat = params_to_bit(flat)
  if not flat:
    raise ValueError('Refusing to save an empty parameter tree')
  if storage.is_remote(path):  # an object appears whole, once its upload is complete
    with storage.open(path, 'wb') as f:
      np.savez(f, **flat)
    logging.info('Saved %d arrays to %s', len(flat), path)
    return
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  fd, tmp_path = tempfile.mkstemp(
      dir=directory, prefix=f'.{os.path.basename(path)}.', suffix='.tmp')
  try:
    # mkstemp creates 0600 files, private to their owner; a checkpoint is meant
    # to be read by others as any file written with open() would be.
    os.fchmod(fd, 0o666 & ~_umask())
    with os.fdopen(fd, 'wb') as f:
      np.savez(f, **flat)  # a file object: numpy does not append '.npz'
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp_path, path)
  except OSError as e:
    if os.path.exists(tmp_path):
      os.remove(tmp_path)
    if e.errno == errno.ENOSPC and e.filename is None:
      # Raised by a write on a file object, which does not know its name.
      raise OSError(e.errno, e.strerror, path) from None
    raise
  except BaseException:
    if os.path.exists(tmp_path):
      os.remove(tmp_path)
    raise
  logging.info('Saved %d arrays to %s', len(flat), path)


def inspect(path_or_params: Union[PathLike, Mapping], print_fn=print) -> list[tuple[str, tuple, str]]:
  """Prints (and returns) every key with its shape and dtype, plus the total count.

  For a file, only the headers are read (`read_npz_specs`).
  """
  if isinstance(path_or_params, Mapping):
    flat = {k: _to_numpy(v) if not hasattr(v, 'shape') else v
            for k, v in flatten(path_or_params).items()}
  else:
    flat = read_npz_specs(path_or_params)
  rows = [(k, tuple(v.shape), str(v.dtype)) for k, v in sorted(flat.items())]
  width = max(len(k) for k, _, _ in rows)
  total = 0
  for key, shape, dtype in rows:
    print_fn(f'{key:<{width}}  {str(shape):<22} {dtype}')
    total += math.prod(shape)
  print_fn(f'{len(rows)} arrays, {total:,} parameters')
  return rows


# ---------------------------------------------------------------------------
# Errors for command-line users
# ---------------------------------------------------------------------------

TRACEBACK_ENV = 'VIT_JAX_TRACEBACK'


def user_error_message(error: BaseException) -> str:
  """One line for a user (`vit_jax.cli.user_error_message`)."""
  from vit_jax import cli  # pylint: disable=g-import-not-at-top
  return cli.user_error_message(error)


def report_user_error(error: BaseException, verbose: bool = False) -> int:
  """`error: <message>` on stderr, exit status 2 (`vit_jax.cli.report_user_error`)."""
  from vit_jax import cli  # pylint: disable=g-import-not-at-top
  return cli.report_user_error(error, verbose)


class ModelMismatchError(ValueError):
  """A tree (checkpoint) whose keys or shapes do not fit the model.

  `str()` lists every missing / unexpected key and shape mismatch;
  `one_line()` is the command-line summary: how many differ, the first of each,
  and which preset the file's shapes fit (`guess_presets`).
  """

  def __init__(self, title: str, missing: list[str], unexpected: list[str],
               mismatched: list[str], shapes: Optional[Mapping[str, Any]] = None):
    parts = [title]
    for name, rows in (('missing keys', missing), ('unexpected keys', unexpected),
                       ('shape mismatches', mismatched)):
      if rows:
        parts.append(_format_problems(name, rows))
    super().__init__('\n'.join(parts))
    self.title, self.missing, self.unexpected, self.mismatched = (
        title, missing, unexpected, mismatched)
    self.presets = guess_presets(shapes) if shapes else []
    self.notes: list[str] = []  # hints on what to change, shown after the rows

  def __str__(self) -> str:
    return super().__str__() + ''.join(f'\n({note})' for note in self.notes)

  def one_line(self) -> str:

    counts = []
    for rows, what in ((self.mismatched, 'shape mismatch'), (self.missing, 'missing key'),
                       (self.unexpected, 'unexpected key')):
      if rows:
        counts.append(f'{len(rows)} {what}{"es" if what.endswith("h") else "s"}, e.g. '
                      f'{rows[0]}' if len(rows) > 1 else f'1 {what}: {rows[0]}')
    fits = (f'; the file fits preset {" / ".join(self.presets)}' if self.presets else
            '; no preset fits the file')
    notes = ''.join(f' ({note})' for note in self.notes)
    return f'{self.title} {"; ".join(counts)}{fits}{notes} (--verbose lists all)'





def vit_architecture(params_or_flat: Mapping) -> Optional[dict[str, Any]]:
  """hidden_size, patch, num_layers, mlp_dim, num_heads of a ViT (or hybrid) tree; None if not one."""
  flat = _as_flat(params_or_flat)
  embedding = flat.get('embedding/kernel')
  block = 'Transformer/encoderblock_0/'
  query = flat.get(block + 'MultiHeadDotProductAttention_1/query/kernel')
  mlp = flat.get(block + 'MlpBlock_3/Dense_0/kernel')
  if embedding is None or query is None or mlp is None or len(_shape(embedding)) != 4:
    return None
  layers = {int(m.group(1)) for m in
            (re.match(r'Transformer/encoderblock_(\d+)/', k) for k in flat) if m}
  return dict(hidden_size=_shape(embedding)[-1], patch=_shape(embedding)[:2],
              num_layers=len(layers), mlp_dim=_shape(mlp)[-1], num_heads=_shape(query)[1])


def _mixer_architecture(flat: Mapping) -> Optional[dict[str, Any]]:
  stem = flat.get('stem/kernel')
  tokens = flat.get('MixerBlock_0/token_mixing/Dense_0/kernel')
  channels = flat.get('MixerBlock_0/channel_mixing/Dense_0/kernel')
  if stem is None or tokens is None or channels is None:
    return None
  blocks = {int(m.group(1)) for m in (re.match(r'MixerBlock_(\d+)/', k) for k in flat) if m}
  return dict(hidden_dim=_shape(stem)[-1], patch=_shape(stem)[:2], num_blocks=len(blocks),
              tokens_mlp_dim=_shape(tokens)[-1], channels_mlp_dim=_shape(channels)[-1])


def guess_presets(params_or_flat: Mapping) -> list[str]:
  """The presets (`vit_jax.configs.models` names) whose architecture a tree's shapes show.

  Read off the shapes alone (an .npz's headers are enough: `read_npz_specs`),
  ignoring what fine-tuning adapts (head, representation layer, position-embedding
  grid): ['ViT-B_16'] for a ViT-B/16 file, ['BiT-R50x1'] for BiT-M R50x1; ViT,
  R+ViT hybrids, BiT ResNets and MLP-Mixers. [] when no preset fits.
  """
  from vit_jax.configs import models as models_config  # pylint: disable=g-import-not-at-top
  flat = _as_flat(params_or_flat)
  if is_bit_layout(flat) or ('conv_root/kernel' in flat and not any(
      k.startswith('Transformer/') for k in flat)):
    name = bit_preset_name(flat)
    return [name] if name else []
  vit, mixer = vit_architecture(flat), _mixer_architecture(flat)
  resnet = resnet_architecture(flat) if vit is not None and 'conv_root/kernel' in flat else None
  found = []
  for name in models_config.names():
    config = models_config.get_config(name)
    kind = config.get('model_type', 'vit')
    if kind == 'vit' and vit is not None:
      fits = (config.hidden_size == vit['hidden_size']
              and tuple(config.patches.size) == tuple(vit['patch'])
              and config.transformer.num_layers == vit['num_layers']
              and config.transformer.mlp_dim == vit['mlp_dim']
              and config.transformer.num_heads == vit['num_heads'])
      if config.get('resnet') is None:
        fits = fits and resnet is None
      else:
        fits = fits and resnet is not None and (
            tuple(config.resnet.num_layers) == resnet.num_layers
            and int(64 * config.resnet.width_factor) == resnet.root_width)
    elif kind == 'mixer' and mixer is not None:
      fits = all(config.get(k) == v for k, v in mixer.items() if k != 'patch') and tuple(
          config.patches.size) == tuple(mixer['patch'])
    else:
      fits = False
    if fits:
      found.append(name)
  return found




# ---------------------------------------------------------------------------
# Geometry read off the parameters
# ---------------------------------------------------------------------------

def _config_get(config: Any, name: str, default: Any = None) -> Any:
  if config is None:
    return default
  if isinstance(config, Mapping):
    return config.get(name, default)
  return getattr(config, name, default)


def _resolve_config(model_config: Any) -> Any:
  if isinstance(model_config, str):
    from vit_jax.configs import models as models_config
    return models_config.get_config(model_config)
  return model_config


def _as_flat(params_or_flat: Mapping) -> Mapping:
  """A flat {'a/b': x} dict, whether given flat or nested."""
  if any(SEP in k for k in params_or_flat) or not any(
      isinstance(v, Mapping) for v in params_or_flat.values()):
    return params_or_flat
  return flatten(params_or_flat)


def num_prefix_tokens(params_or_flat: Mapping, model_config: Any = None) -> int:
  """Tokens before the patch grid in the position embeddings: 1 with a class token."""
  classifier = _config_get(model_config, 'classifier')
  if classifier is not None:
    return 1 if classifier == 'token' else 0
  return 1 if 'cls' in _as_flat(params_or_flat) else 0


def infer_grid(params_or_flat: Mapping, model_config: Any = None) -> tuple[int, int]:
  """The (rows, cols) patch grid the position embeddings were trained for.

  For an MLP-Mixer, the grid its token-mixing MLP mixes (`mixer_grid`). Only
  square grids can be read off a flat token count; others raise ValueError.
  """
  flat = _as_flat(params_or_flat)
  if POSEMB_KEY not in flat and MIXER_GRID_KEY in flat:
    return mixer_grid(flat)
  if POSEMB_KEY not in flat:
    raise ValueError(f'No position embeddings ({POSEMB_KEY}) in these parameters')
  shape = tuple(flat[POSEMB_KEY].shape)
  if len(shape) != 3 or shape[0] != 1:
    raise ValueError(f'{POSEMB_KEY} must have shape (1, tokens, hidden), got {shape}')
  prefix = num_prefix_tokens(flat, _resolve_config(model_config))
  n = shape[1] - prefix
  side = math.isqrt(max(n, 0))
  if n <= 0 or side * side != n:
    raise ValueError(
        f'{POSEMB_KEY} has {shape[1]} tokens ({prefix} prefix token(s) + {n}); '
        f'{n} is not a square patch grid')
  return side, side


def patch_stride(model_config: Any) -> tuple[int, int]:
  """Input pixels per token (patch size, times the ResNet stem's stride for hybrids)."""
  config = _resolve_config(model_config)
  patches = _config_get(config, 'patches')
  size = _config_get(patches, 'size')
  if size is None:
    raise ValueError('model config has no patches.size')
  stem = 1
  resnet = _config_get(config, 'resnet')
  if resnet:
    from vit_jax import models_resnet
    stem = models_resnet.hybrid_stem_stride(resnet)
  return int(size[0]) * stem, int(size[1]) * stem


def infer_image_size(params_or_flat: Mapping, model_config: Any) -> tuple[int, int]:
  """The (height, width) in pixels a checkpoint was trained at: grid x patch stride."""
  rows, cols = infer_grid(params_or_flat, model_config)
  ph, pw = patch_stride(model_config)
  return rows * ph, cols * pw


POSEMB_METHODS = ('linear', 'bicubic')


def _grid_pair(grid: Any, name: str) -> tuple[int, int]:
  """(rows, cols) of positive ints, or ValueError naming the argument."""
  try:
    rows, cols = (int(g) for g in grid)
  except (TypeError, ValueError):
    raise ValueError(f'{name} must be (rows, cols), got {grid!r}') from None
  if rows < 1 or cols < 1:
    raise ValueError(f'{name} must be positive, got {grid!r}')
  return rows, cols


def _check_posemb_method(method: str) -> None:
  if method not in POSEMB_METHODS:
    raise ValueError(f'Unknown position-embedding resize method {method!r}; '
                     f'valid methods: {", ".join(repr(m) for m in POSEMB_METHODS)}')


def _zoom_linear(grid: np.ndarray, new_grid: tuple[int, int]) -> np.ndarray:
  """The reference's resampling: scipy.ndimage.zoom(order=1) over rows and columns.

  scipy maps output index i to input i * (n_in - 1) / (n_out - 1), so the first
  and last rows/columns coincide with the old ones (corner alignment).
  """
  # Imported here: scipy.ndimage takes a while to import and only this needs it.
  from scipy import ndimage  # pylint: disable=g-import-not-at-top
  (old_h, old_w), (new_h, new_w) = grid.shape[:2], new_grid
  # float64: scipy has no bfloat16, and for float32 inputs its double-precision
  # arithmetic rounds to the same float32 values the reference gets.
  resized = ndimage.zoom(grid.astype(np.float64), (new_h / old_h, new_w / old_w, 1), order=1)
  # scipy's output shape is round(n_in * zoom); it must be exactly the new grid.
  if resized.shape[:2] != (new_h, new_w):
    raise ValueError(f'scipy.ndimage.zoom gave a {resized.shape[:2]} grid for '
                     f'{grid.shape[:2]} -> {new_grid}')
  return resized


def _resize_bicubic(grid: np.ndarray, new_grid: tuple[int, int]) -> np.ndarray:
  """timm's resampling (torch bicubic, antialias=True, half-pixel centres).

  jax.image.resize's 'cubic' is the same Keys kernel (a = -0.5), widened when
  shrinking and renormalised at the borders as torch's antialiased path does;
  the two agree to about 1e-6 (tests/test_posemb.py).
  """
  import jax  # pylint: disable=g-import-not-at-top
  shape = (new_grid[0], new_grid[1], grid.shape[2])
  return np.asarray(jax.image.resize(grid.astype(np.float32), shape, method='cubic',
                                     antialias=True))


def resize_posemb(posemb: Any, new_grid: tuple[int, int], num_prefix: int,
                  old_grid: Optional[tuple[int, int]] = None,
                  method: str = 'linear') -> np.ndarray:
  """Resamples the 2-D grid part of (1, prefix + rows*cols, D) position embeddings.

  Args:
    posemb: (1, num_prefix + old_rows * old_cols, D) embeddings.
    new_grid: (rows, cols) of the result's patch grid.
    num_prefix: leading tokens that are not on the grid (1 for a class token);
      they are kept unchanged, as in the paper's fine-tuning at a new resolution.
    old_grid: (rows, cols) of `posemb`'s grid; default: square.
    method: 'linear' (default): the reference implementation's
      `scipy.ndimage.zoom(order=1)`, linear interpolation with corner alignment.
      'bicubic': timm's `resample_abs_pos_embed` (bicubic with antialiasing,
      half-pixel centres).

  Returns:
    (1, num_prefix + rows * cols, D) in the input dtype (computed in float32 or
    float64).
  """
  _check_posemb_method(method)
  posemb = _to_numpy(posemb)
  if posemb.ndim != 3 or posemb.shape[0] != 1:
    raise ValueError(f'position embeddings must be (1, tokens, hidden), got {posemb.shape}')
  if not 0 <= num_prefix <= posemb.shape[1]:
    raise ValueError(f'num_prefix={num_prefix} for {posemb.shape[1]} position embeddings')
  new_grid = _grid_pair(new_grid, 'new_grid')
  prefix, grid = posemb[:, :num_prefix], posemb[0, num_prefix:]
  if old_grid is None:
    side = math.isqrt(grid.shape[0])
    if grid.shape[0] == 0 or side * side != grid.shape[0]:
      raise ValueError(f'{grid.shape[0]} position embeddings do not form a square grid; '
                       'pass old_grid=(rows, cols)')
    old_grid = (side, side)
  old_grid = _grid_pair(old_grid, 'old_grid')
  if old_grid[0] * old_grid[1] != grid.shape[0]:
    raise ValueError(f'grid {old_grid} does not match {grid.shape[0]} position embeddings')
  hidden = posemb.shape[-1]
  grid = grid.reshape(old_grid[0], old_grid[1], hidden)
  if method == 'linear':
    resized = _zoom_linear(grid, new_grid)
  else:
    resized = _resize_bicubic(grid, new_grid)
  resized = resized.reshape(1, new_grid[0] * new_grid[1], hidden).astype(posemb.dtype)
  return np.concatenate([prefix, resized], axis=1)


# ---------------------------------------------------------------------------
# Fine-tuning initialisation
# ---------------------------------------------------------------------------

def model_family(flat: Mapping[str, Any]) -> str:
  """'vit', 'hybrid' (R50+ViT), 'resnet' (BiT), 'mixer' or 'unknown', from the key set.

  Our ResNetV2 tree and the BiT-M release layout (`resnet/...`) are both 'resnet'.
  """
  if is_bit_layout(flat):
    return 'resnet'
  if any(_MIXER_TOKEN_RE.match(k) for k in flat):
    return 'mixer'
  has_transformer = any(k.startswith('Transformer/') for k in flat)
  has_stem = any(k.startswith('conv_root/') for k in flat)
  if has_transformer and has_stem:
    return 'hybrid'
  if has_transformer:
    return 'vit'
  if has_stem:
    return 'resnet'
  return 'unknown'


def _shape(x: Any) -> tuple:
  return tuple(x.shape)


def _has_data(x: Any) -> bool:
  """False for abstract leaves such as jax.ShapeDtypeStruct (from jax.eval_shape)."""
  return not (hasattr(x, 'shape') and hasattr(x, 'dtype') and type(x).__name__ == 'ShapeDtypeStruct')


def _fresh(key: str, init: Any) -> np.ndarray:
  if _has_data(init):
    return _to_numpy(init)
  if key.startswith('head/'):
    # The head is zero-initialised in every model of this package.
    return np.zeros(init.shape, init.dtype)
  raise ValueError(f'{key}: needs a freshly initialised value but init_params only has its shape')


def _format_problems(title: str, rows: list[str]) -> str:
  return f'{title} ({len(rows)}):\n  ' + '\n  '.join(rows)


def _raise_if_problems(title: str, missing: list[str], unexpected: list[str],
                       mismatched: list[str], shapes: Optional[Mapping] = None) -> None:
  """ModelMismatchError listing every missing / unexpected key and shape mismatch, if any.

  `shapes`, the checked tree's flat {key: array or spec}, lets the error name the
  preset that fits it.
  """
  if not (missing or unexpected or mismatched):
    return
  raise ModelMismatchError(title, missing, unexpected, mismatched, shapes)



def load_pretrained(path_or_params: Union[PathLike, Mapping], init_params: Mapping,
                    model_config: Any, *,
                    image_size: Union[int, tuple[int, int], None] = None,
                    posemb_method: str = 'linear',
                    source_grid: Optional[tuple[int, int]] = None,
                    source_name: Optional[str] = None) -> Params:
  """Adapts a pre-trained checkpoint to a model for a new task.

  Args:
    path_or_params: an .npz path (any layout `load` reads) or a params tree.
    init_params: the new model's freshly initialised params (arrays, or
      `jax.ShapeDtypeStruct`s from `jax.eval_shape` -- then a replaced head is zeros).
    model_config: the new model's config (ConfigDict, dict or preset name).
    image_size: the new model's input size, an int or (height, width); it
      gives the new patch grid (size // patch stride). Needed for non-square
      grids; without it the grid is read off `init_params`' position
      embeddings, which must then be square.
    posemb_method: how position embeddings are resampled when the grid
      changes: 'linear' (the reference's corner-aligned `scipy.ndimage.zoom`,
      order 1) or 'bicubic' (timm's); see `resize_posemb`.
    source_grid: (rows, cols) of the checkpoint's patch grid. Needed when it is
      not square; by default it is read off the token count.
    source_name: what error messages call the checkpoint (default: the path,
      or 'params' for a tree): the file a tree was read from.

  Returns:
    A params tree shaped and typed like `init_params` (numpy arrays). Every
    change made (head replaced, representation layer dropped, position
    embeddings resized, shapes squeezed) is logged.

  Raises:
    ValueError: listing every missing key, unexpected key and shape mismatch
      (both shapes), a checkpoint of another model family, or arrays that are
      not floating point or not finite (as `load_flat` checks files).
  """
  config = _resolve_config(model_config)
  # Checked up front so that a typo in a config fails even when no resize is needed.
  _check_posemb_method(posemb_method)
  if image_size is not None:
    from vit_jax.configs.image_size import image_hw  # pylint: disable=g-import-not-at-top
    image_size = image_hw(image_size)
  if source_grid is not None:
    source_grid = _grid_pair(source_grid, 'source_grid')
  init = flatten(init_params)
  if isinstance(path_or_params, Mapping):
    source = source_name or 'params'
    restored = normalize_layout(
        {k: _to_numpy(v) for k, v in flatten(path_or_params).items()}, source)
    check_weights(restored, f'Checkpoint {source!r}')
  else:
    source = source_name or os.fspath(path_or_params)
    # The key set is checked from the headers, before any data is read: a file
    # of the wrong model (or of junk) costs nothing to refuse.
    specs = read_npz_specs(path_or_params)
    _check_keys_fit(specs, init, source)
    _mixer_grids(specs, init, config, image_size, source_grid, source)
    restored = load_flat(path_or_params)
  _check_family(restored, init, source)
  regrid = _mixer_grids(restored, init, config, image_size, source_grid, source)

  out: dict[str, np.ndarray] = {}
  missing, mismatched, notes = [], [], []
  if regrid is not None:
    old_grid, new_grid, k = regrid
    _widen_mixer(restored, old_grid, k)
    logging.info('load_pretrained: token-mixing MLPs widened %dx block-diagonally for the '
                 'grid %dx%d -> %dx%d', k[0] * k[1], *old_grid, *new_grid)
    notes.append(f'token mixing {_fmt_grid(old_grid)} -> {_fmt_grid(new_grid)} '
                 f'({k[0] * k[1]} blocks)')

  # Representation layer: dropped when the new model has none (the paper's fine-tuning).
  if any(k.startswith('pre_logits/') for k in restored) and not any(
      k.startswith('pre_logits/') for k in init):
    for key in [k for k in restored if k.startswith('pre_logits/')]:
      logging.info('load_pretrained: dropping %s %s (target has no representation layer)',
                   key, restored[key].shape)
      notes.append(f'dropped {key}')
      del restored[key]

  for key, target in init.items():
    target_shape = _shape(target)
    if key not in restored:
      if key in HEAD_KEYS:
        logging.info('load_pretrained: checkpoint has no %s; using the fresh %s', key,
                     target_shape)
        out[key] = _fresh(key, target)
        continue
      missing.append(f'{key}: model {target_shape}, not in checkpoint')
      continue
    value = restored[key]
    shape = _shape(value)
    # With both grids given, a grid of the same token count but another shape
    # (4x6 -> 6x4) is resampled too; otherwise equal shapes mean the same grid.
    regrid = (key == POSEMB_KEY and source_grid is not None and image_size is not None
              and shape == target_shape)
    if shape == target_shape and not regrid:
      out[key] = value
    elif key in HEAD_KEYS:
      logging.info('load_pretrained: replacing %s %s with the fresh %s (class count differs)',
                   key, shape, target_shape)
      notes.append(f'replaced {key}')
      out[key] = _fresh(key, target)
    elif key == POSEMB_KEY:
      try:
        out[key], old_grid, new_grid = _adapt_posemb(
            value, target_shape, restored, config, image_size, posemb_method, source_grid)
      except ValueError as e:
        mismatched.append(f'{key}: checkpoint {shape} vs model {target_shape} ({e})')
        continue
      if old_grid == new_grid:
        continue
      logging.info('load_pretrained: resized %s %s -> %s (grid %dx%d -> %dx%d, %s)', key,
                   shape, target_shape, *old_grid, *new_grid, posemb_method)
      notes.append(f'resized {key}')
    elif tuple(d for d in shape if d != 1) == tuple(d for d in target_shape if d != 1):
      # Old hybrid checkpoints store GroupNorm scales as (1, 1, 1, C).
      logging.info('load_pretrained: reshaping %s %s -> %s', key, shape, target_shape)
      out[key] = value.reshape(target_shape)
    else:
      mismatched.append(f'{key}: checkpoint {shape} vs model {target_shape}')

  unexpected = [f'{k}: checkpoint {_shape(v)}, not in model'
                for k, v in sorted(restored.items()) if k not in init]
  _raise_if_problems(f'Checkpoint {source!r} does not fit the model:', missing, unexpected,
                     mismatched, restored)


  result = {}
  for key, target in init.items():
    result[key] = np.asarray(out[key]).astype(np.dtype(target.dtype), copy=False)
  logging.info('load_pretrained: %d arrays from %s%s', len(result), source,
               f' ({"; ".join(notes)})' if notes else ', no changes')
  return unflatten(result)


# ---------------------------------------------------------------------------
# MLP-Mixer: the token-mixing MLP is tied to the patch grid
# ---------------------------------------------------------------------------

# `MixerBlock_3/token_mixing/Dense_0/kernel`: (num_patches, D_S); Dense_1 (D_S, num_patches).
_MIXER_TOKEN_RE = re.compile(r'MixerBlock_(\d+)/token_mixing/Dense_([01])/(kernel|bias)$')
MIXER_GRID_KEY = 'MixerBlock_0/token_mixing/Dense_0/kernel'


def mixer_tokens(params_or_flat: Mapping) -> tuple[int, int]:
  """(num_patches, tokens_mlp_dim) of a Mixer tree, read off its first token-mixing kernel."""
  flat = _as_flat(params_or_flat)
  if MIXER_GRID_KEY not in flat:
    raise ValueError(f'No token-mixing weights ({MIXER_GRID_KEY}) in these parameters')
  shape = _shape(flat[MIXER_GRID_KEY])
  if len(shape) != 2:
    raise ValueError(f'{MIXER_GRID_KEY} must be (num_patches, tokens_mlp_dim), got {shape}')
  return int(shape[0]), int(shape[1])


def mixer_grid(params_or_flat: Mapping) -> tuple[int, int]:
  """The square patch grid a Mixer's token-mixing MLP was trained for."""
  tokens, _ = mixer_tokens(params_or_flat)
  side = math.isqrt(tokens)
  if side * side != tokens:
    raise ValueError(f'{MIXER_GRID_KEY} mixes {tokens} patches: not a square grid; '
                     'pass source_grid=(rows, cols)')
  return side, side


def _fmt_grid(grid: tuple[int, int]) -> str:
  return f'{grid[0]}x{grid[1]}'


def mixer_regrid_factor(ckpt_tokens: tuple[int, int], model_tokens: tuple[int, int],
                        old_grid: tuple[int, int], new_grid: tuple[int, int]
                        ) -> tuple[int, int]:
  """(K_rows, K_cols) of the Mixer paper's fine-tuning at a higher resolution, or ValueError.

  The paper's Appendix fine-tunes a Mixer on K^2 times more patches by widening
  the token-mixing MLP K^2 times and initialising it block-diagonally with K^2
  copies of the pre-trained weights. That needs the new grid to be a whole
  multiple of the old one and the model's tokens_mlp_dim to be K^2 times the
  checkpoint's; anything else is refused with both patch grids named.
  """
  (old_n, old_ds), (new_n, new_ds) = ckpt_tokens, model_tokens
  where = (f'the checkpoint\'s token-mixing MLP is tied to its {_fmt_grid(old_grid)} patch grid '
           f'({old_n} patches, tokens_mlp_dim {old_ds}) but the model has a '
           f'{_fmt_grid(new_grid)} grid ({new_n} patches, tokens_mlp_dim {new_ds})')
  if old_grid[0] * old_grid[1] != old_n or new_grid[0] * new_grid[1] != new_n:
    raise ValueError(f'{where}; the grids do not match those patch counts')
  if new_grid[0] % old_grid[0] or new_grid[1] % old_grid[1]:
    raise ValueError(f'{where}; fine-tuning on another grid needs a whole multiple K of '
                     f'{_fmt_grid(old_grid)} (the Mixer paper\'s block-diagonal '
                     'initialisation) or the same image size')
  k = (new_grid[0] // old_grid[0], new_grid[1] // old_grid[1])
  if new_ds != k[0] * k[1] * old_ds:
    raise ValueError(f'{where}; a {k[0]}x{k[1]} block grid needs tokens_mlp_dim '
                     f'{k[0] * k[1] * old_ds} ({k[0] * k[1]} x {old_ds}: '
                     f'--config.model.tokens_mlp_dim={k[0] * k[1] * old_ds})')
  return k


def _block_of_tokens(old_grid: tuple[int, int], k: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
  """For each token of the new grid (row-major): its block and its index inside the block.

  Blocks are contiguous old-grid-sized tiles of the new grid, row-major, so each
  copy of the pre-trained MLP sees a tile laid out as the pre-training grid.
  """
  gh, gw = old_grid
  rows, cols = np.meshgrid(np.arange(gh * k[0]), np.arange(gw * k[1]), indexing='ij')
  block = (rows // gh) * k[1] + cols // gw
  local = (rows % gh) * gw + cols % gw
  return block.reshape(-1), local.reshape(-1)


def widen_token_mixing(dense0_kernel: np.ndarray, dense0_bias: np.ndarray,
                       dense1_kernel: np.ndarray, dense1_bias: np.ndarray,
                       old_grid: tuple[int, int], k: tuple[int, int]
                       ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
  """One token-mixing MLP widened K^2 times, block-diagonal (see `mixer_regrid_factor`).

  Returns (Dense_0 kernel (K^2 S, K^2 D_S), bias (K^2 D_S,), Dense_1 kernel
  (K^2 D_S, K^2 S), bias (K^2 S,)): on each tile of the new grid the widened
  MLP computes exactly the pre-trained one.
  """
  blocks = k[0] * k[1]
  ds = dense0_kernel.shape[1]
  block, local = _block_of_tokens(old_grid, k)
  new_n = block.size
  w0 = np.zeros((new_n, blocks * ds), dense0_kernel.dtype)
  w1 = np.zeros((blocks * ds, new_n), dense1_kernel.dtype)
  for b in range(blocks):
    tokens = np.nonzero(block == b)[0]
    w0[tokens, b * ds:(b + 1) * ds] = dense0_kernel[local[tokens]]
    w1[b * ds:(b + 1) * ds, tokens] = dense1_kernel[:, local[tokens]]
  return w0, np.tile(dense0_bias, blocks), w1, dense1_bias[local]


def _mixer_grids(specs: Mapping[str, Any], init: Mapping[str, Any], config: Any,
                 image_size: Optional[tuple[int, int]],
                 source_grid: Optional[tuple[int, int]], source: str
                 ) -> Optional[tuple[tuple[int, int], tuple[int, int], tuple[int, int]]]:
  """(old grid, new grid, K) when a Mixer checkpoint's token mixing must be widened.

  None when the token-mixing shapes already fit; ValueError naming both patch
  grids when they cannot be made to (`mixer_regrid_factor`).
  """
  if model_family(specs) != 'mixer' or MIXER_GRID_KEY not in init:
    return None
  ckpt_tokens, model_tokens = mixer_tokens(specs), mixer_tokens(init)
  if image_size is not None:
    ph, pw = patch_stride(config)
    new_grid = (image_size[0] // ph, image_size[1] // pw)
  else:
    side = math.isqrt(model_tokens[0])
    new_grid = (side, side) if side * side == model_tokens[0] else (model_tokens[0], 1)
  if source_grid is not None:
    old_grid = source_grid
  else:
    side = math.isqrt(ckpt_tokens[0])
    old_grid = (side, side) if side * side == ckpt_tokens[0] else (ckpt_tokens[0], 1)
  if ckpt_tokens == model_tokens and old_grid == new_grid:
    return None
  try:
    k = mixer_regrid_factor(ckpt_tokens, model_tokens, old_grid, new_grid)
  except ValueError as e:
    raise ValueError(f'Checkpoint {source!r} does not fit the model: {e}') from None
  return old_grid, new_grid, k


def _widen_mixer(restored: dict[str, np.ndarray], old_grid: tuple[int, int],
                 k: tuple[int, int]) -> list[str]:
  """Widens every block's token-mixing MLP in `restored` in place; returns the keys changed."""
  blocks = sorted({int(m.group(1)) for m in map(_MIXER_TOKEN_RE.match, restored) if m})
  changed = []
  for i in blocks:
    prefix = f'MixerBlock_{i}/token_mixing/'
    keys = [f'{prefix}Dense_0/kernel', f'{prefix}Dense_0/bias', f'{prefix}Dense_1/kernel',
            f'{prefix}Dense_1/bias']
    widened = widen_token_mixing(*(restored[key] for key in keys), old_grid, k)
    for key, value in zip(keys, widened):
      restored[key] = value
    changed.extend(keys)
  return changed


def _check_family(restored: Mapping[str, Any], init: Mapping[str, Any], source: str) -> None:
  family_ckpt, family_model = model_family(restored), model_family(init)
  if family_ckpt != family_model:
    raise ValueError(
        f'Checkpoint {source!r} looks like a {family_ckpt!r} model but the target '
        f'model is {family_model!r}; e.g. checkpoint keys '
        f'{sorted(restored)[:4]} vs model keys {sorted(init)[:4]}')
  if family_ckpt == 'resnet':
    _check_resnet_fit(restored, init, source)


def _check_keys_fit(specs: Mapping[str, Any], init: Mapping[str, Any], source: str) -> None:
  """What `load_pretrained` will refuse that shapes alone show, before data is read.

  A head is replaced when missing or of another class count, a representation
  layer dropped when the model has none and position embeddings resampled (their
  fit is checked once loaded); any other difference in keys or (squeezed)
  shapes cannot be adapted.
  """
  _check_family(specs, init, source)
  missing = [f'{k}: model {_shape(v)}, not in checkpoint' for k, v in sorted(init.items())
             if k not in specs and k not in HEAD_KEYS]
  unexpected = [f'{k}: checkpoint {_shape(v)}, not in model' for k, v in sorted(specs.items())
                if k not in init and not k.startswith('pre_logits/')]
  squeeze = lambda shape: tuple(d for d in shape if d != 1)
  mismatched = [f'{k}: checkpoint {_shape(specs[k])} vs model {_shape(v)}'
                for k, v in sorted(init.items())
                if k in specs and k not in HEAD_KEYS and k != POSEMB_KEY
                and not _MIXER_TOKEN_RE.match(k)  # their fit: _mixer_grids
                and squeeze(_shape(specs[k])) != squeeze(_shape(v))]
  _raise_if_problems(f'Checkpoint {source!r} does not fit the model:', missing, unexpected,
                     mismatched, specs)



def _adapt_posemb(value: np.ndarray, target_shape: tuple, restored: Mapping, config: Any,
                  image_size: Optional[tuple[int, int]], method: str,
                  source_grid: Optional[tuple[int, int]]
                  ) -> tuple[np.ndarray, tuple[int, int], tuple[int, int]]:
  """(resized embeddings, old grid, new grid); ValueError says what does not fit."""
  if value.ndim != 3 or len(target_shape) != 3 or value.shape[0] != 1 or target_shape[0] != 1:
    raise ValueError('position embeddings must be (1, tokens, hidden)')
  if value.shape[2] != target_shape[2]:
    raise ValueError('hidden sizes differ')
  prefix = num_prefix_tokens(restored, config)
  ckpt_prefix = 1 if 'cls' in restored else 0
  if prefix != ckpt_prefix:
    raise ValueError(f'class-token count differs: checkpoint {ckpt_prefix}, model {prefix}')
  old_n = value.shape[1] - prefix
  if source_grid is not None:
    if source_grid[0] * source_grid[1] != old_n:
      raise ValueError(f'source_grid {source_grid} has {source_grid[0] * source_grid[1]} '
                       f'tokens but the checkpoint grid has {old_n}')
    old_grid = source_grid
  else:
    old_side = math.isqrt(max(old_n, 0))
    if old_n <= 0 or old_side * old_side != old_n:
      raise ValueError(f'checkpoint grid of {old_n} tokens is not square; '
                       'pass source_grid=(rows, cols)')
    old_grid = (old_side, old_side)
  new_n = target_shape[1] - prefix
  if image_size is not None:
    ph, pw = patch_stride(config)
    new_grid = (image_size[0] // ph, image_size[1] // pw)
    if new_grid[0] * new_grid[1] != new_n:
      raise ValueError(f'image size {image_size} gives grid {new_grid}, not {new_n} tokens')
  else:
    new_side = math.isqrt(max(new_n, 0))
    if new_n <= 0 or new_side * new_side != new_n:
      raise ValueError(f'model grid of {new_n} tokens is not square; pass image_size')
    new_grid = (new_side, new_side)
  if new_grid == old_grid:
    return value, old_grid, new_grid
  resized = resize_posemb(value, new_grid, prefix, old_grid=old_grid, method=method)
  return resized, old_grid, new_grid


# ---------------------------------------------------------------------------
# Checking a tree against a model
# ---------------------------------------------------------------------------

def abstract_params(model_config: Any, num_classes: int,
                    image_size: tuple[int, int]) -> Params:
  """The model's params as `jax.ShapeDtypeStruct`s (no memory, no compute)."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from vit_jax.configs import models as models_config  # pylint: disable=g-import-not-at-top
  model = models_config.build_model(_resolve_config(model_config), num_classes)
  images = jax.ShapeDtypeStruct((1, image_size[0], image_size[1], 3), jnp.float32)
  variables = jax.eval_shape(
      lambda rng, x: model.init(rng, x, train=False), jax.random.key(0), images)
  return dict(variables['params'])


def check_params(params: Mapping, expected: Mapping, source: str = 'params',
                 title: Optional[str] = None) -> None:
  """ValueError listing every missing/unexpected key and shape mismatch (both shapes).

  Each row calls the checked tree `source`; the message starts with `title`
  (default: '<source> does not fit the model:').
  """
  have, want = flatten(params), flatten(expected)
  missing = [f'{k}: model {_shape(v)}, not in {source}' for k, v in sorted(want.items())
             if k not in have]
  unexpected = [f'{k}: {source} {_shape(v)}, not in model' for k, v in sorted(have.items())
                if k not in want]
  mismatched = [f'{k}: {source} {_shape(have[k])} vs model {_shape(v)}'
                for k, v in sorted(want.items()) if k in have and _shape(have[k]) != _shape(v)]
  _raise_if_problems(title or f'{source} does not fit the model:', missing, unexpected,
                     mismatched, have)

