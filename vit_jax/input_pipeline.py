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

Why one module of this size: the sources (TFDS, folders, digits), the
preprocessing and the bad-image guard share one stateless-seed scheme and one
per-process split of every dataset; the resume guarantee above holds only if
they stay together, so they are read and tested as one pipeline.
"""

from __future__ import annotations

import atexit
import dataclasses
import functools
import itertools
import json
import math
import os
import re
import threading
from typing import Any, Callable, Iterator
import weakref

from absl import logging

from vit_jax import images as images_lib
from vit_jax import randaugment as randaugment_lib
from vit_jax.configs import schema
from vit_jax.configs.image_size import image_hw


IMAGE_FOLDER_PREFIX = 'image_folder:'
IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.gif')
TRAIN_PP = ('inception_crop', 'resize_crop', 'plain')
EVAL_PP = ('resize', 'resize_crop')

BAD_IMAGE_POLICIES = ('raise', 'skip')
MIXUP_FORMS = ('reverse', 'augreg')
BAD_IMAGES_FILE = 'bad_images.txt'

# Tags separating the random streams derived from (seed, process).
_SHUFFLE_TAG, _AUGMENT_TAG, _MIXUP_TAG = 1, 2, 3
# Tag of RandAugment's stream within an example's augmentation seed.
_RANDAUG_TAG = 1

# Elements decoded together in one guarded group (see `_guarded_map`): large
# enough that the group's bookkeeping costs little per image.
_GROUP = 32


class BadImageError(ValueError):
  """An image that cannot be read or decoded (or a folder entry that is not a file)."""


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  """What the trainer needs to know about a dataset."""
  num_classes: int
  num_train_examples: int  # Global count of config.train_split.
  num_eval_examples: int  # Global count of config.eval_split.
  image_shape: tuple[int, int, int]  # (height, width, 3) of config.image_size.
  class_names: tuple[str, ...] | None = None


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


def _pp_settings(config) -> dict[str, Any]:
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


def check_mixup(config) -> tuple[float, str]:
  """(config.mixup_alpha, config.mixup_form), checked."""
  alpha, form = config.mixup_alpha, config.mixup_form
  if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha >= 0:
    raise ValueError(f'config.mixup_alpha must be a number >= 0, got {alpha!r}.')
  if form not in MIXUP_FORMS:
    raise ValueError(f'Unknown config.mixup_form={form!r}; expected one of {MIXUP_FORMS}.')
  return float(alpha), form


def _process(process_index, process_count) -> tuple[int, int]:
  if process_index is None or process_count is None:
    import jax  # pylint: disable=g-import-not-at-top
    if process_index is None:
      process_index = jax.process_index()
    if process_count is None:
      process_count = jax.process_count()
  if not 0 <= process_index < process_count:
    raise ValueError(
        f'process_index={process_index} not in [0, {process_count}).')
  return int(process_index), int(process_count)


def _local_batch(config, field: str, process_count: int) -> int:
  batch = config[field]
  if batch is None or int(batch) <= 0:
    raise ValueError(f'config.{field} must be a positive int, got {batch!r}.')
  if batch % process_count:
    raise ValueError(
        f'config.{field}={batch} (global) is not divisible by the process '
        f'count {process_count}.')
  return batch // process_count


def _even_part(n: int, index: int, count: int) -> tuple[int, int]:
  """[start, stop) of part `index` of `count` near-equal parts of range(n).

  The first `n % count` parts get one more element (as TFDS `even_splits`).
  """
  size, extra = divmod(n, count)
  start = index * size + min(index, extra)
  return start, start + size + (1 if index < extra else 0)


# ----------------------------------------------------------------------------
# Sources: where the (encoded image, label) records of a split come from.
# ----------------------------------------------------------------------------


class _Source:
  """Reads the records of a split: {'image': bytes or path, 'label': int64, 'id'}.

  'id' names the record in error messages: its path (image folders) or its
  position in this process's part of the split (TFDS), see `describe`.
  """

  name: str
  num_classes: int
  class_names: tuple[str, ...] | None
  # True when 'image' holds file paths that still have to be read.
  yields_paths: bool = False
  # Entries with an image extension that are not files (image folders).
  not_files: tuple[str, ...] = ()

  def __init__(self):
    # Unreadable images met so far: {description: reason}, in the order met.
    self.bad_images: dict[str, str] = {}
    self.bad_lock = threading.Lock()

  def num_examples(self, split: str) -> int:
    raise NotImplementedError

  def read(self, split: str, process_index: int, process_count: int):
    """(local tf.data.Dataset of records in a fixed order, local count)."""
    raise NotImplementedError

  def describe(self, split: str, process_index: int, process_count: int, key) -> str:
    """Where the record with 'id' `key` comes from, for a person to find it: a path,
    or 'index N of split S of dataset D'."""
    raise NotImplementedError

  def where(self, split: str, process_index: int, process_count: int, key) -> str:
    """`describe` for a sentence: a path is quoted and given its split."""
    found = self.describe(split, process_index, process_count, key)
    return f'{found!r} (split {split!r} of {self.name!r})' if self.yields_paths else found


class _TfdsSource(_Source):
  """A prepared TFDS dataset (or the embedded digits, prepared on demand)."""

  def __init__(self, name: str, data_dir: str | None):
    super().__init__()
    tfds = _tfds()
    from vit_jax import datasets  # pylint: disable=g-import-not-at-top
    self.name = name
    base_name = name.split(':')[0].split('/')[0]
    if data_dir is not None:
      data_dir = os.path.expanduser(str(data_dir))
    if name in datasets.EMBEDDED_DATASETS:
      # With a version ('digits:1.0.0'), the generic path below reads an
      # already prepared copy instead.
      builder = datasets.prepared_builder(base_name, data_dir)  # Locally, under a lock.
    else:
      if data_dir is not None and not _tf().io.gfile.isdir(data_dir):
        raise FileNotFoundError(
            f'config.data_dir={data_dir!r} (for dataset {name!r}) does not '
            'exist or is not a directory.')
      try:
        builder = tfds.builder(name, data_dir=data_dir)
      except tfds.core.registered.DatasetNotFoundError as e:
        raise ValueError(
            f'Unknown dataset {name!r}: not a dataset of the TFDS catalog, '
            f'nor a dataset prepared in data_dir={data_dir!r} (datasets '
            'outside the catalog, e.g. a self-built imagenet21k, are read '
            'from there), nor one of the embedded datasets '
            f'{datasets.EMBEDDED_DATASETS}, nor '
            f'"{IMAGE_FOLDER_PREFIX}/path/to/folder".') from None  # not TFDS's whole catalog

      if not builder.is_prepared():
        raise FileNotFoundError(
            f'Dataset {name!r} is not prepared in data_dir='
            f'{builder.data_dir!r} (config.data_dir={data_dir!r}), and this '
            'pipeline never downloads. Prepare it on a machine with network '
            'access, e.g. `tfds build '
            f'{base_name} --data_dir=DIR` (datasets with manual downloads '
            'such as imagenet2012 also need the archives in DIR/downloads/'
            'manual), then copy DIR over and set config.data_dir=DIR.')
    self.builder = builder
    info = builder.info
    features = info.features
    self.image_key, self.label_key = 'image', 'label'
    if info.supervised_keys and len(info.supervised_keys) == 2 and (
        'image' not in features or 'label' not in features):
      self.image_key, self.label_key = info.supervised_keys
    if self.image_key not in features or self.label_key not in features:
      raise ValueError(
          f'Dataset {name!r} has no image/label features (features: '
          f'{list(features.keys())}); not an image-classification dataset.')
    label_feature = features[self.label_key]
    if not hasattr(label_feature, 'num_classes'):
      raise ValueError(f'Label feature {self.label_key!r} of {name!r} is not '
                       'a ClassLabel.')
    self.num_classes = int(label_feature.num_classes)
    names = getattr(label_feature, 'names', None)
    self.class_names = tuple(names) if names else None
    # Keep every image-like feature encoded: the pipeline decodes only the
    # one image it needs, after skipping and sharding.
    self.decoders = {
        key: tfds.decode.SkipDecoding()
        for key, feature in features.items()
        if isinstance(feature, tfds.features.Image)
    }

  def _check_split(self, split: str):
    try:
      return self.builder.info.splits[split].num_examples
    except (KeyError, ValueError, AssertionError) as e:
      raise ValueError(
          f'Bad split {split!r} for dataset {self.name!r} (splits: '
          f'{list(self.builder.info.splits.keys())}): {e}') from e

  def num_examples(self, split: str) -> int:
    return int(self._check_split(split))

  def read(self, split, process_index, process_count):
    tfds, tf = _tfds(), _tf()
    self._check_split(split)
    local_split = split
    if process_count > 1:
      local_split = tfds.even_splits(split, n=process_count)[process_index]
    count = int(self.builder.info.splits[local_split].num_examples)
    ds = self.builder.as_dataset(
        split=local_split,
        shuffle_files=False,
        decoders=self.decoders,
        read_config=tfds.ReadConfig(try_autocache=False, skip_prefetch=True),
    )
    image_key, label_key = self.image_key, self.label_key
    ds = _map(ds.enumerate(),
              lambda index, ex: {'image': ex[image_key],
                                 'label': tf.cast(ex[label_key], tf.int64), 'id': index},
              num_parallel_calls=tf.data.AUTOTUNE)
    return ds, count

  def describe(self, split, process_index, process_count, key) -> str:
    """'index 12 of split 'test' of dataset 'digits'' (absolute where it can be told)."""
    index = int(key)
    tfds = _tfds()
    try:
      ranges = [(ins.splitname, ins.from_ or 0,
                 ins.to if ins.to is not None else self.builder.info.splits[ins.splitname]
                 .num_examples)
                for ins in tfds.core.ReadInstruction.from_spec(split).to_absolute(
                    self.builder.info.splits)]
      total = sum(stop - start for _, start, stop in ranges)
      start, _ = _even_part(total, process_index, process_count)  # as tfds.even_splits
      position = start + index
      for name, begin, stop in ranges:
        if position < stop - begin:
          return f'index {begin + position} of split {name!r} of dataset {self.name!r}'
        position -= stop - begin
    except (KeyError, ValueError, AssertionError, AttributeError, TypeError):
      pass
    part = f' (part {process_index} of {process_count})' if process_count > 1 else ''
    return f'index {index} of split {split!r}{part} of dataset {self.name!r}'


class _FolderSource(_Source):
  """Images in `root/<class>/*` or `root/<split>/<class>/*`."""

  yields_paths = True

  def __init__(self, root: str):
    super().__init__()
    root = os.path.expanduser(root)
    self.name = IMAGE_FOLDER_PREFIX + root
    if not root or not _tf().io.gfile.isdir(root):
      raise FileNotFoundError(
          f'Image folder {root!r} (config.dataset={self.name!r}) does not '
          'exist or is not a directory.')
    not_files: list[str] = []
    by_split, empty = self._scan(root, not_files)
    self.not_files = tuple(not_files)
    classes = sorted({c for per_class in by_split.values() for c in per_class})
    if not any(files for per_class in by_split.values()
               for files in per_class.values()):
      raise ValueError(
          f'Image folder {root!r} holds no images: expected '
          f'{root}/<class>/<image> or {root}/<split>/<class>/<image> with '
          f'extensions {IMAGE_EXTENSIONS}.')
    # A class folder without images would be dropped, renumbering the classes
    # after it: refused. One that is empty in one split only is just reported.
    empty_classes = sorted(d for d in empty if os.path.basename(d) not in classes)
    if empty_classes:
      raise ValueError(
          f'Image folder {root!r}: class folder(s) without images ({IMAGE_EXTENSIONS}): '
          f'{", ".join(map(repr, empty_classes))}. Add images or remove the folder(s): '
          'an empty class would silently change the class ids of those after it.')
    for folder in sorted(set(empty) - set(empty_classes)):
      logging.warning('Image folder %r: %r holds no images; that class has none in this '
                      'split.', root, folder)
    self.root = root
    self.class_names = tuple(classes)
    self.num_classes = len(classes)
    class_id = {c: i for i, c in enumerate(classes)}
    self.examples = {}
    for split, per_class in by_split.items():
      paths, labels = [], []
      for c in sorted(per_class):
        for f in per_class[c]:
          paths.append(f)
          labels.append(class_id[c])
      # A fixed permutation (independent of the seed), so that slices such as
      # 'train[:90%]' and per-process parts mix all classes.
      import numpy as np  # pylint: disable=g-import-not-at-top
      order = np.random.RandomState(0).permutation(len(paths))
      self.examples[split] = ([paths[i] for i in order],
                              [labels[i] for i in order])

  # tf.io.gfile rather than os: folders may also live on GCS (gs://...).

  @staticmethod
  def _images_in(folder: str, not_files: list[str]) -> list[str]:
    """Sorted paths of the files with an image extension; other such entries go to
    `not_files` (a directory named x.jpg, a broken link: they cannot be read)."""
    files = []
    if '://' not in folder:  # Local: scandir tells files from the rest without a stat.
      with os.scandir(folder) as entries:
        for entry in entries:
          if entry.name.lower().endswith(IMAGE_EXTENSIONS):
            (files if entry.is_file() else not_files).append(os.path.join(folder, entry.name))
    else:
      for name in _tf().io.gfile.listdir(folder):
        if name.rstrip('/').lower().endswith(IMAGE_EXTENSIONS):
          path = os.path.join(folder, name.rstrip('/'))
          (not_files if name.endswith('/') else files).append(path)
    return sorted(files)

  @classmethod
  def _subdirs(cls, folder: str) -> list[str]:
    gfile = _tf().io.gfile
    return sorted(d.rstrip('/') for d in gfile.listdir(folder)
                  if gfile.isdir(os.path.join(folder, d))
                  and not d.startswith('.'))

  @classmethod
  def _scan(cls, root: str, not_files: list[str]
            ) -> tuple[dict[str, dict[str, list[str]]], list[str]]:
    """({split: {class: sorted image paths}}, class folders without images)."""
    top = cls._subdirs(root)
    flat_not_files: list[str] = []
    flat = {d: cls._images_in(os.path.join(root, d), flat_not_files) for d in top}
    if any(flat.values()):  # root/<class>/<image>: one split, 'train'.
      not_files += flat_not_files
      empty = [os.path.join(root, c) for c, files in flat.items() if not files]
      return {'train': {c: files for c, files in flat.items() if files}}, empty
    by_split, empty = {}, []
    for split in top:  # root/<split>/<class>/<image>.
      split_dir = os.path.join(root, split)
      per_class = {c: cls._images_in(os.path.join(split_dir, c), not_files)
                   for c in cls._subdirs(split_dir)}
      empty += [os.path.join(split_dir, c) for c, files in per_class.items() if not files]
      per_class = {c: files for c, files in per_class.items() if files}
      if per_class:
        by_split[split] = per_class
    return by_split, empty

  def _indices(self, split: str) -> list[tuple[str, int, int]]:
    """The split string as absolute (split name, start, stop) ranges."""
    tfds = _tfds()
    infos = {
        name: tfds.core.SplitInfo(
            name=name, shard_lengths=[len(paths)], num_bytes=0)
        for name, (paths, _) in self.examples.items()
    }
    try:
      instructions = tfds.core.ReadInstruction.from_spec(split).to_absolute(
          infos)
    except (KeyError, ValueError, AssertionError) as e:
      raise ValueError(
          f'Bad split {split!r} for image folder {self.root!r} (splits: '
          f'{sorted(self.examples)}): {e}') from e
    out = []
    for ins in instructions:
      n = len(self.examples[ins.splitname][0])
      start = 0 if ins.from_ is None else ins.from_
      stop = n if ins.to is None else ins.to
      out.append((ins.splitname, start, stop))
    return out

  def _records(self, split: str) -> tuple[list[str], list[int]]:
    paths, labels = [], []
    for name, start, stop in self._indices(split):
      p, l = self.examples[name]
      paths += p[start:stop]
      labels += l[start:stop]
    return paths, labels

  def num_examples(self, split: str) -> int:
    return len(self._records(split)[0])

  def read(self, split, process_index, process_count):
    tf = _tf()
    paths, labels = self._records(split)
    start, stop = _even_part(len(paths), process_index, process_count)
    paths, labels = paths[start:stop], labels[start:stop]
    ds = tf.data.Dataset.from_tensor_slices({
        'image': tf.constant(paths, tf.string),
        'label': tf.constant(labels, tf.int64),
        'id': tf.constant(paths, tf.string),
    })
    return ds, len(paths)

  def describe(self, split, process_index, process_count, key) -> str:
    return key.decode() if isinstance(key, bytes) else str(key)  # the path


# The sources opened in this process, by (dataset, data_dir), for `bad_images`.
_OPENED: dict[tuple[str, str | None], _Source] = {}


@functools.lru_cache(maxsize=16)
def _cached_source(dataset: str, data_dir: str | None) -> _Source:
  if dataset.startswith(IMAGE_FOLDER_PREFIX):
    source: _Source = _FolderSource(dataset[len(IMAGE_FOLDER_PREFIX):])
  else:
    source = _TfdsSource(dataset, data_dir)
  _OPENED[(dataset, data_dir)] = source
  return source


def _bad_image_policy(config) -> str:
  policy = config.bad_images
  if policy not in BAD_IMAGE_POLICIES:
    raise ValueError(f'Unknown config.bad_images={policy!r}; expected one of '
                     f'{BAD_IMAGE_POLICIES}.')
  return policy


def _get_source(config) -> _Source:
  dataset = config.dataset
  if not dataset or not isinstance(dataset, str):
    raise ValueError(f'config.dataset must be a non-empty string, got '
                     f'{dataset!r}.')
  policy = _bad_image_policy(config)
  data_dir = config.data_dir
  # Cached: a folder is listed once per process, so that the counts of
  # get_dataset_info and the datasets agree.
  source = _cached_source(dataset, None if data_dir is None else str(data_dir))
  if source.not_files:
    if policy == 'raise':
      raise BadImageError(
          f'Image folder {source.name!r}: not a file, cannot be read as an image: '
          f'{", ".join(map(repr, source.not_files[:5]))}'
          f'{f" and {len(source.not_files) - 5} more" if len(source.not_files) > 5 else ""}. '
          f'Remove or rename it, or set config.bad_images=\'skip\' to leave such entries out.')
    with source.bad_lock:
      new = [p for p in source.not_files if p not in source.bad_images]
      for path in new:
        source.bad_images[path] = 'not a file'
    if new:
      logging.warning('Image folder %r: leaving out %d entries that are not files '
                      '(config.bad_images=\'skip\'): %s', source.name, len(new),
                      ', '.join(map(repr, new[:5])))
  return source


def bad_images(config) -> dict[str, str]:
  """The unreadable images this process met in config's dataset: {where: why}.

  Filled while the pipelines run with `config.bad_images='skip'`; empty for a
  dataset not opened in this process (and without importing TensorFlow).
  """
  config = schema.resolve(config)
  data_dir = None if config.data_dir is None else str(config.data_dir)
  source = _OPENED.get((config.dataset, data_dir))
  if source is None:
    return {}
  with source.bad_lock:
    return dict(source.bad_images)


def write_bad_images(config, workdir: str, process_index: int | None = None) -> int:
  """Writes `bad_images(config)` to `workdir/bad_images.txt`; returns their count.

  One JSON object per line (`{"image": ..., "reason": ...}`). Nothing is written
  when there are none. Process i > 0 writes `bad_images.<i>.txt` (each process
  reads its own part of the data).
  """
  found = bad_images(config)
  if not found:
    return 0
  if process_index is None:
    process_index, _ = _process(None, None)
  name = BAD_IMAGES_FILE if process_index == 0 else BAD_IMAGES_FILE.replace(
      '.txt', f'.{process_index}.txt')
  path = os.path.join(workdir, name)
  with open(path + '.tmp', 'w') as f:
    for where, why in found.items():
      f.write(json.dumps({'image': where, 'reason': why}) + '\n')
  os.replace(path + '.tmp', path)
  logging.warning('%d unreadable image(s) were left out; listed in %s.', len(found), path)
  return len(found)


def get_dataset_info(config) -> DatasetInfo:
  """Number of classes and examples of config's dataset and splits."""
  config = schema.resolve(config)
  source = _get_source(config)
  height, width = image_hw(config.image_size)
  return DatasetInfo(
      num_classes=source.num_classes,
      num_train_examples=source.num_examples(config.train_split),
      num_eval_examples=source.num_examples(config.eval_split),
      image_shape=(height, width, 3),
      class_names=source.class_names,
  )


