"""Schedules, optimizers and losses of vit_jax.optimizers."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from vit_jax import optimizers
from vit_jax.configs import schema


def _config(**kw):
  base = dict(optimizer='sgd', learning_rate=0.1, total_steps=100, warmup_steps=10,
              schedule='cosine', grad_clip_norm=1.0, weight_decay=0.0, momentum=0.9,
              accumulator_dtype=None, loss='softmax_xent', label_smoothing=0.0)
  base.update(kw)
  return schema.resolve(base)


def reference_warmup_cosine(step, base, warmup, total):
  """The reference code's / big_vision's rate at optax's 0-based `step`, written out."""
  if step < warmup:
    return base * step / warmup  # step 0: rate 0
  progress = (step - warmup) / (total - warmup)
  return base * 0.5 * (1.0 + math.cos(math.pi * progress))


def test_warmup_then_cosine_as_the_reference_counts():
  sched = optimizers.make_schedule(_config())
  lrs = np.array([float(sched(s)) for s in range(101)])
  expected = [reference_warmup_cosine(s, 0.1, 10, 100) for s in range(101)]
  np.testing.assert_allclose(lrs, expected, rtol=1e-5, atol=1e-8)
  assert lrs[0] == 0.0 and lrs[1] == pytest.approx(0.01)
  assert lrs[10] == pytest.approx(0.1)
  assert lrs[55] == pytest.approx(0.05, rel=1e-5)  # half-way through the decay
  assert lrs[100] == pytest.approx(0.0, abs=1e-8)


def test_first_update_has_learning_rate_zero():
  # The optimizer reads the schedule at optax's count, 0 for the first update.
  config = _config(optimizer='adamw', warmup_steps=4, grad_clip_norm=0.0, weight_decay=0.1)
  tx = optimizers.make_optimizer(config)
  params = {'kernel': jnp.ones((3, 2)), 'bias': jnp.ones((2,))}
  grads = jax.tree.map(jnp.ones_like, params)
  state = tx.init(params)
  updates, state = tx.update(grads, state, params)
  assert all(float(jnp.max(jnp.abs(u))) == 0.0 for u in jax.tree.leaves(updates))
  updates, state = tx.update(grads, state, params)
  # Second update: lr = 0.1 * 1/4; Adam's bias-corrected step is 1 for a constant grad.
  np.testing.assert_allclose(updates['kernel'], -0.025 * (1.0 + 0.1), rtol=1e-4)
  np.testing.assert_allclose(updates["bias"], -0.025, rtol=1e-4)


def test_linear_and_constant_decay():
  lin = optimizers.make_schedule(_config(schedule='linear', warmup_steps=0,
                                         end_learning_rate=0.01))
  assert float(lin(0)) == pytest.approx(0.1)
  assert float(lin(50)) == pytest.approx(0.055, rel=1e-5)
  assert float(lin(100)) == pytest.approx(0.01, rel=1e-5)
  const = optimizers.make_schedule(_config(schedule='constant', warmup_steps=0))
  assert float(const(0)) == float(const(99)) == pytest.approx(0.1)


def _quadratic_params():
  return {'w': jnp.ones((3, 2)), 'b': jnp.ones((2,))}


def test_sgd_momentum_matches_hand_computation():
  config = _config(schedule='constant', warmup_steps=0, grad_clip_norm=0.0)
  tx = optimizers.make_optimizer(config)
  params = _quadratic_params()
  state = tx.init(params)
  grads = jax.tree.map(lambda p: 0.5 * jnp.ones_like(p), params)
  updates, state = tx.update(grads, state, params)
  np.testing.assert_allclose(updates['w'], -0.1 * 0.5)
  updates, state = tx.update(grads, state, params)
  np.testing.assert_allclose(updates['w'], -0.1 * (0.5 + 0.9 * 0.5), rtol=1e-6)


