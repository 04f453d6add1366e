"""Stochastic depth (ViT `transformer.stochastic_depth`, Mixer `stochastic_depth`) held to
the facts: DeiT / timm's `drop_path`.

Written here from the facts, not read from the code under test: block l of L
drops each example's residual branch with probability p_l = rate * l / (L - 1)
(0 at the first block, the rate at the last), scales a kept branch by
1 / (1 - p_l), draws from the `dropout` rng stream, and does nothing at eval.
Every DropPath call of a real training forward pass is recorded with
`flax.linen.intercept_methods`, so the drop rate is measured per example over
many draws (binomial error, 4.5 sigma) in the assembled model.
"""

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vit_jax import models_vit
from vit_jax.configs import models as model_configs

RATE = 0.5
DEPTH = 6
BATCH = 4000
SIGMAS = 4.5


def expected_rate(block: int, depth: int = DEPTH, rate: float = RATE) -> float:
  return rate * block / (depth - 1)


def tiny(family: str, stochastic_depth=None):
  """A 6-block model small enough to push 4000 examples through on the CPU.

  `stochastic_depth=None` keeps the family's default.
  """
  if family == 'vit':
    config = model_configs.vit_config('sd-vit', hidden_size=8, patch=4, mlp_dim=16,
                                      num_heads=2, num_layers=DEPTH)
    if stochastic_depth is not None:
      config.transformer.stochastic_depth = stochastic_depth
    # No remat: the recorded branch values must be concrete, not checkpoint tracers.
    return model_configs.build_model(config, 3, remat_policy='none'), (4, 4)
  config = model_configs.mixer_config('sd-mixer', patch=4, hidden_dim=8, num_blocks=DEPTH,
                                      tokens_mlp_dim=4, channels_mlp_dim=16)
  if stochastic_depth is not None:
    config.stochastic_depth = stochastic_depth
  return model_configs.build_model(config, 3), (8, 8)


def images_for(size, batch=BATCH, seed=0):
  return jax.random.normal(jax.random.PRNGKey(seed), (batch, *size, 3))


def with_nonzero_head(variables):
  """The zero-initialised head would hide every difference in the logits."""
  params = dict(variables['params'])
  params['head'] = dict(params['head'], kernel=jnp.ones_like(params['head']['kernel']))
  return {'params': params}


def block_index(module) -> int:
  """The block a DropPath sits in, from its scope path ('encoderblock_3', 'MixerBlock_3')."""
  owner = [p for p in module.scope.path if p.startswith(('encoderblock_', 'MixerBlock_'))]
  return int(owner[-1].rsplit('_', 1)[1])


def record_drop_paths(model, variables, images, rng):
  """(block, rate, branch in, branch out) for every DropPath call in one training pass."""
  static = []  # (block, rate), fixed at trace time

  def forward(variables, images, rng):
    branches = []

    def interceptor(next_fun, args, kwargs, context):
      out = next_fun(*args, **kwargs)
      if isinstance(context.module, models_vit.DropPath) and context.method_name == '__call__':
        static.append((block_index(context.module), context.module.rate))
        branches.append((args[0], out))
      return out

    with nn.intercept_methods(interceptor):
      model.apply(variables, images, train=True, rngs={'dropout': rng})
    return branches

  branches = jax.jit(forward)(variables, images, rng)
  return [(*info, np.asarray(x), np.asarray(y)) for info, (x, y) in zip(static, branches)]


@pytest.fixture(scope='module', params=['vit', 'mixer'])
def trained_pass(request):
  """One training forward pass of 4000 examples, every DropPath call recorded."""
  model, size = tiny(request.param, RATE)
  images = images_for(size)
  variables = with_nonzero_head(jax.jit(model.init)(jax.random.PRNGKey(0), images[:2]))
  calls = record_drop_paths(model, variables, images, jax.random.PRNGKey(3))
  return request.param, model, variables, images[:8], calls


def test_drop_rate_per_example_follows_the_linear_schedule(trained_pass):
  family, *_, calls = trained_pass
  assert sorted(block for block, *_ in calls) == sorted(list(range(DEPTH)) * 2)  # 2 branches
  for block, rate, branch, out in calls:
    assert rate == pytest.approx(expected_rate(block))
    flat_in, flat_out = branch.reshape(BATCH, -1), out.reshape(BATCH, -1)
    assert np.all(np.any(flat_in != 0, axis=1))
    dropped = np.all(flat_out == 0, axis=1)
    p = expected_rate(block)
    sigma = np.sqrt(p * (1 - p) / BATCH)
    assert abs(dropped.mean() - p) <= SIGMAS * sigma + 1e-12, (family, block, dropped.mean())
    # Per example: a kept example's whole branch (every token) is scaled by 1 / (1 - p).
    np.testing.assert_allclose(flat_out[~dropped], flat_in[~dropped] / (1 - p),
                               rtol=1e-6, atol=1e-7)


def test_the_two_branches_of_a_block_draw_independently(trained_pass):
  *_, calls = trained_pass
  last = [np.all(out.reshape(BATCH, -1) == 0, axis=1)
          for block, _, _, out in calls if block == DEPTH - 1]
  both = np.mean(last[0] & last[1])
  sigma = np.sqrt(RATE ** 2 * (1 - RATE ** 2) / BATCH)
  assert abs(both - RATE ** 2) <= SIGMAS * sigma


def test_eval_equals_the_same_weights_without_stochastic_depth(trained_pass):
  family, model, variables, images, _ = trained_pass
  default, _ = tiny(family)
  # Same parameter tree: stochastic depth adds no parameter.
  assert jax.tree.structure(variables) == jax.tree.structure(
      jax.eval_shape(default.init, jax.random.PRNGKey(0), images))
  with_sd, _ = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, images)
  without, _ = jax.jit(lambda v, x: default.apply(v, x, train=False))(variables, images)
  np.testing.assert_array_equal(with_sd, without)
  # Off by default (ViT presets and Mixer alike): training needs no rng and, with
  # no dropout either, computes the eval function.
  trained, _ = jax.jit(lambda v, x: default.apply(v, x, train=True))(variables, images)
  np.testing.assert_allclose(trained, without, rtol=1e-6, atol=1e-6)


def test_masks_come_from_the_dropout_stream(trained_pass):
  _, model, variables, images, _ = trained_pass
  apply = jax.jit(lambda key: model.apply(variables, images, train=True,
                                          rngs={'dropout': key})[0])
  a = apply(jax.random.PRNGKey(1))
  np.testing.assert_array_equal(a, apply(jax.random.PRNGKey(1)))
  assert not np.allclose(a, apply(jax.random.PRNGKey(2)))
  with pytest.raises(flax.errors.InvalidRngError, match='dropout'):
    jax.eval_shape(lambda: model.apply(variables, images, train=True))


def test_presets_have_none():
  assert model_configs.get_config('Mixer-B_16').stochastic_depth == 0.0
  assert model_configs.get_config('ViT-B_16').transformer.stochastic_depth == 0.0


@pytest.mark.parametrize('family,rate', [('vit', 1.0), ('mixer', -0.1)])
def test_a_rate_outside_0_1_is_refused(family, rate):
  model, size = tiny(family, rate)
  with pytest.raises(ValueError, match='stochastic_depth'):
    jax.eval_shape(model.init, jax.random.PRNGKey(0), images_for(size, batch=1))
