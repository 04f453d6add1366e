"""Position-embedding resampling against the references it reproduces.

The expected values are computed here with the references themselves:
`scipy.ndimage.zoom(order=1)` on the (rows, cols, D) grid with the class token
kept (the reference implementation's `load_pretrained`), and timm's
`resample_abs_pos_embed` (bicubic, antialiased). Measured on the CPU: the
linear method is bit-identical to scipy; bicubic is within 1.4e-6 of timm
(float32, values ~N(0, 1)), asserted to 3e-6.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import ndimage

from vit_jax import checkpoint
from vit_jax import predict
from vit_jax.configs import models as model_configs

POSEMB = checkpoint.POSEMB_KEY
BICUBIC_ATOL = 3e-6

# (old grid, new grid): square and non-square, up and down, and mixed.
GRIDS = [
    ((14, 14), (24, 32)),
    ((24, 32), (14, 14)),
    ((7, 5), (10, 3)),
    ((4, 4), (6, 6)),
    ((8, 8), (3, 3)),
    ((5, 7), (2, 13)),
    ((1, 3), (4, 2)),
]


def random_posemb(old, prefix, hidden=16, seed=0, dtype=np.float32):
  rng = np.random.default_rng(seed)
  return rng.standard_normal((1, prefix + old[0] * old[1], hidden)).astype(dtype)


def scipy_reference(posemb, old, new, prefix):
  """The reference's resize: class token kept, the grid zoomed with order=1."""
  grid = posemb[0, prefix:].reshape(old[0], old[1], -1)
  zoomed = ndimage.zoom(grid, (new[0] / old[0], new[1] / old[1], 1), order=1)
  assert zoomed.shape[:2] == tuple(new)
  return np.concatenate([posemb[:, :prefix], zoomed.reshape(1, -1, posemb.shape[-1])], axis=1)


def timm_reference(posemb, old, new, prefix):
  torch = pytest.importorskip('torch')
  pos_embed = pytest.importorskip('timm.layers')
  out = pos_embed.resample_abs_pos_embed(torch.from_numpy(posemb), list(new), list(old),
                                         num_prefix_tokens=prefix)
  return out.numpy()


def abstract_params(name, size, num_classes=10, **config_overrides):
  config = model_configs.get_config(name)
  for key, value in config_overrides.items():
    config[key] = value
  model = model_configs.build_model(config, num_classes)
  shapes = jax.eval_shape(lambda: model.init(
      jax.random.key(0), jnp.zeros((1, size[0], size[1], 3)), train=False))['params']
  return config, model, shapes


def random_params(shapes, seed=0):
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda s: (0.2 * rng.standard_normal(s.shape)).astype(s.dtype), shapes)


# --- resize_posemb ------------------------------------------------------------------

@pytest.mark.parametrize('prefix', [1, 0])
@pytest.mark.parametrize('old,new', GRIDS)
def test_linear_equals_scipy_zoom(old, new, prefix):
  posemb = random_posemb(old, prefix)
  out = checkpoint.resize_posemb(posemb, new, prefix, old_grid=old)
  assert out.shape == (1, prefix + new[0] * new[1], 16) and out.dtype == np.float32
  np.testing.assert_allclose(out, scipy_reference(posemb, old, new, prefix), rtol=0, atol=1e-6)
  np.testing.assert_array_equal(out[:, :prefix], posemb[:, :prefix])


def test_linear_is_the_default_and_square_grid_is_inferred():
  posemb = random_posemb((6, 6), 1)
  np.testing.assert_array_equal(checkpoint.resize_posemb(posemb, (9, 4), 1),
                                scipy_reference(posemb, (6, 6), (9, 4), 1))


def test_linear_is_corner_aligned():
  # A grid linear in (row, col) is reproduced exactly by linear interpolation;
  # with corner alignment output (i, j) samples input (i*(H-1)/(h-1), j*(W-1)/(w-1)).
  old, new = (5, 7), (9, 4)
  rows, cols = np.meshgrid(np.arange(old[0]), np.arange(old[1]), indexing='ij')
  grid = np.stack([rows, cols], axis=-1).astype(np.float32)
  out = checkpoint.resize_posemb(grid.reshape(1, -1, 2), new, 0, old_grid=old)
  out = out.reshape(new[0], new[1], 2)
  expect_rows = np.arange(new[0]) * (old[0] - 1) / (new[0] - 1)
  expect_cols = np.arange(new[1]) * (old[1] - 1) / (new[1] - 1)
  np.testing.assert_allclose(out[:, 0, 0], expect_rows, atol=1e-6)
  np.testing.assert_allclose(out[0, :, 1], expect_cols, atol=1e-6)
  np.testing.assert_allclose(out[[0, -1]][:, [0, -1]], grid[[0, -1]][:, [0, -1]], atol=1e-6)