# ----------------------------------------------------------------------------
# Preprocessing.
# ----------------------------------------------------------------------------


def _resize_pad(image_size: tuple[int, int], crop_pad) -> tuple[int, int]:
  """(height, width) to resize to before cropping `image_size` out of it."""
  if crop_pad is None:  # 224 -> 256 -> 224, as ImageNet evaluation usually does
    return tuple(int(round(s / 0.875)) for s in image_size)
  return tuple(s + int(crop_pad) for s in image_size)


def _header_size(data):
  """(height, width) int64 that an encoded image's header declares, read without decoding.

  JPEG, PNG, GIF and BMP headers are read (JPEG tested first: photos); other
  formats (and headers too short to hold a size) give (0, 0), left to the decoder.
  """
  tf = _tf()

  def number(start, n, little=False, signed=False):
    def read(head):
      weights = [256 ** k for k in range(n)]
      value = tf.reduce_sum(head[start:start + n] * (weights if little else weights[::-1]))
      return tf.abs(tf.where(value >= 2 ** 31, value - 2 ** 32, value)) if signed else value
    return read

  def from_header(height, width):
    def parse():
      head = tf.io.decode_raw(tf.strings.substr(data, 0, 32), tf.uint8)
      head = tf.cast(tf.pad(head, [[0, 32 - tf.shape(head)[0]]]), tf.int64)
      return tf.stack([height(head), width(head)])
    return parse

  def other():
    magic = tf.strings.substr(data, 0, 8)
    png = from_header(number(20, 4), number(16, 4))
    gif = from_header(number(8, 2, little=True), number(6, 2, little=True))
    bmp = from_header(number(22, 4, little=True, signed=True),
                      number(18, 4, little=True, signed=True))
    unknown = lambda: tf.zeros([2], tf.int64)
    return tf.cond(
        tf.equal(magic, b'\x89PNG\r\n\x1a\n'), png, lambda: tf.cond(
            tf.equal(tf.strings.substr(magic, 0, 3), b'GIF'), gif, lambda: tf.cond(
                tf.equal(tf.strings.substr(magic, 0, 2), b'BM'), bmp, unknown)))

  return tf.cond(tf.io.is_jpeg(data),
                 lambda: tf.cast(tf.io.extract_jpeg_shape(data)[:2], tf.int64), other)


