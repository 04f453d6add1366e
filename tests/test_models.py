"""ViT, hybrid and BiT ResNet models: sizes, shapes, names, modes and input errors."""

import functools

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vit_jax import remat
from vit_jax.configs import models as model_configs


def param_shapes(name, num_classes=1000, size=224, **overrides):
  model = model_configs.build_model(name, num_classes, **overrides)
  variables = jax.eval_shape(
      lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, size, size, 3))))
  return variables['params']


def count(params):
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))


@pytest.mark.parametrize('name,paper_millions', [
    ('ViT-B_16', 86), ('ViT-L_16', 307), ('ViT-H_14', 632)])
def test_parameter_count_matches_paper(name, paper_millions):
  millions = count(param_shapes(name)) / 1e6
  assert abs(millions - paper_millions) / paper_millions < 0.01, millions


def test_vit_b16_tree_is_published_layout():
  flat = flax.traverse_util.flatten_dict(param_shapes('ViT-B_16'), sep='/')
  shapes = {k: tuple(v.shape) for k, v in flat.items()}
  block = 'Transformer/encoderblock_0/'
  attn = block + 'MultiHeadDotProductAttention_1/'
  expected = {
      'cls': (1, 1, 768),
      'embedding/kernel': (16, 16, 3, 768),
      'embedding/bias': (768,),
      'Transformer/posembed_input/pos_embedding': (1, 197, 768),
      block + 'LayerNorm_0/scale': (768,),
      attn + 'query/kernel': (768, 12, 64),
      attn + 'key/bias': (12, 64),
      attn + 'value/kernel': (768, 12, 64),
      attn + 'out/kernel': (12, 64, 768),
      attn + 'out/bias': (768,),
      block + 'LayerNorm_2/bias': (768,),
      block + 'MlpBlock_3/Dense_0/kernel': (768, 3072),
      block + 'MlpBlock_3/Dense_1/kernel': (3072, 768),
      'Transformer/encoder_norm/scale': (768,),
      'head/kernel': (768, 1000),
      'head/bias': (1000,),
  }
  for key, shape in expected.items():
    assert shapes[key] == shape, key
  blocks = {k.split('/')[1] for k in shapes if k.startswith('Transformer/encoderblock')}
  assert blocks == {f'encoderblock_{i}' for i in range(12)}
  # 12 blocks x 16 arrays + cls, embedding(2), posemb, encoder_norm(2), head(2).
  assert len(shapes) == 12 * 16 + 8


def test_hybrid_tree_has_resnet_stem_at_top_level():
  params = param_shapes('R50+ViT-B_16')
  assert {'conv_root', 'gn_root', 'block1', 'block2', 'block3', 'embedding'} <= set(params)
  assert set(params['block3']) == {f'unit{i}' for i in range(1, 10)}
  assert set(params['block1']['unit1']) == {
      'conv1', 'conv2', 'conv3', 'gn1', 'gn2', 'gn3', 'conv_proj', 'gn_proj'}
  assert params['embedding']['kernel'].shape == (1, 1, 1024, 768)
  assert params['Transformer']['posembed_input']['pos_embedding'].shape == (1, 197, 768)


def test_representation_layer_is_named_pre_logits():
  config = model_configs.get_config('ViT-Test_4')
  config.representation_size = 24
  params = param_shapes(config, num_classes=5, size=16)
  assert params['pre_logits']['kernel'].shape == (32, 24)
  assert params['head']['kernel'].shape == (24, 5)


def init_and_apply(name_or_config, images, num_classes=7, **kwargs):
  model = model_configs.build_model(name_or_config, num_classes)
  # Compiled whole: op-by-op execution of a ResNet costs far more on CPU.
  variables = jax.jit(model.init)(jax.random.PRNGKey(0), images)
  outputs = jax.jit(functools.partial(model.apply, **kwargs))(variables, images)
  return model, variables, outputs


# Both classifiers on a non-square grid, and a square one (each case compiles twice).
@pytest.mark.parametrize('height,width,classifier', [(16, 16, 'token'), (24, 40, 'token'),
                                                     (24, 40, 'gap')])
