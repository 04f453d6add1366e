"""BiT-M checkpoints: our ResNetV2 against an independent PyTorch forward pass of BiT.

The reference below is written from the BiT paper's architecture and the BiT-M
release layout (docs/checkpoints.md), not from our modules: it reads the
release's flat `resnet/...` keys directly and computes

  root:  7x7/2 conv, padding 3; zero pad 1; 3x3/2 max-pool without padding
  unit:  GN_a + ReLU feeds conv a (1x1) and, in unit01, the projection (1x1,
         stride s); GN_b + ReLU -> conv b (3x3, stride s, padding 1);
         GN_c + ReLU -> conv c (1x1); plus the shortcut.  s = 2 in blocks 2-4.
  head:  GN + ReLU, global mean, 1x1 conv with bias.

with every conv kernel standardised per output filter over (kh, kw, c_in) as
(w - mean) / sqrt(var + 1e-10), and GroupNorm of 32 groups with eps 1e-5. The
reference runs in float64; our model in float32.
"""

from __future__ import annotations

import math
import time
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vit_jax import checkpoint
from vit_jax import npz_reader
from vit_jax.configs import models as model_configs

torch = pytest.importorskip('torch')
F = torch.nn.functional

TOL = 1e-3  # max |logit difference|, float32 model vs float64 reference
WS_EPS = 1e-10
GN_EPS = 1e-5
GN_GROUPS = 32
CONV = 'standardized_conv2d/kernel'

Flat = dict[str, np.ndarray]


# --- The BiT-M layout, from the release's key names --------------------------------

def bit_shapes(num_layers: tuple[int, ...], root_width: int, num_classes: int
               ) -> dict[str, tuple[int, ...]]:
  """Key -> shape of a BiT-M file for units per block `num_layers` and root width."""
  shapes = {f'resnet/root_block/{CONV}': (7, 7, 3, root_width)}
  c_in = root_width
  for b, units in enumerate(num_layers):
    mid = root_width * 2 ** b
    out = 4 * mid
    for u in range(1, units + 1):
      p = f'resnet/block{b + 1}/unit{u:02d}/'
      for part, channels in (('a', c_in), ('b', mid), ('c', mid)):
        shapes[p + f'{part}/group_norm/gamma'] = (channels,)
        shapes[p + f'{part}/group_norm/beta'] = (channels,)
      shapes[p + f'a/{CONV}'] = (1, 1, c_in, mid)
      shapes[p + f'b/{CONV}'] = (3, 3, mid, mid)
      shapes[p + f'c/{CONV}'] = (1, 1, mid, out)
      if u == 1:
        shapes[p + f'a/proj/{CONV}'] = (1, 1, c_in, out)
      c_in = out
  shapes['resnet/group_norm/gamma'] = (c_in,)
  shapes['resnet/group_norm/beta'] = (c_in,)
  shapes['resnet/head/conv2d/kernel'] = (1, 1, c_in, num_classes)
  shapes['resnet/head/conv2d/bias'] = (num_classes,)
  return shapes


def random_bit_weights(shapes: dict[str, tuple[int, ...]], seed: int,
                       kernel_scale: float = 1.0) -> Flat:
  """Random float32 weights; non-trivial norms and head so every parameter matters."""
  rng = np.random.default_rng(seed)
  flat = {}
  for key, shape in shapes.items():
    if key.endswith('/gamma'):
      value = 1.0 + 0.2 * rng.standard_normal(shape)
    elif key.endswith('/beta') or key.endswith('head/conv2d/bias'):
      value = 0.2 * rng.standard_normal(shape)
    elif key.endswith('head/conv2d/kernel'):
      value = 0.05 * rng.standard_normal(shape)
    else:
      fan_in = math.prod(shape[:3])
      value = kernel_scale * math.sqrt(2.0 / fan_in) * rng.standard_normal(shape)
    flat[key] = value.astype(np.float32)
  return flat


# --- The reference forward pass (PyTorch, NCHW) ------------------------------------