def _within_pixel_limit(data):
  """`data`, once its header is checked against `images.MAX_PIXELS` (before any decoding)."""
  tf = _tf()
  size = _header_size(data)
  check = tf.debugging.assert_less_equal(
      size[0] * size[1], tf.constant(images_lib.MAX_PIXELS, tf.int64),
      message='image larger than vit_jax.images.MAX_PIXELS')
  with tf.control_dependencies([check]):
    return tf.identity(data)


def _decode(data):
  """Encoded image (any format TF decodes) -> uint8 [h, w, 3]."""
  tf = _tf()
  data = _within_pixel_limit(data)
  image = tf.io.decode_image(data, channels=3, expand_animations=False)

  image.set_shape([None, None, 3])
  return image


def _decode_random_crop(data, seed, min_area, max_area):
  """Inception crop: random area / aspect ratio crop of the decoded image."""
  tf = _tf()
  data = _within_pixel_limit(data)


  def crop_window(shape):
    begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
        shape,
        bounding_boxes=tf.zeros([0, 0, 4], tf.float32),
        seed=seed,
        area_range=(min_area, max_area),
        aspect_ratio_range=(3 / 4, 4 / 3),
        min_object_covered=0.0,  # Any crop within the area range.
        max_attempts=100,  # tf.image.sample_distorted_bounding_box's default
        use_image_if_no_bounding_boxes=True)
    return begin, size

  def jpeg():  # Decodes only the crop window.
    begin, size = crop_window(tf.io.extract_jpeg_shape(data))
    window = tf.stack([begin[0], begin[1], size[0], size[1]])
    return tf.image.decode_and_crop_jpeg(data, window, channels=3)

  def other():
    image = _decode(data)
    begin, size = crop_window(tf.shape(image))
    return tf.slice(image, begin, size)

  image = tf.cond(tf.io.is_jpeg(data), jpeg, other)
  image.set_shape([None, None, 3])
  return image


