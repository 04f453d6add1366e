"""Tests of vit_jax.input_pipeline and the embedded digits dataset.

Everything runs offline on a temporary data_dir: the digits dataset is
prepared there once per module, image folders are written as PNG/JPEG files.
"""

import os

import ml_collections
import numpy as np
import pytest
from PIL import Image

from vit_jax import input_pipeline as ip
from vit_jax.configs import schema

NUM_DIGITS = 1797


def make_config(**overrides) -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict(dict(
      dataset='digits',
      data_dir=None,
      train_split='train',
      eval_split='test',
      image_size=32,
      pp=ml_collections.ConfigDict(
          dict(train='plain', eval='resize', crop_pad=None)),
      mixup_alpha=0.0,
      shuffle_buffer=10_000,
      cache=True,
      batch_size=128,
      eval_batch_size=256,
      seed=0,
  ))
  pp = overrides.pop('pp', None)
  config.update(overrides)
  if pp:
    config.pp.update(pp)
  return schema.resolve(config)


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  path = str(tmp_path_factory.mktemp('tfds'))
  ip.get_dataset_info(make_config(data_dir=path))  # Prepares digits once.
  return path


@pytest.fixture(scope='module')
def digits_arrays():
  from vit_jax.datasets import digits  # pylint: disable=g-import-not-at-top
  return {split: digits.load_arrays(split) for split in ('train', 'test')}


def batches(ds, n=None):
  out = []
  for i, b in enumerate(ip.iterate_numpy(ds)):
    if n is not None and i >= n:
      break
    out.append(b)
  return out


def rows(images, labels):
  """Sorted byte strings of (image, label) pairs: a multiset to compare."""
  images = np.round(np.asarray(images, np.float32), 4)
  labels = np.asarray(labels)
  return sorted(im.tobytes() + np.int64(l).tobytes()
                for im, l in zip(images, labels))


def expected_rows(arrays):
  images, labels = arrays
  return rows(images.astype(np.float32) / 127.5 - 1.0, labels)


def masked_rows(eval_batches):
  images, labels = [], []
  for b in eval_batches:
    keep = b['mask'] > 0
    images.append(b['image'][keep])
    labels.append(b['label'][keep].argmax(-1))
  return rows(np.concatenate(images), np.concatenate(labels))


# ---------------------------------------------------------------- digits ----


def test_digits_dataset(data_dir, digits_arrays):
  info = ip.get_dataset_info(make_config(data_dir=data_dir))
  assert info.num_classes == 10
  assert info.image_shape == (32, 32, 3)
  assert info.num_train_examples + info.num_eval_examples == NUM_DIGITS
  assert info.num_train_examples == len(digits_arrays['train'][1])
  # Stratified: every class is in both splits, about 80/20.
  for split in ('train', 'test'):
    images, labels = digits_arrays[split]
    assert images.shape[1:] == (32, 32, 3) and images.dtype == np.uint8
    assert sorted(set(labels.tolist())) == list(range(10))
  assert 0.75 < info.num_train_examples / NUM_DIGITS < 0.85
  # A second builder finds the prepared data.
  from vit_jax.datasets import digits  # pylint: disable=g-import-not-at-top
  builder = digits.Digits(data_dir=data_dir)
  assert builder.is_prepared()
  assert builder.info.features['image'].shape == (32, 32, 3)


def test_prepared_tfds_dataset_by_name(data_dir, digits_arrays):
  # With a version, 'digits' goes through the path of any other prepared TFDS
  # dataset (tfds.builder on data_dir, two processes via even_splits).
  config = make_config(dataset='digits:1.0.0', data_dir=data_dir,
                       eval_batch_size=200)
  info = ip.get_dataset_info(config)
  assert (info.num_classes, info.num_eval_examples) == (10, 355)
  got = [batches(ip.get_eval_dataset(config, process_index=pi,
                                     process_count=2)) for pi in range(2)]
  assert masked_rows(got[0] + got[1]) == expected_rows(digits_arrays['test'])


# ----------------------------------------------------------------- train ----


@pytest.mark.parametrize('pp,size', [('plain', 32), ('resize_crop', 32),
                                     ('inception_crop', 24)])
