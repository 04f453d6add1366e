"""BiT ResNets: the paper's CNN baseline and the stem of the R50+ViT hybrid.

Both use weight-standardised convolutions followed (or preceded) by
GroupNorm, which makes them independent of the batch size: no batch
statistics, so the training loop treats a ResNet exactly like a ViT.

- `ResNetV2` is the BiT baseline (Kolesnikov et al., 2020): pre-activation
  bottleneck units (GN -> ReLU -> conv). With its default fields it computes
  what the BiT reference (and so the BiT-M checkpoints) computes: explicit
  symmetric padding (3 for the 7x7 root conv, 1 for the 3x3 convs), a zero pad
  of 1 before a 3x3/2 max-pool without padding, weight standardisation
  (w - mean) / sqrt(var + 1e-10) and GroupNorm epsilon 1e-5.
  `vit_jax.checkpoint` maps its tree to the BiT-M file layout and back.
- `hybrid_stem` is the ResNet stem of the published R50+ViT-B/16 checkpoints:
  post-activation bottleneck units (conv -> GN -> ReLU) whose parameter names
  (`conv_root`, `gn_root`, `block{n}/unit{m}/conv1..`) match those files. It
  keeps the numerics those weights were trained with: TensorFlow 'SAME'
  padding, (w - mean) / (std + 1e-5) and flax's GroupNorm epsilon 1e-6.
"""

from __future__ import annotations

from typing import Any, Sequence

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any
Array = jax.Array

# Added to the kernel's standard deviation, as the published hybrid weights expect.
WEIGHT_STD_EPSILON = 1e-5
# The BiT reference adds its epsilon to the variance, inside the square root.
BIT_WEIGHT_STD_EPSILON = 1e-10
# flax.linen.GroupNorm's default, which the hybrid weights were trained with.
HYBRID_GN_EPSILON = 1e-6
# The BiT reference's GroupNorm epsilon (its PyTorch port's).
BIT_GN_EPSILON = 1e-5
STEM_STRIDE = 4  # 7x7/2 root conv, then 3x3/2 max pool

PADDINGS = ('explicit', 'same')
WEIGHT_STDS = ('var', 'std')


class StdConv(nn.Conv):
  """Convolution whose kernel is standardised per output channel over (kh, kw, c_in).

  `weight_std='std'` (the default, the hybrid's) divides by std + epsilon;
  `'var'` (BiT's) by sqrt(var + epsilon). The two differ by far more than
  float32 rounding for small epsilons, so each checkpoint needs its own.
  """
  weight_std: str = 'std'
  epsilon: float = WEIGHT_STD_EPSILON

  def param(self, name: str, *args, **kwargs):
    value = super().param(name, *args, **kwargs)
    if name == 'kernel':
      axes = tuple(range(value.ndim - 1))
      mean = jnp.mean(value, axis=axes, keepdims=True)
      var = jnp.var(value, axis=axes, keepdims=True)
      if self.weight_std == 'var':
        value = (value - mean) * jax.lax.rsqrt(var + self.epsilon)
      elif self.weight_std == 'std':
        value = (value - mean) / (jnp.sqrt(var) + self.epsilon)
      else:
        raise ValueError(f'weight_std must be one of {WEIGHT_STDS}, got {self.weight_std!r}')
    return value


def _conv(features: int, kernel: int, stride: int, name: str, dtype: Dtype,
          padding: str = 'same', weight_std: str = 'std',
          epsilon: float = WEIGHT_STD_EPSILON) -> StdConv:
  if padding == 'explicit':
    # Symmetric (k - 1) // 2 on each side, as the BiT reference pads; TF 'SAME'
    # puts the odd pixel at the end, which shifts strided convs by one pixel.
    pad = (kernel - 1) // 2
    conv_padding: Any = ((pad, pad), (pad, pad))
  elif padding == 'same':
    conv_padding = 'SAME'
  else:
    raise ValueError(f'padding must be one of {PADDINGS}, got {padding!r}')
  return StdConv(features, (kernel, kernel), strides=(stride, stride), use_bias=False,
                 padding=conv_padding, dtype=dtype, weight_std=weight_std,
                 epsilon=epsilon, name=name)