def reference_logits(flat: Flat, images: np.ndarray, num_layers: tuple[int, ...]
                     ) -> np.ndarray:
  """BiT's forward pass on NHWC images in [-1, 1], read straight off the BiT-M keys."""
  w = {k: torch.from_numpy(v).double() for k, v in flat.items()}

  def conv(x, key, stride, padding):
    kernel = w[key].permute(3, 2, 0, 1)  # HWIO -> OIHW
    var, mean = torch.var_mean(kernel, dim=(1, 2, 3), keepdim=True, unbiased=False)
    kernel = (kernel - mean) / torch.sqrt(var + WS_EPS)
    return F.conv2d(x, kernel, stride=stride, padding=padding)

  def gn_relu(x, prefix):
    return F.relu(F.group_norm(x, GN_GROUPS, w[prefix + 'group_norm/gamma'],
                               w[prefix + 'group_norm/beta'], eps=GN_EPS))

  with torch.no_grad():
    x = torch.from_numpy(images).double().permute(0, 3, 1, 2)
    x = conv(x, f'resnet/root_block/{CONV}', 2, 3)
    x = F.max_pool2d(F.pad(x, (1, 1, 1, 1)), kernel_size=3, stride=2)
    for b, units in enumerate(num_layers):
      for u in range(1, units + 1):
        p = f'resnet/block{b + 1}/unit{u:02d}/'
        stride = 2 if b > 0 and u == 1 else 1
        pre = gn_relu(x, p + 'a/')
        shortcut = x
        if p + f'a/proj/{CONV}' in w:
          shortcut = conv(pre, p + f'a/proj/{CONV}', stride, 0)
        y = conv(pre, p + f'a/{CONV}', 1, 0)
        y = conv(gn_relu(y, p + 'b/'), p + f'b/{CONV}', stride, 1)
        y = conv(gn_relu(y, p + 'c/'), p + f'c/{CONV}', 1, 0)
        x = y + shortcut
    x = gn_relu(x, 'resnet/').mean(dim=(2, 3), keepdim=True)
    head = w['resnet/head/conv2d/kernel'].permute(3, 2, 0, 1)
    logits = F.conv2d(x, head, w['resnet/head/conv2d/bias']).flatten(1)
  return logits.numpy()


def write_npz(path, flat: Flat) -> None:
  np.savez(path, **flat)


def our_logits(preset: str, params, images: np.ndarray, num_classes: int,
               **overrides) -> np.ndarray:
  model = model_configs.build_model(preset, num_classes, **overrides)
  logits, _ = jax.jit(model.apply)({'params': params}, jnp.asarray(images))
  return np.asarray(logits)


def images_for(shape: tuple[int, ...], seed: int) -> np.ndarray:
  return np.random.default_rng(seed).uniform(-1, 1, shape).astype(np.float32)


# --- Tests ---------------------------------------------------------------------------

TINY_LAYERS = (1, 1, 1, 1)  # the BiT-Test preset: base width 32


@pytest.fixture(scope='module')
def tiny_file(tmp_path_factory):
  # Small raw kernels make the weight-standardisation epsilon visible in the logits.
  flat = random_bit_weights(bit_shapes(TINY_LAYERS, 32, 5), seed=0, kernel_scale=1e-3)
  path = tmp_path_factory.mktemp('bit') / 'BiT-M-Test.npz'
  write_npz(path, flat)
  return path, flat


