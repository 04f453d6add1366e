"""tf.data input pipelines: TFDS datasets, image folders and the embedded digits.

Datasets (``config.dataset``):

* any prepared TFDS image-classification dataset by name, with an optional
  version or config (``'cifar10'``, ``'imagenet2012:5.1.0'``, ...), read from
  ``config.data_dir`` (TFDS's default directory when ``None``). Nothing is
  ever downloaded: a dataset that is not prepared there raises an error that
  says how to prepare it.
* ``'digits'``: scikit-learn's handwritten digits as a 32x32x3 TFDS dataset
  (:mod:`vit_jax.datasets.digits`), prepared into ``data_dir`` on first use
  from files that ship with scikit-learn (no network).
* ``'image_folder:/abs/path'``: a folder of images, laid out either as
  ``root/<class>/<image>`` (one split named ``train``; carve an eval split out
  of it with TFDS split strings, e.g. ``train[:90%]`` / ``train[90%:]``) or,
  like ``tfds.ImageFolder``, as ``root/<split>/<class>/<image>``. Class ids
  follow the sorted class-folder names.

Splits are TFDS split strings (``'train'``, ``'train[:98%]'``,
``'train[10:20]+test'``, ...); they work the same for image folders.

Every process reads its own disjoint, contiguous part of a split (TFDS
``even_splits`` semantics); per-process batch = global batch / process count.

Randomness is stateless: the shuffle order of epoch ``e`` and the augmentation
of the ``i``-th element a process reads are pure functions of
``(config.seed, process_index, e)`` and ``(config.seed, process_index, i)``,
so ``get_train_dataset(config, start_step=k)`` yields exactly the batches that
the ``start_step=0`` dataset yields from batch ``k`` on, without preprocessing
the skipped examples.

Unreadable images (garbage bytes, a text file named ``.jpg``, a truncated
file) follow ``config.bad_images``: ``'raise'`` (the default) stops with a
:class:`BadImageError` naming the file (for TFDS, the split and index);
``'skip'`` leaves them out with a warning and lists them
(:func:`bad_images`, :func:`write_bad_images`). Image folders are checked when
they are first listed: an entry with an image extension that is not a file
(e.g. a directory named ``x.jpg``) is such a bad image, and a class directory
without images is an error (it would silently renumber the classes).

TensorFlow is imported lazily, so importing this module (e.g. for
:class:`DatasetInfo`) does not need TensorFlow.

The pipeline is assembled here from modules of their own: the sources
(`vit_jax.image_sources`), the preprocessing (`vit_jax.preprocessing`), the
bad-image guard (`vit_jax.bad_image_guard`) and TensorFlow imported on first use
(`vit_jax.tf_imports`); they share the stateless-seed scheme and the per-process
split defined here, on which the resume guarantee above rests.
"""

from __future__ import annotations

import atexit
import math
import weakref
from typing import Any, Iterator

from vit_jax import randaugment as randaugment_lib
from vit_jax.configs import schema
from vit_jax.configs.image_size import image_hw
from vit_jax.bad_image_guard import (
    _BadImageReporter, _guarded_batches, _guarded_map, _refill, _unstash)
from vit_jax.image_sources import _Source, _bad_image_policy, _get_source, _process
from vit_jax.preprocessing import _base_key, _eval_preprocess, _mixup, _options, _train_preprocess
from vit_jax.tf_imports import _as_written, _map, _tf, _tfds

# The API as users import it from here, defined in the modules named in the docstring.
from vit_jax.image_sources import (  # pylint: disable=unused-import
    IMAGE_FOLDER_PREFIX, IMAGE_EXTENSIONS, BAD_IMAGE_POLICIES, BAD_IMAGES_FILE,
    DatasetInfo, bad_images, write_bad_images, get_dataset_info)
from vit_jax.bad_image_guard import (  # pylint: disable=unused-import
    BadImageError)


TRAIN_PP = ('inception_crop', 'resize_crop', 'plain')
EVAL_PP = ('resize', 'resize_crop')
MIXUP_FORMS = ('reverse', 'augreg')

# Tags separating the random streams derived from (seed, process).
_SHUFFLE_TAG, _AUGMENT_TAG, _MIXUP_TAG = 1, 2, 3


def _pp_settings(config: schema.Config) -> dict[str, Any]:
  """`config.pp` as a dict, validated (defaults: `vit_jax.configs.schema`)."""
  pp = config.pp.to_dict()
  if pp['train'] not in TRAIN_PP:
    raise ValueError(
        f'Unknown config.pp.train={pp["train"]!r}; expected one of {TRAIN_PP}.')
  if pp['eval'] not in EVAL_PP:
    raise ValueError(
        f'Unknown config.pp.eval={pp["eval"]!r}; expected one of {EVAL_PP}.')
  if pp['crop_pad'] is not None and int(pp['crop_pad']) < 0:
    raise ValueError(f'config.pp.crop_pad must be >= 0, got {pp["crop_pad"]}.')
  if not 0 < pp['min_area'] <= pp['max_area'] <= 1:
    raise ValueError('Need 0 < config.pp.min_area <= config.pp.max_area <= 1, '
                     f'got {pp["min_area"]}, {pp["max_area"]}.')
  pp['randaug'] = randaugment_lib.check(pp['randaug'], pp['randaug_ops'])
  return pp


