"""MLP-Mixer (Tolstikhin et al. 2021): sizes, numerics, published layout, timm, tools.

The reference forward pass below is written here in float64 NumPy from the
paper's equations (Sec. 2) and ../shared/README.md's facts about the released
code (LayerNorm eps 1e-6, tanh GELU, mean over patches before the head); it
shares no code with vit_jax.models_mixer.
"""

import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import special

from vit_jax import checkpoint
from vit_jax import predict
from vit_jax.configs import models
from vit_jax.configs import recipes
from vit_jax.configs import schema

# Mixer paper Table 1: (patch, hidden C, blocks, D_S, D_C, parameters in millions).
TABLE_1 = {
    'Mixer-S_32': (32, 512, 8, 256, 2048, 19),
    'Mixer-S_16': (16, 512, 8, 256, 2048, 18),
    'Mixer-B_32': (32, 768, 12, 384, 3072, 60),
    'Mixer-B_16': (16, 768, 12, 384, 3072, 59),
    'Mixer-L_32': (32, 1024, 24, 512, 4096, 206),
    'Mixer-L_16': (16, 1024, 24, 512, 4096, 208),
    'Mixer-H_14': (14, 1280, 32, 640, 5120, 431),
}


# ---------------------------------------------------------------------------
# The independent reference.
# ---------------------------------------------------------------------------

def np_layer_norm(x, scale, bias, eps=1e-6):
  mean = x.mean(-1, keepdims=True)
  var = ((x - mean) ** 2).mean(-1, keepdims=True)
  return (x - mean) / np.sqrt(var + eps) * scale + bias


def np_gelu(x, approximate=True):
  if approximate:
    return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))
  return 0.5 * x * (1 + special.erf(x / np.sqrt(2)))


def np_mlp(x, w1, b1, w2, b2, approximate):
  return np_gelu(x @ w1 + b1, approximate) @ w2 + b2