def test_train_batches(data_dir, pp, size):
  config = make_config(data_dir=data_dir, pp=dict(train=pp), image_size=size,
                       batch_size=64)
  (b,) = batches(ip.get_train_dataset(config, process_index=0,
                                      process_count=1), 1)
  assert set(b) == {'image', 'label'}
  assert b['image'].shape == (64, size, size, 3)
  assert b['image'].dtype == np.float32
  assert b['image'].min() >= -1.0 and b['image'].max() <= 1.0
  assert b['image'].min() < -0.9 and b['image'].max() > 0.9
  assert b['label'].shape == (64, 10) and b['label'].dtype == np.float32
  np.testing.assert_array_equal(b['label'].sum(-1), 1.0)
  assert set(np.unique(b['label'])) == {0.0, 1.0}


def test_plain_train_images_are_the_split(data_dir, digits_arrays):
  # Plain at the native size changes no pixel: one epoch of batches is a
  # permutation of the train split. 1442 = 7 * 206.
  # The second epoch too, in another order.
  config = make_config(data_dir=data_dir, batch_size=206)
  got = batches(ip.get_train_dataset(config, process_index=0,
                                     process_count=1), 14)
  images = np.concatenate([b['image'] for b in got])
  labels = np.concatenate([b['label'].argmax(-1) for b in got])
  n = len(labels) // 2
  assert rows(images[:n], labels[:n]) == expected_rows(digits_arrays['train'])
  assert rows(images[n:], labels[n:]) == expected_rows(digits_arrays['train'])
  assert not np.array_equal(labels[:n], labels[n:])


def test_train_deterministic_given_seed(data_dir):
  config = make_config(data_dir=data_dir, pp=dict(train='resize_crop'),
                       batch_size=32, mixup_alpha=0.5)
  a = batches(ip.get_train_dataset(config, process_index=0,
                                   process_count=1), 3)
  b = batches(ip.get_train_dataset(config, process_index=0,
                                   process_count=1), 3)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x['image'], y['image'])
    np.testing.assert_array_equal(x['label'], y['label'])
  config.seed = 1
  c = batches(ip.get_train_dataset(config, process_index=0,
                                   process_count=1), 1)
  assert not np.array_equal(a[0]['image'], c[0]['image'])
  # Without explicit process arguments, JAX's process index/count are used.
  (d,) = batches(ip.get_train_dataset(schema.replace(config, seed=0)), 1)
  np.testing.assert_array_equal(d['image'], a[0]['image'])


@pytest.mark.parametrize('pp,alpha,randaug', [
    ('resize_crop', 0.0, None), ('inception_crop', 0.2, None),
    ('inception_crop', 0.5, (2, 15)),  # + AugReg's mixup
])
def test_train_resume(data_dir, pp, alpha, randaug):
  # 300 images / 64 = 4.7 batches per epoch: resuming at 4 and 5 covers a
  # batch spanning two epochs and a start inside the second epoch.
  config = make_config(data_dir=data_dir, pp=dict(train=pp, randaug=randaug), batch_size=64,
                       mixup_alpha=alpha, shuffle_buffer=100,
                       train_split='train[:300]',
                       mixup_form='augreg' if randaug else 'reverse')
  full = batches(ip.get_train_dataset(config, process_index=0,
                                      process_count=1), 8)
  # With RandAugment one start (inside the second epoch): each pipeline traces its ops.
  for start in (5,) if randaug else (4, 5):
    resumed = batches(ip.get_train_dataset(config, start_step=start,
                                           process_index=0, process_count=1),
                      8 - start)
    for k, b in enumerate(resumed):
      np.testing.assert_array_equal(b['image'], full[start + k]['image'])
      np.testing.assert_array_equal(b['label'], full[start + k]['label'])
  # Resuming did not just replay the first batches.
  assert not np.array_equal(full[0]['label'], full[5]['label'])


