"""TensorFlow and TFDS, imported on first use, so that importing the input pipeline does not need them.

TensorFlow is kept off the accelerators (JAX owns them), and the functions
tf.data traces are traced as written, without AutoGraph (`_as_written`).
"""

from __future__ import annotations

import functools
import os
from typing import Callable


@functools.cache
def _tf():
  """Imports TensorFlow, hiding accelerators from it (JAX owns them)."""
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  try:
    tf.config.set_visible_devices([], 'GPU')
    tf.config.set_visible_devices([], 'TPU')
  except (RuntimeError, ValueError):
    pass  # TF already initialised its devices, or has no TPU support.
  return tf


def _as_written(fn: Callable) -> Callable:
  """`fn` for tf.data to trace as it is, without AutoGraph. Our functions branch
  with tf.cond and tf.where, never Python control flow on tensors, so converting
  them only cost time: ~1.7 s of CPU per process that builds a pipeline."""
  return _tf().autograph.experimental.do_not_convert(fn)


def _map(ds, fn: Callable, **kwargs):
  """`ds.map(fn)` with `fn` as written (`_as_written`)."""
  return ds.map(_as_written(fn), **kwargs)


@functools.cache
def _tfds():
  _tf()
  from vit_jax import datasets  # pylint: disable=g-import-not-at-top
  datasets.ensure_importlib_resources()
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  return tfds
