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

TensorFlow is imported lazily, so importing this module (e.g. for
:class:`DatasetInfo`) does not need TensorFlow.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from typing import Any, Iterator

from vit_jax.configs import schema
from vit_jax.configs.image_size import image_hw

IMAGE_FOLDER_PREFIX = 'image_folder:'
IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.gif')
TRAIN_PP = ('inception_crop', 'resize_crop', 'plain')
EVAL_PP = ('resize', 'resize_crop')

# Tags separating the random streams derived from (seed, process).
_SHUFFLE_TAG, _AUGMENT_TAG, _MIXUP_TAG = 1, 2, 3


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
  return pp


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
  """Reads the records of a split: {'image': bytes or path, 'label': int64}."""

  name: str
  num_classes: int
  class_names: tuple[str, ...] | None
  # True when 'image' holds file paths that still have to be read.
  yields_paths: bool = False

  def num_examples(self, split: str) -> int:
    raise NotImplementedError

  def read(self, split: str, process_index: int, process_count: int):
    """(local tf.data.Dataset of records in a fixed order, local count)."""
    raise NotImplementedError


class _TfdsSource(_Source):
  """A prepared TFDS dataset (or the embedded digits, prepared on demand)."""

  def __init__(self, name: str, data_dir: str | None):
    tfds = _tfds()
    from vit_jax import datasets  # pylint: disable=g-import-not-at-top
    self.name = name
    base_name = name.split(':')[0].split('/')[0]
    if data_dir is not None:
      data_dir = os.path.expanduser(str(data_dir))
    if name in datasets.EMBEDDED_DATASETS:
      # With a version ('digits:1.0.0'), the generic path below reads an
      # already prepared copy instead.
      builder = datasets.get_builder(base_name, data_dir=data_dir)
      if not builder.is_prepared():
        builder.download_and_prepare()  # Local: reads scikit-learn's files.
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
            f'"{IMAGE_FOLDER_PREFIX}/path/to/folder".') from e
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
    ds = ds.map(
        lambda ex: {'image': ex[image_key],
                    'label': tf.cast(ex[label_key], tf.int64)},
        num_parallel_calls=tf.data.AUTOTUNE)
    return ds, count


class _FolderSource(_Source):
  """Images in `root/<class>/*` or `root/<split>/<class>/*`."""

  yields_paths = True

  def __init__(self, root: str):
    root = os.path.expanduser(root)
    self.name = IMAGE_FOLDER_PREFIX + root
    if not root or not _tf().io.gfile.isdir(root):
      raise FileNotFoundError(
          f'Image folder {root!r} (config.dataset={self.name!r}) does not '
          'exist or is not a directory.')
    by_split = self._scan(root)
    classes = sorted({c for per_class in by_split.values() for c in per_class})
    if not any(files for per_class in by_split.values()
               for files in per_class.values()):
      raise ValueError(
          f'Image folder {root!r} holds no images: expected '
          f'{root}/<class>/<image> or {root}/<split>/<class>/<image> with '
          f'extensions {IMAGE_EXTENSIONS}.')
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
  def _images_in(folder: str) -> list[str]:
    gfile = _tf().io.gfile
    return sorted(os.path.join(folder, f) for f in gfile.listdir(folder)
                  if f.lower().endswith(IMAGE_EXTENSIONS))

  @classmethod
  def _subdirs(cls, folder: str) -> list[str]:
    gfile = _tf().io.gfile
    return sorted(d.rstrip('/') for d in gfile.listdir(folder)
                  if gfile.isdir(os.path.join(folder, d))
                  and not d.startswith('.'))

  @classmethod
  def _scan(cls, root: str) -> dict[str, dict[str, list[str]]]:
    """{split: {class: sorted image paths}}."""
    top = cls._subdirs(root)
    flat = {d: cls._images_in(os.path.join(root, d)) for d in top}
    if any(flat.values()):  # root/<class>/<image>: one split, 'train'.
      return {'train': {c: files for c, files in flat.items() if files}}
    by_split = {}
    for split in top:  # root/<split>/<class>/<image>.
      split_dir = os.path.join(root, split)
      per_class = {c: cls._images_in(os.path.join(split_dir, c))
                   for c in cls._subdirs(split_dir)}
      per_class = {c: files for c, files in per_class.items() if files}
      if per_class:
        by_split[split] = per_class
    return by_split

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
    })
    return ds, len(paths)


