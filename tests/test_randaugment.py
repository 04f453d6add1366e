"""RandAugment (vit_jax.randaugment) against Pillow and the facts of AugReg's code, its
pipeline hook (deterministic, resumable) and the config fields that turn it on."""

from collections import Counter
import math
import os
import subprocess
import sys

import numpy as np
from PIL import Image, ImageEnhance, ImageOps
import pytest
import tensorflow as tf

from vit_jax import randaugment as ra
from vit_jax import validation
from vit_jax.configs import schema


@pytest.mark.parametrize('pp,message', [
    (dict(randaug=(2,)), 'config.pp.randaug'),
    (dict(randaug=(1.5, 10)), 'config.pp.randaug'),
    (dict(randaug=(2, -1)), 'config.pp.randaug'),
    (dict(randaug=(2, 10), randaug_ops=('Rotat',)), "'Rotat'"),
    (dict(randaug=(2, 10), randaug_ops=()), 'config.pp.randaug_ops'),
])
def test_bad_settings_are_refused_by_name(pp, message):
  with pytest.raises(ValueError, match=message):
    validation.validate_config(schema.resolve(dict(model_name='ViT-Ti_16', image_size=32, pp=pp)))


def test_settings():
  assert ra.check(None, None) is None and ra.check((0, 0), None) is None
  assert ra.check((2, 15), None) == (2, 15.0, ra.OPS)
  assert ra.check((1, 5), ('Cutout', 'Rotate', 'Cutout')) == (1, 5.0, ('Cutout', 'Rotate'))
  with pytest.raises(ValueError, match='mixup_form'):
    validation.validate_config(
        schema.resolve(dict(model_name='ViT-Ti_16', image_size=32, mixup_form='roll')))
  config = validation.validate_config(schema.resolve(dict(
      model_name='ViT-Ti_16', image_size=32, pp=dict(randaug=(2, 15)), mixup_form='augreg')))
  assert (config.pp.randaug, config.pp.randaug_ops, config.mixup_form) == ((2, 15), None,
                                                                           'augreg')


# ---------------------------------------------------------------------------
# The ops against Pillow (small images: the ops are per pixel or per image).
# ---------------------------------------------------------------------------

FILL = (128, 128, 128)


@pytest.fixture(scope='module')
def image():
  """20x24 gradients plus noise, range 0..~230 (so AutoContrast has work to do)."""
  rng = np.random.RandomState(0)
  yy, xx = np.mgrid[0:24, 0:20]
  pixels = np.stack([xx * 9 + 20, yy * 7 + 30, (xx + yy) * 4 + 60], -1)
  return np.clip(pixels + rng.randint(-20, 20, pixels.shape), 0, 255).astype(np.uint8)


def ours(image, name, arg=None, key=(0, 0)):
  return ra.apply_op(tf.constant(image), name, arg, tf.constant(key)).numpy()


def test_magnitude_map_is_augregs():
  # ../shared/README.md "RandAugment as AugReg ran it", m = 0, 10, 15, 20.
  expected = {
      'Rotate': (0.0, 30.0, 45.0, 60.0), 'Posterize': (0, 4, 6, 8),
      'Solarize': (0, 256, 384, 512), 'SolarizeAdd': (0, 110, 165, 220),
      'Color': (0.1, 1.9, 2.8, 3.7), 'Contrast': (0.1, 1.9, 2.8, 3.7),
      'Brightness': (0.1, 1.9, 2.8, 3.7), 'Sharpness': (0.1, 1.9, 2.8, 3.7),
      'ShearX': (0.0, 0.3, 0.45, 0.6), 'ShearY': (0.0, 0.3, 0.45, 0.6),
      'TranslateX': (0.0, 100.0, 150.0, 200.0), 'TranslateY': (0.0, 100.0, 150.0, 200.0),
      'Cutout': (0, 40, 60, 80),
      'AutoContrast': (None,) * 4, 'Equalize': (None,) * 4, 'Invert': (None,) * 4,
  }
  assert set(ra.OPS) == set(expected) and len(ra.OPS) == 16
  for name, values in expected.items():
    got = tuple(ra.op_argument(name, m) for m in (0, 10, 15, 20))
    assert got == pytest.approx(values), name
  assert set(ra.GEOMETRIC) == {'Rotate', 'ShearX', 'ShearY', 'TranslateX', 'TranslateY'}


