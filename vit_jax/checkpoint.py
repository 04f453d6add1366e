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

`load_pretrained` turns a pre-trained tree into the starting point of a
fine-tuning run, the way the paper does: a fresh zero-initialised head for a new
class count, no representation layer unless the new model has one, and position
embeddings resampled in 2-D when the resolution (so the patch grid) changes --
by default linearly with corner alignment, as the reference implementation's
`scipy.ndimage.zoom(order=1)` does (`resize_posemb`).
Anything else that does not fit is an error naming the keys and both shapes.

Files are always opened with `allow_pickle=False`: a checkpoint is data and must
not be able to run code.
"""

from __future__ import annotations

import math
import os
import tempfile
import zipfile
from typing import Any, Mapping, Optional, Union

from absl import logging
import numpy as np

PathLike = Union[str, os.PathLike]
Params = dict

SEP = '/'
POSEMB_KEY = 'Transformer/posembed_input/pos_embedding'
HEAD_KEYS = ('head/kernel', 'head/bias')
# Prefixes that other tools put in front of the published keys.
OPT_TARGET_PREFIX = 'opt/target/'
BIG_VISION_PREFIX = 'params/'


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
# load / save
# ---------------------------------------------------------------------------

def _read_npz(path: PathLike) -> dict[str, np.ndarray]:
  """All arrays of an .npz, read eagerly; every failure is a ValueError naming the file."""
  path = os.fspath(path)
  if not os.path.exists(path):
    raise FileNotFoundError(f'Checkpoint file {path!r} does not exist')
  try:
    archive = np.load(path, allow_pickle=False)
    if not isinstance(archive, np.lib.npyio.NpzFile):
      raise ValueError('it holds a single .npy array, not an .npz archive of named arrays')
    with archive:
      flat = {key: archive[key] for key in archive.files}
  except ValueError as e:
    message = str(e)
    if 'pickle' in message or 'Object arrays' in message:
      raise ValueError(
          f'Cannot read checkpoint {path!r}: it is not an .npz of plain numeric '
          'arrays -- reading it would need unpickling Python objects (a pickle '
          'file, object arrays, or not numpy data at all), which is refused for '
          'safety (allow_pickle=False)') from None
    raise ValueError(f'Cannot read checkpoint {path!r}: {message}') from None
  except (zipfile.BadZipFile, EOFError, OSError, KeyError, zipfile.LargeZipFile) as e:
    raise ValueError(
        f'Cannot read checkpoint {path!r}: the file is truncated or is not a valid '
        f'.npz archive ({type(e).__name__}: {e})') from None
  if not flat:
    raise ValueError(f'Checkpoint {path!r} contains no arrays')
  for key, value in flat.items():
    if value.dtype.kind not in 'biuf':
      raise ValueError(
          f'Checkpoint {path!r}: array {key!r} has unsupported dtype {value.dtype} '
          '(expected numeric parameters)')
  return flat


def _select_prefix(flat: dict[str, Any], prefix: str, source: str) -> dict[str, Any]:
  """The entries under `prefix`, without it; others (optimizer state, step) are dropped."""
  kept = {k[len(prefix):]: v for k, v in flat.items() if k.startswith(prefix)}
  dropped = len(flat) - len(kept)
  logging.info('%s: reading the %d arrays under %r%s', source, len(kept), prefix,
               f', ignoring {dropped} others' if dropped else '')
  return kept


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


def normalize_layout(flat: dict[str, Any], source: str = 'params') -> dict[str, Any]:
  """Puts other layouts' keys in the published layout (see the module docstring).

  Also reshapes GroupNorm scales/biases stored as (1, 1, 1, C) by old hybrid
  checkpoints to the (C,) of Flax linen.
  """
  if any(k.startswith(OPT_TARGET_PREFIX) for k in flat):
    flat = _select_prefix(flat, OPT_TARGET_PREFIX, source)
  big_vision = False
  if any(k.startswith(BIG_VISION_PREFIX) for k in flat):
    flat = _select_prefix(flat, BIG_VISION_PREFIX, source)
    big_vision = True
  if big_vision or _is_big_vision(flat):
    logging.info('%s: renaming big_vision module names to the published layout', source)
    flat = _from_big_vision(flat)
  for key, value in list(flat.items()):
    if _is_group_norm(key) and value.ndim > 1 and value.shape[-1] == value.size:
      logging.info('%s: reshaping GroupNorm %s %s -> (%d,)', source, key, value.shape, value.size)
      flat[key] = value.reshape(-1)
  return flat


def load_flat(path: PathLike) -> dict[str, np.ndarray]:
  """The checkpoint at `path` as {'/'-joined path: array}, in the published layout."""
  return normalize_layout(_read_npz(path), source=os.fspath(path))


def load(path: PathLike) -> Params:
  """Loads an .npz checkpoint into a nested params dict of numpy arrays.

  Raises:
    FileNotFoundError: no such file.
    ValueError: the file is truncated, not an .npz, holds pickled objects or
      non-numeric arrays, or its keys do not form a tree. The message names the file.
  """
  flat = load_flat(path)
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


def save(params: Mapping, path: PathLike) -> None:
  """Writes `params` (nested dict of arrays) as a flat .npz in the published layout.

  The file is written to a temporary name in the same directory and renamed
  over `path` only once complete, so a crash never leaves a half-written file.
  """
  path = os.fspath(path)
  flat = {k: _savable(k, v) for k, v in flatten(params).items()}
  if not flat:
    raise ValueError('Refusing to save an empty parameter tree')
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  fd, tmp_path = tempfile.mkstemp(
      dir=directory, prefix=f'.{os.path.basename(path)}.', suffix='.tmp')
  try:
    with os.fdopen(fd, 'wb') as f:
      np.savez(f, **flat)  # a file object: numpy does not append '.npz'
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp_path, path)
  except BaseException:
    if os.path.exists(tmp_path):
      os.remove(tmp_path)
    raise
  logging.info('Saved %d arrays to %s', len(flat), path)


def inspect(path_or_params: Union[PathLike, Mapping], print_fn=print) -> list[tuple[str, tuple, str]]:
  """Prints (and returns) every key with its shape and dtype, plus the total count."""
  if isinstance(path_or_params, Mapping):
    flat = {k: _to_numpy(v) if not hasattr(v, 'shape') else v
            for k, v in flatten(path_or_params).items()}
  else:
    flat = load_flat(path_or_params)
  rows = [(k, tuple(v.shape), str(v.dtype)) for k, v in sorted(flat.items())]
  width = max(len(k) for k, _, _ in rows)
  total = 0
  for key, shape, dtype in rows:
    print_fn(f'{key:<{width}}  {str(shape):<22} {dtype}')
    total += math.prod(shape)
  print_fn(f'{len(rows)} arrays, {total:,} parameters')
  return rows


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

  Only square grids can be read off a flat token count; others raise ValueError.
  """
  flat = _as_flat(params_or_flat)
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
  """'vit', 'hybrid' (R50+ViT), 'resnet' (BiT) or 'unknown', from the key set."""
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