def test_bf16_momentum_accumulator():
  tx = optimizers.make_optimizer(_config(accumulator_dtype='bfloat16'))
  state = tx.init(_quadratic_params())
  dtypes = {x.dtype for x in jax.tree.leaves(state) if x.ndim > 0}
  assert dtypes == {jnp.dtype(jnp.bfloat16)}
  adam = optimizers.make_optimizer(_config(optimizer='adamw', accumulator_dtype='bfloat16'))
  mu = [s for s in jax.tree.leaves(adam.init(_quadratic_params())) if s.ndim > 0]
  assert jnp.dtype(jnp.bfloat16) in {x.dtype for x in mu}  # mu in bf16, nu in f32


def test_clipping_bounds_the_update():
  config = _config(schedule='constant', warmup_steps=0, momentum=0.0, grad_clip_norm=1.0)
  tx = optimizers.make_optimizer(config)
  params = _quadratic_params()
  grads = jax.tree.map(lambda p: 100.0 * jnp.ones_like(p), params)
  updates, _ = tx.update(grads, tx.init(params), params)
  assert float(optax.global_norm(updates)) == pytest.approx(0.1, rel=1e-5)


def test_adamw_decays_kernels_only():
  # big_vision's `.*/kernel$`: decay per step = wd x lr x w on kernels; position
  # embeddings, class token, biases and norm scales untouched.
  config = _config(optimizer='adamw', schedule='constant', warmup_steps=0,
                   weight_decay=0.1, learning_rate=0.01, grad_clip_norm=0.0)
  tx = optimizers.make_optimizer(config)
  params = {'embedding': {'kernel': jnp.ones((2, 2, 3, 4)), 'bias': jnp.ones((4,))},
            'cls': jnp.ones((1, 1, 4)),
            'posembed_input': {'pos_embedding': jnp.ones((1, 5, 4))},
            'LayerNorm_0': {'scale': jnp.ones((4,))}}
  zero = jax.tree.map(jnp.zeros_like, params)
  updates, _ = tx.update(zero, tx.init(params), params)
  np.testing.assert_allclose(updates['embedding']['kernel'], -0.01 * 0.1 * 1.0, rtol=1e-6)
  for leaf in (updates['embedding']['bias'], updates['cls'],
               updates['posembed_input']['pos_embedding'], updates['LayerNorm_0']['scale']):
    np.testing.assert_allclose(leaf, 0.0)


def test_softmax_xent_and_label_smoothing():
  logits = jnp.array([[2.0, 0.0, -1.0]])
  labels = jnp.array([[1.0, 0.0, 0.0]])
  logp = jax.nn.log_softmax(logits)
  assert float(optimizers.softmax_xent(logits, labels)[0]) == pytest.approx(-float(logp[0, 0]))
  smooth = optimizers.softmax_xent(logits, labels, 0.3)
  target = np.array([0.7 + 0.1, 0.1, 0.1])
  assert float(smooth[0]) == pytest.approx(-float(jnp.sum(target * logp[0])), rel=1e-6)


def test_sigmoid_xent():
  logits = jnp.array([[3.0, -2.0]])
  labels = jnp.array([[1.0, 0.0]])
  expected = np.log1p(np.exp(-3.0)) + np.log1p(np.exp(-2.0))
  assert float(optimizers.sigmoid_xent(logits, labels)[0]) == pytest.approx(expected, rel=1e-6)
  loss = optimizers.make_loss(_config(loss='sigmoid_xent', label_smoothing=0.2))
  # Targets 0.9 / 0.1.
  p = jax.nn.sigmoid(logits[0])
  expected = -(0.9 * np.log(p[0]) + 0.1 * np.log(1 - p[0]) + 0.1 * np.log(p[1]) +
               0.9 * np.log(1 - p[1]))
  assert float(loss(logits, labels)[0]) == pytest.approx(float(expected), rel=1e-5)


@pytest.mark.parametrize('field,value', [
    ('learning_rate', 0.0), ('learning_rate', -1e-3), ('optimizer', 'lamb'),
    ('schedule', 'exponential'), ('loss', 'hinge'), ('warmup_steps', 1000),
    ('label_smoothing', 1.0), ('accumulator_dtype', 'float16'), ('momentum', 1.5),
])
def test_validation_names_the_field(field, value):
  with pytest.raises(ValueError, match=field):
    optimizers.validate(_config(**{field: value}))