def check_mixup(config: schema.Config) -> tuple[float, str]:
  """(config.mixup_alpha, config.mixup_form), checked."""
  alpha, form = config.mixup_alpha, config.mixup_form
  if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha >= 0:
    raise ValueError(f'config.mixup_alpha must be a number >= 0, got {alpha!r}.')
  if form not in MIXUP_FORMS:
    raise ValueError(f'Unknown config.mixup_form={form!r}; expected one of {MIXUP_FORMS}.')
  return float(alpha), form


def _local_batch(config: schema.Config, field: str, process_count: int) -> int:
  batch = config[field]
  if batch is None or int(batch) <= 0:
    raise ValueError(f'config.{field} must be a positive int, got {batch!r}.')
  if batch % process_count:
    raise ValueError(
        f'config.{field}={batch} (global) is not divisible by the process '
        f'count {process_count}.')
  return batch // process_count


# ----------------------------------------------------------------------------
# Public pipelines.
# ----------------------------------------------------------------------------


def _maybe_cache(records, source: _Source, cache: bool):
  """(records, whether 'image' still holds paths to read): cached in memory if asked."""
  tf = _tf()
  if not cache:
    return records, source.yields_paths
  if source.yields_paths:  # Cache file contents, not their paths.
    # An unreadable file is cached as b'', which then fails to decode and is
    # reported (by its path) like any bad image.
    records = _guarded_map(records, lambda r: {'image': tf.io.read_file(r['image'])}, None,
                           keep=('id', 'label'))
    records = _map(records, lambda r: {k: r[k] for k in ('image', 'label', 'id')})
  return records.cache(), False


def get_train_dataset(config: schema.Config,
                      *,
                      start_step: int = 0,
                      process_index: int | None = None,
                      process_count: int | None = None):
  """Infinite, shuffled, augmented training batches of this process.

  Args:
    config: see the module docstring / docs/input_pipeline.md for the fields.
    start_step: index of the first batch to yield; the dataset yields the same
      batches as the `start_step=0` one does from that batch on.
    process_index: this process (default `jax.process_index()`).
    process_count: number of processes (default `jax.process_count()`).

  Returns:
    tf.data.Dataset of {'image': float32 [B, S, S, 3] in [-1, 1],
    'label': float32 [B, num_classes]} with B = config.batch_size /
    process_count (one-hot labels, soft when mixup is on).
  """
  tf = _tf()
  pp = _pp_settings(config)
  pi, pc = _process(process_index, process_count)
  batch = _local_batch(config, 'batch_size', pc)
  if int(start_step) < 0:
    raise ValueError(f'start_step must be >= 0, got {start_step}.')
  image_size = image_hw(config.image_size)
  seed = int(config.seed)
  alpha, mixup_form = check_mixup(config)
  buffer = int(config.shuffle_buffer)
  if buffer < 1:
    raise ValueError(f'config.shuffle_buffer must be >= 1, got {buffer}.')
  source = _get_source(config)
  policy = _bad_image_policy(config)
  split = config.train_split
  records, count = source.read(split, pi, pc)
  if count == 0:
    raise ValueError(f'Split {split!r} of {source.name!r} gives process {pi} '
                     f'of {pc} no training examples.')
  records, needs_read = _maybe_cache(records, source, config.cache)

  shuffle_key = _base_key(seed, pi, _SHUFFLE_TAG)
  augment_key = _base_key(seed, pi, _AUGMENT_TAG)
  mixup_key = _base_key(seed, pi, _MIXUP_TAG)
  buffer = max(1, min(buffer, count))

  def one_epoch(epoch):
    # Each epoch is shuffled with its own seed: a pure function of (seed,
    # process, epoch), so that resuming can start at any epoch directly.
    epoch_seed = tf.random.stateless_uniform(
        [],
        seed=tf.random.experimental.stateless_fold_in(shuffle_key, epoch),
        minval=0,
        maxval=2**62,
        dtype=tf.int64)
    return records.shuffle(buffer, seed=epoch_seed,
                           reshuffle_each_iteration=False)

  first_element = int(start_step) * batch
  first_epoch, skip = divmod(first_element, count)
  ds = tf.data.Dataset.counter(start=first_epoch).flat_map(_as_written(one_epoch))
  # Index of each element in this process's stream, for its random seed.
  ds = ds.enumerate(start=first_epoch * count)
  ds = ds.skip(skip)  # Before decoding: skipped elements cost only a read.

  def preprocess(record):
    data = record['image']
    if needs_read:
      data = tf.io.read_file(data)
    key = tf.random.experimental.stateless_fold_in(augment_key, record['index'])
    return {
        'image': _train_preprocess(data, key, pp, image_size),
        'label': tf.one_hot(record['label'], source.num_classes,
                            dtype=tf.float32),
    }

  ds = _map(ds, lambda index, record: {**record, 'index': index})
  ds = _guarded_batches(ds.batch(batch, drop_remainder=True), preprocess,
                        _BadImageReporter(source, split, pi, pc, policy), size=batch,
                        parallel=True)
  if policy == 'skip':
    ds = _map(ds, _refill, num_parallel_calls=tf.data.AUTOTUNE)
  else:  # 'raise': a failed image raised already
    ds = _map(ds, lambda b: {'image': b['image'], 'label': b['label']})
  if alpha > 0:
    ds = _map(ds.enumerate(start=int(start_step)),
              lambda step, b: _mixup(
                  b, tf.random.experimental.stateless_fold_in(mixup_key, step), alpha,
                  mixup_form),
              num_parallel_calls=tf.data.AUTOTUNE)
  ds = ds.prefetch(tf.data.AUTOTUNE)
  return _options(ds)


