"""Where training and evaluation batches come from, behind one small interface.

`get_data(config)` returns an object with `num_classes`, `num_train_examples`,
`num_eval_examples`, `train_batches(start_step)` (an endless iterator of this
process's slice of each global batch, batch `start_step` first) and
`eval_batches()` (one pass over the eval split, padded, with a 'mask').

- `SyntheticData` (`config.dataset = 'synthetic'`): generated on the host, no
  TensorFlow: timing runs, machines without TF, tests.
- `PipelineData`: everything else, through `vit_jax.input_pipeline` (tf.data),
  imported only then, so the trainer runs where TensorFlow is missing.
"""

from __future__ import annotations

import math
from typing import Iterator

import jax
import numpy as np

from vit_jax.configs import schema
from vit_jax.configs.image_size import image_hw

SYNTHETIC = 'synthetic'


class SyntheticData:
  """Noisy class templates made on the host: learnable, resumable, no TensorFlow.

  Class c's template is a random 4x4 colour pattern (from `config.seed`)
  upsampled to the image size; an example is its template plus Gaussian noise
  (`config.synthetic_noise`) drawn from a fixed pool, clipped to [-1, 1].
  The batch at step s is a pure function of (seed, s), and each process
  materialises only its slice of the global batch.
  """
  POOL = 128

  def __init__(self, config: schema.Config, process_index: int = 0, process_count: int = 1):
    self.config = config
    self.num_classes = int(config.num_classes)
    self.num_train_examples = 1 << 20  # nominal: batches never repeat
    self.num_eval_examples = int(config.num_eval_examples)
    self.seed = int(config.seed)
    self.process_index, self.process_count = process_index, process_count
    height, width = image_hw(config.image_size)
    rng = np.random.default_rng([self.seed, 7919])
    low = rng.uniform(-1, 1, (self.num_classes, 4, 4, 3)).astype(np.float32)
    rows, cols = (np.arange(height) * 4) // height, (np.arange(width) * 4) // width
    self.templates = low[:, rows][:, :, cols]
    noise = float(config.synthetic_noise)
    self.noise = (rng.standard_normal((self.POOL, height, width, 3)) * noise).astype(np.float32)

  def _examples(self, rng: np.random.Generator, n: int, start: int, stop: int) -> dict:
    labels = rng.integers(self.num_classes, size=n)[start:stop]
    noise = rng.integers(self.POOL, size=n)[start:stop]
    images = np.clip(self.templates[labels] + self.noise[noise], -1.0, 1.0)
    onehot = np.eye(self.num_classes, dtype=np.float32)[labels]
    return {'image': images, 'label': onehot}

  def _local(self, batch: int) -> tuple[int, int]:
    local = batch // self.process_count
    return self.process_index * local, (self.process_index + 1) * local

  def train_batches(self, start_step: int = 0) -> Iterator[dict]:
    batch = int(self.config.batch_size)
    start, stop = self._local(batch)
    step = start_step
    while True:
      yield self._examples(np.random.default_rng([self.seed, 1, step]), batch, start, stop)
      step += 1

  def eval_batches(self) -> Iterator[dict]:
    batch = int(self.config.eval_batch_size)
    start, stop = self._local(batch)
    for i in range(math.ceil(self.num_eval_examples / batch)):
      out = self._examples(np.random.default_rng([self.seed, 2, i]), batch, start, stop)
      position = i * batch + np.arange(start, stop)
      out['mask'] = (position < self.num_eval_examples).astype(np.float32)
      yield out


class PipelineData:
  """`vit_jax.input_pipeline` (tf.data): TFDS datasets, image folders, digits."""

  def __init__(self, config: schema.Config):
    from vit_jax import input_pipeline  # pylint: disable=g-import-not-at-top
    self._ip = input_pipeline
    self.config = config
    info = input_pipeline.get_dataset_info(config)
    if info.num_classes < 2:
      # Training on it reaches loss 0 and 100% accuracy having learnt nothing.
      names = f' ({", ".join(map(str, info.class_names))})' if info.class_names else ''
      raise ValueError(
          f'config.dataset={config.dataset!r} has {info.num_classes} class{names}: a '
          'classifier has nothing to tell apart; give it at least two classes (for an '
          'image folder, one sub-folder per class)')
    self.num_classes = info.num_classes

    self.num_train_examples = info.num_train_examples
    self.num_eval_examples = info.num_eval_examples
    self._eval_ds = None

  def train_batches(self, start_step: int = 0) -> Iterator[dict]:
    ds = self._ip.get_train_dataset(self.config, start_step=start_step)
    return self._ip.iterate_numpy(ds)

  def eval_batches(self) -> Iterator[dict]:
    if self._eval_ds is None:
      self._eval_ds = self._ip.get_eval_dataset(self.config)
    return self._ip.iterate_numpy(self._eval_ds)


def get_data(config: schema.Config):
  if config.dataset == SYNTHETIC:
    return SyntheticData(config, jax.process_index(), jax.process_count())
  return PipelineData(config)