@pytest.mark.parametrize('prefix', [1, 0])
@pytest.mark.parametrize('old,new', GRIDS)
def test_bicubic_equals_timm(old, new, prefix):
  posemb = random_posemb(old, prefix, seed=1)
  out = checkpoint.resize_posemb(posemb, new, prefix, old_grid=old, method='bicubic')
  assert out.shape == (1, prefix + new[0] * new[1], 16) and out.dtype == np.float32
  np.testing.assert_allclose(out, timm_reference(posemb, old, new, prefix),
                             rtol=0, atol=BICUBIC_ATOL)


@pytest.mark.parametrize('method', ['linear', 'bicubic'])
def test_dtype_kept_and_same_grid_is_identity(method):
  posemb = random_posemb((4, 6), 1, dtype=jnp.bfloat16)
  out = checkpoint.resize_posemb(posemb, (3, 5), 1, old_grid=(4, 6), method=method)
  assert out.dtype == jnp.bfloat16 and out.shape == (1, 16, 16)
  same = random_posemb((4, 6), 1)
  np.testing.assert_allclose(
      checkpoint.resize_posemb(same, (4, 6), 1, old_grid=(4, 6), method=method), same,
      atol=1e-6)


def test_resize_posemb_errors():
  posemb = random_posemb((4, 6), 1)
  with pytest.raises(ValueError, match="'linear', 'bicubic'"):
    checkpoint.resize_posemb(posemb, (5, 5), 1, old_grid=(4, 6), method='nearest')
  with pytest.raises(ValueError, match='square grid; pass old_grid'):
    checkpoint.resize_posemb(posemb, (5, 5), 1)
  with pytest.raises(ValueError, match=r'grid \(5, 5\) does not match 24'):
    checkpoint.resize_posemb(posemb, (5, 5), 1, old_grid=(5, 5))
  with pytest.raises(ValueError, match='new_grid must be positive'):
    checkpoint.resize_posemb(posemb, (0, 5), 1, old_grid=(4, 6))


# --- load_pretrained ----------------------------------------------------------------

def test_load_pretrained_square_checkpoint_into_non_square_model():
  """224 -> 384x512 in miniature: patch 4, 56x56 -> 96x128 pixels (14x14 -> 24x32)."""
  _, _, source_shapes = abstract_params('ViT-Test_4', (56, 56))
  source = random_params(source_shapes)
  config, model, init = abstract_params('ViT-Test_4', (96, 128))
  params = checkpoint.load_pretrained(source, init, config, image_size=(96, 128))
  src, new = checkpoint.flatten(source), checkpoint.flatten(params)
  assert new[POSEMB].shape == (1, 1 + 24 * 32, 32)
  np.testing.assert_allclose(new[POSEMB], scipy_reference(src[POSEMB], (14, 14), (24, 32), 1),
                             rtol=0, atol=1e-6)
  for key in new:
    if key != POSEMB:
      np.testing.assert_array_equal(new[key], src[key], err_msg=key)

  bicubic = checkpoint.load_pretrained(source, init, config, image_size=(96, 128),
                                       posemb_method='bicubic')
  np.testing.assert_allclose(checkpoint.flatten(bicubic)[POSEMB],
                             timm_reference(src[POSEMB], (14, 14), (24, 32), 1),
                             rtol=0, atol=BICUBIC_ATOL)

  images = np.zeros((1, 96, 128, 3), np.float32)
  logits, _ = model.apply({'params': params}, images, train=False)
  assert logits.shape == (1, 10) and np.all(np.isfinite(logits))


