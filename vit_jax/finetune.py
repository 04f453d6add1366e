"""Adapting a pre-trained checkpoint to a model for a new task (`load_pretrained`).

The paper's fine-tuning start: a fresh zero-initialised head for a new class
count, no representation layer unless the new model has one, position
embeddings resampled in 2-D when the patch grid changes (`vit_jax.posemb`), and
an MLP-Mixer's token-mixing MLPs widened block-diagonally for a larger grid.
Anything else that does not fit is an error naming the keys and both shapes,
checked from the file's headers before any data is read.
"""

from __future__ import annotations

import math
import os
from typing import Any, Mapping, Optional, Union

from absl import logging
import numpy as np

from vit_jax.checkpoint_layouts import HEAD_KEYS, POSEMB_KEY, normalize_layout
from vit_jax.model_fit import (
    _MIXER_TOKEN_RE, _check_resnet_fit, _raise_if_problems, _resolve_config, model_family)
from vit_jax.npz_reader import check_weights, load_flat, read_npz_specs
from vit_jax.param_trees import Params, PathLike, _shape, _to_numpy, flatten, unflatten
from vit_jax.patch_grid import (
    MIXER_GRID_KEY, _check_posemb_method, _grid_pair, mixer_tokens, num_prefix_tokens,
    patch_stride, resize_posemb)


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
    # A head of another class count is replaced by a fresh one: its data is never read.
    other_head = [k for k in HEAD_KEYS if k in specs and k in init
                  and tuple(specs[k].shape) != _shape(init[k])]
    restored = load_flat(path_or_params, without_head=bool(other_head))
    for key in other_head:
      logging.info('load_pretrained: replacing %s %s with the fresh %s (class count differs; '
                   'not read)', key, tuple(specs[key].shape), _shape(init[key]))
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