def test_tiny_bit_file_gives_the_reference_logits(tiny_file):
  path, flat = tiny_file
  # Non-square, and odd sizes inside the net, so padding alignment shows.
  images = images_for((2, 72, 56, 3), seed=1)
  params = checkpoint.load(path)
  assert checkpoint.model_family(checkpoint.flatten(params)) == 'resnet'
  assert checkpoint.bit_preset_name(params) == 'BiT-Test'
  ours = our_logits('BiT-Test', params, images, 5)
  ref = reference_logits(flat, images, TINY_LAYERS)
  diff = float(np.max(np.abs(ours - ref)))
  print(f'BiT-Test max |logit diff| {diff:.2e} (logits up to {np.max(np.abs(ref)):.2f})')
  assert diff < TOL
  # The hybrid stem's padding or weight standardisation is each far off: the test sees them.
  for hybrid_choice in (dict(padding='same'), dict(weight_std='std', weight_std_epsilon=1e-5)):
    off = our_logits('BiT-Test', params, images, 5, **hybrid_choice)
    assert float(np.max(np.abs(off - ref))) > 10 * TOL, hybrid_choice


def test_r50x1_bit_file_gives_the_reference_logits_at_128(tmp_path):
  start = time.perf_counter()
  layers = (3, 4, 6, 3)
  flat = random_bit_weights(bit_shapes(layers, 64, 10), seed=2)
  path = tmp_path / 'BiT-M-R50x1.npz'
  write_npz(path, flat)
  images = images_for((2, 128, 128, 3), seed=3)
  params = checkpoint.load(path)
  assert checkpoint.bit_preset_name(params) == 'BiT-R50x1'
  # Every key and shape fits the preset exactly.
  checkpoint.check_params(params, checkpoint.abstract_params('BiT-R50x1', 10, (128, 128)))
  ours = our_logits('BiT-R50x1', params, images, 10)
  ref = reference_logits(flat, images, layers)
  diff = float(np.max(np.abs(ours - ref)))
  print(f'BiT-R50x1 @128 max |logit diff| {diff:.2e} (logits up to '
        f'{np.max(np.abs(ref)):.2f}), {time.perf_counter() - start:.1f} s')
  assert diff < TOL


def _write_zero_bit_file(path, shapes: dict[str, tuple[int, ...]]) -> None:
  """A BiT-layout file of zeros, written in pieces: fast and light even for R50x3."""
  piece = np.zeros(4 * 2**20, np.float32)
  with zipfile.ZipFile(path, 'w', zipfile.ZIP_DEFLATED, compresslevel=1) as zf:
    for key, shape in shapes.items():
      with zf.open(key + '.npy', 'w', force_zip64=True) as f:
        np.lib.format.write_array_header_1_0(
            f, {'descr': '<f4', 'fortran_order': False, 'shape': shape})
        left = math.prod(shape)
        while left:
          n = min(left, piece.size)
          f.write(piece[:n].tobytes())
          left -= n


def test_wrong_width_file_is_refused_naming_the_shapes(tmp_path, monkeypatch):
  path = tmp_path / 'BiT-M-R50x3.npz'
  _write_zero_bit_file(path, bit_shapes((3, 4, 6, 3), 192, 10))
  init = checkpoint.abstract_params('BiT-R50x1', 10, (128, 128))
  # Refused from the headers: no array data is read.
  monkeypatch.setattr(npz_reader, '_read_member', lambda *a: pytest.fail('data was read'))
  with pytest.raises(ValueError) as error:
    checkpoint.load_pretrained(path, init, 'BiT-R50x1')
  message = str(error.value)
  assert 'R50x3' in message and 'R50x1' in message, message
  assert '(7, 7, 3, 192)' in message and '(7, 7, 3, 64)' in message, message
  assert "'BiT-R50x3'" in message, message
  # Against expected shapes, `load` lists every mismatch with both shapes.
  with pytest.raises(ValueError, match=r'conv_root/kernel: checkpoint \(7, 7, 3, 192\) '
                                       r'vs model \(7, 7, 3, 64\)'):
    checkpoint.load(path, init)


def test_deeper_file_is_refused_naming_the_units(tmp_path):
  path = tmp_path / 'deep.npz'
  _write_zero_bit_file(path, bit_shapes((1, 2, 1, 1), 32, 5))
  init = checkpoint.abstract_params('BiT-Test', 5, (32, 32))
  with pytest.raises(ValueError, match=r'units per block \(1, 2, 1, 1\).*'
                                       r'units per block \(1, 1, 1, 1\)'):
    checkpoint.load_pretrained(path, init, 'BiT-Test')


