"""The softmax(Q K^T / sqrt(d)) V product of multi-head self-attention.

Kept apart from the model so the kernel choice is one switch and the layer
stays readable. Tensors are (batch, tokens, heads, head_dim), the layout of the
published query/key/value kernels. Implementations:

- 'explicit': three plain ops (QK^T, softmax, PV) with heads moved in front of
  tokens, so both products are batched matmuls over contiguous (tokens, dim)
  blocks. On CPU this is the fastest we measured: at ViT-S/16 shapes (batch 8,
  197 tokens, 6 heads of 64) forward 1.6x and forward + backward 1.5x faster
  than `jax.nn.dot_product_attention`'s XLA path
  (`benchmarks/attention_benchmark.py`, 2-core CPU, jax 0.10.2).
- 'xla': `jax.nn.dot_product_attention(implementation='xla')`.
- 'cudnn': cuDNN's fused flash attention on GPU, with the sequence padded to a
  length the kernel accepts.
- None: 'explicit' on CPU; on GPU 'cudnn' for bf16/fp16 inputs where the
  installed JAX and cuDNN take them, 'xla' otherwise (logged once); elsewhere
  JAX's own choice. cuDNN has no float32 kernel: `vit_jax.validation` refuses
  `attention_implementation='cudnn'` with `dtype='float32'`.
"""

from __future__ import annotations

from typing import Optional

from absl import logging
import jax
import jax.numpy as jnp

IMPLEMENTATIONS = (None, 'explicit', 'xla', 'cudnn')
# cuDNN's fused kernel only takes some sequence lengths for training; ViT's
# 197 tokens is not one of them, so q/k/v are padded up to a multiple of this.
CUDNN_SEQUENCE_MULTIPLE = 64


def attention_weights(q: jax.Array, k: jax.Array) -> jax.Array:
  """Attention probabilities (batch, heads, q_tokens, k_tokens), in float32.

  Heads move in front of tokens first, so QK^T is a batched matmul over
  contiguous (tokens, dim) blocks; the scale is folded into q (tokens x dim)
  rather than applied to the larger logits.
  """
  scale = jnp.asarray(q.shape[-1] ** -0.5, q.dtype)
  q, k = (t.transpose(0, 2, 1, 3) for t in (q * scale, k))
  logits = jnp.einsum('bhqd,bhkd->bhqk', q, k, preferred_element_type=jnp.float32)
  return _softmax(logits)


def check_implementation(implementation: Optional[str]) -> None:
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(
        f'attention implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}')


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array,
                          implementation: Optional[str] = None) -> jax.Array:
  """softmax(QK^T/sqrt(d))V, by the kernel `implementation` names."""
  check_implementation(implementation)
  if implementation is None:
    backend = jax.default_backend()
    if backend == 'cpu':
      implementation = 'explicit'
    elif backend == 'gpu' and q.dtype in (jnp.bfloat16, jnp.float16):
      return _gpu_default_attention(q, k, v)
  if implementation == 'explicit':
    return explicit_attention(q, k, v)
  if implementation == 'cudnn':
    return _padded_cudnn_attention(q, k, v)
  return jax.nn.dot_product_attention(q, k, v, implementation=implementation)


_LOGGED_GPU_CHOICE = []


def _gpu_default_attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
  """Padded cuDNN attention if this JAX / cuDNN accepts the shapes, else XLA's."""
  try:
    out, choice = _padded_cudnn_attention(q, k, v), 'cudnn (padded)'
  except (NotImplementedError, ValueError, RuntimeError) as e:
    out, choice = jax.nn.dot_product_attention(q, k, v, implementation='xla'), f'xla ({e})'
  if not _LOGGED_GPU_CHOICE:
    _LOGGED_GPU_CHOICE.append(choice)
    logging.info('Attention on GPU (%s): %s', q.dtype, choice)
  return out


def _softmax(logits: jax.Array) -> jax.Array:
  # The max is a constant for the gradient (softmax is shift-invariant), and one
  # reciprocal per row replaces a division per element.
  shifted = logits - jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True))
  e = jnp.exp(shifted)
  return e * (1.0 / jnp.sum(e, axis=-1, keepdims=True))


def explicit_attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
  """Attention as plain batched matmuls: `attention_weights`, then PV.

  Logits and softmax are float32 whatever the input dtype.
  """
  weights = attention_weights(q, k).astype(v.dtype)
  v = v.transpose(0, 2, 1, 3)
  return jnp.einsum('bhqk,bhkd->bhqd', weights, v).transpose(0, 2, 1, 3)


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
