"""Our model against an independent NumPy forward pass of the paper's equations.

The reference below is written from Dosovitskiy et al., eqs. (1)-(4), and the
published checkpoint layout (docs/checkpoints.md), not from our modules:

  (1) z_0  = [x_class; x_p^1 E; ...; x_p^N E] + E_pos   patch "conv" = reshape + matmul
  (2) z'_l = MSA(LN(z_{l-1})) + z_{l-1}                  pre-LN, LayerNorm eps 1e-6
  (3) z_l  = MLP(LN(z'_l)) + z'_l                        MLP = Dense, tanh GELU, Dense
  (4) y    = LN(z_L^0)                                   then [tanh pre_logits], head

with 'gap' pooling averaging all tokens instead of taking the class token. The
tanh GELU is the one the published checkpoints were trained with (the
reference code's `flax.linen.gelu` default). The R50+ViT hybrid's ResNet stem
is written out too: weight-standardised convolutions, GroupNorm with 32 groups,
post-activation bottleneck units under the published `conv_root`, `gn_root`,
`block{i}/unit{j}/...` names, and TensorFlow-style 'SAME' padding.

Random weights are written to an .npz in the published flat layout with numpy
alone, read back with `vit_jax.checkpoint.load` and run through our model; the
NumPy reference computes in float64, our model in float32.
"""

from __future__ import annotations

import functools
import math
from typing import Optional

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.special

from vit_jax import checkpoint
from vit_jax.configs import models as model_configs

TOL = 1e-4  # max |logit difference| allowed (float32 model vs float64 reference)
LN_EPS = 1e-6
GN_EPS = 1e-6  # flax.linen.GroupNorm's default, which the hybrid stem uses
WS_EPS = 1e-5  # added to the kernel's std in weight standardisation
GN_GROUPS = 32

Flat = dict[str, np.ndarray]


# --- NumPy building blocks -----------------------------------------------------------

def gelu_tanh(x: np.ndarray) -> np.ndarray:
  return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def gelu_erf(x: np.ndarray) -> np.ndarray:
  return 0.5 * x * (1.0 + scipy.special.erf(x / math.sqrt(2.0)))


def layer_norm(x: np.ndarray, scale: np.ndarray, bias: np.ndarray) -> np.ndarray:
  mean = x.mean(-1, keepdims=True)
  var = ((x - mean) ** 2).mean(-1, keepdims=True)
  return (x - mean) / np.sqrt(var + LN_EPS) * scale + bias


def softmax(x: np.ndarray, axis: int) -> np.ndarray:
  e = np.exp(x - x.max(axis=axis, keepdims=True))
  return e / e.sum(axis=axis, keepdims=True)


