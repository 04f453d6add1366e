"""The attention kernels agree with each other and with the weights path; GELU form."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vit_jax import attention
from vit_jax import models_vit
from vit_jax.configs import models as model_configs


def qkv(shape=(2, 17, 3, 8), dtype=jnp.float32):
  keys = jax.random.split(jax.random.PRNGKey(0), 3)
  return tuple(jax.random.normal(k, shape, dtype) * 2 for k in keys)


def reference(q, k, v):
  """The textbook formula, independent of vit_jax.attention."""
  logits = jnp.einsum('bqhd,bkhd->bhqk', q, k) / np.sqrt(q.shape[-1])
  return jnp.einsum('bhqk,bkhd->bqhd', jax.nn.softmax(logits, axis=-1), v)


def test_attention_weights_match_the_formula():
  q, k, _ = qkv()
  logits = jnp.einsum('bqhd,bkhd->bhqk', q, k) / np.sqrt(q.shape[-1])
  np.testing.assert_allclose(attention.attention_weights(q, k),
                             jax.nn.softmax(logits, axis=-1), atol=1e-6)


@pytest.mark.parametrize('implementation', [None, 'explicit', 'xla'])
def test_implementations_match_reference_and_gradients(implementation):
  q, k, v = qkv()
  out = attention.dot_product_attention(q, k, v, implementation)
  np.testing.assert_allclose(out, reference(q, k, v), atol=1e-5)

  def loss(fn):
    return lambda q, k, v: jnp.sum(jnp.sin(fn(q, k, v)))

  got = jax.grad(loss(lambda *t: attention.dot_product_attention(*t, implementation)),
                 argnums=(0, 1, 2))(q, k, v)
  want = jax.grad(loss(reference), argnums=(0, 1, 2))(q, k, v)
  for a, b in zip(got, want):
    np.testing.assert_allclose(a, b, atol=1e-5)


def test_explicit_attention_is_stable_for_large_logits():
  q, k, v = qkv()
  out = attention.explicit_attention(q * 100, k * 100, v)
  assert np.all(np.isfinite(out))
  np.testing.assert_allclose(out, reference(q * 100, k * 100, v), atol=1e-4)


def test_explicit_attention_in_bfloat16():
  q, k, v = qkv()
  out = attention.explicit_attention(*(t.astype(jnp.bfloat16) for t in (q, k, v)))
  assert out.dtype == jnp.bfloat16
  np.testing.assert_allclose(out.astype(jnp.float32), reference(q, k, v), atol=5e-2)


def test_unknown_implementation_is_named():
  with pytest.raises(ValueError, match="'flash'"):
    attention.dot_product_attention(*qkv(), implementation='flash')


def test_gelu_is_the_exact_erf_form():
  x = jnp.linspace(-8.0, 8.0, 2001)
  np.testing.assert_allclose(models_vit.gelu(x), nn.gelu(x, approximate=False),
                             atol=1e-6)
  np.testing.assert_allclose(jax.vmap(jax.grad(models_vit.gelu))(x),
                             jax.vmap(jax.grad(lambda t: nn.gelu(t, approximate=False)))(x),
                             atol=1e-6)


def test_model_output_does_not_depend_on_the_kernel():
  images = jax.random.normal(jax.random.PRNGKey(1), (2, 16, 16, 3))
  explicit = model_configs.build_model('ViT-Test_4', 5, attention_implementation='explicit')
  xla = model_configs.build_model('ViT-Test_4', 5, attention_implementation='xla')
  variables = explicit.init(jax.random.PRNGKey(0), images)
  variables = jax.tree.map(lambda p: p + 0.05, variables)  # a non-zero head
  np.testing.assert_allclose(explicit.apply(variables, images)[0],
                             xla.apply(variables, images)[0], atol=1e-5)


def test_gpu_default_takes_cudnn_or_falls_back_to_xla(monkeypatch):
  """On GPU with bf16 the default is padded cuDNN; where it is refused, XLA's kernel."""
  rng = np.random.default_rng(0)
  q, k, v = (jnp.asarray(rng.normal(size=(2, 5, 2, 8)), jnp.bfloat16) for _ in range(3))
  calls = []

  def fake(q_, k_, v_, implementation=None, **kwargs):
    calls.append((implementation, q_.shape[1]))
    if implementation == 'cudnn':
      raise NotImplementedError('no cuDNN here')
    return attention.explicit_attention(q_, k_, v_)

  monkeypatch.setattr(jax, 'default_backend', lambda: 'gpu')
  monkeypatch.setattr(jax.nn, 'dot_product_attention', fake)
  out = attention.dot_product_attention(q, k, v)
  assert calls == [('cudnn', attention.CUDNN_SEQUENCE_MULTIPLE), ('xla', 5)]
  np.testing.assert_allclose(np.asarray(out, np.float32),
                             np.asarray(attention.explicit_attention(q, k, v), np.float32))
