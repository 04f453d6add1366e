"""Data guards: one pixel limit for every image reader, one-class datasets, torch files.

The huge image is a real, valid PNG (greyscale, zlib-compressed zeros: under 1 MB on
disk, about 540 MB once decoded to RGB); the readers must refuse it from its header.
"""

from __future__ import annotations

import os
import struct
import subprocess
import sys
import textwrap
import zlib

import ml_collections
import numpy as np
import pytest

from vit_jax.configs import schema

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_png_grey(path, width: int, height: int) -> None:
  """A valid 8-bit greyscale PNG of zeros, written row by row (never held decoded)."""
  def chunk(kind: bytes, data: bytes) -> bytes:
    return (struct.pack('>I', len(data)) + kind + data
            + struct.pack('>I', zlib.crc32(kind + data) & 0xffffffff))
  compressor = zlib.compressobj(1)
  row = b'\0' * (width + 1)  # filter byte 0, then the pixels
  data = b''.join(compressor.compress(row) for _ in range(height)) + compressor.flush()
  with open(path, 'wb') as f:
    f.write(b'\x89PNG\r\n\x1a\n'
            + chunk(b'IHDR', struct.pack('>IIBBBBB', width, height, 8, 0, 0, 0, 0))
            + chunk(b'IDAT', data) + chunk(b'IEND', b''))


def write_folder(root, classes=('cat', 'dog'), per_class=4) -> None:
  from PIL import Image  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  for split in ('train', 'test'):
    for name in classes:
      os.makedirs(root / split / name, exist_ok=True)
      for i in range(per_class):
        Image.fromarray(rng.integers(0, 255, (12, 12, 3), np.uint8)).save(
            root / split / name / f'{i}.png')


def folder_config(root, **overrides) -> ml_collections.ConfigDict:
  fields = dict(dataset=f'image_folder:{root}', train_split='train', eval_split='test',
                image_size=8, pp=dict(train='plain', eval='resize'), batch_size=4,
                eval_batch_size=4, cache=False, shuffle_buffer=16)
  return schema.resolve({**fields, **overrides})


@pytest.fixture(scope='module')
def huge_png(tmp_path_factory):
  from vit_jax import images  # pylint: disable=g-import-not-at-top
  side = int(images.MAX_PIXELS ** 0.5) + 16  # just over the limit
  path = tmp_path_factory.mktemp('huge') / 'huge.png'
  write_png_grey(path, side, side)
  assert os.path.getsize(path) < 2 << 20
  return path, side


def test_training_folder_and_predict_share_one_pixel_limit(huge_png, tmp_path):
  """raise: the training pipeline names the file and the limit, without decoding it (the
  process's peak RSS stays far below the decoded size); skip: it is left out; predict's
  reader refuses the same file."""
  path, side = huge_png
  root = tmp_path / 'images'
  write_folder(root)
  os.link(path, root / 'train' / 'dog' / 'huge.png')
  script = textwrap.dedent(f'''
      from vit_jax import input_pipeline as ip
      from vit_jax.configs import schema
      config = schema.resolve(dict(
          dataset='image_folder:{root}', train_split='train', eval_split='test', image_size=8,
          pp=dict(train='plain', eval='resize'), batch_size=4, eval_batch_size=4, cache=False,
          shuffle_buffer=16))
      batches = ip.iterate_numpy(ip.get_train_dataset(config, process_index=0, process_count=1))
      try:
        for _ in range(6):
          next(batches)
        print('no error')
      except ip.BadImageError as e:
        print('error:', e)
      with open('/proc/self/status') as f:
        print('hwm_kb', [l.split()[1] for l in f if l.startswith('VmHWM:')][0])
  ''')
  result = subprocess.run([sys.executable, '-c', script], cwd=REPO, capture_output=True,
                          text=True, timeout=300, env=dict(os.environ, JAX_PLATFORMS='cpu'))
  lines = result.stdout.splitlines()
  assert lines and lines[0].startswith('error: '), result.stdout + result.stderr[-3000:]
  message = lines[0]
  assert f"'{root}/train/dog/huge.png'" in message
  assert f'{side}x{side} = {side * side:,} pixels, more than the limit of 178,956,970' in message
  assert "config.bad_images='skip'" in message
  decoded = side * side * 3
  hwm = int(lines[1].split()[1]) * 1024
  print(f'\npeak RSS refusing a {side}x{side} PNG: {hwm / 2**20:.0f} MiB '
        f'(decoded RGB would be {decoded / 2**20:.0f} MiB)')
  assert hwm < decoded + (700 << 20)  # TF's own footprint, but not the decoded image

  from vit_jax import input_pipeline as ip  # pylint: disable=g-import-not-at-top
  config = folder_config(root, bad_images='skip')
  batches = ip.iterate_numpy(ip.get_train_dataset(config, process_index=0, process_count=1))
  for _ in range(3):
    batch = next(batches)
    assert batch['image'].shape == (4, 8, 8, 3)
  assert 'more than the limit' in ip.bad_images(config)[str(root / 'train' / 'dog' / 'huge.png')]

  from vit_jax import images  # pylint: disable=g-import-not-at-top
  with pytest.raises(ValueError, match=r"Cannot read image '.*huge\.png'.*decompression bomb"):
    images.load_image(str(path), 16)


def test_one_class_dataset_is_refused_before_training(tmp_path):
  from vit_jax import data_sources  # pylint: disable=g-import-not-at-top
  root = tmp_path / 'images'
  write_folder(root, classes=('cat',))
  with pytest.raises(ValueError, match=r"has 1 class \(cat\): a classifier has nothing to "
                                       'tell apart; give it at least two classes'):
    data_sources.PipelineData(folder_config(root))
  two = tmp_path / 'two'  # (sources are cached by folder)
  write_folder(two, classes=('cat', 'dog'))
  assert data_sources.PipelineData(folder_config(two)).num_classes == 2


@pytest.mark.parametrize('writer', ['vit_jax.convert', 'torch.save(path)'])
def test_torch_file_as_checkpoint_names_the_users_file(writer, tmp_path):
  """A .pth given where an .npz is read (pretrained_path, predict): the message names
  the user's file and how to convert it, not torch's inner archive folder."""
  torch = pytest.importorskip('torch')
  from vit_jax import checkpoint  # pylint: disable=g-import-not-at-top
  from vit_jax import convert  # pylint: disable=g-import-not-at-top
  path = tmp_path / 'weights.pth'
  state = {'head.weight': np.zeros((10, 32), np.float32)}
  if writer == 'vit_jax.convert':
    staging = tmp_path / '.partial-123-weights.pth'
    convert.write_torch_file(state, str(staging))
    os.replace(staging, path)
  else:
    torch.save({k: torch.from_numpy(v) for k, v in state.items()}, str(path))
  with pytest.raises(ValueError) as e:
    checkpoint.load_flat(path)
  message = str(e.value)
  assert message.startswith(f"Checkpoint '{path}' is a PyTorch file (torch.save)")
  assert 'python -m vit_jax.convert --from timm --to npz' in message
  assert '.partial' not in message and 'data.pkl' not in message
