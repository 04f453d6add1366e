"""MLP-Mixer, as in Tolstikhin et al. 2021, "MLP-Mixer: An all-MLP Architecture for Vision".

The forward pass is the paper's equations (Sec. 2), one module each:

  X        = per-patch linear embedding of the image            `MlpMixer.stem` (a P x P / P conv)
  U_{*,i}  = X_{*,i} + W_2 GELU(W_1 LN(X)_{*,i})  (i: channel)  `MixerBlock.token_mixing`
  Y_{j,*}  = U_{j,*} + W_4 GELU(W_3 LN(U)_{j,*})  (j: patch)    `MixerBlock.channel_mixing`
  y        = head(mean over patches of LN(Y))                  `pre_head_layer_norm`, `head`

No class token and no position embeddings: the token-mixing MLP sees every
patch position through its own weights, so its `Dense_0` kernel is
(num_patches, tokens_mlp_dim) and a model is tied to its patch grid
(`vit_jax.checkpoint.load_pretrained` widens it for a larger grid as the
paper's Appendix describes, or refuses).

Sub-modules are named as in the published `Mixer-B_16.npz` files (`stem`,
`MixerBlock_0/token_mixing/Dense_0`, `pre_head_layer_norm`, `head`), so
`checkpoint.load` hands their arrays over without renaming. Numerics are those
of the released code: LayerNorm epsilon 1e-6, the tanh GELU of `flax.linen.gelu`
(`approximate_gelu=False` selects timm's exact erf form), global average
pooling and a zero-initialised head. Like the other families, `__call__`
returns `(logits, out)` with `out['pre_logits']` the pooled representation.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from vit_jax import models_vit

Dtype = Any
Array = jax.Array

# The released Mixer code's LayerNorm: flax's default epsilon, as ViT's.
LAYER_NORM_EPSILON = models_vit.LAYER_NORM_EPSILON


class MlpBlock(nn.Module):
  """Dense -> GELU -> Dense over the last axis, back to its width."""
  mlp_dim: int
  dtype: Dtype = jnp.float32
  approximate_gelu: bool = True

  @nn.compact
  def __call__(self, x: Array) -> Array:
    dense = functools.partial(nn.Dense, dtype=self.dtype)
    y = dense(self.mlp_dim, name='Dense_0')(x)
    y = nn.gelu(y, approximate=True) if self.approximate_gelu else models_vit.gelu(y)
    return dense(x.shape[-1], name='Dense_1')(y)


class MixerBlock(nn.Module):
  """One Mixer layer: token mixing across patches, then channel mixing per patch.

  `drop_path_rate`: stochastic depth on both residual branches (`models_vit.DropPath`).
  """
  tokens_mlp_dim: int
  channels_mlp_dim: int
  dtype: Dtype = jnp.float32
  approximate_gelu: bool = True
  drop_path_rate: float = 0.0

  @nn.compact
  def __call__(self, x: Array, *, deterministic: bool = True) -> Array:
    drop_path = functools.partial(models_vit.DropPath(self.drop_path_rate),
                                  deterministic=deterministic)
    norm = lambda name: nn.LayerNorm(epsilon=LAYER_NORM_EPSILON, dtype=self.dtype, name=name)
    mlp = lambda dim, name: MlpBlock(dim, dtype=self.dtype,
                                     approximate_gelu=self.approximate_gelu, name=name)
    # (batch, tokens, channels) -> (batch, channels, tokens): the MLP mixes tokens.
    y = jnp.swapaxes(norm('LayerNorm_0')(x), 1, 2)
    y = jnp.swapaxes(mlp(self.tokens_mlp_dim, 'token_mixing')(y), 1, 2)
    x = x + drop_path(y)
    return x + drop_path(mlp(self.channels_mlp_dim, 'channel_mixing')(norm('LayerNorm_1')(x)))


class MlpMixer(nn.Module):
  """Mixer classifier with the call signature of `VisionTransformer`.

  Attributes mirror the presets in `vit_jax.configs.models` (`mixer_config`).
  `__call__(images, train=...)` takes NHWC images scaled to [-1, 1] and returns
  `(logits, out)`; `out` holds the encoded tokens and `pre_logits`.
  """
  num_classes: int
  patches: Sequence[int]
  hidden_dim: int
  num_blocks: int
  tokens_mlp_dim: int
  channels_mlp_dim: int
  dtype: Dtype = jnp.float32
  head_bias_init: float = 0.0
  approximate_gelu: bool = True
  # Rate at the last block, 0 at the first, linear between (as ViT's); 0: off.
  stochastic_depth: float = 0.0

  @property
  def patch_stride(self) -> tuple[int, int]:
    return (self.patches[0], self.patches[1])

  def check_input(self, x: Array) -> None:
    if x.ndim != 4 or x.shape[-1] != 3:
      raise ValueError(f'images must be (batch, height, width, 3), got shape {x.shape}')
    ph, pw = self.patch_stride
    if x.shape[1] % ph or x.shape[2] % pw:
      raise ValueError(f'image size {x.shape[1]}x{x.shape[2]} is not divisible by the patch '
                       f'size {ph}x{pw}')

  @nn.compact
  def __call__(self, images: Array, *, train: bool = False,
               return_attention: bool = False) -> tuple[Array, dict]:
    if return_attention:
      raise ValueError('MlpMixer has no attention weights to return')
    self.check_input(images)
    patches = tuple(self.patches)
    x = nn.Conv(self.hidden_dim, patches, strides=patches, padding='VALID',
                dtype=self.dtype, name='stem')(images.astype(self.dtype))
    batch, height, width, channels = x.shape
    x = x.reshape(batch, height * width, channels)
    rates = models_vit.drop_path_rates(self.stochastic_depth, self.num_blocks)
    for i, rate in enumerate(rates):
      x = MixerBlock(self.tokens_mlp_dim, self.channels_mlp_dim, dtype=self.dtype,
                     approximate_gelu=self.approximate_gelu, drop_path_rate=rate,
                     name=f'MixerBlock_{i}')(x, deterministic=not train)
    x = nn.LayerNorm(epsilon=LAYER_NORM_EPSILON, dtype=self.dtype,
                     name='pre_head_layer_norm')(x)
    out = {'encoded': x}
    x = jnp.mean(x, axis=1)
    out['pre_logits'] = x
    logits = nn.Dense(
        self.num_classes, dtype=self.dtype, kernel_init=nn.initializers.zeros,
        bias_init=nn.initializers.constant(self.head_bias_init), name='head')(x)
    return logits.astype(jnp.float32), out