def test_output_shapes(classifier, height, width):
  config = model_configs.get_config('ViT-Test_4')
  config.classifier = classifier
  images = jnp.zeros((3, height, width, 3))
  _, variables, (logits, out) = init_and_apply(config, images)
  tokens = (height // 4) * (width // 4) + (classifier == 'token')
  assert logits.shape == (3, 7)
  assert out['encoded'].shape == (3, tokens, 32)
  assert variables['params']['Transformer']['posembed_input']['pos_embedding'].shape == (
      1, tokens, 32)
  assert ('cls' in variables['params']) == (classifier == 'token')


def test_dropout_only_in_train_mode():
  config = model_configs.get_config('ViT-Test_4')
  config.transformer.dropout_rate = 0.3
  config.transformer.attention_dropout_rate = 0.3
  config.transformer.stochastic_depth = 0.3
  images = jax.random.normal(jax.random.PRNGKey(1), (4, 16, 16, 3))
  model, variables, (eval_a, _) = init_and_apply(config, images)
  # A non-zero head so dropout shows up in the logits.
  variables = jax.tree.map(lambda x: x, variables)
  variables['params']['head']['kernel'] = jnp.ones_like(variables['params']['head']['kernel'])
  apply = jax.jit(model.apply, static_argnames='train')
  eval_a, _ = apply(variables, images, train=False)
  eval_b, _ = apply(variables, images, train=False)
  np.testing.assert_array_equal(eval_a, eval_b)
  rngs = lambda seed: {'dropout': jax.random.PRNGKey(seed)}
  train_a, _ = apply(variables, images, train=True, rngs=rngs(0))
  train_b, _ = apply(variables, images, train=True, rngs=rngs(1))
  train_a2, _ = apply(variables, images, train=True, rngs=rngs(0))
  assert not np.allclose(train_a, eval_a)
  assert not np.allclose(train_a, train_b)
  np.testing.assert_array_equal(train_a, train_a2)


def test_bfloat16_compute_keeps_float32_params():
  images = jax.random.normal(jax.random.PRNGKey(0), (2, 16, 16, 3))
  model = model_configs.build_model('ViT-Test_4', 5, dtype=jnp.bfloat16)
  variables = jax.jit(model.init)(jax.random.PRNGKey(0), images)
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(variables))
  logits, out = jax.jit(model.apply)(variables, images)
  assert out['encoded'].dtype == jnp.bfloat16
  assert logits.dtype == jnp.float32 and np.all(np.isfinite(logits))
  reference, _ = jax.jit(model_configs.build_model('ViT-Test_4', 5).apply)(variables, images)
  np.testing.assert_allclose(logits, reference, atol=0.05)


def test_attention_weights_are_row_stochastic():
  images = jax.random.normal(jax.random.PRNGKey(0), (2, 16, 16, 3))
  _, variables, (logits, out) = init_and_apply(
      'ViT-Test_4', images, return_attention=True)
  weights = out['attention_weights']
  assert len(weights) == 2
  for w in weights:
    assert w.shape == (2, 2, 17, 17)
    np.testing.assert_allclose(np.sum(w, axis=-1), 1.0, atol=1e-5)
    assert np.all(w >= 0)
  # Asking for weights does not change the function.
  model = model_configs.build_model('ViT-Test_4', 7)
  plain_logits, plain_out = model.apply(variables, images)
  np.testing.assert_allclose(logits, plain_logits, atol=1e-5)
  assert 'attention_weights' not in plain_out


@pytest.mark.parametrize('policy', sorted(set(remat.POLICIES) - {'none'}))
def test_every_remat_policy_gives_the_gradients_of_no_remat(policy):
  # Dropout and stochastic depth on: the recomputation must draw the same masks.
  config = model_configs.get_config('ViT-Test_4')
  config.transformer.update(dropout_rate=0.1, attention_dropout_rate=0.1, stochastic_depth=0.2)
  images = jax.random.normal(jax.random.PRNGKey(0), (4, 16, 16, 3))
  labels = jax.nn.one_hot(jnp.arange(4) % 5, 5)
  plain = model_configs.build_model(config, 5, remat_policy='none')
  params = jax.jit(plain.init)(jax.random.PRNGKey(0), images)['params']

  def grads(model):
    def loss(p):
      logits, _ = model.apply({'params': p}, images, train=True,
                              rngs={'dropout': jax.random.PRNGKey(7)})
      return -jnp.sum(labels * jax.nn.log_softmax(logits))
    return jax.jit(jax.grad(loss))(params)

  expected = grads(plain)
  got = grads(model_configs.build_model(config, 5, remat_policy=policy))
  assert jax.tree.structure(got) == jax.tree.structure(expected)  # the same parameter tree
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(expected)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def _compiled_train_temp_bytes(policy):
  """XLA's temp (activation) memory of a jitted gradient step of ViT-Test_4 at 64x64."""
  config = model_configs.get_config('ViT-Test_4')
  config.transformer.num_layers = 4
  model = model_configs.build_model(config, 10, remat_policy=policy)
  images = jax.ShapeDtypeStruct((32, 64, 64, 3), jnp.float32)
  params = jax.eval_shape(lambda x: model.init(jax.random.PRNGKey(0), x)['params'], images)
  loss = lambda p, x: jnp.sum(model.apply({'params': p}, x, train=True)[0] ** 2)
  compiled = jax.jit(jax.grad(loss)).lower(params, images).compile()
  return compiled.memory_analysis().temp_size_in_bytes