def load_pretrained(path_or_params: Union[PathLike, Mapping], init_params: Mapping,
                    model_config: Any, *,
                    image_size: Union[int, tuple[int, int], None] = None,
                    posemb_method: str = 'linear',
                    source_grid: Optional[tuple[int, int]] = None) -> Params:
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

  Returns:
    A params tree shaped and typed like `init_params` (numpy arrays). Every
    change made (head replaced, representation layer dropped, position
    embeddings resized, shapes squeezed) is logged.

  Raises:
    ValueError: listing every missing key, unexpected key and shape mismatch
      (both shapes), or a checkpoint of another model family.
  """
  config = _resolve_config(model_config)
  # Checked up front so that a typo in a config fails even when no resize is needed.
  _check_posemb_method(posemb_method)
  if image_size is not None:
    from vit_jax.configs.image_size import image_hw  # pylint: disable=g-import-not-at-top
    image_size = image_hw(image_size)
  if source_grid is not None:
    source_grid = _grid_pair(source_grid, 'source_grid')
  if isinstance(path_or_params, Mapping):
    source = 'params'
    restored = normalize_layout(
        {k: _to_numpy(v) for k, v in flatten(path_or_params).items()})
  else:
    source = os.fspath(path_or_params)
    restored = load_flat(path_or_params)
  init = flatten(init_params)

  family_ckpt, family_model = model_family(restored), model_family(init)
  if family_ckpt != family_model:
    raise ValueError(
        f'Checkpoint {source!r} looks like a {family_ckpt!r} model but the target '
        f'model is {family_model!r}; e.g. checkpoint keys '
        f'{sorted(restored)[:4]} vs model keys {sorted(init)[:4]}')

  out: dict[str, np.ndarray] = {}
  missing, mismatched, notes = [], [], []

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
  if missing or unexpected or mismatched:
    parts = [f'Checkpoint {source!r} does not fit the model:']
    if missing:
      parts.append(_format_problems('missing keys', missing))
    if unexpected:
      parts.append(_format_problems('unexpected keys', unexpected))
    if mismatched:
      parts.append(_format_problems('shape mismatches', mismatched))
    raise ValueError('\n'.join(parts))

  result = {}
  for key, target in init.items():
    result[key] = np.asarray(out[key]).astype(np.dtype(target.dtype), copy=False)
  logging.info('load_pretrained: %d arrays from %s%s', len(result), source,
               f' ({"; ".join(notes)})' if notes else ', no changes')
  return unflatten(result)


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


def check_params(params: Mapping, expected: Mapping, source: str = 'params') -> None:
  """ValueError listing every missing/unexpected key and shape mismatch (both shapes)."""
  have, want = flatten(params), flatten(expected)
  missing = [f'{k}: model {_shape(v)}, not in {source}' for k, v in sorted(want.items())
             if k not in have]
  unexpected = [f'{k}: {source} {_shape(v)}, not in model' for k, v in sorted(have.items())
                if k not in want]
  mismatched = [f'{k}: {source} {_shape(have[k])} vs model {_shape(v)}'
                for k, v in sorted(want.items()) if k in have and _shape(have[k]) != _shape(v)]
  if missing or unexpected or mismatched:
    parts = [f'{source} does not fit the model:']
    if missing:
      parts.append(_format_problems('missing keys', missing))
    if unexpected:
      parts.append(_format_problems('unexpected keys', unexpected))
    if mismatched:
      parts.append(_format_problems('shape mismatches', mismatched))
    raise ValueError('\n'.join(parts))
