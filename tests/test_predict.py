"""Inference helpers and the `python -m vit_jax.predict` CLI."""

import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vit_jax import checkpoint
from vit_jax import labels as labels_lib
from vit_jax import predict
from vit_jax.configs import models as model_configs

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def random_checkpoint(path, name='ViT-Test_4', num_classes=1000, size=32, seed=0):
  """A checkpoint of random weights (head included, so the top-5 is not a tie)."""
  model = model_configs.build_model(name, num_classes)
  shapes = jax.eval_shape(
      lambda: model.init(jax.random.key(0), jnp.zeros((1, size, size, 3))))['params']
  rng = np.random.default_rng(seed)
  params = jax.tree.map(lambda s: (0.2 * rng.standard_normal(s.shape)).astype(s.dtype), shapes)
  checkpoint.save(params, path)
  return params


@pytest.fixture(scope='module')
def cat_jpg(tmp_path_factory):
  skimage_data = pytest.importorskip('skimage.data')
  from PIL import Image  # pylint: disable=g-import-not-at-top
  path = tmp_path_factory.mktemp('images') / 'chelsea.jpg'
  Image.fromarray(skimage_data.chelsea()).save(path, quality=90)
  return str(path)


def test_imagenet_labels_standard_order():
  labels = labels_lib.imagenet1k_labels()
  assert len(labels) == 1000
  assert labels[0].startswith('tench')
  assert labels[1].startswith('goldfish')
  assert labels[281].startswith('tabby')
  assert labels[285] == 'Egyptian cat'
  assert labels[999].startswith('toilet tissue')


def test_load_image_sizes_and_range(cat_jpg):
  image = predict.load_image(cat_jpg, 48)
  assert image.shape == (48, 48, 3) and image.dtype == np.float32
  assert -1.0 <= image.min() < -0.5 and 0.5 < image.max() <= 1.0
  grey = predict.load_image(np.full((10, 20), 255, np.uint8), (8, 12))
  assert grey.shape == (8, 12, 3)
  np.testing.assert_allclose(grey, 1.0)
  floats = predict.load_image(np.zeros((5, 5, 3), np.float32), 4)
  np.testing.assert_allclose(floats, -1.0)
  with pytest.raises(ValueError, match='Cannot read image'):
    predict.load_image(__file__, 32)


def test_predict_and_top_k(tmp_path, cat_jpg):
  random_checkpoint(tmp_path / 'm.npz', num_classes=10)
  model, params, size = predict.load_model('ViT-Test_4', tmp_path / 'm.npz')
  assert size == (32, 32)
  image = predict.load_image(cat_jpg, size)
  probs = predict.predict(model, params, image)
  assert probs.shape == (10,)
  np.testing.assert_allclose(probs.sum(), 1.0, rtol=1e-5)
  batch = predict.predict(model, params, np.stack([image, image]))
  np.testing.assert_allclose(batch[1], probs, rtol=1e-5)
  rows = predict.top_k(probs, 3, predict.class_names(10))
  assert [r[0] for r in rows] == list(np.argsort(-probs)[:3])
  assert rows[0][1] == f'class {rows[0][0]}' and rows[0][2] == pytest.approx(probs.max())
  assert len(predict.top_k(probs, 50)) == 10


def test_load_model_reads_geometry_and_rejects_wrong_model(tmp_path):
  random_checkpoint(tmp_path / 'small.npz', num_classes=7, size=16)
  model, params, size = predict.load_model('ViT-Test_4', tmp_path / 'small.npz')
  assert size == (16, 16) and model.num_classes == 7
  with pytest.raises(ValueError, match='does not fit the model'):
    predict.load_model('ViT-Digits_4', tmp_path / 'small.npz')


def test_cli_prints_labelled_top5(tmp_path, cat_jpg):
  random_checkpoint(tmp_path / 'vit.npz')
  result = subprocess.run(
      [sys.executable, '-m', 'vit_jax.predict', '--model', 'ViT-Test_4',
       '--checkpoint', str(tmp_path / 'vit.npz'), '--image', cat_jpg],
      cwd=REPO, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  lines = [l for l in result.stdout.splitlines() if re.match(r'\s*\d+\. ', l)]
  assert len(lines) == 5, result.stdout
  imagenet = set(labels_lib.imagenet1k_labels())
  percents = []
  for line in lines:
    match = re.match(r'\s*\d+\.\s+([\d.]+)%\s+\[\s*(\d+)\] (.+)$', line)
    assert match, line
    percents.append(float(match.group(1)))
    index, label = int(match.group(2)), match.group(3)
    assert label == labels_lib.imagenet1k_labels()[index] and label in imagenet
  assert percents == sorted(percents, reverse=True)
  assert '32x32' in result.stdout  # resolution read off the checkpoint


def test_cli_custom_labels_and_errors(tmp_path, cat_jpg, capsys):
  random_checkpoint(tmp_path / 'three.npz', num_classes=3)
  (tmp_path / 'labels.txt').write_text('cat\ndog\nbird\n')
  assert predict.main(['--model', 'ViT-Test_4', '--checkpoint', str(tmp_path / 'three.npz'),
                       '--image', cat_jpg, '--labels', str(tmp_path / 'labels.txt'),
                       '--top_k', '2']) == 0
  out = capsys.readouterr().out
  assert len(re.findall(r'\] (cat|dog|bird)$', out, re.M)) == 2
  (tmp_path / 'bad.txt').write_text('cat\ndog\n')
  assert predict.main(['--model', 'ViT-Test_4', '--checkpoint', str(tmp_path / 'three.npz'),
                       '--image', cat_jpg, '--labels', str(tmp_path / 'bad.txt')]) == 2
  assert '2 labels but the model has 3 classes' in capsys.readouterr().err
  (tmp_path / 'broken.npz').write_bytes(b'PK\x03\x04broken')
  assert predict.main(['--model', 'ViT-Test_4', '--checkpoint', str(tmp_path / 'broken.npz'),
                       '--image', cat_jpg]) == 2
  assert 'broken.npz' in capsys.readouterr().err