def _group_norm(name: str, dtype: Dtype, zero_scale: bool = False,
                epsilon: float = HYBRID_GN_EPSILON) -> nn.GroupNorm:
  scale_init = nn.initializers.zeros if zero_scale else nn.initializers.ones
  return nn.GroupNorm(num_groups=32, epsilon=epsilon, dtype=dtype, scale_init=scale_init,
                      name=name)


class BottleneckUnit(nn.Module):
  """Post-activation bottleneck (conv -> GN -> ReLU), as in the hybrid stem."""
  features: int
  stride: int = 1
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    out_features = self.features * 4
    residual = x
    if self.stride != 1 or x.shape[-1] != out_features:
      residual = _conv(out_features, 1, self.stride, 'conv_proj', self.dtype)(x)
      residual = _group_norm('gn_proj', self.dtype)(residual)
    y = nn.relu(_group_norm('gn1', self.dtype)(
        _conv(self.features, 1, 1, 'conv1', self.dtype)(x)))
    y = nn.relu(_group_norm('gn2', self.dtype)(
        _conv(self.features, 3, self.stride, 'conv2', self.dtype)(y)))
    # Zero-initialised last norm: each unit starts as the identity.
    y = _group_norm('gn3', self.dtype, zero_scale=True)(
        _conv(out_features, 1, 1, 'conv3', self.dtype)(y))
    return nn.relu(residual + y)


class PreActBottleneckUnit(nn.Module):
  """Pre-activation bottleneck (GN -> ReLU -> conv) of ResNetV2 / BiT.

  GN1 + ReLU feeds both conv1 and the projection; the stride is in the 3x3
  conv2; the residual is added after conv3 with no activation.
  """
  features: int
  stride: int = 1
  dtype: Dtype = jnp.float32
  padding: str = 'explicit'
  weight_std: str = 'var'
  weight_std_epsilon: float = BIT_WEIGHT_STD_EPSILON
  gn_epsilon: float = BIT_GN_EPSILON

  @nn.compact
  def __call__(self, x: Array) -> Array:
    conv = lambda features, kernel, stride, name: _conv(
        features, kernel, stride, name, self.dtype, self.padding, self.weight_std,
        self.weight_std_epsilon)
    norm = lambda name: _group_norm(name, self.dtype, epsilon=self.gn_epsilon)
    out_features = self.features * 4
    x_pre = nn.relu(norm('gn1')(x))
    residual = x
    if self.stride != 1 or x.shape[-1] != out_features:
      residual = conv(out_features, 1, self.stride, 'conv_proj')(x_pre)
    y = conv(self.features, 1, 1, 'conv1')(x_pre)
    y = nn.relu(norm('gn2')(y))
    y = conv(self.features, 3, self.stride, 'conv2')(y)
    y = nn.relu(norm('gn3')(y))
    y = conv(out_features, 1, 1, 'conv3')(y)
    return residual + y


class ResNetStage(nn.Module):
  """`num_units` bottleneck units; the first one may downsample.

  `unit_kwargs` (pre-activation units only) carries ResNetV2's numerics fields.
  """
  num_units: int
  features: int
  first_stride: int
  preact: bool
  dtype: Dtype = jnp.float32
  unit_kwargs: Any = None

  @nn.compact
  def __call__(self, x: Array) -> Array:
    unit_cls = PreActBottleneckUnit if self.preact else BottleneckUnit
    kwargs = dict(self.unit_kwargs or {})
    for i in range(self.num_units):
      stride = self.first_stride if i == 0 else 1
      x = unit_cls(self.features, stride, self.dtype, name=f'unit{i + 1}', **kwargs)(x)
    return x


def stage_strides(num_stages: int) -> list[int]:
  return [1] + [2] * (num_stages - 1)


def hybrid_stem_stride(resnet: dict) -> int:
  """Pixels per output position of `hybrid_stem` with this config."""
  stride = STEM_STRIDE
  for s in stage_strides(len(resnet['num_layers'])):
    stride *= s
  return stride