def test_pixel_ops_equal_pillow(image):
  pil = Image.fromarray(image)
  same = lambda a, b: np.testing.assert_array_equal(a, np.asarray(b))
  same(ours(image, 'AutoContrast'), ImageOps.autocontrast(pil))
  same(ours(image, 'Equalize'), ImageOps.equalize(pil))
  same(ours(image, 'Invert'), ImageOps.invert(pil))
  for bits in range(1, 9):
    same(ours(image, 'Posterize', bits), ImageOps.posterize(pil, bits))
  # 0 bits (magnitude < 2.5): AugReg's shift by 8, which TF clamps to 7, keeps 1 bit.
  same(ours(image, 'Posterize', 0), ImageOps.posterize(pil, 1))
  for threshold in (0, 100, 128, 256, 384):
    same(ours(image, 'Solarize', threshold), ImageOps.solarize(pil, threshold))
  enhancers = {'Color': ImageEnhance.Color, 'Contrast': ImageEnhance.Contrast,
               'Brightness': ImageEnhance.Brightness, 'Sharpness': ImageEnhance.Sharpness}
  for factor in (0.1, 1.0, 1.9, 2.8, 3.7):
    for name, enhancer in enhancers.items():
      want = np.asarray(enhancer(pil).enhance(factor)).astype(int)
      got = ours(image, name, factor).astype(int)
      assert np.abs(got - want).max() <= 1, (name, factor)


def test_equalize_and_autocontrast_edge_cases():
  flat = np.full((6, 5, 3), 77, np.uint8)
  flat[0, 0] = (3, 200, 77)  # one channel constant, two with two levels
  pil = Image.fromarray(flat)
  np.testing.assert_array_equal(ours(flat, 'Equalize'), ImageOps.equalize(pil))
  np.testing.assert_array_equal(ours(flat, 'AutoContrast'), ImageOps.autocontrast(pil))


def test_solarize_add_and_cutout_by_formula(image):
  for addition in (0, 110, 165, 220):
    want = np.where(image < 128, np.minimum(image.astype(int) + addition, 255), image)
    np.testing.assert_array_equal(ours(image, 'SolarizeAdd', addition), want)
  marked = np.where(image == 128, 129, image).astype(np.uint8)  # 128 only where painted
  height, width = image.shape[:2]
  centres = set()
  for key in range(40):
    half = 4
    out = ours(marked, 'Cutout', half, key=(key, 7))
    painted = (out == 128).all(-1)
    np.testing.assert_array_equal(out[~painted], marked[~painted])
    rows, cols = np.nonzero(painted.any(1))[0], np.nonzero(painted.any(0))[0]
    # The square [c - half, c + half) of a centre c in the image, clipped to it.
    (cy,) = {c for c in range(height) if list(rows) == list(range(max(0, c - half),
                                                                  min(height, c + half)))}
    (cx,) = {c for c in range(width) if list(cols) == list(range(max(0, c - half),
                                                                 min(width, c + half)))}
    assert painted.sum() == len(rows) * len(cols)
    centres.add((cy, cx))
  assert len(centres) > 30  # positions drawn from the key


def _pillow_affine(pil, matrix):
  return np.asarray(pil.transform(pil.size, Image.AFFINE, matrix, resample=Image.NEAREST,
                                  fillcolor=FILL))


def _near_ties(shape, matrix):
  """Output pixels whose source coordinate (Pillow's corner convention) is within 1e-3 of a
  pixel edge: there float32 and float64 may round to different pixels."""
  a, b, c, d, e, f = matrix
  yy, xx = np.mgrid[0:shape[0], 0:shape[1]] + 0.5
  near = lambda v: np.abs(v - np.round(v)) < 1e-3
  return near(a * xx + b * yy + c) | near(d * xx + e * yy + f)


def _matches(got, want, ties) -> bool:
  """Equal but for a few pixels at rounding ties."""
  differ = (got != want).any(-1)
  return not (differ & ~ties).any() and differ.mean() < 0.05


