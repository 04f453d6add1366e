"""Fault injection: each bad input of issue 15 that loading, convert, predict and the
metric writers meet, built here, with the outcome asserted.

Tests are named after the issue's numbered cases (case 1: bad images, 2: two
runs on one workdir, 3: convert, 4: a corrupt but finite checkpoint, 5: unbounded
loading, 6: weights that cannot be right, 7: SIGKILL, 8: disk full, 9: the
smaller items), and `test_user_errors_*` for "user errors are one clear message".
"""

import errno
import glob
import io
import json
import logging
import os
import shutil
import signal
import stat
import struct
import subprocess
import sys
import textwrap
import threading
import time
import warnings
import zipfile
import zlib

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from vit_jax import checkpoint
from vit_jax import cli
from vit_jax import predict
from vit_jax import train
from vit_jax import train_checkpoints
from vit_jax import workdir_lock
from vit_jax.configs import models as model_configs
from vit_jax.configs import schema

try:
  # timm loads torch's triton, which crashes (SIGSEGV) once TensorFlow is loaded, and
  # the bad-image tests here load TensorFlow: load timm first, as collecting
  # test_convert.py does in a whole run.
  import timm  # pylint: disable=unused-import
except ImportError:
  pass

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def random_params(name='ViT-Test_4', num_classes=10, size=32, seed=0):
  model = model_configs.build_model(name, num_classes)
  shapes = jax.eval_shape(
      lambda: model.init(jax.random.key(0), jnp.zeros((1, size, size, 3))))['params']
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda s: (0.1 * rng.standard_normal(s.shape)).astype(s.dtype), shapes)


def write_npz_member(zf, key, shape, dtype=np.float32, data=None, fill_bytes=None):
  """One .npy member whose header says `shape`/`dtype`; data as given (may disagree)."""
  with zf.open(f'{key}.npy', 'w', force_zip64=True) as f:
    np.lib.format.write_array_header_1_0(f, {
        'descr': np.lib.format.dtype_to_descr(np.dtype(dtype)),
        'fortran_order': False, 'shape': tuple(shape)})
    if data is not None:
      f.write(data)
    elif fill_bytes is not None:
      chunk = bytes(1 << 24)
      left = fill_bytes
      while left:
        n = min(left, len(chunk))
        f.write(chunk[:n])
        left -= n


def bomb_checkpoint(path, params, junk_bytes):
  """A valid checkpoint plus one deflated all-zero array of `junk_bytes`."""
  with zipfile.ZipFile(path, 'w', zipfile.ZIP_DEFLATED, compresslevel=1) as zf:
    for key, value in checkpoint.flatten(params).items():
      value = np.asarray(value)
      buffer = io.BytesIO()
      np.lib.format.write_array(buffer, value)
      zf.writestr(f'{key}.npy', buffer.getvalue())
    write_npz_member(zf, 'junk/kernel', (junk_bytes // 4,), fill_bytes=junk_bytes)


def run_python(code, env=None, timeout=240):
  return subprocess.run([sys.executable, '-c', textwrap.dedent(code)], cwd=REPO,
                        capture_output=True, text=True, timeout=timeout,
                        env=dict(os.environ, **(env or {})))


@pytest.fixture(scope='module', autouse=True)
def compilation_cache(tmp_path_factory):
  """Most runs here share one tiny config: a persistent compilation cache (also for the
  subprocesses, through the environment) compiles each of its steps once."""
  from jax.experimental.compilation_cache import compilation_cache as cc  # pylint: disable=g-import-not-at-top
  path = str(tmp_path_factory.mktemp('jax_cache'))
  settings = {'jax_compilation_cache_dir': path,
              'jax_persistent_cache_min_compile_time_secs': 0,
              'jax_persistent_cache_min_entry_size_bytes': 0}
  before = {name: getattr(jax.config, name) for name in settings}
  env = {name.upper(): str(value) for name, value in settings.items()}
  env_before = {name: os.environ.get(name) for name in env}
  for name, value in settings.items():
    jax.config.update(name, value)
  os.environ.update(env)
  cc.reset_cache()
  yield
  for name, value in before.items():
    jax.config.update(name, value)
  for name, value in env_before.items():
    if value is None:
      os.environ.pop(name, None)
    else:
      os.environ[name] = value
  cc.reset_cache()


@pytest.fixture(scope='module')
def params():
  return random_params()


@pytest.fixture(scope='module')
def good_npz(tmp_path_factory, params):
  path = tmp_path_factory.mktemp('ckpt') / 'vit.npz'
  checkpoint.save(params, path)
  return path


@pytest.fixture(scope='module')
def png(tmp_path_factory):
  from PIL import Image  # pylint: disable=g-import-not-at-top
  path = tmp_path_factory.mktemp('img') / 'rgb.png'
  Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 40, 3), np.uint8)).save(path)
  return str(path)


# --- case 1: bad images are named and handled by policy ---------------------------

def tiny_run_config(**overrides):
  """ViT-Test_4 (one layer) at 8x8 on synthetic data: a whole run in a few seconds."""
  config = ml_collections.ConfigDict(dict(
      model_name='ViT-Test_4', model=dict(transformer=dict(num_layers=1)), dataset='synthetic',
      num_classes=4, image_size=8, synthetic_noise=0.3, num_eval_examples=32, batch_size=16,
      eval_batch_size=16, seed=0, optimizer='adamw', learning_rate=3e-3, weight_decay=0.01,
      schedule='cosine', warmup_steps=2, total_steps=8, grad_clip_norm=1.0, log_every=4,
      eval_every=0, checkpoint_every=4, keep_checkpoints=3))
  config.update(overrides)
  return config


def write_images(root, split, per_class=4, classes=('cat', 'dog'), size=12):
  from PIL import Image  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  for c in classes:
    folder = os.path.join(root, split, c) if split else os.path.join(root, c)
    os.makedirs(folder, exist_ok=True)
    for i in range(per_class):
      Image.fromarray(rng.integers(0, 255, (size, size, 3), np.uint8)).save(
          os.path.join(folder, f'{i}.png'))


