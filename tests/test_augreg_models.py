"""The AugReg release's models against independent implementations.

- Hybrids (R+ViT-Ti_16, R26+ViT-S_32, R26+ViT-B_32, R50+ViT-L_32): a file we save in
  the published layout is read by timm's own `.npz` loader (`load_pretrained`, the
  path timm uses for the released files) into timm's hybrid, which must give our
  logits. timm's GELU is exact, the published one tanh: timm is built with
  `act_layer='gelu_tanh'`, as test_convert does for exports. Likewise its
  weight standardisation, (w - mean) / sqrt(var + 1e-8), is the reference's
  (w - mean) / (std + 1e-5) here, and its GroupNorm epsilon flax's 1e-6: with
  timm's own the logits differ by ~3e-4 (R26) to ~2e-3 (R50, 16 units).
- gap-norep ViTs: a NumPy forward pass written here from the facts (pre-LN blocks,
  LayerNorm eps 1e-6, tanh GELU, the published kernel layouts, mean over tokens,
  no class token, no representation layer).
- Parameter counts at 1000 classes, 224 px: timm's, from the shared facts.
"""

import jax
import numpy as np
import pytest

from vit_jax import checkpoint
from vit_jax.configs import models as model_configs

# Parameters at 1000 classes and 224x224 (timm's models of the same names).
RELEASE_COUNTS = {
    'R+ViT-Ti_16': 6_337_704,  # vit_tiny_r_s16_p8_224
    'R26+ViT-S_32': 36_431_912,  # vit_small_r26_s32_224
    'R26+ViT-B_32': 101_383_976,  # vit_base_r26_s32_224
    'R50+ViT-L_32': 328_994_856,  # vit_large_r50_s32_224
    # gap-norep: the ViT's count less the class token and its position embedding.
    'ViT-S_16-gap-norep': 22_050_664 - 2 * 384,
    'ViT-B_16-gap-norep': 86_567_656 - 2 * 768,
    'ViT-S_32-gap-norep': 22_878_952 - 2 * 384,
    'ViT-B_32-gap-norep': 88_224_232 - 2 * 768,
}
SHORT_NAMES = {'Ti_16': 'ViT-Ti_16', 'S_16': 'ViT-S_16', 'B_16': 'ViT-B_16', 'L_16': 'ViT-L_16',
               'B_8': 'ViT-B_8', 'S_32': 'ViT-S_32', 'B_32': 'ViT-B_32',
               'R_Ti_16': 'R+ViT-Ti_16', 'R26_S_32': 'R26+ViT-S_32',
               'R26_B_32': 'R26+ViT-B_32', 'R50_L_32': 'R50+ViT-L_32'}


@pytest.mark.parametrize('name', sorted(RELEASE_COUNTS))
def test_parameter_counts(name):
  shapes = checkpoint.flatten(checkpoint.abstract_params(name, 1000, (224, 224)))
  assert sum(int(np.prod(s.shape)) for s in shapes.values()) == RELEASE_COUNTS[name]
  # Each file's shapes name its preset alone (hybrids: 7x7+1 tokens at 224).
  assert checkpoint.guess_presets(shapes) == [name]
  if '+' in name:
    assert shapes[checkpoint.POSEMB_KEY].shape[1] == 50


def test_release_short_names_are_presets():
  for short, preset in SHORT_NAMES.items():
    assert model_configs.canonical_name(short) == preset
    assert model_configs.get_config(short).name == preset
    assert model_configs.short_name(preset) == short
  with pytest.raises(ValueError, match='Unknown model'):
    model_configs.get_config('R26_S_16')


def test_root_only_and_r50_stems():
  # R+ViT-Ti_16: the /4 root alone, cut into 8x8 patches of 64 channels.
  shapes = checkpoint.flatten(checkpoint.abstract_params('R_Ti_16', 1000, (32, 32)))
  assert shapes['embedding/kernel'].shape == (8, 8, 64, 192)
  assert not any(k.startswith('block') for k in shapes)
  assert checkpoint.resnet_architecture(shapes).num_layers == ()
  config = model_configs.get_config('R50_L_32')
  assert tuple(config.resnet.num_layers) == (3, 4, 6, 3) and config.resnet.width_factor == 1


# --- hybrids against timm's loader of the published .npz -----------------------------

# (preset, timm model, transformer layers kept): the R26 / R50 hybrids keep their whole
# ResNet and their ViT's widths but 2 of its blocks, in both models (CI time: R50+ViT-L_32
# has 329M parameters); their full sizes are checked by test_parameter_counts.
HYBRIDS = [('R+ViT-Ti_16', 'vit_tiny_r_s16_p8_224', None),
           ('R26+ViT-S_32', 'vit_small_r26_s32_224', 2),
           ('R26+ViT-B_32', 'vit_base_r26_s32_224', 2),
           ('R50+ViT-L_32', 'vit_large_r50_s32_224', 2)]


def _with_reference_numerics(model):
  """timm's hybrid with the reference's StdConv and GroupNorm epsilons (see the docstring)."""
  import torch  # pylint: disable=g-import-not-at-top
  from timm.layers.padding import pad_same  # pylint: disable=g-import-not-at-top

  def standardised(conv):
    def forward(x):
      if conv.same_pad:
        x = pad_same(x, conv.kernel_size, conv.stride, conv.dilation)
      w = conv.weight
      w = (w - w.mean((1, 2, 3), keepdim=True)) / (
          w.std((1, 2, 3), keepdim=True, unbiased=False) + 1e-5)
      return torch.nn.functional.conv2d(x, w, conv.bias, conv.stride, conv.padding,
                                        conv.dilation, conv.groups)
    return forward

  for module in model.modules():
    if type(module).__name__ == 'StdConv2dSame':
      module.forward = standardised(module)
    elif isinstance(module, torch.nn.GroupNorm):
      module.eps = 1e-6
  return model


