"""Vision Transformer, as in Dosovitskiy et al., "An Image is Worth 16x16 Words".

The forward pass is the paper's equations, one module each:

  (1)  z_0  = [x_class; x_p^1 E; ... ; x_p^N E] + E_pos     `VisionTransformer` + `AddPositionEmbs`
                  (E_pos learned, or fixed 2-D sin-cos: `posemb`)
  (2)  z'_l = MSA(LN(z_{l-1})) + z_{l-1}                     `Encoder1DBlock`, first residual
  (3)  z_l  = MLP(LN(z'_l)) + z'_l                           `Encoder1DBlock`, second residual
  (4)  y    = LN(z_L^0)                                      `Encoder.encoder_norm`, then the head

Sub-module names are spelled out so the parameter tree equals the published
checkpoints' (`Transformer/encoderblock_0/MultiHeadDotProductAttention_1/...`),
which lets `checkpoint.load` hand their arrays over without renaming.

Every model returns `(logits, out)`: `out` holds intermediates (the encoded
tokens, pre-logits and, on request, each layer's attention weights), so a
visualisation needs no second model.
"""

from __future__ import annotations

import functools
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from vit_jax import attention as attention_lib
from vit_jax import models_resnet
from vit_jax import remat as remat_lib

Dtype = Any
Array = jax.Array

# The published checkpoints were trained with these; changing them changes outputs.
LAYER_NORM_EPSILON = 1e-6
POSEMB_INIT_STDDEV = 0.02
# E_pos: 'learn' (the paper's, a parameter) or 'sincos2d' (fixed; "Better plain ViT baselines").
POSEMB_TYPES = ('learn', 'sincos2d')
SINCOS_TEMPERATURE = 10_000.0


def layer_norm(name: str, dtype: Dtype) -> nn.LayerNorm:
  return nn.LayerNorm(epsilon=LAYER_NORM_EPSILON, dtype=dtype, name=name)