def test_load_pretrained_non_square_source_needs_source_grid():
  _, _, source_shapes = abstract_params('ViT-Test_4', (24, 32))  # 6x8 grid
  source = random_params(source_shapes)
  src = checkpoint.flatten(source)[POSEMB]
  config, _, init = abstract_params('ViT-Test_4', (56, 56))  # 14x14
  with pytest.raises(ValueError, match=r'not square; pass source_grid=\(rows, cols\)'):
    checkpoint.load_pretrained(source, init, config)
  params = checkpoint.load_pretrained(source, init, config, source_grid=(6, 8))
  np.testing.assert_allclose(checkpoint.flatten(params)[POSEMB],
                             scipy_reference(src, (6, 8), (14, 14), 1), rtol=0, atol=1e-6)
  with pytest.raises(ValueError, match=r'source_grid \(4, 8\) has 32 tokens'):
    checkpoint.load_pretrained(source, init, config, source_grid=(4, 8))

  # Same token count, transposed grid: resampled, not copied.
  config, _, init = abstract_params('ViT-Test_4', (32, 24))  # 8x6
  params = checkpoint.load_pretrained(source, init, config, image_size=(32, 24),
                                      source_grid=(6, 8))
  np.testing.assert_allclose(checkpoint.flatten(params)[POSEMB],
                             scipy_reference(src, (6, 8), (8, 6), 1), rtol=0, atol=1e-6)
  # Same grid: bit-identical.
  config, _, init = abstract_params('ViT-Test_4', (24, 32))
  params = checkpoint.load_pretrained(source, init, config, image_size=(24, 32),
                                      source_grid=(6, 8))
  np.testing.assert_array_equal(checkpoint.flatten(params)[POSEMB], src)


def test_load_pretrained_gap_model_and_bad_method():
  _, _, source_shapes = abstract_params('ViT-Test_4', (16, 16), classifier='gap')
  source = random_params(source_shapes)
  config, _, init = abstract_params('ViT-Test_4', (20, 28), classifier='gap')
  params = checkpoint.load_pretrained(source, init, config, image_size=(20, 28))
  np.testing.assert_allclose(
      checkpoint.flatten(params)[POSEMB],
      scipy_reference(checkpoint.flatten(source)[POSEMB], (4, 4), (5, 7), 0), rtol=0, atol=1e-6)
  with pytest.raises(ValueError, match="valid methods: 'linear', 'bicubic'"):
    checkpoint.load_pretrained(source, source, config, posemb_method='cubic')


# --- predict at a non-square size ------------------------------------------------------

def test_parse_image_size():
  assert predict.parse_image_size('384') == (384, 384)
  assert predict.parse_image_size('384x512') == (384, 512)
  assert predict.parse_image_size('384,512') == (384, 512)
  for bad in ('', 'x', '0x4', '3x4x5', 'abc'):
    with pytest.raises(ValueError, match='H or HxW'):
      predict.parse_image_size(bad)


def test_predict_at_non_square_size(tmp_path, capsys):
  _, _, shapes = abstract_params('ViT-Test_4', (16, 16), num_classes=5)
  source = random_params(shapes)
  checkpoint.save(source, tmp_path / 'vit.npz')
  model, params, size = predict.load_model('ViT-Test_4', tmp_path / 'vit.npz', (16, 24))
  assert size == (16, 24)
  np.testing.assert_allclose(
      params['Transformer']['posembed_input']['pos_embedding'],
      scipy_reference(checkpoint.flatten(source)[POSEMB], (4, 4), (4, 6), 1), rtol=0, atol=1e-6)
  image = predict.load_image(np.full((30, 40, 3), 128, np.uint8), size)
  assert image.shape == (16, 24, 3)
  probs = predict.predict(model, params, image)
  assert probs.shape == (5,) and abs(float(probs.sum()) - 1) < 1e-5

  from PIL import Image  # pylint: disable=g-import-not-at-top
  Image.fromarray(np.full((30, 40, 3), 90, np.uint8)).save(tmp_path / 'grey.png')
  assert predict.main(['--model', 'ViT-Test_4', '--checkpoint', str(tmp_path / 'vit.npz'),
                       '--image', str(tmp_path / 'grey.png'), '--image_size', '16x24',
                       '--top_k', '2']) == 0
  assert '(16x24, ViT-Test_4)' in capsys.readouterr().out

  # A non-square checkpoint at another size needs its grid.
  _, _, shapes = abstract_params('ViT-Test_4', (16, 24), num_classes=5)
  checkpoint.save(random_params(shapes), tmp_path / 'wide.npz')
  with pytest.raises(ValueError, match='pass source_grid'):
    predict.load_model('ViT-Test_4', tmp_path / 'wide.npz', (20, 20))
  _, params, size = predict.load_model('ViT-Test_4', tmp_path / 'wide.npz', (20, 20),
                                       source_grid=(4, 6))
  assert params['Transformer']['posembed_input']['pos_embedding'].shape == (1, 26, 32)
  _, _, size = predict.load_model('ViT-Test_4', tmp_path / 'wide.npz', source_grid=(4, 6))
  assert size == (16, 24)