def test_randaug_on_uint8_after_the_crop_per_example(data_dir):
  config = make_config(data_dir=data_dir, batch_size=64, shuffle_buffer=100,
                       train_split='train[:300]')
  (plain,) = batches(ip.get_train_dataset(config, process_index=0, process_count=1), 1)
  config.pp.randaug, config.pp.randaug_ops = (1, 10), ('Invert',)
  (inverted,) = batches(ip.get_train_dataset(config, process_index=0, process_count=1), 1)
  # 255 - x on the uint8 pixels is -x in [-1, 1]; labels and order untouched.
  np.testing.assert_allclose(inverted['image'], -plain['image'], atol=1e-6)
  np.testing.assert_array_equal(inverted['label'], plain['label'])
  config.pp.randaug, config.pp.randaug_ops = (1, 2), ('Cutout',)  # 16x16 squares
  (cut,) = batches(ip.get_train_dataset(config, process_index=0, process_count=1), 1)
  grey = lambda x: np.isclose(x, 128 / 127.5 - 1, atol=1e-6).all(-1)
  painted = grey(cut['image']) & ~grey(plain['image'])
  # Each example its own square: 64 examples, (almost) as many positions.
  assert len({np.argwhere(p)[0].tobytes() for p in painted if p.any()}) > 40


def test_augreg_mixup_is_big_visions(data_dir):
  config = make_config(data_dir=data_dir, batch_size=16, shuffle_buffer=100,
                       train_split='train[:300]')
  clean = batches(ip.get_train_dataset(config, process_index=0, process_count=1), 30)
  config.update(mixup_alpha=0.5, mixup_form='augreg')
  mixed = batches(ip.get_train_dataset(config, process_index=0, process_count=1), 30)
  weights = []
  for c, m in zip(clean, mixed):
    # One a per batch, a >= 1/2 on the example itself, 1 - a on its neighbour (rolled by 1).
    a = m['label'][np.arange(16), c['label'].argmax(-1)].min()  # 1 if all one class
    roll = lambda x: np.roll(x, 1, axis=0)
    for key in ('image', 'label'):
      np.testing.assert_allclose(m[key], a * c[key] + (1 - a) * roll(c[key]), atol=1e-5)
    weights.append(a)
  assert min(weights) >= 0.5 and max(weights) < 1
  # E[max(a, 1 - a)] for a ~ Beta(.5, .5) is 1/2 + 1/pi; sd of max(a, 1-a) ~ 0.16.
  assert abs(np.mean(weights) - (0.5 + 1 / np.pi)) < 3 * 0.16 / np.sqrt(30)


def test_mixup_soft_labels(data_dir):
  config = make_config(data_dir=data_dir, mixup_alpha=1.0, batch_size=64)
  (b,) = batches(ip.get_train_dataset(config, process_index=0,
                                      process_count=1), 1)
  np.testing.assert_allclose(b['label'].sum(-1), 1.0, rtol=1e-5)
  # Each label mixes at most two classes; pairs of different classes give
  # soft labels (lam is in (0, 1) almost surely).
  assert ((b['label'] > 0).sum(-1) <= 2).all()
  assert (b['label'].max(-1) < 1.0).sum() > 32
  assert b['image'].min() >= -1.0 and b['image'].max() <= 1.0


def test_two_processes_train_disjoint_and_complete(data_dir, digits_arrays):
  # 1442 / 2 processes = 721 = 7 * 103 examples each: 7 batches of 103 are
  # exactly one epoch of a process's part.
  config = make_config(data_dir=data_dir, batch_size=206)
  parts = []
  for pi in range(2):
    got = batches(ip.get_train_dataset(config, process_index=pi,
                                       process_count=2), 7)
    assert got[0]['image'].shape == (103, 32, 32, 3)
    parts.append(rows(np.concatenate([b['image'] for b in got]),
                      np.concatenate([b['label'].argmax(-1) for b in got])))
  assert len(parts[0]) == len(parts[1]) == 721
  assert sorted(parts[0] + parts[1]) == expected_rows(digits_arrays['train'])


# ------------------------------------------------------------------ eval ----


def test_eval_counts_every_example_once(data_dir, digits_arrays):
  config = make_config(data_dir=data_dir, eval_batch_size=100)
  got = batches(ip.get_eval_dataset(config, process_index=0, process_count=1))
  n = len(digits_arrays['test'][1])  # 355: not a multiple of 100.
  assert len(got) == ip.num_eval_batches(config, process_count=1) == 4
  for b in got:
    assert b['image'].shape == (100, 32, 32, 3)
    assert b['label'].shape == (100, 10) and b['mask'].shape == (100,)
    assert b['mask'].dtype == np.float32
    # Padding is all zeros.
    np.testing.assert_array_equal(b['label'][b['mask'] == 0], 0.0)
  assert sum(b['mask'].sum() for b in got) == n
  assert masked_rows(got) == expected_rows(digits_arrays['test'])
  # Eval order is fixed.
  again = batches(ip.get_eval_dataset(config, process_index=0,
                                      process_count=1))
  np.testing.assert_array_equal(got[0]['image'], again[0]['image'])


