"""Unreadable images inside tf.data: raised with their name, or skipped and listed.

A `BadImageError` raised while tf.data decodes a batch reaches Python wrapped in
a TF error; the guard decodes elements in groups, finds the culprit, and either
re-raises it naming the file (for TFDS, the split and index) or, with
`config.bad_images='skip'`, leaves it out and records it for `bad_images`.
"""

from __future__ import annotations

import itertools
import re
from typing import TYPE_CHECKING, Callable

from absl import logging

from vit_jax import images as images_lib
from vit_jax.preprocessing import _header_size
from vit_jax.tf_imports import _map, _tf

if TYPE_CHECKING:  # the sources import this module
  from vit_jax.image_sources import _Source


# Elements decoded together in one guarded group (see `_guarded_map`): large
# enough that the group's bookkeeping costs little per image.
_GROUP = 32


class BadImageError(ValueError):
  """An image that cannot be read or decoded (or a folder entry that is not a file)."""


# ----------------------------------------------------------------------------
# Unreadable images.
# ----------------------------------------------------------------------------

# A BadImageError raised inside the tf.data graph reaches Python wrapped in a TF
# error; `iterate_numpy` finds it here by the token in that error's text and
# raises it instead.
_STASHED: dict[int, BadImageError] = {}
_STASH_IDS = itertools.count()
_STASH_TOKEN = re.compile(r'\[vit_jax bad image #(\d+)\]')


def _stash(error: BadImageError) -> ValueError:
  """What to raise inside a tf.py_function for `error` to come out of `iterate_numpy`."""
  token = next(_STASH_IDS)
  _STASHED[token] = error
  return ValueError(f'{error} [vit_jax bad image #{token}]')


def _unstash(text: str) -> BadImageError | None:
  match = _STASH_TOKEN.search(text)
  return _STASHED.pop(int(match.group(1)), None) if match else None


def _error_text(error: Exception) -> str:
  """A TF error's message without its node names and op suffix."""
  text = getattr(error, 'message', None) or str(error)
  text = re.sub(r'\{\{[^}]*\}\}\s*', '', text)
  text = re.sub(r'\s*\[Op:[^\]]*\].*$', '', text, flags=re.S)
  return text.strip().splitlines()[0] if text.strip() else type(error).__name__


def _failure_reason(raw: bytes | None, path: str | None) -> str:
  """Why an image cannot be used, found again eagerly (only ever for bad ones)."""
  tf = _tf()
  if path is not None:
    try:
      with tf.io.gfile.GFile(path, 'rb') as f:
        raw = f.read()
    except Exception as e:  # pylint: disable=broad-except
      return f'cannot be read ({_error_text(e)})'
  if not raw:
    return 'empty file (0 bytes)'
  try:
    height, width = (int(v) for v in _header_size(tf.constant(raw)))
  except Exception:  # pylint: disable=broad-except  (a corrupt header: the decoder says why)
    height = width = 0
  if height * width > images_lib.MAX_PIXELS:
    return (f'{width}x{height} = {height * width:,} pixels, more than the limit of '
            f'{images_lib.MAX_PIXELS:,} (vit_jax.images.MAX_PIXELS); not decoded')
  try:
    tf.io.decode_image(raw, channels=3, expand_animations=False)

  except Exception as e:  # pylint: disable=broad-except
    return f'cannot be decoded ({_error_text(e)})'
  return 'it decodes, but preprocessing it failed'


class _BadImageReporter:
  """Called through tf.py_function with the records of a group that failed.

  'raise': raises a BadImageError naming the first. 'skip': adds them to the
  source's list and logs each the first time it is met.
  """

  def __init__(self, source: _Source, split: str, process_index: int,
               process_count: int, policy: str):
    self.source, self.split, self.policy = source, split, policy
    self.process = (process_index, process_count)

  def __call__(self, keys, data):
    import numpy as np  # pylint: disable=g-import-not-at-top
    found = []
    for key, raw in zip(keys.numpy(), data.numpy()):
      name = self.source.describe(self.split, *self.process, key)
      path = name if self.source.yields_paths else None
      found.append((key, name, _failure_reason(None if path else raw, path)))
    if self.policy == 'raise':
      key, _, reason = found[0]
      more = f' ({len(found) - 1} more near it)' if len(found) > 1 else ''
      raise _stash(BadImageError(
          f'Cannot use image {self.source.where(self.split, *self.process, key)}: '
          f'{reason}{more}. Replace or remove it, or set config.bad_images=\'skip\' to '
          'leave unreadable images out. (A run rerun in the same workdir resumes from its '
          'latest checkpoint.)'))
    new = []
    with self.source.bad_lock:
      for key, name, reason in found:
        if name not in self.source.bad_images:
          self.source.bad_images[name] = reason
          new.append((key, reason))
      total = len(self.source.bad_images)
    for key, reason in new:
      logging.warning("Leaving out image %s: %s (config.bad_images='skip'; %d so far).",
                      self.source.where(self.split, *self.process, key), reason, total)
    return np.int64(len(found))