def truncated_jpeg():
  from PIL import Image  # pylint: disable=g-import-not-at-top
  buffer = io.BytesIO()
  Image.fromarray(np.random.default_rng(1).integers(0, 255, (64, 64, 3), np.uint8)).save(
      buffer, 'JPEG')
  return buffer.getvalue()[:buffer.tell() // 2]


BAD_FILES = {  # name: (content, what the reason says)
    'garbage.jpg': (bytes(np.random.default_rng(2).integers(0, 256, 300, np.uint8)),
                    'Unknown image file format'),
    'notes.jpg': (b'these are my notes, not a picture\n', 'Unknown image file format'),
    'truncated.jpg': (truncated_jpeg(), 'jpeg::Uncompress failed'),
    'empty.jpg': (b'', 'empty file (0 bytes)'),
}


def pipeline_config(root, **overrides):
  fields = dict(dataset=f'image_folder:{root}', train_split='train', eval_split='test',
                image_size=8, pp=dict(train='plain', eval='resize'), batch_size=4,
                eval_batch_size=4, cache=False, shuffle_buffer=64)
  return schema.resolve({**fields, **overrides})


@pytest.mark.slow
def test_case1_corrupt_eval_image_keeps_final_checkpoint_and_names_it(tmp_path):
  """The issue's run: garbage test/cat/bad.jpg. The 4 steps are saved before the final
  evaluation fails, and the one-line error names the file."""
  root = tmp_path / 'images'
  write_images(root, 'train')
  write_images(root, 'test', per_class=2)
  (root / 'test' / 'cat' / 'bad.jpg').write_bytes(BAD_FILES['garbage.jpg'][0])
  workdir = tmp_path / 'run'
  result = subprocess.run(
      [sys.executable, '-m', 'vit_jax.main', '--config=configs/default.py:ViT-Test_4',
       f'--workdir={workdir}', f'--config.dataset=image_folder:{root}',
       '--config.total_steps=4', '--config.warmup_steps=1', '--config.batch_size=8',
       '--config.eval_batch_size=8', '--config.eval_every=0', '--config.checkpoint_every=0',
       '--config.image_size=(8,8)', '--config.model.transformer.num_layers=1'],
      cwd=REPO, capture_output=True, text=True, timeout=300,
      env=dict(os.environ, JAX_PLATFORMS='cpu', VIT_JAX_TRACEBACK='0', XLA_FLAGS=''))
  assert result.returncode == 2, result.stderr[-3000:]
  last = result.stderr.strip().splitlines()[-1]
  assert last.startswith(f"error: Cannot use image '{root}/test/cat/bad.jpg' (split 'test'")
  assert 'Unknown image file format' in last and "config.bad_images='skip'" in last
  assert 'Traceback' not in result.stderr
  assert train_checkpoints.RunCheckpointer(str(workdir)).all_steps() == [4]
  assert not (workdir / 'final_metrics.json').exists()


@pytest.mark.parametrize('name', sorted(BAD_FILES))
def test_case1_each_kind_of_bad_image_raises_naming_it(tmp_path, name):
  from vit_jax import input_pipeline as ip  # pylint: disable=g-import-not-at-top
  content, reason = BAD_FILES[name]
  root = tmp_path / 'images'
  write_images(root, 'train', per_class=3)
  write_images(root, 'test', per_class=3)
  (root / 'train' / 'dog' / name).write_bytes(content)
  (root / 'test' / 'cat' / name).write_bytes(content)
  config = pipeline_config(root)
  with pytest.raises(ip.BadImageError) as e:
    list(ip.iterate_numpy(ip.get_eval_dataset(config, process_index=0, process_count=1)))
  assert str(e.value).startswith(f"Cannot use image '{root}/test/cat/{name}' (split 'test' of "
                                 f"'image_folder:{root}'): ")
  assert reason in str(e.value)
  # Training names it too, whichever epoch meets it first.
  batches = ip.iterate_numpy(ip.get_train_dataset(config, process_index=0, process_count=1))
  with pytest.raises(ip.BadImageError, match=f"'{root}/train/dog/{name}' \\(split 'train'"):
    for _ in range(4):
      next(batches)


@pytest.mark.slow
def test_case1_skip_drops_counts_logs_and_lists_them(tmp_path, caplog):
  """bad_images='skip' through a whole run: every kind is left out, logged once, and
  listed in workdir/bad_images.txt; evaluation counts the good images only."""
  root = tmp_path / 'images'
  classes = ('cat', 'dog', 'emu', 'fox')  # 4, as tiny_run_config: its compiled steps
  write_images(root, 'train', per_class=3, classes=classes)
  write_images(root, 'test', per_class=2, classes=classes)
  for name, (content, _) in BAD_FILES.items():
    (root / 'train' / 'cat' / name).write_bytes(content)
  (root / 'test' / 'dog' / 'bad.jpg').write_bytes(BAD_FILES['garbage.jpg'][0])
  (root / 'train' / 'dog' / 'folder.jpg').mkdir()  # not a file: left out when listed
  config = tiny_run_config(dataset=f'image_folder:{root}', eval_split='test',
                           pp=dict(train='plain', eval='resize'), bad_images='skip',
                           checkpoint_every=0, shuffle_buffer=64)
  caplog.set_level(logging.WARNING)
  result = train.train_and_evaluate(config, str(tmp_path / 'run'))
  assert result['step'] == 8
  assert result['eval_examples'] == 8  # 4 classes x 2; bad.jpg is masked out
  listed = [json.loads(line)
            for line in (tmp_path / 'run' / 'bad_images.txt').read_text().splitlines()]
  expected = {str(root / 'train' / 'cat' / name): reason
              for name, (_, reason) in BAD_FILES.items()}
  expected[str(root / 'test' / 'dog' / 'bad.jpg')] = 'Unknown image file format'
  expected[str(root / 'train' / 'dog' / 'folder.jpg')] = 'not a file'
  assert sorted(entry['image'] for entry in listed) == sorted(expected)
  for entry in listed:
    assert expected[entry['image']] in entry['reason'], entry
  # 8 x 16 images of 16: every bad training image was met several times, logged once.
  logged = [r.getMessage() for r in caplog.records if 'Leaving out image' in r.getMessage()]
  assert sorted(m.split("'")[1] for m in logged) == sorted(
      p for p in expected if not p.endswith('folder.jpg'))
  assert any('listed in' in r.getMessage() and 'bad_images.txt' in r.getMessage()
             for r in caplog.records)


def test_case1_skipped_images_keep_batches_full_and_resumable(tmp_path):
  from vit_jax import input_pipeline as ip  # pylint: disable=g-import-not-at-top
  root = tmp_path / 'images'
  write_images(root, 'train', per_class=5)
  write_images(root, 'test', per_class=1)
  (root / 'train' / 'cat' / 'bad.jpg').write_bytes(b'not an image')
  config = pipeline_config(root, bad_images='skip')

  def first(n, start_step=0):
    ds = ip.get_train_dataset(config, start_step=start_step, process_index=0, process_count=1)
    batches = ip.iterate_numpy(ds)
    return [next(batches) for _ in range(n)]

  whole = first(9)  # 11 images, 4 per batch: bad.jpg falls in several batches
  assert all(b['image'].shape == (4, 8, 8, 3) for b in whole)
  assert all(np.all(b['image'].reshape(4, -1).std(axis=1) > 0) for b in whole)  # no zeros
  resumed = first(3, start_step=6)
  for a, b in zip(resumed, whole[6:]):
    np.testing.assert_array_equal(a['image'], b['image'])
  assert list(ip.bad_images(config)) == [str(root / 'train' / 'cat' / 'bad.jpg')]
  # Nothing to copy from: an error, not a batch of zeros.
  root = tmp_path / 'all_bad'
  write_images(root, 'test', per_class=1)
  for i in range(4):
    os.makedirs(root / 'train' / f'c{i}')
    (root / 'train' / f'c{i}' / 'x.png').write_bytes(b'not an image')
  config = pipeline_config(root, bad_images='skip')
  with pytest.raises(ip.BadImageError, match='Every image of a training batch is unreadable'):
    next(ip.iterate_numpy(ip.get_train_dataset(config, process_index=0, process_count=1)))


def test_case1_folders_checked_at_start(tmp_path, caplog):
  from vit_jax import input_pipeline as ip  # pylint: disable=g-import-not-at-top
  root = tmp_path / 'empty_class'
  write_images(root, None)
  (root / 'emu').mkdir()
  with pytest.raises(ValueError, match=rf"class folder\(s\) without images .*'{root}/emu'.*"
                     'would silently change the class ids'):
    ip.get_dataset_info(pipeline_config(root, train_split='train[:50%]',
                                        eval_split='train[50%:]'))
  # Empty in one split only: the class exists; reported, not refused.
  root = tmp_path / 'split_layout'
  write_images(root, 'train')
  write_images(root, 'test', classes=('cat',))
  (root / 'test' / 'dog').mkdir()
  caplog.set_level(logging.WARNING)
  assert ip.get_dataset_info(pipeline_config(root)).num_classes == 2
  assert f"'{root}/test/dog' holds no images" in caplog.text
  # An entry named like an image that is not a file.
  root = tmp_path / 'not_a_file'
  write_images(root, 'train')
  write_images(root, 'test')
  (root / 'test' / 'cat' / 'x.jpg').mkdir()
  with pytest.raises(ip.BadImageError, match=f"not a file, cannot be read as an image: "
                     f"'{root}/test/cat/x.jpg'"):
    ip.get_dataset_info(pipeline_config(root))
  info = ip.get_dataset_info(pipeline_config(root, bad_images='skip'))
  assert info.num_eval_examples == 8
  assert ip.bad_images(pipeline_config(root)) == {str(root / 'test' / 'cat' / 'x.jpg'):
                                                  'not a file'}


@pytest.mark.slow
def test_case1_tfds_bad_record_named_by_split_and_index(tmp_path):
  """A prepared TFDS dataset whose test example 3 holds garbage bytes."""
  tfds = pytest.importorskip('tensorflow_datasets')
  from vit_jax import datasets  # pylint: disable=g-import-not-at-top
  from vit_jax import input_pipeline as ip  # pylint: disable=g-import-not-at-top
  datasets.ensure_importlib_resources()
  garbage = tmp_path / 'garbage.png'
  garbage.write_bytes(BAD_FILES['garbage.jpg'][0])

  class Tiny(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    VERSION = tfds.core.Version('1.0.0')

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
          'image': tfds.features.Image(shape=(None, None, 3), encoding_format='png'),
          'label': tfds.features.ClassLabel(num_classes=2)}))

    def _split_generators(self, dl_manager):
      return {'train': self._generate_examples(4), 'test': self._generate_examples(5)}

    def _generate_examples(self, n):
      for i in range(n):  # TFDS stores a file's bytes as they are: the garbage gets in.
        yield i, {'image': str(garbage) if n == 5 and i == 3 else np.full((8, 8, 3), i, np.uint8),
                  'label': i % 2}

  builder = Tiny(data_dir=str(tmp_path / 'tfds'))
  builder.download_and_prepare()
  # TFDS shuffles examples when it writes them: find where the garbage ended up.
  stored = builder.as_dataset(split='test', shuffle_files=False,
                              decoders={'image': tfds.decode.SkipDecoding()})
  bad = [i for i, ex in enumerate(tfds.as_numpy(stored)) if ex['image'] == garbage.read_bytes()]
  assert len(bad) == 1
  config = schema.resolve(dict(
      dataset='tiny', data_dir=str(tmp_path / 'tfds'), eval_split='test', image_size=8,
      pp=dict(eval='resize'), eval_batch_size=2))
  # Alone, and as the process of two whose part ([0, 3) or [3, 5)) holds it.
  for process_index, process_count in ((0, 1), (int(bad[0] >= 3), 2)):
    with pytest.raises(ip.BadImageError,
                       match=rf"Cannot use image index {bad[0]} of split 'test' of dataset "
                       "'tiny': cannot be decoded"):
      list(ip.iterate_numpy(ip.get_eval_dataset(config, process_index=process_index,
                                                process_count=process_count)))
  config.bad_images = 'skip'
  batches = list(ip.iterate_numpy(ip.get_eval_dataset(config, process_index=0,
                                                      process_count=1)))
  assert sum(b['mask'].sum() for b in batches) == 4
  assert list(ip.bad_images(config)) == [f"index {bad[0]} of split 'test' of dataset 'tiny'"]


