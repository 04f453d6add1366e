"""`config.model.posemb='sincos2d'`: fixed 2-D sin-cos position embeddings ("Better plain
ViT baselines", big_vision's `posemb_sincos_2d`), against the formula written out here.

For patch (row y, column x) of a rows x cols grid (row-major) and width D, with
q = D / 4 and w_k = 10000 ** -(k / (q - 1)), k < q, the embedding is
[sin(x w_k)]_k ++ [cos(x w_k)]_k ++ [sin(y w_k)]_k ++ [cos(y w_k)]_k; the class
token gets none (big_vision adds the table before prepending it).
"""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vit_jax import checkpoint
from vit_jax import models_vit
from vit_jax import validation
from vit_jax.configs import models as model_configs
from vit_jax.configs import schema


def sincos_formula(rows: int, cols: int, width: int) -> np.ndarray:
  q = width // 4
  table = np.zeros((rows * cols, width))
  for y in range(rows):
    for x in range(cols):
      for k in range(q):
        w = 10000.0 ** -(k / (q - 1))
        table[y * cols + x, [k, q + k, 2 * q + k, 3 * q + k]] = (
            math.sin(x * w), math.cos(x * w), math.sin(y * w), math.cos(y * w))
  return table


def vit(posemb: str, classifier: str = 'token'):
  config = model_configs.get_config('ViT-Test_4')  # hidden 32, 4x4 patches
  config.posemb, config.classifier = posemb, classifier
  return config, model_configs.build_model(config, 5)


@pytest.mark.parametrize('classifier', ['token', 'gap'])
def test_model_adds_the_formula_on_a_non_square_grid(classifier):
  _, model = vit('sincos2d', classifier)
  images = jax.random.normal(jax.random.PRNGKey(0), (2, 12, 20, 3))  # 3 x 5 patches
  variables = jax.jit(model.init)(jax.random.PRNGKey(0), images)

  def added(variables, images):
    seen = []

    def interceptor(next_fun, args, kwargs, context):
      out = next_fun(*args, **kwargs)
      if isinstance(context.module, models_vit.AddPositionEmbs):
        seen.append(out - args[0])
      return out

    with nn.intercept_methods(interceptor):
      model.apply(variables, images)
    return seen[0]

  got = np.asarray(jax.jit(added)(variables, images))
  expected = sincos_formula(3, 5, 32)
  prefix = 1 if classifier == 'token' else 0
  assert got.shape == (2, prefix + 15, 32)
  np.testing.assert_allclose(got[:, :prefix], 0.0)
  np.testing.assert_allclose(got[:, prefix:], np.broadcast_to(expected, (2, 15, 32)),
                             atol=2e-6)


def test_sincos2d_has_no_parameter_and_learn_stays_the_published_tree(tmp_path):
  images = jnp.zeros((1, 16, 16, 3))
  learned_config, learned = vit('learn')
  fixed_config, fixed = vit('sincos2d')
  learned_params = jax.eval_shape(learned.init, jax.random.PRNGKey(0), images)['params']
  fixed_params = jax.eval_shape(fixed.init, jax.random.PRNGKey(0), images)['params']
  learned_flat, fixed_flat = checkpoint.flatten(learned_params), checkpoint.flatten(fixed_params)
  assert model_configs.get_config('ViT-B_16').posemb == 'learn'  # the published models'
  assert learned_flat[checkpoint.POSEMB_KEY].shape == (1, 17, 32)
  assert set(learned_flat) - set(fixed_flat) == {checkpoint.POSEMB_KEY}
  # A sincos2d model's own weights load back; a learned table has no place in it.
  params = jax.tree.map(lambda s: np.ones(s.shape, s.dtype), fixed_params)
  checkpoint.save(params, tmp_path / 'fixed.npz')
  loaded = checkpoint.load_pretrained(str(tmp_path / 'fixed.npz'), fixed_params, fixed_config)
  assert set(checkpoint.flatten(loaded)) == set(fixed_flat)
  learned_values = jax.tree.map(lambda s: np.ones(s.shape, s.dtype), learned_params)
  with pytest.raises(ValueError, match='pos_embedding'):
    checkpoint.load_pretrained(learned_values, fixed_params, fixed_config)


@pytest.mark.parametrize('posemb,hidden,match', [
    ('sincos', 32, 'posemb must be one of'), ('sincos2d', 36, None), ('sincos2d', 30, 'divisible by 4')])
def test_config_values_checked(posemb, hidden, match):
  config = dict(model_name='ViT-Test_4', image_size=(16, 16), dataset='synthetic',
                model=dict(posemb=posemb, hidden_size=hidden))
  if match is None:
    validation.validate_config(schema.resolve(config))
    return
  with pytest.raises(ValueError, match=match):
    validation.validate_config(schema.resolve(config))