@functools.lru_cache(maxsize=16)
def _cached_source(dataset: str, data_dir: str | None) -> _Source:
  if dataset.startswith(IMAGE_FOLDER_PREFIX):
    return _FolderSource(dataset[len(IMAGE_FOLDER_PREFIX):])
  return _TfdsSource(dataset, data_dir)


def _get_source(config) -> _Source:
  dataset = config.dataset
  if not dataset or not isinstance(dataset, str):
    raise ValueError(f'config.dataset must be a non-empty string, got '
                     f'{dataset!r}.')
  data_dir = config.data_dir
  # Cached: a folder is listed once per process, so that the counts of
  # get_dataset_info and the datasets agree.
  return _cached_source(dataset, None if data_dir is None else str(data_dir))


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


def _decode(data):
  """Encoded image (any format TF decodes) -> uint8 [h, w, 3]."""
  tf = _tf()
  image = tf.io.decode_image(data, channels=3, expand_animations=False)
  image.set_shape([None, None, 3])
  return image


def _decode_random_crop(data, seed, min_area, max_area):
  """Inception crop: random area / aspect ratio crop of the decoded image."""
  tf = _tf()

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


def _mixup(batch, seed, alpha: float):
  """Mixes each example with the batch reversed, weight lam ~ Beta(a, a)."""
  tf = _tf()
  s1, s2 = tf.unstack(tf.random.experimental.stateless_split(seed, num=2))
  g1 = tf.random.stateless_gamma([], seed=s1, alpha=alpha)
  g2 = tf.random.stateless_gamma([], seed=s2, alpha=alpha)
  total = g1 + g2
  lam = tf.where(total > 0, g1 / tf.maximum(total, 1e-30), 1.0)

  def mix(x):
    return lam * x + (1.0 - lam) * tf.reverse(x, axis=[0])

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
  return ds.with_options(options)


# ----------------------------------------------------------------------------
# Public pipelines.
# ----------------------------------------------------------------------------


def _maybe_cache(records, source: _Source, cache: bool):
  """(records, whether 'image' still holds paths to read): cached in memory if asked."""
  tf = _tf()
  if not cache:
    return records, source.yields_paths
  if source.yields_paths:  # Cache file contents, not their paths.
    records = records.map(
        lambda r: {'image': tf.io.read_file(r['image']), 'label': r['label']},
        num_parallel_calls=tf.data.AUTOTUNE)
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
  alpha = float(config.mixup_alpha)
  if not alpha >= 0:
    raise ValueError(f'config.mixup_alpha must be >= 0, got {alpha}.')
  buffer = int(config.shuffle_buffer)
  if buffer < 1:
    raise ValueError(f'config.shuffle_buffer must be >= 1, got {buffer}.')
  source = _get_source(config)
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
  ds = tf.data.Dataset.counter(start=first_epoch).flat_map(one_epoch)
  # Index of each element in this process's stream, for its random seed.
  ds = ds.enumerate(start=first_epoch * count)
  ds = ds.skip(skip)  # Before decoding: skipped elements cost only a read.

  def preprocess(index, record):
    data = record['image']
    if needs_read:
      data = tf.io.read_file(data)
    key = tf.random.experimental.stateless_fold_in(augment_key, index)
    return {
        'image': _train_preprocess(data, key, pp, image_size),
        'label': tf.one_hot(record['label'], source.num_classes,
                            dtype=tf.float32),
    }

  ds = ds.map(preprocess, num_parallel_calls=tf.data.AUTOTUNE)
  ds = ds.batch(batch, drop_remainder=True)
  if alpha > 0:
    ds = ds.enumerate(start=int(start_step)).map(
        lambda step, b: _mixup(
            b, tf.random.experimental.stateless_fold_in(mixup_key, step),
            alpha),
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
        'mask': tf.constant(1.0, tf.float32),
    }

  ds = records.map(preprocess, num_parallel_calls=tf.data.AUTOTUNE)
  padding = tf.data.Dataset.from_tensors({
      'image': tf.zeros([*image_size, 3], tf.float32),
      'label': tf.zeros([num_classes], tf.float32),
      'mask': tf.constant(0.0, tf.float32),
  }).repeat(num_batches * batch - count)
  ds = ds.concatenate(padding).batch(batch, drop_remainder=True)
  ds = ds.prefetch(tf.data.AUTOTUNE)
  return _options(ds)


def iterate_numpy(ds) -> Iterator[dict[str, Any]]:
  """Iterates a tf.data.Dataset as (nested) numpy arrays."""
  return iter(_tfds().as_numpy(ds))