@pytest.mark.parametrize('preset,timm_name,depth', HYBRIDS, ids=[h[0] for h in HYBRIDS])
def test_hybrid_npz_loads_into_timm(tmp_path, preset, timm_name, depth):
  torch = pytest.importorskip('torch')
  timm = pytest.importorskip('timm')
  from test_convert import random_params  # pylint: disable=g-import-not-at-top
  size, classes = 64, 10
  config = model_configs.get_config(preset)
  if depth:
    config.transformer.num_layers = depth
  params = random_params(config, classes, size, seed=1)
  path = tmp_path / f'{model_configs.short_name(preset)}.npz'
  checkpoint.save(params, path)

  kwargs = dict(img_size=size, num_classes=classes, act_layer='gelu_tanh')
  if depth:
    kwargs['depth'] = depth
  reference = timm.create_model(timm_name, pretrained=False, **kwargs).eval()
  reference.load_pretrained(str(path))  # timm's reader of the published .npz files
  _with_reference_numerics(reference)

  images = np.random.default_rng(2).uniform(-1, 1, (2, size, size, 3)).astype(np.float32)
  model = model_configs.build_model(config, classes)
  ours = np.asarray(jax.jit(lambda p, x: model.apply({'params': p}, x)[0])(params, images))
  with torch.no_grad():
    theirs = reference(torch.from_numpy(images.transpose(0, 3, 1, 2).copy())).numpy()
  diff = float(np.abs(ours - theirs).max())
  print(f'\n{preset} vs timm {timm_name}: max |logit diff| {diff:.2e} '
        f'(logits up to {np.abs(theirs).max():.3g})')
  assert np.abs(theirs).max() > 0.1  # a non-trivial head
  assert diff <= 1e-4


# --- gap-norep ViTs against a forward pass from the facts -----------------------------

def _layer_norm(x, p):
  mean = x.mean(-1, keepdims=True)
  var = ((x - mean) ** 2).mean(-1, keepdims=True)
  return (x - mean) / np.sqrt(var + 1e-6) * p['scale'] + p['bias']


def _tanh_gelu(x):
  return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))


def _reference_gap_vit(p, images, patch, layers):
  """ViT with mean pooling, from the paper's eqs. (1)-(3) and the published layout."""
  b, h, w, c = images.shape
  x = images.reshape(b, h // patch, patch, w // patch, patch, c).transpose(0, 1, 3, 2, 4, 5)
  x = x.reshape(b, -1, patch * patch * c) @ p['embedding']['kernel'].reshape(-1, p[
      'embedding']['kernel'].shape[-1]) + p['embedding']['bias']
  t = p['Transformer']
  x = x + t['posembed_input']['pos_embedding']
  for i in range(layers):
    blk = t[f'encoderblock_{i}']
    att = blk['MultiHeadDotProductAttention_1']
    y = _layer_norm(x, blk['LayerNorm_0'])
    q, k, v = (np.einsum('btd,dhk->bthk', y, att[n]['kernel']) + att[n]['bias']
               for n in ('query', 'key', 'value'))
    logits = np.einsum('bqhk,bthk->bhqt', q, k) / np.sqrt(q.shape[-1])
    weights = np.exp(logits - logits.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    y = np.einsum('bhqt,bthk->bqhk', weights, v)
    x = x + np.einsum('bqhk,hkd->bqd', y, att['out']['kernel']) + att['out']['bias']
    mlp = blk['MlpBlock_3']
    y = _layer_norm(x, blk['LayerNorm_2'])
    y = _tanh_gelu(y @ mlp['Dense_0']['kernel'] + mlp['Dense_0']['bias'])
    x = x + y @ mlp['Dense_1']['kernel'] + mlp['Dense_1']['bias']
  x = _layer_norm(x, t['encoder_norm']).mean(axis=1)
  return x @ p['head']['kernel'] + p['head']['bias']


@pytest.mark.parametrize('preset', ['ViT-S_16-gap-norep', 'ViT-B_16-gap-norep',
                                    'ViT-S_32-gap-norep', 'ViT-B_32-gap-norep'])
def test_gap_norep_forward_matches_the_facts(preset):
  from test_convert import random_params  # pylint: disable=g-import-not-at-top
  config = model_configs.get_config(preset)
  config.transformer.num_layers = 2  # widths, heads, patch and pooling are the preset's
  patch = config.patches.size[0]
  size, classes = 2 * patch, 7
  params = random_params(config, classes, size, seed=3)
  flat = checkpoint.flatten(params)
  assert 'cls' not in flat and not any(k.startswith('pre_logits') for k in flat)
  images = np.random.default_rng(4).uniform(-1, 1, (2, size, size, 3)).astype(np.float32)
  model = model_configs.build_model(config, classes)
  ours = np.asarray(jax.jit(lambda p, x: model.apply({'params': p}, x)[0])(params, images))
  as64 = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), params)
  expected = _reference_gap_vit(as64, images.astype(np.float64), patch,
                                config.transformer.num_layers)
  diff = float(np.abs(ours - expected).max())
  print(f'\n{preset}: max |logit diff| {diff:.2e} (logits up to {np.abs(expected).max():.3g})')
  assert np.abs(expected).max() > 0.1
  assert diff <= 1e-4
