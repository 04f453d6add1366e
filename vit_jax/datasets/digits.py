"""The ``digits`` dataset: scikit-learn's handwritten digits as a TFDS builder.

scikit-learn bundles 1,797 grey-scale 8x8 images of handwritten digits (ten
classes, pixel values 0..16) taken from the UCI "Optical Recognition of
Handwritten Digits" data. ``sklearn.datasets.load_digits`` reads them from a
file inside the scikit-learn package, so preparing this dataset needs no
network access.

The builder upsamples every image to 32x32 with bilinear interpolation,
rescales it to 0..255 and repeats it over three channels (uint8, 32x32x3), so
that it looks like a tiny RGB image-classification dataset to the rest of the
code. The train/test split is fixed and stratified: within each class, in the
order scikit-learn returns the images, every fifth image (positions 4, 9, 14,
...) goes to ``test`` and the others to ``train`` (1,442 / 355 images).
"""

from __future__ import annotations

import numpy as np
import tensorflow_datasets as tfds

from vit_jax import datasets

datasets.ensure_importlib_resources()

IMAGE_SIZE = 32
NUM_CLASSES = 10
TEST_EVERY = 5  # Every TEST_EVERY-th image of each class goes to 'test'.

_DESCRIPTION = __doc__
_CITATION = """\
@misc{alpaydin1998optdigits,
  author = {Alpaydin, E. and Kaynak, C.},
  title = {Optical Recognition of Handwritten Digits},
  year = {1998},
  howpublished = {UCI Machine Learning Repository},
}
"""


def interpolation_matrix(size_out: int, size_in: int) -> np.ndarray:
  """Matrix M (size_out x size_in) so that M @ x resamples x linearly.

  Uses half-pixel centres (like ``tf.image.resize`` with bilinear method) and
  clamps at the borders.
  """
  centres = (np.arange(size_out) + 0.5) * size_in / size_out - 0.5
  centres = np.clip(centres, 0, size_in - 1)
  lo = np.floor(centres).astype(np.int64)
  hi = np.minimum(lo + 1, size_in - 1)
  frac = centres - lo
  m = np.zeros((size_out, size_in), np.float64)
  m[np.arange(size_out), lo] += 1.0 - frac
  m[np.arange(size_out), hi] += frac
  return m


def upsample(images8: np.ndarray, size: int = IMAGE_SIZE) -> np.ndarray:
  """[N, 8, 8] values in 0..16 -> uint8 [N, size, size, 3] in 0..255."""
  images8 = np.asarray(images8, np.float64)
  m = interpolation_matrix(size, images8.shape[1])
  big = np.einsum('ij,njk,lk->nil', m, images8, m)
  big = np.clip(np.round(big * (255.0 / 16.0)), 0, 255).astype(np.uint8)
  return np.repeat(big[..., None], 3, axis=-1)


def split_indices() -> dict[str, np.ndarray]:
  """Indices into ``load_digits()`` of the train and test images."""
  from sklearn.datasets import load_digits  # pylint: disable=g-import-not-at-top
  target = load_digits().target
  is_test = np.zeros(len(target), bool)
  for c in range(NUM_CLASSES):
    idx = np.flatnonzero(target == c)
    is_test[idx[TEST_EVERY - 1::TEST_EVERY]] = True
  return {'train': np.flatnonzero(~is_test), 'test': np.flatnonzero(is_test)}


def load_arrays(split: str) -> tuple[np.ndarray, np.ndarray]:
  """(images uint8 [N,32,32,3], labels int64 [N]) of a split, in file order."""
  from sklearn.datasets import load_digits  # pylint: disable=g-import-not-at-top
  data = load_digits()
  idx = split_indices()[split]
  return upsample(data.images[idx]), data.target[idx].astype(np.int64)


class Digits(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """scikit-learn's handwritten digits, 32x32x3, 10 classes.

  Not registered in the global TFDS registry (so that it never clashes with a
  dataset of the same name); instantiate it directly:
  ``Digits(data_dir=...).download_and_prepare()``, or use
  ``config.dataset = 'digits'`` with :mod:`vit_jax.input_pipeline`.
  """

  name = 'digits'
  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'First version.'}

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=_DESCRIPTION,
        features=tfds.features.FeaturesDict({
            'image': tfds.features.Image(
                shape=(IMAGE_SIZE, IMAGE_SIZE, 3), encoding_format='png'),
            'label': tfds.features.ClassLabel(
                names=[str(i) for i in range(NUM_CLASSES)]),
        }),
        supervised_keys=('image', 'label'),
        homepage='https://archive.ics.uci.edu/dataset/80',
        citation=_CITATION,
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing to download: the data ships with scikit-learn.
    return {
        'train': self._generate_examples('train'),
        'test': self._generate_examples('test'),
    }

  def _generate_examples(self, split: str):
    images, labels = load_arrays(split)
    for i, (image, label) in enumerate(zip(images, labels)):
      yield i, {'image': image, 'label': int(label)}