def same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
  """TensorFlow 'SAME': ceil(size / stride) outputs, the odd pixel of padding at the end."""
  out = -(-size // stride)
  total = max((out - 1) * stride + kernel - size, 0)
  return total // 2, total - total // 2


def pad_same(x: np.ndarray, kernel: int, stride: int, value: float) -> np.ndarray:
  pads = [(0, 0), same_padding(x.shape[1], kernel, stride),
          same_padding(x.shape[2], kernel, stride), (0, 0)]
  return np.pad(x, pads, constant_values=value)


def windows(x: np.ndarray, kernel: int, stride: int, out_h: int, out_w: int):
  """Yields (i, j, x[:, i::stride, j::stride]) cut to the output size: one kernel tap each."""
  for i in range(kernel):
    for j in range(kernel):
      yield i, j, x[:, i:i + stride * (out_h - 1) + 1:stride,
                    j:j + stride * (out_w - 1) + 1:stride, :]


def conv_same(x: np.ndarray, kernel: np.ndarray, stride: int) -> np.ndarray:
  """NHWC x HWIO convolution with 'SAME' padding, as a sum of per-tap matmuls."""
  k = kernel.shape[0]
  out_h, out_w = -(-x.shape[1] // stride), -(-x.shape[2] // stride)
  padded = pad_same(x, k, stride, 0.0)
  out = np.zeros(x.shape[:1] + (out_h, out_w, kernel.shape[-1]))
  for i, j, tap in windows(padded, k, stride, out_h, out_w):
    out += tap @ kernel[i, j]
  return out


def max_pool_same(x: np.ndarray, kernel: int, stride: int) -> np.ndarray:
  out_h, out_w = -(-x.shape[1] // stride), -(-x.shape[2] // stride)
  padded = pad_same(x, kernel, stride, -np.inf)
  return np.max([tap for _, _, tap in windows(padded, kernel, stride, out_h, out_w)], axis=0)


def standardize(kernel: np.ndarray) -> np.ndarray:
  """Weight standardisation per output filter over (kh, kw, c_in)."""
  mean = kernel.mean(axis=(0, 1, 2), keepdims=True)
  std = kernel.std(axis=(0, 1, 2), keepdims=True)
  return (kernel - mean) / (std + WS_EPS)


def group_norm(x: np.ndarray, scale: np.ndarray, bias: np.ndarray) -> np.ndarray:
  b, h, w, c = x.shape
  g = x.reshape(b, h, w, GN_GROUPS, c // GN_GROUPS)
  mean = g.mean(axis=(1, 2, 4), keepdims=True)
  var = ((g - mean) ** 2).mean(axis=(1, 2, 4), keepdims=True)
  return ((g - mean) / np.sqrt(var + GN_EPS)).reshape(b, h, w, c) * scale + bias


def relu(x: np.ndarray) -> np.ndarray:
  return np.maximum(x, 0.0)


# --- NumPy forward passes ------------------------------------------------------------

def resnet_stem(flat: Flat, x: np.ndarray, num_layers: tuple[int, ...], width: int) -> np.ndarray:
  """Root (7x7/2 conv, GN, ReLU, 3x3/2 max pool) and post-activation bottleneck stages."""
  conv = lambda key, y, stride: conv_same(y, standardize(flat[f'{key}/kernel']), stride)
  gn = lambda key, y: group_norm(y, flat[f'{key}/scale'], flat[f'{key}/bias'])
  x = relu(gn('gn_root', conv('conv_root', x, 2)))
  x = max_pool_same(x, 3, 2)
  for b, units in enumerate(num_layers):
    features = width * 2 ** b
    for u in range(units):
      p = f'block{b + 1}/unit{u + 1}/'
      # The first unit of every stage after the first halves the grid, in its 3x3 conv.
      stride = 2 if (b > 0 and u == 0) else 1
      residual = x
      if f'{p}conv_proj/kernel' in flat:
        residual = gn(p + 'gn_proj', conv(p + 'conv_proj', x, stride))
      y = relu(gn(p + 'gn1', conv(p + 'conv1', x, 1)))
      y = relu(gn(p + 'gn2', conv(p + 'conv2', y, stride)))
      y = gn(p + 'gn3', conv(p + 'conv3', y, 1))
      x = relu(residual + y)
  return x


def multi_head_attention(flat: Flat, prefix: str, x: np.ndarray) -> np.ndarray:
  """softmax(Q K^T / sqrt(d)) V per head, with (D, heads, d) / (heads, d, D) kernels."""
  proj = lambda name: (np.einsum('btd,dhk->bthk', x, flat[f'{prefix}{name}/kernel'])
                       + flat[f'{prefix}{name}/bias'])
  q, k, v = proj('query'), proj('key'), proj('value')
  scores = np.einsum('bqhd,bkhd->bhqk', q, k) / math.sqrt(q.shape[-1])
  y = np.einsum('bhqk,bkhd->bqhd', softmax(scores, axis=-1), v)
  return np.einsum('bqhd,hdo->bqo', y, flat[f'{prefix}out/kernel']) + flat[f'{prefix}out/bias']


def reference_logits(flat: Flat, images: np.ndarray, *, num_layers: int, classifier: str,
                     resnet: Optional[dict] = None, gelu=gelu_tanh) -> np.ndarray:
  flat = {k: v.astype(np.float64) for k, v in flat.items()}
  x = images.astype(np.float64)
  if resnet is not None:
    x = resnet_stem(flat, x, **resnet)
  # Eq. (1): split into P x P patches, flatten each (row, column, channel) and project.
  ph, pw, c, d = flat['embedding/kernel'].shape
  b, h, w, _ = x.shape
  patches = x.reshape(b, h // ph, ph, w // pw, pw, c).transpose(0, 1, 3, 2, 4, 5)
  patches = patches.reshape(b, (h // ph) * (w // pw), ph * pw * c)
  z = patches @ flat['embedding/kernel'].reshape(ph * pw * c, d) + flat['embedding/bias']
  if classifier == 'token':
    z = np.concatenate([np.broadcast_to(flat['cls'], (b, 1, d)), z], axis=1)
  z = z + flat['Transformer/posembed_input/pos_embedding']
  for i in range(num_layers):
    p = f'Transformer/encoderblock_{i}/'
    ln = lambda n, y: layer_norm(y, flat[f'{p}{n}/scale'], flat[f'{p}{n}/bias'])
    # Eq. (2).
    z = z + multi_head_attention(flat, p + 'MultiHeadDotProductAttention_1/', ln('LayerNorm_0', z))
    # Eq. (3).
    y = ln('LayerNorm_2', z)
    y = gelu(y @ flat[p + 'MlpBlock_3/Dense_0/kernel'] + flat[p + 'MlpBlock_3/Dense_0/bias'])
    z = z + y @ flat[p + 'MlpBlock_3/Dense_1/kernel'] + flat[p + 'MlpBlock_3/Dense_1/bias']
  # Eq. (4).
  z = layer_norm(z, flat['Transformer/encoder_norm/scale'], flat['Transformer/encoder_norm/bias'])
  y = z[:, 0] if classifier == 'token' else z.mean(axis=1)
  if 'pre_logits/kernel' in flat:
    y = np.tanh(y @ flat['pre_logits/kernel'] + flat['pre_logits/bias'])
  return y @ flat['head/kernel'] + flat['head/bias']


# --- Random weights in the published layout ------------------------------------------

def published_vit_keys(*, hidden: int, mlp: int, heads: int, num_layers: int, patch: int,
                       in_channels: int, tokens: int, classifier: str,
                       representation_size: Optional[int], num_classes: int
                       ) -> dict[str, tuple[int, ...]]:
  """Key -> shape of a ViT checkpoint, spelled as the published files spell them."""
  d, hd = hidden, hidden // heads
  shapes = {
      'embedding/kernel': (patch, patch, in_channels, d),
      'embedding/bias': (d,),
      'Transformer/posembed_input/pos_embedding': (1, tokens, d),
      'Transformer/encoder_norm/scale': (d,),
      'Transformer/encoder_norm/bias': (d,),
  }
  if classifier == 'token':
    shapes['cls'] = (1, 1, d)
  for i in range(num_layers):
    p = f'Transformer/encoderblock_{i}/'
    a = p + 'MultiHeadDotProductAttention_1/'
    for ln in ('LayerNorm_0', 'LayerNorm_2'):
      shapes[f'{p}{ln}/scale'] = shapes[f'{p}{ln}/bias'] = (d,)
    for name in ('query', 'key', 'value'):
      shapes[f'{a}{name}/kernel'] = (d, heads, hd)
      shapes[f'{a}{name}/bias'] = (heads, hd)
    shapes[a + 'out/kernel'] = (heads, hd, d)
    shapes[a + 'out/bias'] = (d,)
    shapes[p + 'MlpBlock_3/Dense_0/kernel'] = (d, mlp)
    shapes[p + 'MlpBlock_3/Dense_0/bias'] = (mlp,)
    shapes[p + 'MlpBlock_3/Dense_1/kernel'] = (mlp, d)
    shapes[p + 'MlpBlock_3/Dense_1/bias'] = (d,)
  features = d
  if representation_size:
    shapes['pre_logits/kernel'] = (d, representation_size)
    shapes['pre_logits/bias'] = (representation_size,)
    features = representation_size
  shapes['head/kernel'] = (features, num_classes)
  shapes['head/bias'] = (num_classes,)
  return shapes


def published_stem_keys(num_layers: tuple[int, ...], width: int) -> dict[str, tuple[int, ...]]:
  """Key -> shape of the hybrid's ResNet stem (`conv_root`, `gn_root`, `block{i}/unit{j}`)."""
  shapes = {'conv_root/kernel': (7, 7, 3, width),
            'gn_root/scale': (width,), 'gn_root/bias': (width,)}
  channels = width
  for b, units in enumerate(num_layers):
    features = width * 2 ** b
    for u in range(units):
      p = f'block{b + 1}/unit{u + 1}/'
      if u == 0:  # channels (and, after block1, the grid) change: a projection shortcut
        shapes[p + 'conv_proj/kernel'] = (1, 1, channels, 4 * features)
        shapes[p + 'gn_proj/scale'] = shapes[p + 'gn_proj/bias'] = (4 * features,)
      shapes[p + 'conv1/kernel'] = (1, 1, channels if u == 0 else 4 * features, features)
      shapes[p + 'conv2/kernel'] = (3, 3, features, features)
      shapes[p + 'conv3/kernel'] = (1, 1, features, 4 * features)
      for n, c in (('gn1', features), ('gn2', features), ('gn3', 4 * features)):
        shapes[f'{p}{n}/scale'] = shapes[f'{p}{n}/bias'] = (c,)
    channels = 4 * features
  return shapes


def random_weights(shapes: dict[str, tuple[int, ...]], seed: int) -> Flat:
  """Weights of a realistic scale: kernels ~ 1/sqrt(fan_in), norm scales ~ 1.

  The head is larger (~1 per weight) so logits are O(1-10) and a GELU-form
  difference shows well above the tolerance.
  """
  rng = np.random.default_rng(seed)
  flat = {}
  for key, shape in sorted(shapes.items()):
    n = rng.standard_normal(shape)
    if key.endswith('/scale'):
      value = 1.0 + 0.2 * n
    elif key == 'head/kernel':
      value = n
    elif key.endswith('/kernel'):
      # q/k/v kernels are (D, heads, head_dim): fan-in D. Others: all but the last axis.
      fan_in = shape[0] if len(shape) == 3 and 'MultiHead' in key and '/out/' not in key \
          else int(np.prod(shape[:-1]))
      value = n / math.sqrt(fan_in)
    elif key == 'cls' or key.endswith('pos_embedding'):
      value = 0.5 * n
    else:
      value = 0.1 * n
    flat[key] = value.astype(np.float32)
  return flat


# --- Cases ---------------------------------------------------------------------------

NUM_CLASSES = 5

# name: (preset, config overrides, image (height, width))
CASES = {
    'token': ('ViT-Test_4', {}, (16, 20)),
    'gap': ('ViT-Test_4', {'classifier': 'gap'}, (16, 20)),
    'pre_logits': ('ViT-Test_4', {'representation_size': 24}, (16, 20)),
    # Two units in block1, so a unit without projection is covered too.
    'hybrid': ('R-Test+ViT-Test_1', {'resnet.num_layers': (2, 1)}, (32, 40)),
}


def case_config(case: str):
  preset, overrides, _ = CASES[case]
  config = model_configs.get_config(preset)
  for key, value in overrides.items():
    node = config
    *parents, leaf = key.split('.')
    for p in parents:
      node = node[p]
    node[leaf] = value
  return config


def case_layout(case: str) -> tuple[dict[str, tuple[int, ...]], dict]:
  """Published key shapes for a case, from its sizes; and the reference's keyword args."""
  config = case_config(case)
  height, width = CASES[case][2]
  t = config.transformer
  patch = config.patches.size[0]
  in_channels, stride, resnet = 3, patch, None
  shapes = {}
  if config.resnet:
    stem_width = int(64 * config.resnet.width_factor)
    layers = tuple(config.resnet.num_layers)
    shapes.update(published_stem_keys(layers, stem_width))
    # 4 (root conv + pool) x 2 per stage after the first.
    stride = patch * 4 * 2 ** (len(layers) - 1)
    in_channels = 4 * stem_width * 2 ** (len(layers) - 1)
    resnet = dict(num_layers=layers, width=stem_width)
  tokens = (height // stride) * (width // stride) + (config.classifier == 'token')
  shapes.update(published_vit_keys(
      hidden=config.hidden_size, mlp=t.mlp_dim, heads=t.num_heads, num_layers=t.num_layers,
      patch=patch, in_channels=in_channels, tokens=tokens, classifier=config.classifier,
      representation_size=config.representation_size, num_classes=NUM_CLASSES))
  return shapes, dict(num_layers=t.num_layers, classifier=config.classifier, resnet=resnet)


def images_for(case: str, batch: int = 2, seed: int = 0) -> np.ndarray:
  height, width = CASES[case][2]
  return np.random.default_rng(seed).uniform(-1, 1, (batch, height, width, 3)).astype(np.float32)


@functools.lru_cache(maxsize=None)
def weights_file(case: str, tmp_dir: str) -> str:
  shapes, _ = case_layout(case)
  path = f'{tmp_dir}/{case}.npz'
  np.savez(path, **random_weights(shapes, seed=sorted(CASES).index(case)))
  return path


def our_logits(case: str, path: str, images: np.ndarray, approximate_gelu: bool = True
               ) -> np.ndarray:
  model = model_configs.build_model(case_config(case), NUM_CLASSES,
                                    approximate_gelu=approximate_gelu)
  params = checkpoint.load(path)
  # The file was written from the published names alone: it must be exactly our tree.
  expected = jax.eval_shape(model.init, jax.random.PRNGKey(0),
                            jnp.zeros(images.shape, jnp.float32))['params']
  chex.assert_trees_all_equal_shapes(params, expected)
  logits, _ = jax.jit(model.apply)({'params': params}, images)
  return np.asarray(logits)


@pytest.fixture(scope='module')
def tmp_dir(tmp_path_factory) -> str:
  return str(tmp_path_factory.mktemp('reference_numerics'))


# --- Tests ---------------------------------------------------------------------------

@pytest.mark.parametrize('case', sorted(CASES))
def test_logits_match_numpy_reference(case, tmp_dir):
  path = weights_file(case, tmp_dir)
  images = images_for(case)
  _, kwargs = case_layout(case)
  flat = dict(np.load(path))
  expected = reference_logits(flat, images, **kwargs)
  got = our_logits(case, path, images)
  diff = float(np.abs(got - expected).max())
  print(f'\n{case}: max |logit diff| vs NumPy = {diff:.3g} '
        f'(logits up to {np.abs(expected).max():.3g})')
  assert np.abs(expected).max() > 1.0  # not a degenerate, near-zero comparison
  assert diff <= TOL, case


@pytest.mark.parametrize('case', ['token', 'hybrid'])
def test_exact_gelu_model_is_told_apart(case, tmp_dir):
  """approximate_gelu=False matches an erf reference but misses the tanh one.

  So the tolerance above is tight enough to tell the two GELU forms apart.
  """
  path = weights_file(case, tmp_dir)
  images = images_for(case)
  _, kwargs = case_layout(case)
  flat = dict(np.load(path))
  exact = our_logits(case, path, images, approximate_gelu=False)
  diff_erf = float(np.abs(exact - reference_logits(flat, images, gelu=gelu_erf, **kwargs)).max())
  diff_tanh = float(np.abs(exact - reference_logits(flat, images, **kwargs)).max())
  print(f'\n{case}, exact-GELU model: vs erf reference {diff_erf:.3g}, '
        f'vs tanh reference {diff_tanh:.3g}')
  assert diff_erf <= TOL
  assert diff_tanh > 3 * TOL


def test_gelu_forms_differ_as_documented():
  x = np.linspace(-6.0, 6.0, 120001)
  gap = np.abs(gelu_tanh(x) - gelu_erf(x)).max()
  assert 4.6e-4 < gap < 4.8e-4  # 4.7e-4 over [-6, 6], per docs/checkpoints.md