def _geometric_cases(image):
  """(op, argument, Pillow's result, its inverse map as Pillow's AFFINE data)."""
  pil = Image.fromarray(image)
  width, height = pil.size
  for degrees in (30.0, -45.0, 60.0):
    t = math.radians(degrees)
    cx, cy = width / 2, height / 2  # Image.rotate's inverse map
    matrix = (math.cos(t), -math.sin(t), cx - math.cos(t) * cx + math.sin(t) * cy,
              math.sin(t), math.cos(t), cy - math.sin(t) * cx - math.cos(t) * cy)
    yield 'Rotate', degrees, np.asarray(pil.rotate(degrees, resample=Image.NEAREST,
                                                   fillcolor=FILL)), matrix
  for level in (0.3, -0.45, 0.6):
    # Shears about pixel centres: in Pillow's corner convention, offset by -level / 2.
    for name, matrix in (('ShearX', (1, level, -level / 2, 0, 1, 0)),
                         ('ShearY', (1, 0, 0, level, 1, -level / 2))):
      yield name, level, _pillow_affine(pil, matrix), matrix
  for pixels in (3.0, -7.0, 150.0):
    for name, matrix in (('TranslateX', (1, 0, pixels, 0, 1, 0)),
                         ('TranslateY', (1, 0, 0, 0, 1, pixels))):
      yield name, pixels, _pillow_affine(pil, matrix), matrix


def test_geometric_ops_equal_pillow_affine_with_fill_128(image):
  for name, arg, want, matrix in _geometric_cases(image):
    assert _matches(ours(image, name, arg), want, _near_ties(image.shape, matrix)), name
    assert (want == 128).all(-1).any() or name == 'Rotate'  # the fill shows


def test_layers_draw_ops_uniformly_with_a_random_sign(image):
  # Geometric ops through randaugment: Pillow's transform at +arg or -arg, both seen.
  pil = Image.fromarray(image)
  for name, magnitude, matrix_of in (('ShearX', 5, lambda s: (1, s, -s / 2, 0, 1, 0)),
                                     ('TranslateY', 0.5, lambda p: (1, 0, 0, 0, 1, p))):
    arg = ra.op_argument(name, magnitude)
    signs = []
    for key in range(8):
      got = ra.randaugment(tf.constant(image), 1, magnitude, tf.constant([key, 1]),
                           ops=(name,))
      for sign in (1, -1):
        matrix = matrix_of(sign * arg)
        if _matches(got.numpy(), _pillow_affine(pil, matrix),
                    _near_ties(image.shape, matrix)):
          signs.append(sign)
    assert sorted(set(signs)) == [-1, 1] and len(signs) == 8, name
  # Always applied: Invert twice is the identity, three times the inverse.
  invert_only = lambda n: ra.randaugment(tf.constant(image), n, 10, tf.constant([0, 0]),
                                         ops=('Invert',)).numpy()
  np.testing.assert_array_equal(invert_only(2), image)
  np.testing.assert_array_equal(invert_only(3), 255 - image)
  # One op per layer, uniformly: 1 layer over 400 seeds, each of 4 ops (told apart by
  # their results) about 100 times (chi-square, 3 d.o.f., p ~ 1e-4 at 21).
  ops = ('Invert', 'Equalize', 'Posterize', 'Brightness')
  outcomes = {name: ours(image, name, ra.op_argument(name, 10)).tobytes() for name in ops}
  seeds = tf.data.Dataset.range(400).map(lambda i: tf.stack([i, 3]))
  results = seeds.map(lambda s: ra.randaugment(tf.constant(image), 1, 10, s, ops=ops))
  counts = Counter()
  for out in results.as_numpy_iterator():
    (name,) = [n for n, o in outcomes.items() if o == out.tobytes()]
    counts[name] += 1
  chi2 = sum((counts[n] - 100) ** 2 / 100 for n in ops)
  assert chi2 < 21, counts


_IN_ANOTHER_PROCESS = """
import sys, numpy as np, tensorflow as tf
from vit_jax import randaugment as ra
image = np.load(sys.argv[1])
np.save(sys.argv[2], np.stack([ra.randaugment(tf.constant(image), 2, 15,
                                              tf.constant([k, 5])).numpy()
                               for k in range(6)]))
"""


def test_same_image_and_seed_same_result_in_another_process(image, tmp_path):
  np.save(tmp_path / 'image.npy', image)
  subprocess.run([sys.executable, '-c', _IN_ANOTHER_PROCESS, str(tmp_path / 'image.npy'),
                  str(tmp_path / 'out.npy')], check=True,
                 env={**os.environ, 'PYTHONPATH': os.getcwd()})
  here = np.stack([ra.randaugment(tf.constant(image), 2, 15, tf.constant([k, 5])).numpy()
                   for k in range(6)])
  np.testing.assert_array_equal(np.load(tmp_path / 'out.npy'), here)
  assert len({out.tobytes() for out in here}) >= 4  # the seed matters