def _to_float(image):
  """[0, 255] -> float32 [-1, 1]."""
  tf = _tf()
  image = tf.cast(image, tf.float32) / 127.5 - 1.0
  return tf.clip_by_value(image, -1.0, 1.0)


def _train_preprocess(data, seed, pp, image_size):
  """Encoded image + [2] seed -> float32 [H, W, 3] in [-1, 1]."""
  tf = _tf()
  seed_crop, seed_flip = tf.unstack(
      tf.random.experimental.stateless_split(seed, num=2))
  method = pp['resize_method']
  if pp['train'] == 'inception_crop':
    image = _decode_random_crop(data, seed_crop, pp['min_area'],
                                pp['max_area'])
    image = tf.image.resize(image, image_size, method=method)
  elif pp['train'] == 'resize_crop':
    size = _resize_pad(image_size, pp['crop_pad'])
    image = tf.image.resize(_decode(data), size, method=method)
    image = tf.image.stateless_random_crop(
        image, [*image_size, 3], seed=seed_crop)
  else:  # 'plain'
    image = tf.image.resize(_decode(data), image_size, method=method)
  if pp['flip'] and pp['train'] != 'plain':
    image = tf.image.stateless_random_flip_left_right(image, seed=seed_flip)
  if pp['randaug']:  # on uint8, as AugReg
    layers, magnitude, ops = pp['randaug']
    image = tf.cast(tf.clip_by_value(tf.round(image), 0.0, 255.0), tf.uint8)
    image.set_shape([*image_size, 3])
    image = randaugment_lib.randaugment(
        image, layers, magnitude,
        tf.random.experimental.stateless_fold_in(seed, _RANDAUG_TAG), ops)
  return _to_float(image)