def np_mixer(flat, images, approximate=True):
  """Logits of a Mixer given as {published key: array}, in float64."""
  f = {k: np.asarray(v, np.float64) for k, v in flat.items()}
  x = np.asarray(images, np.float64)
  kernel = f['stem/kernel']  # (P, P, 3, C)
  p, c = kernel.shape[0], kernel.shape[-1]
  b, h, w, _ = x.shape
  patches = x.reshape(b, h // p, p, w // p, p, 3).transpose(0, 1, 3, 2, 4, 5)
  patches = patches.reshape(b, (h // p) * (w // p), p * p * 3)
  x = patches @ kernel.reshape(p * p * 3, c) + f['stem/bias']  # X: (batch, S, C)
  i = 0
  while f'MixerBlock_{i}/LayerNorm_0/scale' in f:
    g = lambda name: f[f'MixerBlock_{i}/{name}']
    mlp = lambda name, y: np_mlp(y, g(f'{name}/Dense_0/kernel'), g(f'{name}/Dense_0/bias'),
                                 g(f'{name}/Dense_1/kernel'), g(f'{name}/Dense_1/bias'),
                                 approximate)
    # U_{*,i} = X_{*,i} + W2 GELU(W1 LN(X)_{*,i}): an MLP over the patches of each channel.
    y = np_layer_norm(x, g('LayerNorm_0/scale'), g('LayerNorm_0/bias'))
    x = x + mlp('token_mixing', y.transpose(0, 2, 1)).transpose(0, 2, 1)
    # Y_{j,*} = U_{j,*} + W4 GELU(W3 LN(U)_{j,*}): an MLP over the channels of each patch.
    y = np_layer_norm(x, g('LayerNorm_1/scale'), g('LayerNorm_1/bias'))
    x = x + mlp('channel_mixing', y)
    i += 1
  x = np_layer_norm(x, f['pre_head_layer_norm/scale'], f['pre_head_layer_norm/bias'])
  return x.mean(axis=1) @ f['head/kernel'] + f['head/bias']


def published_keys(num_blocks):
  keys = ['stem/kernel', 'stem/bias', 'pre_head_layer_norm/scale', 'pre_head_layer_norm/bias',
          'head/kernel', 'head/bias']
  for i in range(num_blocks):
    for norm in ('LayerNorm_0', 'LayerNorm_1'):
      keys += [f'MixerBlock_{i}/{norm}/scale', f'MixerBlock_{i}/{norm}/bias']
    for mlp in ('token_mixing', 'channel_mixing'):
      for d in ('Dense_0', 'Dense_1'):
        keys += [f'MixerBlock_{i}/{mlp}/{d}/kernel', f'MixerBlock_{i}/{mlp}/{d}/bias']
  return sorted(keys)


def random_published(seed, *, patch, hidden, blocks, tokens, ds, dc, classes):
  """Random weights in the published Mixer layout, built from the shapes in
  ../shared/README.md (not from our model)."""
  rng = np.random.default_rng(seed)
  n = lambda *shape, s=0.2: (rng.standard_normal(shape) * s).astype(np.float32)
  flat = {'stem/kernel': n(patch, patch, 3, hidden), 'stem/bias': n(hidden),
          'pre_head_layer_norm/scale': 1 + n(hidden), 'pre_head_layer_norm/bias': n(hidden),
          'head/kernel': n(hidden, classes), 'head/bias': n(classes)}
  for i in range(blocks):
    p = f'MixerBlock_{i}/'
    for norm in ('LayerNorm_0', 'LayerNorm_1'):
      flat[p + norm + '/scale'] = 1 + n(hidden)
      flat[p + norm + '/bias'] = n(hidden)
    for mlp, dim, width in (('token_mixing', tokens, ds), ('channel_mixing', hidden, dc)):
      flat[p + mlp + '/Dense_0/kernel'] = n(dim, width)
      flat[p + mlp + '/Dense_0/bias'] = n(width)
      flat[p + mlp + '/Dense_1/kernel'] = n(width, dim)
      flat[p + mlp + '/Dense_1/bias'] = n(dim)
  return flat


# Mixer-Test_4 at 16x16: a 4x4 grid of 16 patches.
TEST = dict(patch=4, hidden=32, blocks=2, tokens=16, ds=16, dc=64)


def images(seed, size=16, batch=2):
  return np.random.default_rng(seed).uniform(-1, 1, (batch, size, size, 3)).astype(np.float32)


def apply(name_or_config, params, x, classes):
  model = models.build_model(name_or_config, classes)
  return np.asarray(model.apply({'params': params}, jnp.asarray(x), train=False)[0])


# ---------------------------------------------------------------------------
# Sizes.
# ---------------------------------------------------------------------------

def paper_count(patch, c, blocks, ds, dc, classes, image=224):
  """Parameters from the paper's equations: stem, per block 2 LNs + 2 MLPs, LN, head."""
  s = (image // patch) ** 2
  block = 2 * 2 * c + (s * ds + ds + ds * s + s) + (c * dc + dc + dc * c + c)
  return patch * patch * 3 * c + c + blocks * block + 2 * c + c * classes + classes


@pytest.mark.parametrize('name', sorted(TABLE_1))
def test_presets_match_table_1(name):
  patch, c, blocks, ds, dc, paper_m = TABLE_1[name]
  config = models.get_config(name)
  assert (tuple(config.patches.size), config.hidden_dim, config.num_blocks,
          config.tokens_mlp_dim, config.channels_mlp_dim) == ((patch, patch), c, blocks, ds, dc)
  params = checkpoint.abstract_params(name, 1000, (224, 224))
  flat = checkpoint.flatten(params)
  assert sorted(flat) == published_keys(blocks)
  count = sum(math.prod(v.shape) for v in flat.values())
  assert count == paper_count(patch, c, blocks, ds, dc, 1000)
  head = c * 1000 + 1000
  print(f'{name}: {count / 1e6:.2f}M with the 1000-class head, '
        f'{(count - head) / 1e6:.2f}M without; paper {paper_m}M')
  # Table 1 rounds to millions; its figures fall between the counts without and
  # with a 1000-class head (e.g. H/14: 431.07M / 432.35M, paper 431M).
  assert (count - head) / 1e6 - 0.5 <= paper_m <= count / 1e6 + 0.5
  assert flat['MixerBlock_0/token_mixing/Dense_0/kernel'].shape == ((224 // patch) ** 2, ds)


def test_head_is_zero_initialised_and_config_overrides_reach_the_model():
  model = models.build_model('Mixer-Test_4', 10)
  params = model.init(jax.random.key(0), jnp.zeros((1, 16, 16, 3)))['params']
  assert not np.any(np.asarray(params['head']['kernel']))
  config = schema.resolve({'model_name': 'Mixer-Test_4',
                           'model': {'tokens_mlp_dim': 24, 'approximate_gelu': False}})
  from vit_jax import validation  # pylint: disable=g-import-not-at-top
  built = validation.build_model(config, 10)
  assert (built.tokens_mlp_dim, built.approximate_gelu) == (24, False)
  with pytest.raises(ValueError, match='transformer'):
    schema.model_config(schema.resolve({'model_name': 'Mixer-Test_4',
                                        'model': {'transformer': {'num_heads': 2}}}))


# ---------------------------------------------------------------------------
# Numerics and the published layout.
# ---------------------------------------------------------------------------

@pytest.mark.parametrize('approximate', [True, False])
def test_published_npz_loads_and_matches_the_reference(tmp_path, approximate):
  flat = random_published(0, classes=10, **TEST)
  path = str(tmp_path / 'Mixer-Test_4.npz')
  np.savez(path, **flat)
  expected = checkpoint.abstract_params('Mixer-Test_4', 10, (16, 16))
  params = checkpoint.load(path, expected=expected)
  config = models.get_config('Mixer-Test_4')
  config.approximate_gelu = approximate
  x = images(1)
  got = apply(config, params, x, 10)
  want = np_mixer(flat, x, approximate)
  diff = float(np.max(np.abs(got - want)))
  print(f'approximate_gelu={approximate}: max |logit - reference| {diff:.2e} '
        f'(logits up to {np.abs(want).max():.1f})')
  assert diff < 1e-4
  # The other GELU is measurably different: the test would notice a wrong one.
  other = np_mixer(flat, x, not approximate)
  assert np.max(np.abs(other - want)) > 1e-4
  # The tree round-trips through save / inspect in the same layout.
  out = str(tmp_path / 'again.npz')
  checkpoint.save(params, out)
  assert sorted(np.load(out).files) == published_keys(2)
  rows = checkpoint.inspect(out, print_fn=lambda *_: None)
  assert len(rows) == len(flat)
  assert checkpoint.model_family(flat) == 'mixer'


def test_load_pretrained_gives_a_fresh_head(tmp_path):
  flat = random_published(2, classes=10, **TEST)
  path = str(tmp_path / 'ckpt.npz')
  np.savez(path, **flat)
  init = checkpoint.abstract_params('Mixer-Test_4', 5, (16, 16))
  params = checkpoint.load_pretrained(path, init, 'Mixer-Test_4', image_size=(16, 16))
  out = checkpoint.flatten(params)
  assert out['head/kernel'].shape == (32, 5) and not out['head/kernel'].any()
  for key, value in flat.items():
    if not key.startswith('head/'):
      np.testing.assert_array_equal(out[key], value)
  # A ViT checkpoint is refused by family.
  vit_init = checkpoint.abstract_params('ViT-Test_4', 5, (16, 16))
  with pytest.raises(ValueError, match="'mixer' model but the target model is 'vit'"):
    checkpoint.load_pretrained(path, vit_init, 'ViT-Test_4')


def test_higher_resolution_widens_token_mixing_block_diagonally(tmp_path):
  """4x4 -> 8x8 patches (16 -> 32 px): each contiguous 4x4 tile of the new grid is
  mixed by the pre-trained token MLP, as the paper's Appendix initialisation does."""
  flat = random_published(3, classes=10, **TEST)
  path = str(tmp_path / 'ckpt.npz')
  np.savez(path, **flat)
  config = models.get_config('Mixer-Test_4')
  config.tokens_mlp_dim = 4 * TEST['ds']
  init = checkpoint.abstract_params(config, 10, (32, 32))
  params = checkpoint.flatten(
      checkpoint.load_pretrained(path, init, config, image_size=(32, 32)))
  p = 'MixerBlock_1/token_mixing/'
  assert params[p + 'Dense_0/kernel'].shape == (64, 64)
  assert params[p + 'Dense_1/kernel'].shape == (64, 64)
  # The widened MLP on a (channels, 8x8) input, against the old one per 4x4 tile.
  y = np.random.default_rng(4).standard_normal((5, 8, 8))
  got = np_mlp(y.reshape(5, 64), params[p + 'Dense_0/kernel'], params[p + 'Dense_0/bias'],
               params[p + 'Dense_1/kernel'], params[p + 'Dense_1/bias'], True).reshape(5, 8, 8)
  for r in (0, 4):
    for c in (0, 4):
      tile = y[:, r:r + 4, c:c + 4].reshape(5, 16)
      want = np_mlp(tile, flat[p + 'Dense_0/kernel'], flat[p + 'Dense_0/bias'],
                    flat[p + 'Dense_1/kernel'], flat[p + 'Dense_1/bias'], True)
      np.testing.assert_allclose(got[:, r:r + 4, c:c + 4].reshape(5, 16), want, atol=1e-5)
  # The whole model runs at the new size with those weights.
  logits = apply(config, checkpoint.unflatten(params), images(5, 32), 10)
  assert logits.shape == (2, 10) and np.all(np.isfinite(logits))


def test_grids_that_cannot_be_widened_are_refused_naming_both(tmp_path):
  flat = random_published(6, classes=10, **TEST)
  path = str(tmp_path / 'ckpt.npz')
  np.savez(path, **flat)
  # 24 px: a 6x6 grid, not a whole multiple of 4x4.
  init = checkpoint.abstract_params('Mixer-Test_4', 10, (24, 24))
  with pytest.raises(ValueError, match=r'4x4 patch grid.*6x6 grid'):
    checkpoint.load_pretrained(path, init, 'Mixer-Test_4', image_size=(24, 24))
  # 32 px without the widened token MLP: says which tokens_mlp_dim it needs.
  init = checkpoint.abstract_params('Mixer-Test_4', 10, (32, 32))
  with pytest.raises(ValueError, match=r'8x8 grid.*tokens_mlp_dim=64'):
    checkpoint.load_pretrained(path, init, 'Mixer-Test_4', image_size=(32, 32))


# ---------------------------------------------------------------------------
# timm.
# ---------------------------------------------------------------------------

def test_timm_mixer_converts_to_1e4(tmp_path):
  torch = pytest.importorskip('torch')
  pytest.importorskip('timm')
  from vit_jax import convert  # pylint: disable=g-import-not-at-top
  torch.manual_seed(0)
  exact = convert.pytorch_model_config('Mixer-Test_4')
  timm_model = convert.build_timm_mixer(exact, 10, (16, 16))
  with torch.no_grad():  # timm zero-initialises the head: make every logit informative
    timm_model.head.weight.normal_(0, 0.5)
    timm_model.head.bias.normal_(0, 0.5)
  x = images(7)
  with torch.no_grad():
    want = timm_model(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).numpy()
  params = convert.from_timm(timm_model.state_dict(), exact)
  got = apply(exact, params, x, 10)
  diff = float(np.max(np.abs(got - want)))
  tanh = apply('Mixer-Test_4', params, x, 10)
  print(f'timm MlpMixer vs ours (exact GELU): {diff:.2e}; ours with the tanh GELU '
        f'differs by {np.max(np.abs(tanh - want)):.2e}')
  assert diff < 1e-4
  # And back: our params as a timm state dict load strictly and give the same logits.
  again = convert.build_timm_mixer(exact, 10, (16, 16))
  again.load_state_dict(convert.torch_state_dict(convert.to_timm(params, False)))
  with torch.no_grad():
    back = again(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).numpy()
  np.testing.assert_allclose(back, want, atol=1e-5)
  # The CLI path: npz -> timm file, read back by timm and checked.
  npz = str(tmp_path / 'm.npz')
  checkpoint.save(params, npz)
  result = convert.convert_file('npz', 'timm', 'Mixer-Test_4', npz, str(tmp_path / 'm.pth'))
  assert result.checks['output'] < 1e-4
  with pytest.raises(ValueError, match='no Mixer'):
    convert.convert_file('npz', 'hf', 'Mixer-Test_4', npz, str(tmp_path / 'hf'))


def test_timm_mixer_b16_224_maps_onto_the_preset():
  """timm's own Mixer-B/16 definition (`mixer_b16_224`, random weights) has exactly
  the Mixer-B_16 tree once converted: every key and shape."""
  pytest.importorskip('torch')
  timm = pytest.importorskip('timm')
  from vit_jax import convert  # pylint: disable=g-import-not-at-top
  model = timm.create_model('mixer_b16_224', pretrained=False)
  params = convert.from_timm(model.state_dict(), convert.pytorch_model_config('Mixer-B_16'))
  expected = checkpoint.abstract_params('Mixer-B_16', 1000, (224, 224))
  checkpoint.check_params(params, expected)
  assert set(convert.to_timm(params, False)) == set(model.state_dict())


# ---------------------------------------------------------------------------
# Tools and configs.
# ---------------------------------------------------------------------------

def test_predict_runs_a_mixer_at_its_own_grid(tmp_path):
  flat = random_published(8, classes=10, **TEST)
  path = str(tmp_path / 'ckpt.npz')
  np.savez(path, **flat)
  model, params, size = predict.load_model('Mixer-Test_4', path)
  assert size == (16, 16)
  x = images(9, batch=1)
  probs = predict.predict(model, params, x)
  want = np_mixer(flat, x)
  want = np.exp(want - want.max()) / np.exp(want - want.max()).sum()
  np.testing.assert_allclose(probs, want, atol=1e-5)
  with pytest.raises(ValueError, match=r'4x4 patch grid.*8x8 grid'):
    predict.load_model('Mixer-Test_4', path, image_size=32)


def test_visualize_writes_the_token_mixing_figure(tmp_path):
  from vit_jax import visualize  # pylint: disable=g-import-not-at-top
  flat = random_published(10, classes=10, **TEST)
  units = visualize.token_mixing_units(checkpoint.unflatten(flat), 0, (4, 4))
  kernel = flat['MixerBlock_0/token_mixing/Dense_0/kernel']
  # Every unit is one column of the kernel laid out on the patch grid (row-major).
  columns = {tuple(np.round(kernel[:, j], 6)) for j in range(kernel.shape[1])}
  assert {tuple(np.round(u.reshape(-1), 6)) for u in units} == columns
  # Sorted by spatial frequency: a constant-sign smooth unit before a checkerboard.
  smooth = np.outer(np.hanning(6)[1:5], np.hanning(6)[1:5])
  checker = np.indices((4, 4)).sum(0) % 2 * 2 - 1.0
  two = {'MixerBlock_0': {'token_mixing': {'Dense_0': {'kernel': np.stack(
      [checker.reshape(-1), smooth.reshape(-1)], axis=1)}}}}
  np.testing.assert_allclose(visualize.token_mixing_units(two, 0, (4, 4))[0], smooth)
  npz = str(tmp_path / 'm.npz')
  np.savez(npz, **flat)
  paths = visualize.main(['--model', 'Mixer-Test_4', '--checkpoint', npz,
                          '--image', 'digits:test:0', '--out', str(tmp_path / 'vis')])
  assert set(paths) == {'patches', 'token_mixing', 'top_k'}
  for path in paths.values():
    with open(path, 'rb') as f:
      assert f.read(8) == visualize.PNG_MAGIC


def test_finetune_recipe_for_mixer_widens_at_448():
  config = recipes.from_arg('finetune', 'cifar10', 'Mixer-B_16')
  assert config.pretrained_path.endswith('Mixer-B_16.npz')
  assert tuple(config.image_size) == (448, 448)
  assert config.model.tokens_mlp_dim == 4 * 384
  from vit_jax import validation  # pylint: disable=g-import-not-at-top
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(os.path, 'exists', lambda p: True)  # no published file here
    validation.validate_config(config)
  local = recipes.from_arg('finetune', 'cifar10', 'Mixer-B_16,runlocal')
  assert local.model_name == 'Mixer-Test_4' and local.model.tokens_mlp_dim is None
  validation.validate_config(local)


def test_analytic_flops_agree_with_xla():
  """`flops.vit_flops` on a Mixer preset: the matmul count within 2% of what XLA's
  CPU cost analysis counts for the compiled forward pass (which adds norms, GELU)."""
  from vit_jax import flops  # pylint: disable=g-import-not-at-top
  model = models.build_model('Mixer-S_32', 1000)
  params = checkpoint.abstract_params('Mixer-S_32', 1000, (224, 224))
  compiled = jax.jit(lambda p, x: model.apply({'params': p}, x)[0]).lower(
      params, jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.float32)).compile()
  xla = flops.xla_flops(compiled)
  analytic = flops.vit_flops(models.get_config('Mixer-S_32'), 224, 1000)
  print(f'Mixer-S_32 forward: analytic {analytic / 1e9:.3f} GFLOPs, XLA {xla / 1e9:.3f}')
  assert analytic <= xla <= 1.02 * analytic


def test_benchmark_builds_timm_mixer_b16_224_for_the_preset():
  """benchmarks/timm_bench.py times a Mixer preset against timm's MlpMixer of the
  same numbers: for Mixer-B_16 at 224 that is timm's `mixer_b16_224`."""
  pytest.importorskip('torch')
  timm = pytest.importorskip('timm')
  from benchmarks import jax_bench, timm_bench  # pylint: disable=g-import-not-at-top
  spec = {'model': 'Mixer-B_16', 'image_size': 224, 'num_classes': 1000, 'dtype': 'fp32'}
  ours = timm_bench.timm_model(spec).state_dict()
  reference = timm.create_model('mixer_b16_224', pretrained=False).state_dict()
  assert {k: tuple(v.shape) for k, v in ours.items()} == {
      k: tuple(v.shape) for k, v in reference.items()}
  _, model = jax_bench.build(spec)
  assert type(model).__name__ == 'MlpMixer'
