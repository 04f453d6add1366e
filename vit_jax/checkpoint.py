"""Parameter checkpoints: the entry points for reading, writing and fine-tuning from them.

A checkpoint is a flat `.npz`: one array per parameter, keyed by its '/'-joined
path in the Flax params tree (`Transformer/encoderblock_0/LayerNorm_0/scale`),
exactly as the released `ViT-B_16.npz` files are. This module writes them
(`save`, in the published or the BiT-M layout) and lists them (`inspect`); the
rest of the API is kept importable from here and lives in modules of its own:

- `load`, `load_flat`, `read_npz_specs`: `vit_jax.npz_reader`, the header-first,
  bounded reader of untrusted files;
- the layouts found in the wild (optimizer dumps, big_vision, BiT-M) and their
  mapping onto ours: `vit_jax.checkpoint_layouts`;
- which model a tree holds and whether it fits one (`check_params`,
  `guess_presets`, `resnet_architecture`): `vit_jax.model_fit`;
- the patch grid and position-embedding resampling (`resize_posemb`):
  `vit_jax.patch_grid`;
- `load_pretrained`, a pre-trained tree adapted to a new task: `vit_jax.finetune`;
- `flatten` / `unflatten`: `vit_jax.param_trees`.
"""

from __future__ import annotations

import errno
import math
import os
import tempfile
from typing import Any, Mapping, Union

from absl import logging
import numpy as np

from vit_jax import storage
from vit_jax.checkpoint_layouts import params_to_bit
from vit_jax.npz_reader import read_npz_specs
from vit_jax.param_trees import PathLike, _to_numpy, flatten

# The API as users import it (`checkpoint.load`, `checkpoint.load_pretrained` ...),
# defined in the modules named in the docstring.
from vit_jax.param_trees import (  # pylint: disable=unused-import
    Params, SEP, unflatten)
from vit_jax.checkpoint_layouts import (  # pylint: disable=unused-import
    POSEMB_KEY, HEAD_KEYS, OPT_TARGET_PREFIX, BIG_VISION_PREFIX, BIT_PREFIX,
    is_bit_layout, bit_to_params, normalize_layout)
from vit_jax.model_fit import (  # pylint: disable=unused-import
    ResNetArchitecture, resnet_architecture, bit_preset_name, ModelMismatchError,
    vit_architecture, guess_presets, _config_get, _resolve_config, model_family,
    abstract_params, check_params)
from vit_jax.npz_reader import (  # pylint: disable=unused-import
    MAX_NPZ_BYTES_ENV, DEFAULT_MAX_NPZ_BYTES, ArraySpec, format_bytes, max_npz_bytes,
    machine_memory_limit,
    check_weights, load_flat, load)
from vit_jax.patch_grid import (  # pylint: disable=unused-import
    num_prefix_tokens, infer_grid, patch_stride, infer_image_size, POSEMB_METHODS,
    resize_posemb, MIXER_GRID_KEY, mixer_tokens, mixer_grid)
from vit_jax.finetune import (  # pylint: disable=unused-import
    load_pretrained, mixer_regrid_factor, widen_token_mixing)


# `save` layouts: ours (the published ViT files'), or the BiT-M release's.
LAYOUTS = ('published', 'bit')


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