def test_default_remat_policy_needs_less_activation_memory_than_none():
  assert model_configs.get_config('ViT-B_16').remat_policy == remat.DEFAULT
  none, default, block = (_compiled_train_temp_bytes(p) for p in ('none', remat.DEFAULT, 'block'))
  # Measured: 298, 96 and 84 MB (XLA:CPU keeps none of these apart without the
  # cotangent tie in vit_jax.remat: all three were equal).
  assert default < 0.75 * none, (none, default)
  assert block < default, (default, block)


def test_unknown_remat_policy_is_named():
  model = model_configs.build_model('ViT-Test_4', 5, remat_policy='sometimes')
  with pytest.raises(ValueError, match="remat_policy must be one of .*'sometimes'"):
    model.init(jax.random.PRNGKey(0), jnp.zeros((1, 16, 16, 3)), train=True)


def test_resnet_forward_and_backward():
  images = jax.random.normal(jax.random.PRNGKey(0), (2, 32, 32, 3))
  labels = jax.nn.one_hot(jnp.array([1, 3]), 4)
  model, variables, (logits, out) = init_and_apply('BiT-Test', images, num_classes=4)
  assert logits.shape == (2, 4)
  assert set(variables) == {'params'}  # GroupNorm: no batch statistics
  assert out['pre_logits'].shape == (2, 32 * 8 * 4)

  def loss_fn(params):
    logits, _ = model.apply({'params': params}, images, train=True)
    return -jnp.mean(jnp.sum(labels * jax.nn.log_softmax(logits), axis=-1))

  grad_fn = jax.jit(jax.grad(loss_fn))
  grads = grad_fn(variables['params'])
  norms = {k: float(jnp.linalg.norm(g)) for k, g in
           flax.traverse_util.flatten_dict(grads, sep='/').items()}
  assert all(np.isfinite(v) for v in norms.values())
  assert norms['head/kernel'] > 0
  # The head starts at zero; with a random one the gradient reaches the root conv.
  params = dict(variables['params'])
  kernel = params['head']['kernel']
  params['head'] = {'kernel': jax.random.normal(jax.random.PRNGKey(2), kernel.shape),
                    'bias': params['head']['bias']}
  grads = grad_fn(params)
  assert float(jnp.linalg.norm(grads['conv_root']['kernel'])) > 0


def test_bit_presets_have_expected_sizes():
  # BiT-M R50x1 has about 25.5M parameters at 1000 classes.
  assert abs(count(param_shapes('BiT-R50x1')) / 1e6 - 25.5) < 0.3
  for name in ['BiT-R101x1', 'BiT-R50x3', 'BiT-R152x2']:
    assert name in model_configs.names()


def test_hybrid_forward():
  images = jax.random.normal(jax.random.PRNGKey(0), (2, 32, 32, 3))
  model, variables, (logits, out) = init_and_apply('R-Test+ViT-Test_1', images)
  # Stem stride 4 x one stage of stride 2: 32 px -> 4x4 grid + class token.
  assert model.patch_stride == (8, 8)
  assert out['stem'].shape == (2, 4, 4, 256)
  assert out['encoded'].shape == (2, 17, 32)
  assert logits.shape == (2, 7) and np.all(np.isfinite(logits))


