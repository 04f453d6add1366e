"""The layouts checkpoints are found in, and their mapping onto the published one.

The published layout keys each array by its '/'-joined path in the Flax params
tree (`Transformer/encoderblock_0/LayerNorm_0/scale`), as the released
`ViT-B_16.npz` files are. Others found in the wild are normalised to it:

- `opt/target/...`: old dumps of a whole optimizer state; the prefix is dropped.
- `params/...` (big_vision): the prefix is dropped and big_vision's module names
  (`MultiHeadDotProductAttention_0`, `LayerNorm_1`, `MlpBlock_0`, top-level
  `pos_embedding`, layers stacked under `Transformer/encoderblock/` when scanned)
  are renamed to ours.
- `resnet/...` (the BiT-M release, `BiT-M-R50x1.npz` ...): renamed to our
  ResNetV2 tree (`bit_to_params`); `params_to_bit` writes it back, so a round
  trip is exact.
"""

from __future__ import annotations

import math
import re
from typing import Any, Mapping

from absl import logging
import numpy as np

from vit_jax.param_trees import SEP, _as_flat, _to_numpy


POSEMB_KEY = 'Transformer/posembed_input/pos_embedding'
HEAD_KEYS = ('head/kernel', 'head/bias')
# Prefixes that other tools put in front of the published keys.
OPT_TARGET_PREFIX = 'opt/target/'
BIG_VISION_PREFIX = 'params/'
# Every key of a BiT-M release file starts with this.
BIT_PREFIX = 'resnet/'


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
