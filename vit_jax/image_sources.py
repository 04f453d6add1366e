"""Where a split's (encoded image, label) records come from: TFDS datasets and image folders.

Each process reads its own disjoint, contiguous part of a split (TFDS
`even_splits` semantics). Nothing is downloaded: a TFDS dataset that is not
prepared is an error saying how to prepare it; image folders are listed and
checked once (`root/<class>/<image>` or `root/<split>/<class>/<image>`, class ids
in sorted folder order). `bad_images` / `write_bad_images` list the images a
'skip' policy left out; `get_dataset_info` is what the trainer needs to know.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import threading

from absl import logging

from vit_jax.configs import schema
from vit_jax.configs.image_size import image_hw
from vit_jax.bad_image_guard import BadImageError
from vit_jax.tf_imports import _map, _tf, _tfds


IMAGE_FOLDER_PREFIX = 'image_folder:'
IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.gif')

BAD_IMAGE_POLICIES = ('raise', 'skip')
BAD_IMAGES_FILE = 'bad_images.txt'


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  """What the trainer needs to know about a dataset."""
  num_classes: int
  num_train_examples: int  # Global count of config.train_split.
  num_eval_examples: int  # Global count of config.eval_split.
  image_shape: tuple[int, int, int]  # (height, width, 3) of config.image_size.
  class_names: tuple[str, ...] | None = None


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


def _bad_image_policy(config: schema.Config) -> str:
  policy = config.bad_images
  if policy not in BAD_IMAGE_POLICIES:
    raise ValueError(f'Unknown config.bad_images={policy!r}; expected one of '
                     f'{BAD_IMAGE_POLICIES}.')
  return policy


def _get_source(config: schema.Config) -> _Source:
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


def bad_images(config: schema.Config) -> dict[str, str]:
  """The unreadable images this process met in config's dataset: {where: why}.

  Filled while the pipelines run with `config.bad_images='skip'`; empty for a
  dataset not opened in this process (and without importing TensorFlow).
  """
  data_dir = None if config.data_dir is None else str(config.data_dir)
  source = _OPENED.get((config.dataset, data_dir))
  if source is None:
    return {}
  with source.bad_lock:
    return dict(source.bad_images)


def write_bad_images(config: schema.Config, workdir: str, process_index: int | None = None) -> int:
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
  from vit_jax import storage  # pylint: disable=g-import-not-at-top
  path = storage.join(workdir, name)
  storage.write_text(path, ''.join(json.dumps({'image': where, 'reason': why}) + '\n'
                                   for where, why in found.items()))
  logging.warning('%d unreadable image(s) were left out; listed in %s.', len(found), path)
  return len(found)


def get_dataset_info(config: schema.Config) -> DatasetInfo:
  """Number of classes and examples of config's dataset and splits."""
  source = _get_source(config)
  height, width = image_hw(config.image_size)
  return DatasetInfo(
      num_classes=source.num_classes,
      num_train_examples=source.num_examples(config.train_split),
      num_eval_examples=source.num_examples(config.eval_split),
      image_shape=(height, width, 3),
      class_names=source.class_names,
  )
