"""The patch grid a parameter tree was made for, and resampling position embeddings to another.

The grid is read off the position embeddings (a ViT) or the token-mixing MLP (a
Mixer), given the class-token count and patch stride of the model's config.
When the resolution (so the grid) changes, `resize_posemb` resamples the
embeddings in 2-D -- by default linearly with corner alignment, as the reference
implementation's `scipy.ndimage.zoom(order=1)` does; 'bicubic' is timm's.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Optional

import numpy as np

from vit_jax.checkpoint_layouts import POSEMB_KEY
from vit_jax.model_fit import _config_get, _resolve_config
from vit_jax.param_trees import _as_flat, _shape, _to_numpy


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