def num_eval_batches(config: schema.Config, *, process_count: int | None = None) -> int:
  """Number of batches every process's eval dataset has."""
  if process_count is None:
    _, process_count = _process(None, None)
  pc = int(process_count)
  batch = _local_batch(config, 'eval_batch_size', pc)
  total = _get_source(config).num_examples(config.eval_split)
  return max(1, math.ceil(math.ceil(total / pc) / batch))


def get_eval_dataset(config: schema.Config,
                     *,
                     process_index: int | None = None,
                     process_count: int | None = None):
  """Finite, ordered, padded evaluation batches of this process.

  Every example of `config.eval_split` appears exactly once over all
  processes with mask 1; padding examples (zeros) have mask 0. All processes
  yield the same number of batches, `num_eval_batches(config)`.

  Returns:
    tf.data.Dataset of {'image': float32 [B, S, S, 3], 'label': float32
    [B, num_classes] (one-hot), 'mask': float32 [B]}, B = eval_batch_size /
    process_count.
  """
  tf = _tf()
  pp = _pp_settings(config)
  pi, pc = _process(process_index, process_count)
  batch = _local_batch(config, 'eval_batch_size', pc)
  image_size = image_hw(config.image_size)
  source = _get_source(config)
  split = config.eval_split
  total = source.num_examples(split)
  if total == 0:
    raise ValueError(f'Eval split {split!r} of {source.name!r} is empty.')
  num_batches = max(1, math.ceil(math.ceil(total / pc) / batch))
  records, count = source.read(split, pi, pc)
  records, needs_read = _maybe_cache(records, source, config.cache)
  num_classes = source.num_classes

  def preprocess(record):
    data = record['image']
    if needs_read:
      data = tf.io.read_file(data)
    return {
        'image': _eval_preprocess(data, pp, image_size),
        'label': tf.one_hot(record['label'], num_classes, dtype=tf.float32),
    }

  ds = _guarded_map(records, preprocess,
                    _BadImageReporter(source, split, pi, pc, _bad_image_policy(config)))
  # A left-out image ('skip') is masked like padding: it counts nowhere.
  ds = _map(ds, lambda e: {'image': e['image'], 'label': e['label'],
                           'mask': tf.cast(e['ok'], tf.float32)})
  padding = tf.data.Dataset.from_tensors({
      'image': tf.zeros([*image_size, 3], tf.float32),
      'label': tf.zeros([num_classes], tf.float32),
      'mask': tf.constant(0.0, tf.float32),
  }).repeat(num_batches * batch - count)
  ds = ds.concatenate(padding).batch(batch, drop_remainder=True)
  ds = ds.prefetch(tf.data.AUTOTUNE)
  return _options(ds)


def iterate_numpy(ds) -> Iterator[dict[str, Any]]:
  """Iterates a tf.data.Dataset as (nested) numpy arrays.

  A BadImageError raised inside the pipeline comes out as itself, not wrapped
  in TensorFlow's error.
  """
  errors = _tf().errors

  def batches():
    iterator = iter(_tfds().as_numpy(ds))
    while True:
      try:
        batch = next(iterator)
      except StopIteration:
        return
      except errors.OpError as e:
        stashed = _unstash(str(e))
        if stashed is None:
          raise
      else:
        yield batch
        continue
      # The error's traceback keeps this frame, and so tf.data's iterator, alive until
      # the garbage collector runs, perhaps during interpreter exit, when destroying
      # the iterator hangs (see _LIVE_ITERATORS): let the iterator go first.
      del iterator
      raise stashed

  generator = batches()
  _LIVE_ITERATORS.add(generator)
  return generator


# Iterators still open at exit are closed while the interpreter still runs: a
# tf.data thread inside a tf.py_function (the bad-image reporter) cannot get the
# GIL once finalisation has begun, and destroying its iterator then would hang.
_LIVE_ITERATORS: weakref.WeakSet = weakref.WeakSet()


@atexit.register
def _close_live_iterators() -> None:
  for generator in list(_LIVE_ITERATORS):
    generator.close()