def _raise_in_graph(message: str):
  """A tf op that raises BadImageError(message) when run."""
  tf = _tf()

  def fail():
    raise _stash(BadImageError(message))

  return tf.py_function(fail, [], tf.int64)


def _guarded_batches(batches, fn: Callable, report: Callable | None,
                     keep: tuple[str, ...] = (), *, size: int, parallel: bool = False):
  """`fn` mapped over each element of each batch of `batches`, surviving failures.

  `batches` holds batches (of at most `size`) of dict elements with an 'id'
  and the encoded 'image'. Each output batch holds `fn`'s outputs (zeros where
  `fn` raised), the `keep` entries of its input and 'ok' (False where `fn`
  raised); nothing is dropped, so positions (resuming, per-example seeds) stay
  as they are. `report(ids, images)` runs (as a tf.py_function) with the failed
  elements of a batch, only when there are any.

  `fn` runs per element inside a nested dataset with `ignore_errors`: TF has no
  way to catch an op's error inside a graph. The nested dataset's batch is the
  output batch, so no image is copied more often than by a plain map + batch.
  """
  tf = _tf()

  def guarded(elements):
    n = tf.shape(elements['id'], out_type=tf.int64)[0]
    inner = tf.data.Dataset.from_tensor_slices((tf.range(n), elements))
    if parallel:
      inner = _map(inner, lambda i, e: (i, fn(e)), num_parallel_calls=tf.data.AUTOTUNE,
                   deterministic=True)
    else:
      inner = _map(inner, lambda i, e: (i, fn(e)))
    inner = inner.ignore_errors()
    zeros = tf.nest.map_structure(lambda spec: tf.zeros(spec.shape, spec.dtype),
                                  inner.element_spec[1])
    # A sentinel at position n: the batch is never empty, and searchsorted below
    # always finds an entry.
    inner = inner.concatenate(tf.data.Dataset.from_tensors((n, zeros)))
    done, outputs = inner.batch(size + 1).get_single_element()
    slot = tf.searchsorted(done, tf.range(n))
    ok = tf.equal(tf.gather(done, slot), tf.range(n))

    def all_ok():
      return tf.nest.map_structure(lambda x: x[:n], outputs)

    def some_failed():
      def pick(x, zero):
        keep_mask = tf.reshape(ok, tf.concat([[n], tf.ones([tf.rank(zero)], tf.int32)], 0))
        return tf.where(keep_mask, tf.gather(x, slot), zero)
      return tf.nest.map_structure(pick, outputs, zeros)

    out = tf.cond(tf.reduce_all(ok), all_ok, some_failed)
    if report is not None:
      failed = tf.logical_not(ok)
      reported = tf.cond(
          tf.reduce_any(failed),
          lambda: tf.py_function(report, [tf.boolean_mask(elements['id'], failed),
                                          tf.boolean_mask(elements['image'], failed)],
                                 tf.int64),
          lambda: tf.constant(0, tf.int64))
      with tf.control_dependencies([reported]):
        ok = tf.identity(ok)
    return {**{k: elements[k] for k in keep}, **out, 'ok': ok}

  # With the parallelism inside a batch, two batches at a time keep the cores
  # busy at batch boundaries without holding many batches in memory.
  return _map(batches, guarded, num_parallel_calls=2 if parallel else tf.data.AUTOTUNE)


def _guarded_map(ds, fn: Callable, report: Callable | None, keep: tuple[str, ...] = ()):
  """`_guarded_batches` element by element (groups of `_GROUP`, unbatched again)."""
  return _guarded_batches(ds.batch(_GROUP), fn, report, keep, size=_GROUP).unbatch()


def _refill(batch):
  """'skip' in training: a failed example's slot takes a copy of a good one of the batch.

  Batches keep their size and positions, so a resumed run still sees exactly
  the batches of an uninterrupted one.
  """
  tf = _tf()
  ok = batch['ok']
  n = tf.shape(ok)[0]

  def refilled():
    good = tf.cast(tf.where(ok)[:, 0], tf.int32)
    check = tf.cond(tf.size(good) > 0, lambda: tf.constant(0, tf.int64),
                    lambda: _raise_in_graph(
                        'Every image of a training batch is unreadable; is the dataset '
                        'intact?'))
    with tf.control_dependencies([check]):
      take = tf.where(ok, tf.range(n), tf.gather(good, tf.range(n) % tf.maximum(tf.size(good), 1)))
    return {k: tf.gather(batch[k], take) for k in ('image', 'label')}

  return tf.cond(tf.reduce_all(ok), lambda: {k: batch[k] for k in ('image', 'label')},
                 refilled)
