"""BiT ResNets: the paper's CNN baseline and the stem of the R50+ViT hybrid.

Both use weight-standardised convolutions followed (or preceded) by
GroupNorm, which makes them independent of the batch size: no batch
statistics, so the training loop treats a ResNet exactly like a ViT.

- `ResNetV2` is the BiT baseline (Kolesnikov et al., 2020): pre-activation
  bottleneck units (GN -> ReLU -> conv).
- `hybrid_stem` is the ResNet stem of the published R50+ViT-B/16 checkpoints:
  post-activation bottleneck units (conv -> GN -> ReLU) whose parameter names
  (`conv_root`, `gn_root`, `block{n}/unit{m}/conv1..`) match those files.
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any
Array = jax.Array

# Added to the kernel's standard deviation, as the published hybrid weights expect.
WEIGHT_STD_EPSILON = 1e-5
STEM_STRIDE = 4  # 7x7/2 root conv, then 3x3/2 max pool


class StdConv(nn.Conv):
  """Convolution whose kernel is standardised (zero mean, unit std) per output channel."""

  def param(self, name: str, *args, **kwargs):
    value = super().param(name, *args, **kwargs)
    if name == 'kernel':
      axes = tuple(range(value.ndim - 1))
      mean = jnp.mean(value, axis=axes, keepdims=True)
      std = jnp.std(value, axis=axes, keepdims=True)
      value = (value - mean) / (std + WEIGHT_STD_EPSILON)
    return value


def _conv(features: int, kernel: int, stride: int, name: str, dtype: Dtype) -> StdConv:
  return StdConv(features, (kernel, kernel), strides=(stride, stride), use_bias=False,
                 padding='SAME', dtype=dtype, name=name)


def _group_norm(name: str, dtype: Dtype, zero_scale: bool = False) -> nn.GroupNorm:
  scale_init = nn.initializers.zeros if zero_scale else nn.initializers.ones
  return nn.GroupNorm(num_groups=32, dtype=dtype, scale_init=scale_init, name=name)


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
  """Pre-activation bottleneck (GN -> ReLU -> conv) of ResNetV2 / BiT."""
  features: int
  stride: int = 1
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    out_features = self.features * 4
    x_pre = nn.relu(_group_norm('gn1', self.dtype)(x))
    residual = x
    if self.stride != 1 or x.shape[-1] != out_features:
      residual = _conv(out_features, 1, self.stride, 'conv_proj', self.dtype)(x_pre)
    y = _conv(self.features, 1, 1, 'conv1', self.dtype)(x_pre)
    y = nn.relu(_group_norm('gn2', self.dtype)(y))
    y = _conv(self.features, 3, self.stride, 'conv2', self.dtype)(y)
    y = nn.relu(_group_norm('gn3', self.dtype)(y))
    y = _conv(out_features, 1, 1, 'conv3', self.dtype)(y)
    return residual + y


class ResNetStage(nn.Module):
  """`num_units` bottleneck units; the first one may downsample."""
  num_units: int
  features: int
  first_stride: int
  preact: bool
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    unit_cls = PreActBottleneckUnit if self.preact else BottleneckUnit
    for i in range(self.num_units):
      stride = self.first_stride if i == 0 else 1
      x = unit_cls(self.features, stride, self.dtype, name=f'unit{i + 1}')(x)
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
  """BiT ResNetV2 classifier with the same call signature as `VisionTransformer`."""
  num_classes: int
  num_layers: Sequence[int]
  width_factor: float = 1
  width: int = 64  # base width before `width_factor`; tiny test models shrink it
  dtype: Dtype = jnp.float32
  head_bias_init: float = 0.0

  @nn.compact
  def __call__(self, images: Array, *, train: bool = False,
               return_attention: bool = False) -> tuple[Array, dict]:
    del train  # GroupNorm and no dropout: train and eval compute the same function.
    if return_attention:
      raise ValueError('ResNetV2 has no attention weights to return')
    if images.ndim != 4 or images.shape[-1] != 3:
      raise ValueError(
          f'images must be (batch, height, width, 3), got shape {images.shape}')
    width = int(self.width * self.width_factor)
    x = _conv(width, 7, 2, 'conv_root', self.dtype)(images.astype(self.dtype))
    x = nn.max_pool(x, (3, 3), strides=(2, 2), padding='SAME')
    strides = stage_strides(len(self.num_layers))
    for i, (units, stride) in enumerate(zip(self.num_layers, strides)):
      x = ResNetStage(units, width * 2**i, stride, preact=True, dtype=self.dtype,
                      name=f'block{i + 1}')(x)
    x = nn.relu(nn.GroupNorm(num_groups=32, dtype=self.dtype, name='norm_pre_head')(x))
    out = {'feature_map': x}
    x = jnp.mean(x, axis=(1, 2))
    out['pre_logits'] = x
    logits = nn.Dense(
        self.num_classes, dtype=self.dtype, kernel_init=nn.initializers.zeros,
        bias_init=nn.initializers.constant(self.head_bias_init), name='head')(x)
    return logits.astype(jnp.float32), out