def test_weight_standardisation():
  from vit_jax import models_resnet
  conv = models_resnet.StdConv(4, (3, 3), use_bias=False)
  x = jax.random.normal(jax.random.PRNGKey(0), (1, 5, 5, 2))
  variables = conv.init(jax.random.PRNGKey(1), x)
  scaled = jax.tree.map(lambda k: 3.0 * k + 1.0, variables)
  # Standardised kernels ignore affine changes of the raw weights.
  np.testing.assert_allclose(conv.apply(variables, x), conv.apply(scaled, x), rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize('shape,message', [
    ((1, 30, 32, 3), 'not divisible by the patch size'),
    ((1, 32, 32, 1), '3 channels'),
    ((32, 32, 3), 'batch, height, width'),
])
def test_bad_input_shape_is_named(shape, message):
  model = model_configs.build_model('ViT-Test_4', 3)
  with pytest.raises(ValueError, match=message):
    model.init(jax.random.PRNGKey(0), jnp.zeros(shape))


def test_hybrid_checks_total_stride():
  model = model_configs.build_model('R-Test+ViT-Test_1', 3)
  with pytest.raises(ValueError, match='patch size 8x8'):
    model.init(jax.random.PRNGKey(0), jnp.zeros((1, 36, 36, 3)))


def test_unknown_preset_lists_valid_names():
  with pytest.raises(ValueError, match='ViT-B_16') as info:
    model_configs.get_config('ViT-Q_16')
  assert 'ViT-Q_16' in str(info.value)


def test_paper_spelling_is_accepted():
  assert model_configs.get_config('ViT-B/16').hidden_size == 768
  assert model_configs.get_config('R50+ViT-B/16').resnet.num_layers == (3, 4, 9)


def test_unknown_classifier_is_named():
  config = model_configs.get_config('ViT-Test_4')
  config.classifier = 'max'
  model = model_configs.build_model(config, 3)
  with pytest.raises(ValueError, match="classifier"):
    model.init(jax.random.PRNGKey(0), jnp.zeros((1, 16, 16, 3)))


def test_every_vit_preset_computes_tanh_gelu_by_default():
  """The published checkpoints were trained with flax's default (tanh) GELU."""
  vits = [n for n in model_configs.names()
          if model_configs.get_config(n).model_type == 'vit']
  assert 'R50+ViT-B_16' in vits and 'ViT-B_16' in vits
  for name in vits:
    assert model_configs.get_config(name).approximate_gelu is True, name
    assert model_configs.build_model(name, 3).approximate_gelu is True, name
  # The module's own default agrees with the presets'.
  from vit_jax import models_vit
  assert models_vit.VisionTransformer.approximate_gelu is True
  assert models_vit.MlpBlock.approximate_gelu is True


@pytest.mark.parametrize('approximate', [True, False])
def test_mlp_block_gelu_form(approximate):
  from vit_jax import models_vit
  block = models_vit.MlpBlock(mlp_dim=8, approximate_gelu=approximate)
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 3, 4))
  variables = block.init(jax.random.PRNGKey(1), x, deterministic=True)
  p = variables['params']
  hidden = x @ p['Dense_0']['kernel'] + p['Dense_0']['bias']
  act = jax.nn.gelu(hidden, approximate=approximate)
  expected = act @ p['Dense_1']['kernel'] + p['Dense_1']['bias']
  np.testing.assert_allclose(block.apply(variables, x, deterministic=True), expected,
                             atol=1e-6)


def test_exact_gelu_matches_erfc_form():
  from vit_jax import models_vit
  x = jnp.linspace(-6.0, 6.0, 1001)
  np.testing.assert_allclose(models_vit.gelu(x), jax.nn.gelu(x, approximate=False),
                             atol=1e-6)
  # ... and is not the tanh form: they differ by up to ~4.7e-4.
  assert float(jnp.abs(models_vit.gelu(x) - jax.nn.gelu(x, approximate=True)).max()) > 4e-4


def test_approximate_gelu_override_reaches_the_logits():
  images = jax.random.normal(jax.random.PRNGKey(0), (2, 16, 16, 3))
  tanh = model_configs.build_model('ViT-Test_4', 5)
  exact = model_configs.build_model('ViT-Test_4', 5, approximate_gelu=False)
  variables = jax.jit(tanh.init)(jax.random.PRNGKey(0), images)
  variables['params']['head']['kernel'] = jnp.ones_like(variables['params']['head']['kernel'])
  a, _ = jax.jit(tanh.apply)(variables, images)
  b, _ = jax.jit(exact.apply)(variables, images)
  assert not np.allclose(a, b, rtol=0, atol=1e-7)
  np.testing.assert_allclose(a, b, atol=1e-2)


def _float32_activation_residuals(policy, num_layers):
  """Lines of `print_saved_residuals` for float32 arrays with the batch (5) in front."""
  import contextlib  # pylint: disable=g-import-not-at-top
  import io  # pylint: disable=g-import-not-at-top
  from jax.ad_checkpoint import print_saved_residuals  # pylint: disable=g-import-not-at-top
  config = model_configs.get_config('ViT-Test_4')
  config.transformer.num_layers = num_layers
  model = model_configs.build_model(config, 10, remat_policy=policy, dtype=jnp.bfloat16)
  images = jnp.zeros((5, 16, 16, 3))
  params = model.init(jax.random.PRNGKey(0), images)['params']
  loss = lambda p: jnp.sum(model.apply({'params': p}, images, train=True)[0].astype(jnp.float32))
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    print_saved_residuals(loss, params)
  return [line for line in out.getvalue().splitlines() if line.startswith('f32[5,')]


def test_default_policy_keeps_block_activations_in_the_compute_dtype():
  # bf16 compute: what a block keeps for the backward pass is bf16 under the default
  # policy (the float32 residuals left are the final LayerNorm's, not per block);
  # without remat, LayerNorm and softmax keep float32 intermediates in every block.
  one, three = (_float32_activation_residuals(remat.DEFAULT, n) for n in (1, 3))
  assert len(one) == len(three), three
  none_one, none_three = (_float32_activation_residuals('none', n) for n in (1, 3))
  assert len(none_three) > len(none_one), none_three