def posemb_sincos_2d(rows: int, cols: int, width: int,
                     temperature: float = SINCOS_TEMPERATURE) -> Array:
  """Fixed 2-D sin-cos position embeddings, (1, rows * cols, width), row-major patches.

  A quarter of the channels each: sin(x w_k), cos(x w_k), sin(y w_k), cos(y w_k)
  for column x and row y, with w_k = temperature ** -(k / (width / 4 - 1)).
  """
  if width % 4 or width < 8:
    raise ValueError(f"posemb='sincos2d' needs a hidden size divisible by 4 and >= 8, "
                     f'got {width}')
  y, x = jnp.mgrid[:rows, :cols]
  omega = 1.0 / temperature ** (jnp.arange(width // 4) / (width // 4 - 1))
  x = x.reshape(-1, 1) * omega
  y = y.reshape(-1, 1) * omega
  return jnp.concatenate([jnp.sin(x), jnp.cos(x), jnp.sin(y), jnp.cos(y)], axis=1)[None]


class AddPositionEmbs(nn.Module):
  """Adds position embeddings E_pos (eq. 1), one per token.

  'learn': the paper's learned table, `pos_embedding` in the published
  checkpoints. 'sincos2d': `posemb_sincos_2d` over the patch `grid`, no
  parameter; the class token gets none (big_vision adds it before prepending
  the class token).
  """
  posemb: str = 'learn'
  grid: Optional[tuple[int, int]] = None  # (rows, cols) of patches; 'sincos2d' needs it

  @nn.compact
  def __call__(self, x: Array) -> Array:
    if self.posemb == 'sincos2d':
      rows, cols = self.grid
      table = posemb_sincos_2d(rows, cols, x.shape[2])
      table = jnp.pad(table, ((0, 0), (x.shape[1] - rows * cols, 0), (0, 0)))
      return x + table.astype(x.dtype)
    shape = (1, x.shape[1], x.shape[2])
    pos_embedding = self.param(
        'pos_embedding', nn.initializers.normal(stddev=POSEMB_INIT_STDDEV), shape)
    return x + pos_embedding.astype(x.dtype)


def gelu(x: Array) -> Array:
  """Exact GELU, x * Phi(x), written with erf (`MlpBlock(approximate_gelu=False)`).

  Same function as `nn.gelu(approximate=False)` (to 1e-6), which uses erfc.
  XLA's CPU erf is a short polynomial while erfc goes through exp: in a profiled
  ViT-S/16 CPU training step (batch 8) the activation took 31 ms instead of 68.
  """
  return 0.5 * x * (1.0 + jax.lax.erf(x * jnp.asarray(0.7071067811865476, x.dtype)))


class MlpBlock(nn.Module):
  """The MLP of eq. (3): two layers with a GELU between.

  `approximate_gelu=True` (the default) is the tanh form
  0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))): the reference code calls
  `flax.linen.gelu` with its default `approximate=True`, so the published
  checkpoints were trained with it. `False` is the exact erf form (`gelu`),
  which timm and Hugging Face compute: use it for weights converted from them.
  The two differ by at most 4.7e-4 per activation, 3e-4 to 6.5e-4 in ViT logits.
  """
  mlp_dim: int
  dropout_rate: float = 0.0
  dtype: Dtype = jnp.float32
  approximate_gelu: bool = True

  @nn.compact
  def __call__(self, x: Array, *, deterministic: bool) -> Array:
    dense = functools.partial(
        nn.Dense, dtype=self.dtype,
        kernel_init=nn.initializers.xavier_uniform(),
        bias_init=nn.initializers.normal(stddev=1e-6))
    y = dense(self.mlp_dim, name='Dense_0')(x)
    y = nn.gelu(y, approximate=True) if self.approximate_gelu else gelu(y)
    y = nn.Dropout(self.dropout_rate)(y, deterministic=deterministic)
    y = dense(x.shape[-1], name='Dense_1')(y)
    return nn.Dropout(self.dropout_rate)(y, deterministic=deterministic)


class MultiHeadDotProductAttention(nn.Module):
  """MSA of eq. (2), with the published (D, heads, head_dim) kernel layout.

  Returns `(output, weights)`; `weights` is (batch, heads, tokens, tokens) when
  `return_weights`, else None. Without weights or attention dropout the
  softmax(QK^T/sqrt(d))V product goes through `attention.dot_product_attention`,
  which can use a fused kernel.
  """
  num_heads: int
  dropout_rate: float = 0.0
  dtype: Dtype = jnp.float32
  implementation: Optional[str] = None

  @nn.compact
  def __call__(self, x: Array, *, deterministic: bool,
               return_weights: bool = False) -> tuple[Array, Optional[Array]]:
    features = x.shape[-1]
    if features % self.num_heads:
      raise ValueError(
          f'hidden_size {features} is not divisible by num_heads {self.num_heads}')
    head_dim = features // self.num_heads
    projection = functools.partial(
        nn.DenseGeneral, features=(self.num_heads, head_dim), axis=-1,
        dtype=self.dtype, kernel_init=nn.initializers.xavier_uniform())
    q = projection(name='query')(x)
    k = projection(name='key')(x)
    v = projection(name='value')(x)

    needs_explicit = return_weights or (
        self.dropout_rate > 0.0 and not deterministic)
    if needs_explicit:
      weights = attention_lib.attention_weights(q, k)
      dropped = nn.Dropout(self.dropout_rate)(weights, deterministic=deterministic)
      y = jnp.einsum('bhqk,bkhd->bqhd', dropped.astype(v.dtype), v)
    else:
      weights = None
      y = attention_lib.dot_product_attention(q, k, v, self.implementation)

    out = nn.DenseGeneral(
        features=features, axis=(-2, -1), dtype=self.dtype,
        kernel_init=nn.initializers.xavier_uniform(), name='out')(y)
    return out, (weights if return_weights else None)


def drop_path_rates(rate: float, depth: int) -> tuple[float, ...]:
  """Stochastic depth per block as DeiT / timm: 0 at the first, `rate` at the last, linear."""
  if not 0.0 <= rate < 1.0:
    raise ValueError(f'stochastic_depth must be in [0, 1), got {rate!r}')
  return tuple(rate * i / max(depth - 1, 1) for i in range(depth))


class DropPath(nn.Module):
  """Stochastic depth: in training, drops each example's residual branch with
  probability `rate` and scales the kept ones by 1 / (1 - rate); draws from the
  `dropout` rng stream; the identity at eval."""
  rate: float

  @nn.compact
  def __call__(self, x: Array, *, deterministic: bool) -> Array:
    if deterministic or self.rate == 0.0:
      return x
    keep = 1.0 - self.rate
    mask_shape = (x.shape[0],) + (1,) * (x.ndim - 1)
    mask = jax.random.bernoulli(self.make_rng('dropout'), keep, mask_shape)
    return jnp.where(mask, x / keep, jnp.zeros_like(x))


class Encoder1DBlock(nn.Module):
  """One Transformer layer: eqs. (2) and (3)."""
  mlp_dim: int
  num_heads: int
  dropout_rate: float = 0.0
  attention_dropout_rate: float = 0.0
  drop_path_rate: float = 0.0
  dtype: Dtype = jnp.float32
  attention_implementation: Optional[str] = None
  approximate_gelu: bool = True

  @nn.compact
  def __call__(self, z: Array, deterministic: bool,
               return_weights: bool = False) -> tuple[Array, Optional[Array]]:
    drop_path = DropPath(self.drop_path_rate)
    # Eq. (2): z' = MSA(LN(z)) + z
    y = layer_norm('LayerNorm_0', self.dtype)(z)
    y, weights = MultiHeadDotProductAttention(
        num_heads=self.num_heads, dropout_rate=self.attention_dropout_rate,
        dtype=self.dtype, implementation=self.attention_implementation,
        name='MultiHeadDotProductAttention_1')(
            y, deterministic=deterministic, return_weights=return_weights)
    y = nn.Dropout(self.dropout_rate)(y, deterministic=deterministic)
    z = z + drop_path(y, deterministic=deterministic)
    # Eq. (3): z = MLP(LN(z')) + z'
    y = layer_norm('LayerNorm_2', self.dtype)(z)
    y = MlpBlock(mlp_dim=self.mlp_dim, dropout_rate=self.dropout_rate,
                 dtype=self.dtype, approximate_gelu=self.approximate_gelu,
                 name='MlpBlock_3')(y, deterministic=deterministic)
    return z + drop_path(y, deterministic=deterministic), weights


class Encoder(nn.Module):
  """Position embeddings, L encoder blocks and the final LayerNorm of eq. (4)."""
  num_layers: int
  mlp_dim: int
  num_heads: int
  dropout_rate: float = 0.0
  attention_dropout_rate: float = 0.0
  stochastic_depth: float = 0.0
  dtype: Dtype = jnp.float32
  remat_policy: str = remat_lib.DEFAULT
  attention_implementation: Optional[str] = None
  approximate_gelu: bool = True
  posemb: str = 'learn'

  @nn.compact
  def __call__(self, x: Array, *, train: bool, return_attention: bool = False,
               grid: Optional[tuple[int, int]] = None) -> tuple[Array, tuple[Array, ...]]:
    x = AddPositionEmbs(self.posemb, grid, name='posembed_input')(x)
    x = nn.Dropout(self.dropout_rate)(x, deterministic=not train)
    # Recomputing activations only saves memory under a gradient.
    policy = self.remat_policy if train else 'none'
    attentions = []
    for i, rate in enumerate(drop_path_rates(self.stochastic_depth, self.num_layers)):
      block = dict(
          mlp_dim=self.mlp_dim, num_heads=self.num_heads,
          dropout_rate=self.dropout_rate,
          attention_dropout_rate=self.attention_dropout_rate,
          drop_path_rate=rate, dtype=self.dtype,
          attention_implementation=self.attention_implementation,
          approximate_gelu=self.approximate_gelu)
      x, weights = remat_lib.apply_block(
          Encoder1DBlock, policy, block, f'encoderblock_{i}', x, not train, return_attention)
      if return_attention:
        attentions.append(weights)
    return layer_norm('encoder_norm', self.dtype)(x), tuple(attentions)


class VisionTransformer(nn.Module):
  """ViT classifier; with `resnet` set, the R50+ViT hybrid.

  Attributes mirror the model configs in `vit_jax.configs.models`.
  `__call__(images, train=..., return_attention=...)` takes NHWC images
  scaled to [-1, 1] and returns `(logits, out)`.
  """
  num_classes: int
  patches: Sequence[int]
  hidden_size: int
  transformer: dict
  classifier: str = 'token'
  representation_size: Optional[int] = None
  resnet: Optional[dict] = None
  dtype: Dtype = jnp.float32
  remat_policy: str = remat_lib.DEFAULT  # see `vit_jax.remat`
  attention_implementation: Optional[str] = None
  head_bias_init: float = 0.0
  # The tanh GELU the published checkpoints were trained with; False for the
  # exact erf form of timm / Hugging Face weights (see `MlpBlock`).
  approximate_gelu: bool = True
  posemb: str = 'learn'  # POSEMB_TYPES

  @property
  def patch_stride(self) -> tuple[int, int]:
    """Input pixels per token along each axis (the ResNet stem's stride included)."""
    stem = models_resnet.hybrid_stem_stride(self.resnet) if self.resnet else 1
    return (self.patches[0] * stem, self.patches[1] * stem)

  def check_input(self, x: Array) -> None:
    if x.ndim != 4:
      raise ValueError(f'images must be (batch, height, width, 3), got shape {x.shape}')
    if x.shape[-1] != 3:
      raise ValueError(
          f'images must have 3 channels (RGB), got {x.shape[-1]} in shape {x.shape}')
    ph, pw = self.patch_stride
    if x.shape[1] % ph or x.shape[2] % pw:
      raise ValueError(
          f'image size {x.shape[1]}x{x.shape[2]} is not divisible by the patch '
          f'size {ph}x{pw}')
    if self.classifier not in ('token', 'gap'):
      raise ValueError(f"classifier must be 'token' or 'gap', got {self.classifier!r}")
    if self.posemb not in POSEMB_TYPES:
      raise ValueError(f'posemb must be one of {POSEMB_TYPES}, got {self.posemb!r}')

  @nn.compact
  def __call__(self, images: Array, *, train: bool = False,
               return_attention: bool = False) -> tuple[Array, dict]:
    self.check_input(images)
    out = {}
    x = images.astype(self.dtype)
    if self.resnet:
      x = models_resnet.hybrid_stem(
          x, num_layers=tuple(self.resnet['num_layers']),
          width_factor=self.resnet['width_factor'], dtype=self.dtype)
      out['stem'] = x

    # Eq. (1): a patch-size conv with equal stride is the linear projection E
    # applied to every flattened patch.
    x = nn.Conv(self.hidden_size, tuple(self.patches), strides=tuple(self.patches),
                padding='VALID', dtype=self.dtype, name='embedding')(x)
    batch, height, width, channels = x.shape
    x = x.reshape(batch, height * width, channels)
    if self.classifier == 'token':
      cls = self.param('cls', nn.initializers.zeros, (1, 1, channels))
      x = jnp.concatenate([jnp.tile(cls.astype(x.dtype), (batch, 1, 1)), x], axis=1)

    x, attentions = Encoder(
        dtype=self.dtype, remat_policy=self.remat_policy,
        attention_implementation=self.attention_implementation,
        approximate_gelu=self.approximate_gelu, posemb=self.posemb,
        **self.transformer, name='Transformer')(
            x, train=train, return_attention=return_attention, grid=(height, width))
    out['encoded'] = x
    if return_attention:
      out['attention_weights'] = attentions

    # Eq. (4): y = LN(z_L^0) -- the norm is inside the encoder; pick token 0.
    x = x[:, 0] if self.classifier == 'token' else jnp.mean(x, axis=1)
    if self.representation_size is not None:
      x = nn.tanh(nn.Dense(self.representation_size, dtype=self.dtype,
                           name='pre_logits')(x))
    out['pre_logits'] = x
    logits = nn.Dense(
        self.num_classes, dtype=self.dtype, kernel_init=nn.initializers.zeros,
        bias_init=nn.initializers.constant(self.head_bias_init), name='head')(x)
    return logits.astype(jnp.float32), out
