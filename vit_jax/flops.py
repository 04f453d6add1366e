"""Analytic compute cost of a plain ViT: multiply-accumulates and FLOPs per image.

Counts the matrix products only (patch embedding, q/k/v/out projections,
attention scores and mixing, the MLP and the head); LayerNorm, softmax, GELU
and additions are a few percent at most and are left out, as is usual.

With N tokens, width D, MLP width M, L layers, patch P x P and C classes:

    MACs = L * (N * (4 D^2 + 2 D M) + 2 N^2 D) + (N - 1) P^2 3 D + D C
    FLOPs = 2 * MACs

ViT-B/16 at 224x224 is 17.56 GMACs = 35.1 GFLOPs forward. A training step
(forward, backward for activations and for weights) costs about three
forwards. Use this count for MFU: XLA's own cost analysis misses work done
inside library calls (cuBLAS, cuDNN) on GPU.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

# A backward pass costs about twice the forward pass.
TRAIN_FLOPS_FACTOR = 3


def _field(config: Any, name: str, default: Any = None) -> Any:
  if isinstance(config, dict):
    return config.get(name, default)
  return getattr(config, name, default)


def _patch_grid(config: Any, image_size: int | Sequence[int]) -> tuple[int, int, int]:
  """(patch height, patch width, patch count) of `config` at `image_size`."""
  height, width = ((image_size, image_size) if isinstance(image_size, int)
                   else tuple(image_size))
  patches = _field(config, 'patches')
  ph, pw = tuple(_field(patches, 'size', patches))
  if height % ph or width % pw:
    raise ValueError(f'image {height}x{width} is not divisible by patch {ph}x{pw}')
  return ph, pw, (height // ph) * (width // pw)


def vit_macs(config: Any, image_size: int | Sequence[int], num_classes: int) -> int:
  """Forward multiply-accumulates per image for a ViT preset config.

  `config` is a preset (`vit_jax.configs.models.get_config(...)`) or a dict
  with the same fields. Hybrid (ResNet-stem) models are not counted.
  """
  if _field(config, 'model_type', 'vit') != 'vit' or _field(config, 'resnet'):
    raise ValueError('the analytic count covers plain ViT models only')
  ph, pw, num_patches = _patch_grid(config, image_size)
  transformer = _field(config, 'transformer')
  layers = _field(transformer, 'num_layers')
  mlp = _field(transformer, 'mlp_dim')
  d = _field(config, 'hidden_size')
  tokens = num_patches + (1 if _field(config, 'classifier', 'token') == 'token' else 0)

  per_layer = tokens * (4 * d * d + 2 * d * mlp) + 2 * tokens * tokens * d
  embedding = num_patches * ph * pw * 3 * d
  representation = _field(config, 'representation_size')
  if representation:
    head = d * representation + representation * num_classes
  else:
    head = d * num_classes
  return layers * per_layer + embedding + head


def mixer_macs(config: Any, image_size: int | Sequence[int], num_classes: int) -> int:
  """Forward multiply-accumulates per image for an MLP-Mixer preset config.

  With S patches of P x P, hidden C, token-MLP D_S and channel-MLP D_C, each
  block costs C * 2 * S * D_S (token mixing, per channel) + S * 2 * C * D_C
  (channel mixing, per patch); plus the stem S * P^2 * 3 * C and the head.
  """
  ph, pw, s = _patch_grid(config, image_size)
  c = _field(config, 'hidden_dim')
  block = c * 2 * s * _field(config, 'tokens_mlp_dim') + s * 2 * c * _field(
      config, 'channels_mlp_dim')
  return _field(config, 'num_blocks') * block + s * ph * pw * 3 * c + c * num_classes


def vit_flops(config: Any, image_size: int | Sequence[int], num_classes: int,
              train: bool = False) -> int:
  """FLOPs per image (2 per MAC); `train=True` gives forward + backward.

  An MLP-Mixer config is counted with `mixer_macs`.
  """
  if _field(config, 'model_type', 'vit') == 'mixer':
    flops = 2 * mixer_macs(config, image_size, num_classes)
    return flops * TRAIN_FLOPS_FACTOR if train else flops
  flops = 2 * vit_macs(config, image_size, num_classes)
  return flops * TRAIN_FLOPS_FACTOR if train else flops


def xla_flops(compiled) -> Optional[float]:
  """FLOPs of one call of a compiled function as XLA's cost analysis counts them.

  None when the backend has no cost analysis or reports nothing. On GPU it
  undercounts (library calls such as cuBLAS are not counted): prefer the
  analytic count there.
  """
  try:
    analysis = compiled.cost_analysis()
  except Exception:  # pylint: disable=broad-except  (some backends do not implement it)
    return None
  if isinstance(analysis, (list, tuple)):
    analysis = analysis[0] if analysis else None
  if not analysis:
    return None
  flops = analysis.get('flops')
  return float(flops) if flops is not None and flops > 0 else None
