"""Tests of vit_jax.visualize: the numbers behind each figure, the figures and the CLI."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from vit_jax import attention_maps
from vit_jax import images as images_lib
from vit_jax import visualize
from vit_jax.datasets import digits
from vit_jax.configs import models as model_configs

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def is_png(path):
  with open(path, 'rb') as f:
    head = f.read(8)
  return os.path.getsize(path) > 100 and head == visualize.PNG_MAGIC


def random_attention(rng, layers, batch, heads, tokens):
  logits = rng.normal(size=(layers, batch, heads, tokens, tokens)) * 2
  a = np.exp(logits)
  return list(a / a.sum(-1, keepdims=True))


# --- patch grid ---------------------------------------------------------------

def test_patch_grid_count_and_content():
  image = np.arange(32 * 24 * 3).reshape(32, 24, 3)
  patches = attention_maps.patch_grid(image, 8)
  assert patches.shape == (4, 3, 8, 8, 3)
  assert patches.shape[0] * patches.shape[1] == (32 // 8) * (24 // 8)
  np.testing.assert_array_equal(patches[2, 1], image[16:24, 8:16])
  patches = attention_maps.patch_grid(image, (4, 6))
  assert patches.shape[:2] == (8, 4)


def test_patch_grid_rejects_indivisible_size():
  with pytest.raises(ValueError, match='not divisible'):
    attention_maps.patch_grid(np.zeros((30, 32, 3)), 4)


# --- position embedding similarity ---------------------------------------------

def test_position_similarity_symmetric_unit_diagonal():
  rng = np.random.default_rng(0)
  pos = rng.normal(size=(1, 1 + 5 * 5, 16))  # class token + 5x5 grid
  sim = attention_maps.position_embedding_similarity(pos)
  assert sim.shape == (5, 5, 5, 5)
  flat = sim.reshape(25, 25)
  np.testing.assert_allclose(flat, flat.T, atol=1e-12)
  np.testing.assert_allclose(np.diag(flat), 1.0, atol=1e-12)
  assert flat.min() >= -1 and flat.max() <= 1
  # Tile (i, j) is patch (i, j)'s row: its own position is the maximum.
  assert np.unravel_index(np.argmax(sim[3, 1]), (5, 5)) == (3, 1)


def test_position_similarity_known_values():
  # Orthogonal embeddings: identity; the class token (row 0) is dropped.
  pos = np.concatenate([np.ones((1, 4)), np.eye(4)])[None]
  sim = attention_maps.position_embedding_similarity(pos, (2, 2))
  np.testing.assert_allclose(sim.reshape(4, 4), np.eye(4))
  # Antiparallel embeddings: -1.
  sim = attention_maps.position_embedding_similarity(np.array([[1.0, 2.0], [-2.0, -4.0]]), (1, 2))
  np.testing.assert_allclose(sim.reshape(2, 2), [[1, -1], [-1, 1]])


def test_position_similarity_non_square_grid_needs_shape():
  with pytest.raises(ValueError, match='square'):
    attention_maps.position_embedding_similarity(np.ones((1, 1 + 6, 4)))
  assert attention_maps.position_embedding_similarity(
      np.random.rand(1, 7, 4), (2, 3)).shape == (2, 3, 2, 3)


# --- attention rollout -----------------------------------------------------------

def test_rollout_rows_sum_to_one():
  rng = np.random.default_rng(1)
  attn = random_attention(rng, layers=3, batch=2, heads=4, tokens=10)
  rollout = attention_maps.attention_rollout(attn)
  assert rollout.shape == (2, 10, 10)
  np.testing.assert_allclose(rollout.sum(-1), 1.0, atol=1e-12)
  assert rollout.min() >= 0
  raw = attention_maps.attention_rollout(attn, add_residual=False)
  np.testing.assert_allclose(raw.sum(-1), 1.0, atol=1e-12)


def test_rollout_matches_hand_computation():
  rng = np.random.default_rng(2)
  attn = random_attention(rng, layers=2, batch=1, heads=3, tokens=5)
  eye = np.eye(5)

  def layer(a):
    m = a[0].mean(0) + eye
    return m / m.sum(-1, keepdims=True)

  expected = layer(attn[1]) @ layer(attn[0])  # later layers multiply from the left
  np.testing.assert_allclose(attention_maps.attention_rollout(attn)[0], expected, atol=1e-12)


def test_rollout_of_identity_attention_is_identity():
  attn = [np.broadcast_to(np.eye(6), (1, 2, 6, 6))] * 4
  np.testing.assert_allclose(attention_maps.attention_rollout(attn)[0], np.eye(6))


def test_rollout_map_and_class_attention_pick_class_token_row():
  rng = np.random.default_rng(3)
  attn = random_attention(rng, layers=2, batch=1, heads=2, tokens=1 + 9)
  maps = attention_maps.class_token_attention(attn, (3, 3))
  assert maps.shape == (2, 1, 2, 3, 3)
  np.testing.assert_allclose(maps[1, 0, 1].ravel(), attn[1][0, 1, 0, 1:])
  rollout = attention_maps.attention_rollout(attn)
  rmap = attention_maps.rollout_map(rollout, (3, 3))
  np.testing.assert_allclose(rmap[0].ravel(), rollout[0, 0, 1:])
  # Without a class token the mean query stands in for it.
  attn = random_attention(rng, layers=1, batch=1, heads=2, tokens=4)
  gap = attention_maps.class_token_attention(attn, (2, 2), num_prefix_tokens=0)
  np.testing.assert_allclose(gap[0, 0, 0].ravel(), attn[0][0, 0].mean(0))


# --- mean attention distance --------------------------------------------------------

def test_attention_distance_bounds():
  rng = np.random.default_rng(4)
  attn = random_attention(rng, layers=3, batch=2, heads=4, tokens=1 + 16)
  dist = attention_maps.mean_attention_distance(attn, patch_size=8)
  assert dist.shape == (3, 4)
  diagonal = np.hypot(32, 32)  # 4x4 patches of 8 pixels
  assert np.all(dist >= 0) and np.all(dist <= diagonal)


def test_attention_distance_known_values():
  tokens = 1 + 4  # 2x2 grid of 10-pixel patches: neighbours 10 px apart, diagonal 14.1
  local = np.zeros((1, 1, tokens, tokens))
  local[..., np.arange(tokens), np.arange(tokens)] = 1.0  # every patch attends to itself
  assert attention_maps.mean_attention_distance([local], 10)[0, 0] == 0.0
  uniform = np.full((1, 1, tokens, tokens), 1.0 / tokens)
  expected = (0 + 10 + 10 + np.hypot(10, 10)) / 4  # same for every query by symmetry
  np.testing.assert_allclose(attention_maps.mean_attention_distance([uniform], 10)[0, 0], expected)
  far = np.zeros((1, 1, tokens, tokens))
  far[0, 0, 1:, 1:] = np.fliplr(np.eye(4))  # patch k attends to the opposite corner
  far[0, 0, 0, 0] = 1.0
  np.testing.assert_allclose(attention_maps.mean_attention_distance([far], 10)[0, 0],
                             np.hypot(10, 10))


def test_patch_distances():
  d = attention_maps.patch_distances((2, 3), (4, 5))
  assert d.shape == (6, 6)
  np.testing.assert_allclose(d, d.T)
  np.testing.assert_allclose(d[0, 5], np.hypot(4, 10))


def test_top_k():
  idx, probs = attention_maps.top_k(np.array([0.0, 3.0, 1.0, 2.0]), k=3)
  assert idx.tolist() == [1, 3, 2]
  assert np.all(np.diff(probs) <= 0) and probs.sum() <= 1
  assert len(attention_maps.top_k(np.zeros(3), 5)[0]) == 3


# --- with a model -----------------------------------------------------------------

def make_params(model_name, image_size=16, num_classes=10, **overrides):
  model = model_configs.build_model(model_name, num_classes, **overrides)
  params = model.init(jax.random.PRNGKey(0), np.zeros((1, image_size, image_size, 3)),
                      train=False)['params']
  return model, params


@pytest.fixture(scope='module')
def vit_test():
  return make_params('ViT-Test_4')


def test_analyze_numbers(vit_test):
  model, params = vit_test
  image = (np.random.default_rng(0).random((16, 16, 3)) * 255).astype(np.uint8)
  a = visualize.analyze(model, params, image, labels=[str(i) for i in range(10)])
  assert a.grid_shape == (4, 4) and a.patch_size == (4, 4)
  assert a.num_prefix_tokens == 1
  assert a.attentions.shape == (2, 2, 17, 17)
  np.testing.assert_allclose(a.attentions.sum(-1), 1.0, atol=1e-5)
  np.testing.assert_allclose(a.rollout.sum(-1), 1.0, atol=1e-6)
  assert a.class_attention.shape == (2, 2, 4, 4)
  assert a.rollout_map.shape == (4, 4)
  flat = a.position_similarity.reshape(16, 16)
  np.testing.assert_allclose(flat, flat.T, atol=1e-6)
  np.testing.assert_allclose(np.diag(flat), 1.0, atol=1e-6)
  assert a.attention_distance.shape == (2, 2)
  assert np.all(a.attention_distance >= 0)
  assert np.all(a.attention_distance <= np.hypot(16, 16))
  top = a.top_k(5)
  assert len(top) == 5 and all(label in '0123456789' for label, _ in top)
  assert a.summary()['num_heads'] == 2


def test_analyze_gap_classifier():
  model, params = make_params('ViT-Test_4', classifier='gap')
  a = visualize.analyze(model, params, np.zeros((16, 16, 3), np.uint8))
  assert a.num_prefix_tokens == 0
  np.testing.assert_allclose(a.rollout.sum(-1), 1.0, atol=1e-6)
  assert a.class_attention.shape == (2, 2, 4, 4)


def test_analyze_rejects_resnet():
  model = model_configs.build_model('BiT-Test', 10)
  with pytest.raises(ValueError, match='no attention'):
    visualize.analyze(model, {}, np.zeros((32, 32, 3), np.uint8))


def test_write_figures_pngs(vit_test, tmp_path):
  model, params = vit_test
  image, shown = images_lib.prepare_image(
      (np.random.default_rng(1).random((40, 50, 3)) * 255).astype(np.uint8), 16, 64)
  assert image.shape == (16, 16, 3) and shown.shape[0] >= 64
  a = visualize.analyze(model, params, image, display_image=shown)
  paths = visualize.write_figures(a, str(tmp_path), dpi=50)
  assert set(paths) == set(visualize.FIGURE_FILES)
  for path in paths.values():
    assert is_png(path), path
  assert (tmp_path / 'analysis.json').exists()


def test_attention_distance_over_images(vit_test):
  model, params = vit_test
  images = (np.random.default_rng(2).random((5, 16, 16, 3)) * 255).astype(np.uint8)
  together = visualize.attention_distance_over(model, params, images, batch_size=2)
  assert together.shape == (2, 2)
  singles = [visualize.analyze(model, params, im).attention_distance for im in images]
  np.testing.assert_allclose(together, np.mean(singles, axis=0), rtol=1e-5)


def test_figures_individually():
  fig = visualize.plot_attention_distance(np.random.rand(3, 2) * 10, (32, 32), 4, 12.0)
  assert len(fig.axes) == 1
  assert fig.axes[0].get_ylim()[1] == pytest.approx(32.0)  # half the diagonal * sqrt(2)
  fig = visualize.plot_top_k([('a', 0.5), ('b', 0.3)])
  assert [t.get_text() for t in fig.axes[0].get_yticklabels()] == ['a', 'b']
  sim = attention_maps.position_embedding_similarity(np.random.rand(1, 10, 4), (3, 3))
  fig = visualize.plot_position_embedding_similarity(sim)
  assert fig.axes[0].get_images()[0].get_array().shape == (3 * 4 - 1,) * 2


def test_palette_png_is_smaller_and_valid(tmp_path):
  image = (np.random.default_rng(3).random((64, 64, 3)) * 255).astype(np.uint8)
  fig = visualize.plot_patch_grid(image, 8)
  full = visualize.save_figure(fig, str(tmp_path / 'full.png'), dpi=50)
  small = visualize.save_figure(fig, str(tmp_path / 'small.png'), dpi=50, palette=True)
  assert is_png(full) and is_png(small)
  assert os.path.getsize(small) < os.path.getsize(full)


def test_read_labels(tmp_path):
  assert visualize.read_labels(None, 10, 'digits') == [str(i) for i in range(10)]
  assert visualize.read_labels(None, 3) == ['class 0', 'class 1', 'class 2']
  assert len(visualize.read_labels(None, 1000)) == 1000
  names = tmp_path / 'names.txt'
  names.write_text('cat\ndog\n')
  assert visualize.read_labels(str(names), 2) == ['cat', 'dog']


def test_load_image_spec():
  cat = images_lib.load_image_spec('skimage:chelsea')
  assert cat.dtype == np.uint8 and cat.ndim == 3 and cat.shape[-1] == 3
  with pytest.raises(ValueError):
    images_lib.load_image_spec('skimage:no_such_image')
  assert len(images_lib.load_images('skimage:astronaut')) == 1


def test_load_digits_images():
  digit = images_lib.load_image_spec('digits:test:2')
  assert digit.shape == (32, 32, 3) and digit.dtype == np.uint8
  many = images_lib.load_images('digits:test:0-4')
  assert len(many) == 5
  np.testing.assert_array_equal(many[2], digit)
  # Resized like the eval pipeline (tf.image.resize, bilinear, half-pixel centres):
  # halving the size averages 2x2 blocks.
  small = images_lib.load_images('digits:test:0-4', image_size=16)
  blocks = np.stack(many).astype(float).reshape(5, 16, 2, 16, 2, 3).mean(axis=(2, 4))
  assert np.abs(np.stack(small) - blocks).max() <= 0.5
  np.testing.assert_allclose(digits.interpolation_matrix(5, 5), np.eye(5))
  np.testing.assert_allclose(digits.interpolation_matrix(7, 3).sum(-1), 1.0)


def test_cli_writes_pngs(tmp_path):
  """`python -m vit_jax.visualize` on a checkpoint saved in the published format."""
  from vit_jax import checkpoint
  _, params = make_params('ViT-Test_4', image_size=32)
  ckpt = tmp_path / 'vit_test.npz'
  checkpoint.save(params, str(ckpt))
  out = tmp_path / 'out'
  result = subprocess.run(
      [sys.executable, '-m', 'vit_jax.visualize', '--model', 'ViT-Test_4',
       '--checkpoint', str(ckpt), '--image', 'skimage:astronaut', '--out', str(out),
       '--dpi', '40', '--palette'],
      cwd=REPO, env=dict(os.environ, MPLBACKEND='Agg'), capture_output=True, text=True,
      timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'top-5' in result.stdout
  for fname in visualize.FIGURE_FILES.values():
    assert is_png(out / fname), fname


def test_cli_main_random_init(tmp_path):
  """The same entry point in-process, with random parameters and no checkpoint."""
  paths = visualize.main([
      '--model', 'ViT-Test_4', '--random-init', '--image-size', '16', '--num-classes', '7',
      '--image', 'skimage:chelsea', '--image', 'skimage:astronaut', '--display-size', '64',
      '--dpi', '40', '--out', str(tmp_path)])
  assert set(paths) == set(visualize.FIGURE_FILES)
  for path in paths.values():
    assert is_png(path)
  with open(tmp_path / 'analysis.json') as f:
    summary = json.load(f)
  assert summary['mean_attention_distance_images'] == 2
  assert len(summary['top5']) == 5


def test_cli_needs_parameters(tmp_path):
  with pytest.raises(SystemExit):
    visualize.main(['--model', 'ViT-Test_4', '--out', str(tmp_path)])


# --- non-square inputs ------------------------------------------------------------

def test_prepare_image_and_digits_non_square():
  image = (np.random.default_rng(5).random((60, 50, 3)) * 255).astype(np.uint8)
  model_input, shown = images_lib.prepare_image(image, (16, 24), 64)
  assert model_input.shape == (16, 24, 3)
  assert shown.shape[0] >= 64 and abs(shown.shape[1] / shown.shape[0] - 1.5) < 0.05
  assert images_lib.center_crop(image, (2, 3)).shape[:2] == (33, 50)  # full width kept
  assert images_lib.center_crop(image, (1, 1)).shape[:2] == (50, 50)
  digits = images_lib.load_images('digits:test:0-1', image_size=(16, 24))
  assert digits[0].shape == (16, 24, 3)


def test_non_square_checkpoint_size_resamples_position_embeddings(tmp_path):
  """A 16x16 checkpoint visualised at 16x24: its 4x4 grid is zoomed to 4x6."""
  from scipy import ndimage  # pylint: disable=g-import-not-at-top
  from vit_jax import checkpoint
  _, params = make_params('ViT-Test_4', image_size=16)
  checkpoint.save(params, str(tmp_path / 'vit.npz'))
  pos = np.asarray(params['Transformer']['posembed_input']['pos_embedding'])
  fitted = visualize.fit_position_embedding(params, (4, 4), (16, 24))
  new = fitted['Transformer']['posembed_input']['pos_embedding']
  expected = ndimage.zoom(pos[0, 1:].reshape(4, 4, -1), (1, 6 / 4, 1), order=1)
  np.testing.assert_allclose(new[0, 1:], expected.reshape(24, -1), atol=1e-6)
  np.testing.assert_array_equal(new[:, :1], pos[:, :1])
  assert params['Transformer']['posembed_input']['pos_embedding'].shape == (1, 17, 32)

  paths = visualize.main([
      '--model', 'ViT-Test_4', '--checkpoint', str(tmp_path / 'vit.npz'),
      '--image-size', '16x24', '--image', 'skimage:chelsea', '--display-size', '48',
      '--dpi', '30', '--out', str(tmp_path / 'out')])
  for path in paths.values():
    assert is_png(path)
  with open(tmp_path / 'out' / 'analysis.json') as f:
    summary = json.load(f)
  assert summary['image_size'] == [16, 24] and summary['grid_shape'] == [4, 6]
  with pytest.raises(SystemExit):
    visualize.parse_args(['--image-size', '16x', '--out', str(tmp_path)])


def test_16_bit_grey_png_is_scaled_not_saturated(tmp_path):
  from PIL import Image  # pylint: disable=g-import-not-at-top
  ramp = np.tile(np.linspace(0, 65535, 64).astype(np.uint16), (16, 1))
  path = str(tmp_path / 'grey16.png')
  Image.fromarray(ramp).save(path)
  image = images_lib.load_image_spec(path)
  assert image.shape == (16, 64, 3) and image.dtype == np.uint8
  np.testing.assert_allclose(image[0, :, 0], np.round(ramp[0] / 257.0), atol=1)


def test_workdir_of_a_mixer_fine_tuned_at_another_grid(tmp_path):
  """Issue 31 (9): a Mixer pre-trained at 16x16 and fine-tuned at 32x32 (its token-mixing
  MLP widened 4x, the run's config.model.tokens_mlp_dim) is drawn from its workdir with the
  run's own model, as evaluate and export read it."""
  import ml_collections  # pylint: disable=g-import-not-at-top
  from test_faults import tiny_run_config  # pylint: disable=g-import-not-at-top
  from vit_jax import checkpoint  # pylint: disable=g-import-not-at-top
  from vit_jax import train  # pylint: disable=g-import-not-at-top
  model = model_configs.build_model('Mixer-Test_4', 4)
  params = model.init(jax.random.PRNGKey(0), np.zeros((1, 16, 16, 3), np.float32),
                      train=False)['params']
  npz = str(tmp_path / 'mixer16.npz')
  checkpoint.save(jax.tree.map(np.asarray, params), npz)
  config = tiny_run_config(model_name='Mixer-Test_4', image_size=32, total_steps=1,
                           warmup_steps=0, checkpoint_every=1, pretrained_path=npz)
  config.model = ml_collections.ConfigDict({'tokens_mlp_dim': 4 * 16})  # 4x4 -> 8x8 patches
  train.train_and_evaluate(config, str(tmp_path / 'run'))
  written = visualize.main(['--workdir', str(tmp_path / 'run'), '--out', str(tmp_path / 'vis')])
  assert set(written) == {'patches', 'token_mixing', 'top_k'}
  assert all(is_png(path) for path in written.values())