def _eval_preprocess(data, pp, image_size):
  tf = _tf()
  method = pp['resize_method']
  image = _decode(data)
  if pp['eval'] == 'resize_crop':
    size = _resize_pad(image_size, pp['crop_pad'])
    image = tf.image.resize(image, size, method=method)
    top, left = (size[0] - image_size[0]) // 2, (size[1] - image_size[1]) // 2
    image = image[top:top + image_size[0], left:left + image_size[1]]
  else:  # 'resize': the reference's evaluation
    image = tf.image.resize(image, image_size, method=method)
  image.set_shape([*image_size, 3])
  return _to_float(image)


def _mixup(batch, seed, alpha: float, form: str = 'reverse'):
  """One weight lam ~ Beta(alpha, alpha) per batch. 'reverse': example i mixed with
  example B-1-i; 'augreg' (big_vision): lam = max(lam, 1 - lam), example i mixed with
  example i-1 (the batch rolled by one)."""
  tf = _tf()
  s1, s2 = tf.unstack(tf.random.experimental.stateless_split(seed, num=2))
  g1 = tf.random.stateless_gamma([], seed=s1, alpha=alpha)
  g2 = tf.random.stateless_gamma([], seed=s2, alpha=alpha)
  total = g1 + g2
  lam = tf.where(total > 0, g1 / tf.maximum(total, 1e-30), 1.0)
  if form == 'augreg':
    lam = tf.maximum(lam, 1.0 - lam)

  def mix(x):
    other = tf.roll(x, 1, axis=0) if form == 'augreg' else tf.reverse(x, axis=[0])
    return lam * x + (1.0 - lam) * other

  return {'image': mix(batch['image']), 'label': mix(batch['label'])}


