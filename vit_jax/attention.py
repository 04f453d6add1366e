"""The softmax(Q K^T / sqrt(d)) V product of multi-head self-attention.

Kept apart from the model so the kernel choice (plain XLA, or cuDNN's fused
flash attention on GPU) is one switch and the layer stays readable.
Tensors are (batch, tokens, heads, head_dim), the layout of the published
query/key/value kernels.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

IMPLEMENTATIONS = (None, 'xla', 'cudnn')
# cuDNN's fused kernel only takes some sequence lengths for training; ViT's
# 197 tokens is not one of them, so q/k/v are padded up to a multiple of this.
CUDNN_SEQUENCE_MULTIPLE = 64


def attention_weights(q: jax.Array, k: jax.Array) -> jax.Array:
  """Attention probabilities (batch, heads, q_tokens, k_tokens), in float32."""
  scale = q.shape[-1] ** -0.5
  logits = jnp.einsum('bqhd,bkhd->bhqk', q, k, preferred_element_type=jnp.float32)
  return jax.nn.softmax(logits * scale, axis=-1)


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array,
                          implementation: Optional[str] = None) -> jax.Array:
  """softmax(QK^T/sqrt(d))V without materialising weights where the kernel allows."""
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(
        f'attention implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}')
  if implementation == 'cudnn':
    return _padded_cudnn_attention(q, k, v)
  return jax.nn.dot_product_attention(q, k, v, implementation=implementation)


def _padded_cudnn_attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
  """cuDNN flash attention with the sequence padded; padding is masked out."""
  batch, length = q.shape[0], q.shape[1]
  padded = -(-length // CUDNN_SEQUENCE_MULTIPLE) * CUDNN_SEQUENCE_MULTIPLE
  pad = [(0, 0), (0, padded - length), (0, 0), (0, 0)]
  q, k, v = (jnp.pad(t, pad) for t in (q, k, v))
  lengths = jnp.full((batch,), length, dtype=jnp.int32)
  y = jax.nn.dot_product_attention(
      q, k, v, query_seq_lengths=lengths, key_value_seq_lengths=lengths,
      implementation='cudnn')
  return y[:, :length]