def test_save_bit_layout_round_trip_is_exact(tiny_file, tmp_path):
  path, flat = tiny_file
  params = checkpoint.load(path)
  out = tmp_path / 'again.npz'
  checkpoint.save(params, out, layout='bit')
  with zipfile.ZipFile(out) as zf:
    assert sorted(n[:-len('.npy')] for n in zf.namelist()) == sorted(flat)
  with np.load(out, allow_pickle=False) as written:
    for key, value in flat.items():
      assert written[key].dtype == value.dtype and np.array_equal(written[key], value), key
  again = checkpoint.flatten(checkpoint.load(out))
  original = checkpoint.flatten(params)
  assert set(again) == set(original)
  for key, value in original.items():
    assert np.array_equal(again[key], value), key
  # The published layout keeps our names.
  checkpoint.save(params, tmp_path / 'ours.npz')
  assert 'conv_root/kernel' in checkpoint.read_npz_specs(tmp_path / 'ours.npz')
  with pytest.raises(ValueError, match="Unknown checkpoint layout 'timm'"):
    checkpoint.save(params, tmp_path / 'x.npz', layout='timm')


def test_save_bit_layout_refuses_other_trees(tmp_path):
  vit = checkpoint.abstract_params('ViT-Test_4', 3, (16, 16))
  vit = {k: np.zeros(v.shape, np.float32) for k, v in checkpoint.flatten(vit).items()}
  with pytest.raises(ValueError, match="layout='bit' needs a BiT ResNetV2 tree"):
    checkpoint.save(checkpoint.unflatten(vit), tmp_path / 'vit.npz', layout='bit')
  assert not (tmp_path / 'vit.npz').exists()


def test_model_family_of_bit_layout(tiny_file):
  _, flat = tiny_file
  assert checkpoint.model_family(flat) == 'resnet'
  assert checkpoint.model_family(checkpoint.bit_to_params(flat)) == 'resnet'


def test_load_pretrained_gives_a_fresh_zero_head(tiny_file):
  path, flat = tiny_file
  init = checkpoint.abstract_params('BiT-Test', 7, (32, 32))
  params = checkpoint.flatten(checkpoint.load_pretrained(path, init, 'BiT-Test'))
  assert params['head/kernel'].shape == (1024, 7) and not params['head/kernel'].any()
  assert params['head/bias'].shape == (7,) and not params['head/bias'].any()
  loaded = checkpoint.flatten(checkpoint.load(path))
  for key, value in params.items():
    if not key.startswith('head/'):
      assert np.array_equal(value, loaded[key]), key
  # Same class count: the head is kept, and a tree in the BiT layout loads too.
  same = checkpoint.flatten(checkpoint.load_pretrained(
      checkpoint.unflatten(flat), checkpoint.abstract_params('BiT-Test', 5, (32, 32)),
      'BiT-Test'))
  assert np.array_equal(same['head/kernel'], flat['resnet/head/conv2d/kernel'][0, 0])


def test_unknown_bit_key_is_named(tmp_path, tiny_file):
  _, flat = tiny_file
  path = tmp_path / 'extra.npz'
  write_npz(path, dict(flat, **{'resnet/block1/unit01/d/group_norm/gamma':
                                np.ones(32, np.float32)}))
  with pytest.raises(ValueError, match='resnet/block1/unit01/d/group_norm/gamma'):
    checkpoint.load(path)
  with pytest.raises(ValueError, match='resnet/block1/unit01/d/group_norm/gamma'):
    checkpoint.read_npz_specs(path)


def test_bit_into_vit_is_refused(tiny_file):
  path, _ = tiny_file
  init = checkpoint.abstract_params('ViT-Test_4', 5, (16, 16))
  with pytest.raises(ValueError, match="'resnet' model but the target model is 'vit'"):
    checkpoint.load_pretrained(path, init, 'ViT-Test_4')