def test_eval_resize_crop(data_dir):
  config = make_config(data_dir=data_dir, image_size=24, eval_batch_size=400,
                       pp=dict(eval='resize_crop', crop_pad=4))
  (b,) = batches(ip.get_eval_dataset(config, process_index=0,
                                     process_count=1))
  assert b['image'].shape == (400, 24, 24, 3)
  assert b['mask'].sum() == 355


@pytest.mark.parametrize('batch', [100, 8])
def test_two_processes_eval_disjoint_and_complete(data_dir, digits_arrays,
                                                  batch):
  config = make_config(data_dir=data_dir, eval_batch_size=batch)
  per_process = [
      batches(ip.get_eval_dataset(config, process_index=pi, process_count=2))
      for pi in range(2)
  ]
  # Same number of batches everywhere, local batch = global / 2.
  assert len(per_process[0]) == len(per_process[1]) == ip.num_eval_batches(
      config, process_count=2)
  assert per_process[0][0]['image'].shape[0] == batch // 2
  parts = [masked_rows(p) for p in per_process]
  assert sum(len(p) for p in parts) == 355
  assert sorted(parts[0] + parts[1]) == expected_rows(digits_arrays['test'])


# ---------------------------------------------------------- image folder ----


def write_folder(root, classes=('cat', 'dog', 'emu'), per_class=7, split=None,
                 seed=0):
  """PNG (RGB, grey, RGBA) and JPEG images of varied sizes."""
  rng = np.random.RandomState(seed)
  for c_idx, c in enumerate(classes):
    folder = os.path.join(root, split, c) if split else os.path.join(root, c)
    os.makedirs(folder, exist_ok=True)
    for i in range(per_class):
      h, w = rng.randint(16, 48, size=2)
      # Class-dependent brightness, so labels can be checked from pixels.
      pixels = np.full((h, w, 3), 40 + 80 * c_idx, np.uint8)
      pixels[: h // 2] = rng.randint(0, 256, (h // 2, w, 3))
      kind = i % 4
      if kind == 0:
        Image.fromarray(pixels).save(os.path.join(folder, f'{i}.png'))
      elif kind == 1:
        Image.fromarray(pixels[..., 0]).save(os.path.join(folder, f'{i}.png'))
      elif kind == 2:
        rgba = np.concatenate([pixels, np.full((h, w, 1), 255, np.uint8)], -1)
        Image.fromarray(rgba).save(os.path.join(folder, f'{i}.PNG'))
      else:
        Image.fromarray(pixels).save(os.path.join(folder, f'{i}.jpg'))
  with open(os.path.join(root, 'README.txt'), 'w') as f:
    f.write('not an image')


@pytest.mark.parametrize('cache', [True, False])
def test_image_folder_end_to_end(tmp_path, cache):
  root = str(tmp_path / 'images')
  write_folder(root)
  config = make_config(
      dataset=f'image_folder:{root}', train_split='train[:80%]',
      eval_split='train[80%:]', image_size=24, batch_size=4,
      eval_batch_size=3, cache=cache, pp=dict(train='inception_crop'))
  info = ip.get_dataset_info(config)
  assert info.num_classes == 3
  assert info.class_names == ('cat', 'dog', 'emu')
  assert (info.num_train_examples, info.num_eval_examples) == (17, 4)

  train = batches(ip.get_train_dataset(config, process_index=0,
                                       process_count=1), 5)
  for b in train:
    assert b['image'].shape == (4, 24, 24, 3)
    assert b['label'].shape == (4, 3)
    assert -1.0 <= b['image'].min() and b['image'].max() <= 1.0
  resumed = batches(ip.get_train_dataset(config, start_step=3,
                                         process_index=0, process_count=1), 2)
  np.testing.assert_array_equal(resumed[0]['image'], train[3]['image'])
  np.testing.assert_array_equal(resumed[1]['label'], train[4]['label'])

  config.pp.train = 'resize_crop'
  assert batches(ip.get_train_dataset(config, process_index=0,
                                      process_count=1), 1)[0]['image'].shape \
      == (4, 24, 24, 3)

  evals = batches(ip.get_eval_dataset(config, process_index=0,
                                      process_count=1))
  assert len(evals) == 2
  assert sum(b['mask'].sum() for b in evals) == 4
  # The bottom half of each image is flat, with the class's brightness.
  for b in evals:
    for image, label, mask in zip(b['image'], b['label'], b['mask']):
      if mask:
        level = (image[-4:].mean() + 1) * 127.5
        assert abs(level - (40 + 80 * label.argmax())) < 3


def test_image_folder_split_layout_and_processes(tmp_path):
  root = str(tmp_path / 'images')
  write_folder(root, split='train', per_class=5)
  write_folder(root, split='test', per_class=3, seed=1)
  config = make_config(dataset=f'image_folder:{root}', image_size=16,
                       eval_batch_size=4, train_split='train+test')
  info = ip.get_dataset_info(config)
  assert (info.num_classes, info.num_train_examples,
          info.num_eval_examples) == (3, 24, 9)
  per_process = [
      batches(ip.get_eval_dataset(config, process_index=pi, process_count=2))
      for pi in range(2)
  ]
  assert len(per_process[0]) == len(per_process[1])
  counts = [sum(b['mask'].sum() for b in p) for p in per_process]
  assert counts == [5, 4]
  parts = [masked_rows(p) for p in per_process]
  assert not set(parts[0]) & set(parts[1])
  whole = masked_rows(batches(ip.get_eval_dataset(
      config, process_index=0, process_count=1)))
  assert sorted(parts[0] + parts[1]) == whole


# ---------------------------------------------------------------- errors ----


def test_unknown_dataset_name(tmp_path):
  config = make_config(dataset='no_such_dataset_xyz', data_dir=str(tmp_path))
  with pytest.raises(ValueError, match='no_such_dataset_xyz'):
    ip.get_dataset_info(config)


def test_missing_data_dir(tmp_path):
  missing = str(tmp_path / 'does_not_exist')
  config = make_config(dataset='cifar10', data_dir=missing)
  with pytest.raises(FileNotFoundError, match='does_not_exist'):
    ip.get_train_dataset(config, process_index=0, process_count=1)


def test_dataset_not_prepared(tmp_path):
  config = make_config(dataset='cifar10', data_dir=str(tmp_path))
  with pytest.raises(FileNotFoundError, match='cifar10') as e:
    ip.get_eval_dataset(config, process_index=0, process_count=1)
  assert str(tmp_path) in str(e.value) and 'tfds build' in str(e.value)


def test_empty_and_missing_image_folder(tmp_path):
  empty = tmp_path / 'empty_folder'
  (empty / 'some_class').mkdir(parents=True)
  with pytest.raises(ValueError, match='empty_folder'):
    ip.get_dataset_info(make_config(dataset=f'image_folder:{empty}'))
  with pytest.raises(FileNotFoundError, match='nowhere'):
    ip.get_dataset_info(
        make_config(dataset=f'image_folder:{tmp_path / "nowhere"}'))


def test_config_errors(data_dir):
  with pytest.raises(ValueError, match='warp'):
    ip.get_train_dataset(make_config(data_dir=data_dir, pp=dict(train='warp')),
                         process_index=0, process_count=1)
  with pytest.raises(ValueError, match='center'):
    ip.get_eval_dataset(make_config(data_dir=data_dir, pp=dict(eval='center')),
                        process_index=0, process_count=1)
  with pytest.raises(ValueError, match='batch_size'):
    ip.get_train_dataset(make_config(data_dir=data_dir, batch_size=127),
                         process_index=0, process_count=2)
  with pytest.raises(ValueError, match='eval_batch_size'):
    ip.get_eval_dataset(make_config(data_dir=data_dir, eval_batch_size=9),
                        process_index=1, process_count=2)
  with pytest.raises(ValueError, match='validation'):
    ip.get_eval_dataset(make_config(data_dir=data_dir,
                                    eval_split='validation'),
                        process_index=0, process_count=1)