# --- case 2: one run per workdir ------------------------------------------------------

def write_run_config(path, **overrides):
  """A config file: the schema's fields (so every one is overridable), tiny_run_config's
  values."""
  config = tiny_run_config(**overrides).to_dict()
  config['image_size'] = (config['image_size'],) * 2  # the schema's type
  path.write_text(textwrap.dedent(f'''
      from vit_jax.configs import schema
      def get_config():
        config = schema.base_config()
        config.update({config!r})
        return config
      '''))
  return str(path)


def start_main(config_path, workdir):
  env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONUNBUFFERED='1', VIT_JAX_TRACEBACK='0')
  return subprocess.Popen([sys.executable, '-m', 'vit_jax.main', f'--config={config_path}',
                           f'--workdir={workdir}'], cwd=REPO, env=env,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


TIMING_KEYS = ('train_seconds', 'steps_per_sec', 'images_per_sec')


@pytest.mark.slow
def test_case2_second_run_on_a_workdir_exits_at_once_naming_the_first(tmp_path, trained_run):
  config_path = write_run_config(tmp_path / 'config.py')  # trained_run's, run alone
  workdir = tmp_path / 'run'
  first = start_main(config_path, workdir)
  try:
    lock = workdir / workdir_lock.LOCK_NAME
    deadline = time.monotonic() + 120
    while not (lock.exists() and lock.read_text().strip()):
      assert first.poll() is None, first.stderr.read()[-3000:]
      assert time.monotonic() < deadline, 'the first run never took the lock'
      time.sleep(0.05)
    assert json.loads(lock.read_text())['pid'] == first.pid
    started = time.monotonic()
    second = start_main(config_path, workdir)
    _, err = second.communicate(timeout=60)
    took = time.monotonic() - started
    assert first.poll() is None, 'the first run ended before the second was refused'
  finally:
    _, first_err = first.communicate(timeout=300)
  print(f'\nsecond run refused after {took:.1f} s')
  assert second.returncode == 2 and took < 10, err[-3000:]
  assert err.strip().splitlines()[-1].startswith(
      f'error: {workdir} is in use by another run: pid {first.pid} on host ')
  assert err.count('\n') == 1, err
  assert first.returncode == 0, first_err[-3000:]
  assert lock.read_text() == ''  # released
  # The first run was not disturbed: the final metrics of the lone run.
  together = json.loads((workdir / 'final_metrics.json').read_text())
  for key, value in trained_run[1].items():
    if key not in TIMING_KEYS:
      assert together[key] == value, key


def test_case2_stale_lock_of_a_killed_run_is_taken_over(tmp_path, caplog):
  holder = subprocess.Popen(
      [sys.executable, '-c', textwrap.dedent(f'''
          import time
          from vit_jax import workdir_lock
          workdir_lock.DirectoryLock({str(tmp_path)!r}).acquire()
          print('held', flush=True)
          time.sleep(600)
      ''')], cwd=REPO, stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline().strip() == 'held'
    with pytest.raises(workdir_lock.WorkdirLockedError, match=f'pid {holder.pid} on host'):
      workdir_lock.hold(str(tmp_path)).__enter__()
  finally:
    holder.kill()
    holder.wait(timeout=60)
  caplog.set_level(logging.WARNING)
  with workdir_lock.hold(str(tmp_path)) as lock:
    assert lock.took_over.startswith(f'pid {holder.pid} on host ')
    assert json.loads((tmp_path / '.lock').read_text())['pid'] == os.getpid()
  assert f'from pid {holder.pid} on host' in caplog.text and 'killed?' in caplog.text
  assert (tmp_path / '.lock').read_text() == ''


def test_case2_lock_nests_in_a_thread_and_conflicts_across_threads(tmp_path):
  with workdir_lock.hold(str(tmp_path)):
    with workdir_lock.hold(str(tmp_path)):  # main.py, then train_and_evaluate
      pass
    assert json.loads((tmp_path / '.lock').read_text())['pid'] == os.getpid()
    errors = []

    def other_run():
      try:
        with workdir_lock.hold(str(tmp_path)):
          pass
      except workdir_lock.WorkdirLockedError as e:
        errors.append(e)

    thread = threading.Thread(target=other_run)
    thread.start()
    thread.join()
    assert len(errors) == 1
  assert (tmp_path / '.lock').read_text() == ''


def test_case2_two_first_runs_prepare_digits_in_turn(tmp_path):
  """Two preparations of the digits into one fresh data_dir at once: the second waits
  for the first and finds it prepared (was: FileExistsError: Cannot rename ...)."""
  pytest.importorskip('sklearn')
  from vit_jax import datasets  # pylint: disable=g-import-not-at-top
  data_dir = str(tmp_path / 'tfds')
  results, errors = [], []

  def prepare():
    try:
      results.append(datasets.prepared_builder('digits', data_dir).info.splits['test']
                     .num_examples)
    except Exception as e:  # pylint: disable=broad-except
      errors.append(e)

  threads = [threading.Thread(target=prepare) for _ in range(2)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  assert not errors and results == [355, 355]
  assert sorted(os.listdir(os.path.join(data_dir, 'digits'))) == ['.prepare.lock', '1.0.0']

# --- case 3: convert refuses partial or mismatched trees ----------------------------

def test_case3_convert_refuses_partial_tree(tmp_path, params, capsys):
  pytest.importorskip('torch')
  from vit_jax import convert  # pylint: disable=g-import-not-at-top
  flat = checkpoint.flatten(params)
  missing = 'Transformer/encoderblock_1/MlpBlock_3/Dense_0/kernel'
  np.savez(tmp_path / 'partial.npz', **{k: v for k, v in flat.items() if k != missing})
  out = tmp_path / 'timm.safetensors'
  assert convert.main(['--from', 'npz', '--to', 'timm', '--model', 'ViT-Test_4',
                       '--input', str(tmp_path / 'partial.npz'), '--output', str(out)]) == 2
  err = capsys.readouterr().err
  # One line (vit_jax.cli): the missing key, its shape and the preset the file fits.
  assert err.count('\n') == 1 and err.startswith('error: ')
  assert f'{missing}: model (32, 64), not in npz weights' in err
  assert 'the file fits preset ViT-Test_4' in err
  assert not out.exists() and os.listdir(tmp_path) == ['partial.npz']


def test_case3_convert_refuses_mismatched_preset(tmp_path, good_npz, capsys):
  """ViT-Test_4 weights (32 wide, 2 layers) named ViT-Digits_4 (64 wide, 4 layers)."""
  pytest.importorskip('torch')
  from vit_jax import convert  # pylint: disable=g-import-not-at-top
  assert convert.main(['--from', 'npz', '--to', 'hf', '--model', 'ViT-Digits_4',
                       '--input', str(good_npz), '--output', str(tmp_path / 'hf')]) == 2
  err = capsys.readouterr().err
  assert err.startswith(f"error: npz weights '{good_npz}' do not fit the ViT-Digits_4 model:")
  assert err.count('\n') == 1  # one line: how many shapes differ, the first ones, the fit
  assert 'not in npz weights' in err and 'the file fits preset ViT-Test_4' in err
  assert not os.listdir(tmp_path)


def test_case3_convert_exits_0_only_if_the_output_computes_the_same(tmp_path, good_npz,
                                                                    monkeypatch, capsys):
  pytest.importorskip('torch')
  pytest.importorskip('timm')
  from vit_jax import convert  # pylint: disable=g-import-not-at-top
  out = tmp_path / 'vit.pth'
  args = ['--from', 'npz', '--to', 'timm', '--model', 'ViT-Test_4',
          '--input', str(good_npz), '--output', str(out)]
  assert convert.main(args) == 0
  assert 'checked: max |logit difference| output' in capsys.readouterr().out

  # A mapping that loses a sign writes a loadable file of another function.
  real_to_timm = convert.to_timm

  def broken_to_timm(params, approximate_gelu=True):
    sd = real_to_timm(params, approximate_gelu)
    sd['blocks.1.mlp.fc2.weight'] = -sd['blocks.1.mlp.fc2.weight']
    return sd

  monkeypatch.setattr(convert, 'to_timm', broken_to_timm)
  before = out.read_bytes()
  assert convert.main(args) == 2
  err = capsys.readouterr().err
  assert 'does not compute the input' in err and err.count('\n') == 1, err
  assert out.read_bytes() == before  # the earlier good file is untouched
  assert sorted(os.listdir(tmp_path)) == ['vit.pth']  # and no partial file is left


# --- case 4: checkpoints verified on restore -----------------------------------------

@pytest.fixture(scope='module')
def trained_run(tmp_path_factory):
  """A finished `tiny_run_config()` run (checkpoints at steps 4 and 8), to copy."""
  workdir = tmp_path_factory.mktemp('trained')
  final = train.train_and_evaluate(tiny_run_config(), str(workdir))
  return workdir, final


def copy_run(trained_run, tmp_path):
  workdir = tmp_path / 'run'
  shutil.copytree(trained_run[0], workdir)
  return workdir


def _flip_bits_in_array_files(step_dir, every=61):
  """Flips one bit in every `every`-th byte of each data file of the saved state.

  One flipped byte can land in a region of an OCDBT file nothing references (then the
  restore rightly succeeds); flipping throughout the files always hits stored data."""
  files = [p for p in glob.glob(os.path.join(step_dir, 'state', '**', 'd', '*'), recursive=True)
           if os.path.isfile(p)]
  assert files, f'no array data files under {step_dir}'
  for path in files:
    data = bytearray(open(path, 'rb').read())
    for i in range(len(data) // 2 % every, len(data), every):
      data[i] ^= 1 << 3
    open(path, 'wb').write(bytes(data))


@pytest.mark.slow
def test_case4_bit_flip_in_latest_checkpoint_falls_back_with_warning(trained_run, tmp_path):
  workdir = copy_run(trained_run, tmp_path)
  step, first = train_checkpoints.load_latest(str(workdir))
  assert step == 8
  _flip_bits_in_array_files(workdir / 'checkpoints' / '8')
  # Whether TensorStore's CRC covers the flipped bytes (a read error; so with 8 devices,
  # where small arrays are stored inline) or not (changed values, which the checksum
  # catches: see the next test), the checkpoint is set aside and step 4 resumes.
  with pytest.warns(train_checkpoints.CorruptCheckpointWarning, match='step 8 .*cannot be used'):
    result = train.train_and_evaluate(tiny_run_config(), str(workdir))
  assert result['step'] == 8
  assert [d.split('-')[0] for d in os.listdir(workdir / 'checkpoints_corrupt')] == ['8']
  _, again = train_checkpoints.load_latest(str(workdir))  # resumed from 4, retrained 5..8
  chex.assert_trees_all_equal(again['params'], first['params'])


def test_case4_value_changed_on_disk_fails_its_checksum(tmp_path, monkeypatch):
  """The issue's case: a flipped bit the storage layer does not notice (a weight of
  1.7e26, restored silently before). Modelled by writing one changed value after the
  checksums were taken; the restore names the array and uses the step before."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  state = {'params': {'head': {'kernel': jnp.full((4, 3), 0.25), 'bias': jnp.zeros(3)}},
           'step': jnp.array(2, jnp.int32)}
  checkpointer = train_checkpoints.RunCheckpointer(str(tmp_path), async_save=False)
  checkpointer.save(1, state)
  real = ocp.args.StandardSave

  def changed_on_the_way_to_disk(tree):
    kernel = np.array(tree['params']['head']['kernel'])
    kernel.reshape(-1).view(np.uint32)[0] ^= np.uint32(1 << 30)  # 0.25 -> 8.5e37
    return real({**tree, 'params': {'head': {**tree['params']['head'], 'kernel': kernel}}})

  monkeypatch.setattr(ocp.args, 'StandardSave', changed_on_the_way_to_disk)
  checkpointer.save(2, state)
  monkeypatch.undo()
  checkpointer.close()
  meta = json.loads((tmp_path / 'checkpoints' / '2' / 'meta' / 'metadata').read_text())
  digests = train_checkpoints.checksums(state)
  assert sorted(digests) == ['params/head/bias', 'params/head/kernel', 'step']
  assert meta['checksums'] == {'algorithm': 'sha256', 'leaves': digests}
  step, raw = train_checkpoints.load_latest(str(tmp_path))  # unchecked: as Orbax reads it
  assert step == 2 and raw['params']['head']['kernel'][0, 0] > 1e37
  checkpointer = train_checkpoints.RunCheckpointer(str(tmp_path))
  with pytest.warns(train_checkpoints.CorruptCheckpointWarning,
                    match=r'step 2 .*checksum mismatch in 1 of 3 arrays \(params/head/kernel\)'):
    restored, meta = checkpointer.restore_latest(jax.eval_shape(lambda: state))
  checkpointer.close()
  assert meta['step'] == 1 and float(restored['params']['head']['kernel'][0, 0]) == 0.25
  assert [d.split('-')[0] for d in os.listdir(tmp_path / 'checkpoints_corrupt')] == ['2']
  # A checkpoint saved before checksums existed restores unchecked.
  del meta['checksums']
  train_checkpoints._verify_checksums(restored, meta)  # pylint: disable=protected-access


def test_case4_checksum_cost_is_small_for_tiny_models():
  """Hashing ViT-Test_4's training state (params and two Adam moments) takes a few
  milliseconds, next to an Orbax save's hundreds."""
  params = random_params()
  state = {'params': params, 'mu': params, 'nu': params}
  train_checkpoints.checksums(state)
  start = time.perf_counter()
  for _ in range(10):
    train_checkpoints.checksums(state)
  per_save = (time.perf_counter() - start) / 10
  nbytes = sum(x.nbytes for x in jax.tree.leaves(state))
  print(f'\nchecksums of {nbytes / 1e6:.2f} MB of state: {per_save * 1e3:.2f} ms')
  assert per_save < 0.05


def test_case4_non_finite_first_step_after_restore_names_checkpoint_suspect(tmp_path):
  """An absurd but finite weight that no checksum flags (saved that way, e.g. by a
  version without checksums): the first step after restoring it is non-finite, and
  the error blames that checkpoint, not the recipe. Later steps blame the recipe."""
  from vit_jax import periodic  # pylint: disable=g-import-not-at-top

  class Writer:
    def write_scalars(self, step, scalars):
      pass

  directory = str(tmp_path / 'checkpoints')

  def metrics(restored):
    return periodic.TrainMetrics(Writer(), periodic.Chrono(8), 16, 1000,
                                 lambda: 'The last good checkpoint is step 8.',
                                 restored=restored)

  nan = {'loss': np.float32('nan'), 'grad_norm': np.float32(1), 'learning_rate': np.float32(0)}
  finite = {**nan, 'loss': np.float32(1)}
  after_restore = metrics((8, directory))
  after_restore.add(9, nan)
  with pytest.raises(train.NonFiniteLossError) as e:
    after_restore.flush()
  message = str(e.value)
  assert 'at step 9, the first step after restoring the checkpoint of step 8 in ' in message
  assert f'That checkpoint is suspect: move {directory}/8 aside' in message
  assert 'last good' not in message and 'learning_rate' not in message
  later = metrics((8, directory))
  later.add(9, finite)
  later.add(10, nan)
  with pytest.raises(train.NonFiniteLossError, match='at step 10; .*last good checkpoint is '
                     r'step 8\. Lower config\.learning_rate'):
    later.flush()
  fresh = metrics((0, directory))  # step 0: not restored
  fresh.add(1, nan)
  with pytest.raises(train.NonFiniteLossError, match='Lower config.learning_rate'):
    fresh.flush()


# --- case 5: loading memory is bounded ---------------------------------------------

def test_case5_zip_bomb_refused_before_its_data_is_read(tmp_path, params):
  """A valid ViT-Test_4 checkpoint plus 1 GiB of deflated zeros (a ~1 MB file): predict
  and convert refuse it from the headers; peak RSS stays far below the inflated size."""
  bomb = tmp_path / 'bomb.npz'
  bomb_checkpoint(bomb, params, junk_bytes=1 << 30)
  assert os.path.getsize(bomb) < 8 << 20
  image = tmp_path / 'x.png'
  from PIL import Image  # pylint: disable=g-import-not-at-top
  Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(image)
  result = run_python(f'''
      import jax, jax.numpy as jnp
      from vit_jax import predict

      def peak_kb():  # this process's own peak (ru_maxrss counts the forking parent's too)
        with open('/proc/self/status') as f:
          return int([line.split()[1] for line in f if line.startswith('VmHWM:')][0])

      (jnp.ones(3) + 1).block_until_ready()  # JAX's backend up: the baseline
      base = peak_kb()
      rc = predict.main(['--model', 'ViT-Test_4', '--checkpoint', {str(bomb)!r},
                         '--image', {str(image)!r}])
      print('rc', rc, 'grown_kb', peak_kb() - base)
  ''')
  rc, rss_kb = result.stdout.split()[1], int(result.stdout.split()[3])
  print(f'\npredict on a 1 GiB zip bomb: exit {rc}, peak RSS grew {rss_kb / 1024:.0f} MiB')
  assert rc == '2', result.stderr[-2000:]
  assert (f"error: Checkpoint '{bomb}' does not fit the model: 1 unexpected key: junk/kernel: "
          'checkpoint (268435456,), not in model; the file fits preset ViT-Test_4 ') in result.stderr

  # Above what JAX's start-up takes (which depends on the accelerator plugins
  # installed), the bomb alone would add 1024 MiB.
  assert rss_kb < 300 * 1024

  from vit_jax import convert  # pylint: disable=g-import-not-at-top
  with pytest.raises(ValueError, match=r'unexpected keys \(1\):\n  junk/kernel'):
    convert.convert_file('npz', 'npz', 'ViT-Test_4', str(bomb), str(tmp_path / 'copy.npz'))
  assert not (tmp_path / 'copy.npz').exists()


def test_case5_total_size_limit(tmp_path, params, monkeypatch):
  bomb = tmp_path / 'bomb.npz'
  bomb_checkpoint(bomb, params, junk_bytes=64 << 20)
  monkeypatch.setenv(checkpoint.MAX_NPZ_BYTES_ENV, '32M')
  with pytest.raises(ValueError, match=r"'junk/kernel' declares shape \(16777216,\) float32, "
                     r'64.0 MiB, more than the 32.0 MiB limit'):
    checkpoint.load(bomb)
  with pytest.raises(ValueError, match=r'arrays declare 64.1 MiB, more than the 64.0 MiB limit'):
    checkpoint.load(bomb, max_bytes=(64 << 20) + 1000)
  monkeypatch.setenv(checkpoint.MAX_NPZ_BYTES_ENV, 'lots')
  with pytest.raises(ValueError, match='VIT_JAX_MAX_NPZ_BYTES'):
    checkpoint.load(bomb)


def test_case5_40gb_declared_array_refused_before_allocation(tmp_path, monkeypatch):
  path = tmp_path / 'huge.npz'
  with zipfile.ZipFile(path, 'w') as zf:
    write_npz_member(zf, 'head/kernel', (10_000_000_000,), data=b'\0' * 16)
  with pytest.raises(ValueError, match=r"'head/kernel' declares shape \(10000000000,\) float32, "
                     r'37.3 GiB, more than the [\d.]+ GiB limit'):
    checkpoint.load(path)
  # With the limit raised, the header still disagrees with what the zip holds.
  with pytest.raises(ValueError, match=r'\(40,000,000,000 bytes\) but its zip member holds '
                     r'16 bytes of data'):
    checkpoint.load(path, max_bytes=1 << 40)
  with pytest.raises(ValueError, match='37.3 GiB'):
    checkpoint.inspect(path, print_fn=lambda _: None)


# --- case 6: weights that cannot be right ------------------------------------------

@pytest.mark.parametrize('bad', ['nan', 'inf'])
def test_case6_non_finite_weights_refused(tmp_path, params, png, capsys, bad):
  flat = {k: np.array(v) for k, v in checkpoint.flatten(params).items()}
  flat['Transformer/encoderblock_0/MlpBlock_3/Dense_0/kernel'][3, 5] = float(bad)
  path = tmp_path / f'{bad}.npz'
  np.savez(path, **flat)
  with pytest.raises(ValueError, match=r"'Transformer/encoderblock_0/MlpBlock_3/Dense_0/kernel' "
                     rf'\(32, 64\) has 1 non-finite value\(s\) \(first: {bad} at index \(3, 5\)\)'):
    checkpoint.load(path)
  assert predict.main(['--model', 'ViT-Test_4', '--checkpoint', str(path), '--image', png]) == 2
  assert 'non-finite' in capsys.readouterr().err
  with pytest.raises(ValueError, match='non-finite'):
    checkpoint.load_pretrained(checkpoint.unflatten(flat), params, 'ViT-Test_4')


def test_case6_non_finite_found_in_any_chunk(tmp_path):
  """The finite check reads 16 MiB pieces: a NaN in the last piece of a 24 MiB array."""
  values = np.zeros(6 << 20, np.float32)
  values[-1] = np.nan
  path = tmp_path / 'late_nan.npz'
  np.savez(path, **{'head/kernel': values.reshape(-1, 1024)})
  with pytest.raises(ValueError, match=r'first: nan at index \(6143, 1023\)'):
    checkpoint.load(path)
  fortran = np.asfortranarray(np.ones((8, 4), np.float32))
  fortran[6, 1] = np.inf
  np.savez(path, **{'head/kernel': fortran})
  with pytest.raises(ValueError, match=r'first: inf at index \(6, 1\)'):
    checkpoint.load(path)
  fortran[6, 1] = 2.0
  np.savez(path, **{'head/kernel': fortran})
  np.testing.assert_array_equal(checkpoint.load(path)['head']['kernel'], fortran)


@pytest.mark.parametrize('dtype', [np.int8, np.bool_, np.int64, np.uint8])
def test_case6_int_and_bool_weights_refused(tmp_path, params, dtype):
  flat = {k: np.asarray(v) for k, v in checkpoint.flatten(params).items()}
  flat['head/kernel'] = np.ones(flat['head/kernel'].shape, dtype)
  path = tmp_path / 'ints.npz'
  np.savez(path, **flat)
  with pytest.raises(ValueError, match=rf"'head/kernel' has .*dtype {np.dtype(dtype)}; "
                     'parameters must be floating point'):
    checkpoint.load(path)
  with pytest.raises(ValueError, match='floating point'):
    checkpoint.load_pretrained(path, params, 'ViT-Test_4')
  # The integer step of an optimizer-state dump is not a parameter: still read.
  np.savez(path, **{f'opt/target/{k}': np.asarray(v) for k, v in checkpoint.flatten(params).items()},
           **{'opt/state/step': np.array(7, dtype)})
  assert sorted(checkpoint.load_flat(path)) == sorted(checkpoint.flatten(params))


# --- case 7: metrics survive SIGKILL ---------------------------------------------------

def _read_event_steps(path):
  """Steps of the scalar events in a TFRecord event file, parsed without TensorFlow."""
  from tensorboard.compat.proto import event_pb2  # pylint: disable=g-import-not-at-top
  steps = []
  with open(path, 'rb') as f:
    data = f.read()
  pos = 0
  while pos + 12 <= len(data):
    (length,) = struct.unpack('<Q', data[pos:pos + 8])
    record = data[pos + 12:pos + 12 + length]
    if len(record) < length:
      break
    event = event_pb2.Event.FromString(record)
    if event.summary.value:
      steps.append(event.step)
    pos += 12 + length + 4
  return steps


def test_case7_metrics_survive_sigkill(tmp_path):
  pytest.importorskip('tensorboard')
  workdir = tmp_path / 'run'
  # TensorFlow is hidden so tensorboard uses its own file writer, as on a
  # machine without TensorFlow (and the subprocess starts in a second).
  code = textwrap.dedent(f'''
      import sys, time
      sys.modules['tensorflow'] = None
      from vit_jax import metric_writers
      writer = metric_writers.create_default_writer({str(workdir)!r}, 250)
      for step in range(1, 251):
        writer.write_scalars(step, {{'train_loss': 1.0 / step}})
        if step == 200:
          writer.flush(fsync=True)  # what the trainer does when it saves a checkpoint
      print('written', flush=True)
      time.sleep(600)
  ''')
  proc = subprocess.Popen([sys.executable, '-c', code], cwd=REPO, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
  try:
    assert proc.stdout.readline().strip() == 'written', proc.stderr.read()
  finally:
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
  assert proc.returncode == -signal.SIGKILL
  lines = (workdir / 'metrics.jsonl').read_text().splitlines()
  assert [json.loads(line)['step'] for line in lines] == list(range(1, 251))
  (events,) = glob.glob(str(workdir / 'events.out.tfevents.*'))
  assert _read_event_steps(events) == list(range(1, 251))


# --- case 8: a full disk names the path and the free space ---------------------------

def test_case8_disk_full_names_path_and_free_space(tmp_path, params, monkeypatch, capsys):
  def no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

  monkeypatch.setattr(np, 'savez', no_space)
  target = tmp_path / 'params.npz'
  with pytest.raises(OSError) as e:
    checkpoint.save(params, target)
  assert e.value.errno == errno.ENOSPC and e.value.filename == str(target)
  assert os.listdir(tmp_path) == []  # no temporary file left behind
  message = cli.user_error_message(e.value)
  assert message.startswith(f"No space left on device writing '{target}' (")
  assert message.endswith(' free there)')
  assert cli.report_user_error(e.value) == 2
  assert capsys.readouterr().err == f'error: {message}\n'


def _fail_second_save(monkeypatch, error):
  """Orbax's save raises `error` from the second checkpoint on."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  real_save = ocp.CheckpointManager.save
  calls = []

  def save(self, step, *args, **kwargs):
    calls.append(step)
    if len(calls) > 1:
      raise error
    return real_save(self, step, *args, **kwargs)

  monkeypatch.setattr(ocp.CheckpointManager, 'save', save)


def test_case8_disk_full_in_a_checkpoint_save(tmp_path, monkeypatch):
  """ENOSPC from Orbax, bare, or deep in the errors its background threads raise (found
  by the next save or wait): one CheckpointDiskFullError naming the step that failed;
  the checkpoint before it survives."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  state = {'w': jnp.ones(3)}
  no_space = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
  _fail_second_save(monkeypatch, no_space)
  checkpointer = train_checkpoints.RunCheckpointer(str(tmp_path / 'bare'))
  checkpointer.save(1, state)
  with pytest.raises(train_checkpoints.CheckpointDiskFullError) as e:
    checkpointer.save(2, state)
  checkpointer.close()  # does not raise it again
  assert (e.value.errno, e.value.filename) == (errno.ENOSPC, str(tmp_path / 'bare/checkpoints/2'))
  monkeypatch.undo()
  assert train_checkpoints.load_latest(str(tmp_path / 'bare'))[0] == 1

  try:
    raise ValueError('Save Finalize thread (save_finalize) failed.') from no_space
  except ValueError as wrapped:
    error = wrapped
  real_wait = ocp.CheckpointManager.wait_until_finished
  pending = []

  def wait(self):
    real_wait(self)
    if pending:  # the asynchronous save of step 4 failed in the background
      pending.clear()
      raise error

  monkeypatch.setattr(ocp.CheckpointManager, 'wait_until_finished', wait)
  checkpointer = train_checkpoints.RunCheckpointer(str(tmp_path / 'async'))
  checkpointer.save(3, state)
  checkpointer.save(4, state)
  pending.append(4)
  with pytest.raises(train_checkpoints.CheckpointDiskFullError) as e:
    checkpointer.save(5, state)  # finds step 4's failure
  checkpointer.close()
  assert e.value.filename == str(tmp_path / 'async/checkpoints/4')
  message = cli.user_error_message(e.value)
  assert message.startswith(f"No space left on device writing '{tmp_path}/async/checkpoints/4' (")
  assert message.endswith(' free there)')


def test_case8_orbax_disk_full_tracebacks_not_logged(caplog):
  """Orbax logs each failed background write with its traceback; those are dropped
  (the error raised says it once), other Orbax records pass."""
  drop = train_checkpoints._DropOrbaxDiskFull()  # pylint: disable=protected-access
  orbax_file = '/site-packages/orbax/checkpoint/_src/checkpointers/async_checkpointer.py'
  try:
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
  except OSError:
    exc_info = sys.exc_info()
  failed = logging.LogRecord('absl', logging.ERROR, orbax_file, 1, 'Failed to run commit', (),
                             exc_info)
  other = logging.LogRecord('absl', logging.WARNING, orbax_file, 1, 'slow save', (), None)
  ours = logging.LogRecord('absl', logging.ERROR, '/vit_jax/train.py', 1,
                           'No space left on device', (), None)
  # asyncio's report of a write coroutine nobody awaited, as Orbax leaves them.
  unretrieved = logging.LogRecord(
      'asyncio', logging.ERROR, '/usr/lib/python3.11/asyncio/base_events.py', 1,
      "Task exception was never retrieved\nfuture: <Task finished exception=ValueError("
      "'RESOURCE_EXHAUSTED: ... No space left on device')>", (), None)
  loop_closed = logging.LogRecord('asyncio', logging.ERROR, '/asyncio/base_events.py', 1,
                                  'Exception in callback', (), None)
  assert [drop.filter(r) for r in (failed, other, ours, unretrieved, loop_closed)] == [
      False, True, True, False, True]
  train_checkpoints._install_log_filter()  # pylint: disable=protected-access
  assert any(isinstance(f, train_checkpoints._DropOrbaxDiskFull)  # pylint: disable=protected-access
             for f in logging.getLogger('asyncio').filters)



# --- case 9: the smaller items ---------------------------------------------------------

def test_case9_16bit_greyscale_png_not_saturated(tmp_path):
  from PIL import Image  # pylint: disable=g-import-not-at-top
  ramp = np.tile(np.linspace(0, 65535, 64).astype(np.uint16), (64, 1))
  path = tmp_path / 'grey16.png'
  Image.fromarray(ramp).save(path)
  assert Image.open(path).mode == 'I;16'
  image = predict.load_image(str(path), 64)
  assert image.shape == (64, 64, 3) and image.dtype == np.float32
  expected = ramp.astype(np.float32) / 65535 * 2 - 1
  np.testing.assert_allclose(image[..., 0], expected, atol=1e-5)
  np.testing.assert_array_equal(image[..., 0], image[..., 2])
  assert np.mean(image >= 1.0) < 0.05  # was 98% of pixels at +1
  # The same as the 8-bit image of the same picture, to 8-bit precision.
  eight = predict.load_image((ramp >> 8).astype(np.uint8), 64)
  assert np.abs(eight - image).max() < 2 / 255 + 1e-6
  np.testing.assert_allclose(predict.load_image(ramp, 64), image, atol=1e-6)


def _png_header_only(width, height):
  """A PNG whose IHDR says width x height (greyscale 8-bit) with one empty IDAT."""
  def chunk(kind, data):
    return (struct.pack('>I', len(data)) + kind + data
            + struct.pack('>I', zlib.crc32(kind + data) & 0xffffffff))
  ihdr = struct.pack('>IIBBBBB', width, height, 8, 0, 0, 0, 0)
  return (b'\x89PNG\r\n\x1a\n' + chunk(b'IHDR', ihdr) + chunk(b'IDAT', zlib.compress(b''))
          + chunk(b'IEND', b''))


def test_case9_huge_image_is_a_clear_error(tmp_path, good_npz, capsys):
  path = tmp_path / 'huge.png'
  path.write_bytes(_png_header_only(15000, 15000))
  with pytest.raises(ValueError, match=r"Cannot read image '.*huge.png': Image size "
                     r'\(225000000 pixels\) exceeds limit'):
    predict.load_image(str(path), 32)
  assert predict.main(['--model', 'ViT-Test_4', '--checkpoint', str(good_npz),
                       '--image', str(path)]) == 2
  err = capsys.readouterr().err
  assert err.count('\n') == 1 and 'huge.png' in err and 'MAX_IMAGE_PIXELS' in err


def test_case9_negative_top_k_refused(good_npz, png, capsys):
  with pytest.raises(SystemExit) as e:
    predict.main(['--model', 'ViT-Test_4', '--checkpoint', str(good_npz), '--image', png,
                  '--top_k', '-3'])
  assert e.value.code == 2
  assert "argument --top_k: must be a positive integer, got '-3'" in capsys.readouterr().err
  with pytest.raises(ValueError, match='positive'):
    predict.top_k(np.ones(4) / 4, 0)
  assert len(predict.top_k(np.ones(4) / 4, 10)) == 4


def test_case9_save_writes_normal_permissions(tmp_path, params):
  old = os.umask(0o022)
  try:
    checkpoint.save(params, tmp_path / 'a.npz')
    os.umask(0o027)
    checkpoint.save(params, tmp_path / 'b.npz')
  finally:
    os.umask(old)
  assert stat.S_IMODE(os.stat(tmp_path / 'a.npz').st_mode) == 0o644
  assert stat.S_IMODE(os.stat(tmp_path / 'b.npz').st_mode) == 0o640


def test_case9_text_file_renamed_npz(tmp_path):
  path = tmp_path / 'notes.npz'
  path.write_text('these are my notes\n')
  with pytest.raises(ValueError) as e:
    checkpoint.load(path)
  assert 'not an npz (zip) file' in str(e.value) and str(path) in str(e.value)
  assert 'pickl' not in str(e.value)


def test_case9_bad_safetensors_names_the_file(tmp_path, capsys):
  pytest.importorskip('safetensors')
  from vit_jax import convert  # pylint: disable=g-import-not-at-top
  path = tmp_path / 'model.safetensors'
  for content in (b'hello', b'\xff' * 8 + b'{}', struct.pack('<Q', 10**12) + b'{'):
    path.write_bytes(content)
    with pytest.raises(ValueError, match=rf"Cannot read safetensors file '{path}': not a valid"):
      convert.read_torch_file(str(path))
  assert convert.main(['--from', 'timm', '--to', 'npz', '--model', 'ViT-Test_4',
                       '--input', str(path), '--output', str(tmp_path / 'out.npz')]) == 2
  err = capsys.readouterr().err
  assert err.count('\n') == 1 and 'model.safetensors' in err


def test_case9_resnet_into_vit_names_the_file(tmp_path, params):
  bit = random_params('BiT-Test', 10, 32)
  path = tmp_path / 'BiT-M-R50x1.npz'
  checkpoint.save(bit, path)
  with pytest.raises(ValueError, match=rf"Checkpoint '{path}' looks like a 'resnet' model but "
                     "the target model is 'vit'"):
    checkpoint.load_pretrained(path, params, 'ViT-Test_4')
  # A tree read from the file (as train does to drop the head) keeps the name.
  with pytest.raises(ValueError, match=rf"Checkpoint '{path}' looks like a 'resnet' model"):
    checkpoint.load_pretrained(checkpoint.load(path), params, 'ViT-Test_4',
                               source_name=str(path))


# --- user errors are one clear message --------------------------------------------------

def test_user_errors_one_message_exit_2_traceback_on_request(tmp_path, png):
  (tmp_path / 'notes.npz').write_text('text')
  args = ['--model', 'ViT-Test_4', '--checkpoint', str(tmp_path / 'notes.npz'), '--image', png]
  code = f'import sys; from vit_jax import predict; sys.exit(predict.main({args!r}))'
  quiet = subprocess.run([sys.executable, '-c', code], cwd=REPO, capture_output=True, text=True,
                         timeout=240, env=dict(os.environ, VIT_JAX_TRACEBACK='0'))
  assert quiet.returncode == 2
  assert quiet.stderr.strip().splitlines()[-1].startswith('error: Cannot read checkpoint')
  assert 'Traceback' not in quiet.stderr and 'not an npz (zip) file' in quiet.stderr
  loud = subprocess.run([sys.executable, '-c', code], cwd=REPO, capture_output=True, text=True,
                        timeout=240, env=dict(os.environ, VIT_JAX_TRACEBACK='1'))
  assert loud.returncode == 2 and 'Traceback (most recent call last)' in loud.stderr
  assert loud.stderr.strip().splitlines()[-1].startswith('error: Cannot read checkpoint')


def run_main(args, capsys, monkeypatch):
  """`python -m vit_jax.main ARGS` in this process: (exit status, stderr)."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  from vit_jax import main as vit_main  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(sys, 'excepthook', sys.excepthook)  # main filters them; put back
  monkeypatch.setattr(sys, 'unraisablehook', sys.unraisablehook)
  capsys.readouterr()
  # config_flags defines a flag per override, found in sys.argv, at each parse: drop
  # those of an earlier parse in this process.
  for name in [n for n in flags.FLAGS if n.startswith('config.')]:
    delattr(flags.FLAGS, name)
  monkeypatch.setattr(sys, 'argv', ['vit_jax.main', *args])
  flags.FLAGS(sys.argv)
  try:
    vit_main.main(['vit_jax.main'])
    status = 0
  except SystemExit as e:
    status = e.code
  finally:
    flags.FLAGS.unparse_flags()
  return status, capsys.readouterr().err


def test_user_errors_main_one_message_exit_2(tmp_path, capsys, monkeypatch):
  monkeypatch.setenv('VIT_JAX_TRACEBACK', '0')
  default = f'--config={write_run_config(tmp_path / "config.py")}'
  workdir = f'--workdir={tmp_path / "run"}'
  status, err = run_main([default, workdir, '--config.bad_images=sometimes'], capsys,
                         monkeypatch)
  assert status == 2
  assert err.strip().splitlines()[-1] == (
      "error: Unknown config.bad_images='sometimes'; expected one of ('raise', 'skip')")
  assert 'Traceback' not in err
  status, err = run_main([default, workdir, '--verbose', '--config.bad_images=sometimes'],
                         capsys, monkeypatch)
  assert status == 2 and 'Traceback (most recent call last)' in err
  missing = tmp_path / 'no_images'
  monkeypatch.setenv('VIT_JAX_TRACEBACK', '1')
  status, err = run_main([default, workdir, f'--config.dataset=image_folder:{missing}'],
                         capsys, monkeypatch)
  assert status == 2 and 'Traceback (most recent call last)' in err
  assert err.strip().splitlines()[-1].startswith(f"error: Image folder '{missing}' ")


def test_case8_user_errors_main_disk_full_one_line(tmp_path, capsys, monkeypatch):
  """A whole run whose second checkpoint meets a full disk (the error wrapped as Orbax's
  background threads raise it): one line naming the path and the free space, exit 2,
  the first checkpoint kept, the workdir's lock released."""
  monkeypatch.setenv('VIT_JAX_TRACEBACK', '0')
  try:
    raise ValueError('Save Finalize thread (save_finalize) failed.') from OSError(
        errno.ENOSPC, os.strerror(errno.ENOSPC))
  except ValueError as wrapped:
    _fail_second_save(monkeypatch, wrapped)
  workdir = tmp_path / 'run'
  status, err = run_main([f'--config={write_run_config(tmp_path / "config.py")}',
                          f'--workdir={workdir}'], capsys, monkeypatch)
  assert status == 2
  last = err.strip().splitlines()[-1]
  assert last.startswith(f"error: No space left on device writing '{workdir}/checkpoints/8' (")
  assert last.endswith(' free there)')
  assert 'Traceback' not in err and 'orbax' not in err
  monkeypatch.undo()
  assert train_checkpoints.load_latest(str(workdir))[0] == 4
  assert (workdir / '.lock').read_text() == ''


def _one_error_line(status, err, fragment):
  errors = [line for line in err.splitlines() if line.startswith('error:')]
  assert status == 2 and len(errors) == 1 and fragment in errors[0], err[-3000:]
  assert 'Traceback' not in err, err[-3000:]


REFUSED_RESUMES = {
    'invalid value': (['--config.dtype=float8'], "Unknown config.dtype='float8'"),
    'history change': (['--config.batch_size=32'], 'batch_size 16 -> 32'),
    'another model': (['--config.model_name=ViT-Digits_4'], 'belongs to a different run'),
    'unknown resume policy': (['--config.resume_changes=bogus'],
                              "Unknown config.resume_changes='bogus'"),
}


def test_refused_run_keeps_the_record_and_leaves_no_fresh_workdir(trained_run, tmp_path, capsys,
                                                                  monkeypatch):
  """Issue 31 (7): a refused rerun of a finished run (bad value, changed history, another
  model, unknown resume policy) leaves its config.json and checkpoints byte for byte; a
  refused fresh run (unknown resume policy, missing images) leaves no workdir behind."""
  from test_cli_errors import tree_digest  # pylint: disable=g-import-not-at-top
  monkeypatch.setenv('VIT_JAX_TRACEBACK', '0')
  config = f'--config={write_run_config(tmp_path / "config.py")}'
  from vit_jax import main as vit_main  # pylint: disable=g-import-not-at-top
  from vit_jax.configs import schema  # pylint: disable=g-import-not-at-top
  workdir = copy_run(trained_run, tmp_path)  # the finished run main would have recorded
  vit_main._write_config(schema.resolve(tiny_run_config()), str(workdir))  # pylint: disable=protected-access
  before = tree_digest(workdir)
  assert 'config.json' in before and any(k.startswith('checkpoints/') for k in before)
  for extra, fragment in REFUSED_RESUMES.values():
    status, err = run_main([config, f'--workdir={workdir}', *extra], capsys, monkeypatch)
    _one_error_line(status, err, fragment)
    assert tree_digest(workdir) == before, extra
  fresh = tmp_path / 'fresh'
  for extra, fragment in [(['--config.resume_changes=bogus'], 'resume_changes'),
                          ([f'--config.dataset=image_folder:{tmp_path / "none"}'],
                           'Image folder')]:
    status, err = run_main([config, f'--workdir={fresh}', *extra], capsys, monkeypatch)
    _one_error_line(status, err, fragment)
    assert not fresh.exists(), os.listdir(fresh)


_BAD_TRAINING_IMAGES_SCRIPT = r'''
import os, sys
from vit_jax import cli
cli.quiet_console()  # as every command does, before TensorFlow loads
import ast
from vit_jax import input_pipeline as ip
from vit_jax.configs import schema
for config in ast.literal_eval(sys.argv[1]):  # pipeline_config()s, as dicts
  batches = ip.iterate_numpy(ip.get_train_dataset(schema.resolve(config),
                                                  process_index=0, process_count=1))
  try:
    for _ in range(4):
      next(batches)
    print('no error for', config['dataset'])
  except ip.BadImageError as e:
    print('error:', str(e).splitlines()[0])
'''


def test_bad_training_images_leave_no_tensorflow_tracebacks(tmp_path):
  """Issue 31 (8): a text file named .jpg, garbage, a truncated and a 0-byte JPEG, and a PNG
  declaring 30000x30000 pixels in the training split: each is one line naming the file, in
  a console free of TensorFlow's failed-op warnings (EagerPyFunc tracebacks), with the
  environment a user has (no TF_CPP_MIN_LOG_LEVEL, no JAX_PLATFORMS)."""
  bad = dict(BAD_FILES, **{'huge.png': (_png_header_only(30000, 30000), 'pixels')})
  configs = []
  for name, (content, _) in sorted(bad.items()):
    root = tmp_path / name.replace('.', '_')
    write_images(root, 'train', per_class=3)
    (root / 'train' / 'dog' / name).write_bytes(content)
    configs.append(pipeline_config(root).to_dict())
  env = {k: v for k, v in os.environ.items()
         if k not in ('TF_CPP_MIN_LOG_LEVEL', 'JAX_PLATFORMS', 'VIT_JAX_TRACEBACK')}
  result = subprocess.run([sys.executable, '-c', _BAD_TRAINING_IMAGES_SCRIPT,
                           repr(configs)],
                          cwd=REPO, capture_output=True, text=True, timeout=300,
                          env=dict(env, PYTHONPATH=REPO))
  console = result.stdout + result.stderr
  assert result.returncode == 0, console[-3000:]
  errors = [line for line in console.splitlines() if line.startswith('error:')]
  assert len(errors) == len(bad), console[-3000:]
  for line, (name, (_, reason)) in zip(errors, sorted(bad.items())):
    assert f"/train/dog/{name}' (split 'train'" in line and reason in line, (name, line)
  for noise in ('Traceback', 'EagerPyFunc', 'op_kernel', 'local_rendezvous', 'W0000'):
    assert noise not in console, (noise, console[-3000:])
  assert len(console.splitlines()) == len(bad), console[-3000:]


def test_a_huge_head_is_never_read(tmp_path, params):
  """Issue 31 (10): a ViT-Test_4 checkpoint whose head declares 1 GiB of deflated zeros
  (8.4M classes; a ~1 MB file). predict refuses it from the header; fine-tuning with a new
  head (reset_head, or another class count) never reads it; the default cap is half the
  machine's memory. Peak RSS measured in a fresh process."""
  classes = (1 << 30) // (32 * 4)
  path = tmp_path / 'big_head.npz'
  with zipfile.ZipFile(path, 'w', zipfile.ZIP_DEFLATED, compresslevel=1) as zf:
    for key, value in checkpoint.flatten(params).items():
      if not key.startswith('head/'):
        buffer = io.BytesIO()
        np.lib.format.write_array(buffer, np.asarray(value))
        zf.writestr(f'{key}.npy', buffer.getvalue())
    write_npz_member(zf, 'head/kernel', (32, classes), fill_bytes=32 * classes * 4)
    write_npz_member(zf, 'head/bias', (classes,), fill_bytes=classes * 4)
  assert os.path.getsize(path) < 8 << 20
  result = run_python(f'''
      import os, jax, numpy as np
      from vit_jax import checkpoint, predict
      from vit_jax.configs import models

      def peak_mb():  # this process's own peak (ru_maxrss counts the forking parent's too)
        with open('/proc/self/status') as f:
          return int([l.split()[1] for l in f if l.startswith('VmHWM:')][0]) // 1024

      half = os.sysconf('SC_PHYS_PAGES') * os.sysconf('SC_PAGE_SIZE') // 2
      print('cap', checkpoint.max_npz_bytes() == half)
      model = models.build_model('ViT-Test_4', 10)
      init = jax.eval_shape(lambda: model.init(jax.random.key(0), np.zeros((1, 32, 32, 3)),
                                               train=False))['params']
      base = peak_mb()
      try:
        predict.load_model('ViT-Test_4', {str(path)!r})
      except ValueError as e:
        print('predict', str(e).splitlines()[0])
      flat = checkpoint.load_flat({str(path)!r}, without_head=True)  # reset_head
      print('reset_head', sorted(k for k in flat if k.startswith('head/')))
      tuned = checkpoint.load_pretrained({str(path)!r}, init, 'ViT-Test_4')  # 10 classes
      print('finetune', tuned['head']['kernel'].shape, float(abs(tuned['head']['kernel']).max()))
      print('grown_mb', peak_mb() - base)
  ''', env={'VIT_JAX_MAX_NPZ_BYTES': ''})
  lines = dict(line.split(' ', 1) for line in result.stdout.strip().splitlines())
  assert lines.get('cap') == 'True', result.stdout + result.stderr[-3000:]
  assert 'its head declares 8,388,608 classes' in lines['predict'], lines
  assert lines['reset_head'] == '[]'
  assert lines['finetune'] == '(32, 10) 0.0'
  assert int(lines['grown_mb']) < 200, lines  # reading the head would add 1024 MiB