def _base_key(seed: int, process_index: int, tag: int):
  """Stateless [2] seed for one random stream of one process."""
  tf = _tf()
  key = tf.constant([int(seed), int(process_index)], tf.int64)
  return tf.random.experimental.stateless_fold_in(key, tag)


def _options(ds):
  tf = _tf()
  options = tf.data.Options()
  options.deterministic = True
  options.experimental_optimization.map_parallelization = True
  # No autotuning model. Its optimisation thread sleeps for a period that doubles up
  # to a minute, and destroying an iterator could wait out that sleep (0 to 32 s
  # measured at the end of a run, CPU idle). Without it, AUTOTUNE map parallelism
  # is the size of tf.data's thread pool (the cores) and AUTOTUNE prefetch buffers
  # grow whenever the consumer waits: the same input speed here
  # (benchmarks/input_pipeline_benchmark.py, docs/input_pipeline.md).
  options.autotune.enabled = False
  return ds.with_options(options)


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


def get_train_dataset(config,
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
  config = schema.resolve(config)
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


def num_eval_batches(config, *, process_count: int | None = None) -> int:
  """Number of batches every process's eval dataset has."""
  config = schema.resolve(config)
  if process_count is None:
    _, process_count = _process(None, None)
  pc = int(process_count)
  batch = _local_batch(config, 'eval_batch_size', pc)
  total = _get_source(config).num_examples(config.eval_split)
  return max(1, math.ceil(math.ceil(total / pc) / batch))


def get_eval_dataset(config,
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
  config = schema.resolve(config)
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