def hybrid_stem(x: Array, num_layers: Sequence[int], width_factor: float,
                dtype: Dtype) -> Array:
  """The ResNet part of R50+ViT, built in the caller's scope.

  Called from inside `VisionTransformer.__call__` so its modules sit at the top
  of the parameter tree (`conv_root`, `gn_root`, `block1` ...) exactly where the
  published hybrid checkpoints have them.
  """
  width = int(64 * width_factor)
  x = _conv(width, 7, 2, 'conv_root', dtype)(x)
  x = nn.relu(_group_norm('gn_root', dtype)(x))
  x = nn.max_pool(x, (3, 3), strides=(2, 2), padding='SAME')
  for i, (units, stride) in enumerate(zip(num_layers, stage_strides(len(num_layers)))):
    x = ResNetStage(units, width * 2**i, stride, preact=False, dtype=dtype,
                    name=f'block{i + 1}')(x)
  return x


class ResNetV2(nn.Module):
  """BiT ResNetV2 classifier with the same call signature as `VisionTransformer`.

  The numerics fields default to the BiT reference's (see the module
  docstring); `padding='same'`, `weight_std='std'`, `weight_std_epsilon=1e-5`,
  `gn_epsilon=1e-6` give the hybrid stem's choices instead.
  """
  num_classes: int
  num_layers: Sequence[int]
  width_factor: float = 1
  width: int = 64  # base width before `width_factor`; tiny test models shrink it
  dtype: Dtype = jnp.float32
  head_bias_init: float = 0.0
  padding: str = 'explicit'  # 'explicit' (BiT's symmetric pads) or 'same' (TF 'SAME')
  weight_std: str = 'var'  # 'var': / sqrt(var + eps) (BiT); 'std': / (std + eps)
  weight_std_epsilon: float = BIT_WEIGHT_STD_EPSILON
  gn_epsilon: float = BIT_GN_EPSILON

  @nn.compact
  def __call__(self, images: Array, *, train: bool = False,
               return_attention: bool = False) -> tuple[Array, dict]:
    del train  # GroupNorm and no dropout: train and eval compute the same function.
    if return_attention:
      raise ValueError('ResNetV2 has no attention weights to return')
    if images.ndim != 4 or images.shape[-1] != 3:
      raise ValueError(
          f'images must be (batch, height, width, 3), got shape {images.shape}')
    if self.padding not in PADDINGS:
      raise ValueError(f'padding must be one of {PADDINGS}, got {self.padding!r}')
    width = int(self.width * self.width_factor)
    unit_kwargs = dict(padding=self.padding, weight_std=self.weight_std,
                       weight_std_epsilon=self.weight_std_epsilon,
                       gn_epsilon=self.gn_epsilon)
    x = _conv(width, 7, 2, 'conv_root', self.dtype, self.padding, self.weight_std,
              self.weight_std_epsilon)(images.astype(self.dtype))
    if self.padding == 'explicit':
      # BiT pads the root conv's output (no norm or ReLU before the pool in a
      # pre-activation net) with zeros, not -inf, so a border pixel's max is
      # at least 0; then pools without padding.
      x = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
      x = nn.max_pool(x, (3, 3), strides=(2, 2), padding='VALID')
    else:
      x = nn.max_pool(x, (3, 3), strides=(2, 2), padding='SAME')
    strides = stage_strides(len(self.num_layers))
    for i, (units, stride) in enumerate(zip(self.num_layers, strides)):
      x = ResNetStage(units, width * 2**i, stride, preact=True, dtype=self.dtype,
                      unit_kwargs=flax.core.FrozenDict(unit_kwargs),
                      name=f'block{i + 1}')(x)
    x = nn.relu(nn.GroupNorm(num_groups=32, epsilon=self.gn_epsilon, dtype=self.dtype,
                             name='norm_pre_head')(x))
    out = {'feature_map': x}
    x = jnp.mean(x, axis=(1, 2))
    out['pre_logits'] = x
    logits = nn.Dense(
        self.num_classes, dtype=self.dtype, kernel_init=nn.initializers.zeros,
        bias_init=nn.initializers.constant(self.head_bias_init), name='head')(x)
    return logits.astype(jnp.float32), out
