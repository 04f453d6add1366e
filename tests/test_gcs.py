"""Runs whose workdir is a Cloud Storage bucket (`--workdir=gs://...`), against a local emulator.

The emulator (tests/gcs_emulator.py) is reached only through the clients' own
variables; what the runs left in the bucket is listed and read with plain HTTP
requests of the JSON API, not through the code under test.
"""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import zipfile

import jax
import ml_collections
import numpy as np
import pytest

from gcs_emulator import BUCKET, Emulator
from test_train_resume import CONFIG as RESUME_CONFIG
from vit_jax import checkpoint
from vit_jax import storage
from vit_jax import train
from vit_jax import train_checkpoints

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# configs/default.py (the digits job), short.
DIGITS_OVERRIDES = dict(total_steps=12, warmup_steps=2, checkpoint_every=2, eval_every=0,
                        log_every=4, export_params=True)
# A run that lasts long enough to be stopped part-way (tests/test_train_resume.py's, longer).
TINY = dict(RESUME_CONFIG, total_steps=200, checkpoint_every=4)


@pytest.fixture(scope='module')
def gcs():
  emulator = Emulator().start()
  yield emulator
  emulator.stop()


@pytest.fixture
def in_process(gcs, monkeypatch):
  """This process's clients pointed at `gcs`."""
  gcs.point_clients_here(monkeypatch)
  return gcs


_STARTED = []


@pytest.fixture(autouse=True)
def _no_run_left():
  """Kills what a failed test left running (a run would hold the emulator's bucket)."""
  yield
  while _STARTED:
    proc = _STARTED.pop()
    if proc.poll() is None:
      proc.kill()
      proc.wait()


def start_main(emulator, workdir, *args, cwd, extra_env=None):
  env = dict(os.environ, **emulator.env, PYTHONPATH=REPO, JAX_PLATFORMS='cpu',
             PYTHONUNBUFFERED='1', XLA_FLAGS='--xla_force_host_platform_device_count=8',
             **(extra_env or {}))
  proc = subprocess.Popen([sys.executable, '-m', 'vit_jax.main', f'--workdir={workdir}', *args],
                          cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                          text=True)
  _STARTED.append(proc)
  return proc


def committed_steps(emulator, prefix):
  """Steps whose checkpoint Orbax committed (its commit file at the step's top)."""
  return sorted(int(name.split('/')[-2]) for name in emulator.objects(f'{prefix}/checkpoints/')
                if name.endswith('/commit_success.txt') and name.count('/') == 3)


def wait_for_checkpoint(emulator, prefix, proc, after=0, timeout=300):
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline:
    steps = [s for s in committed_steps(emulator, prefix) if s > after]
    if steps:
      return steps[-1]
    if proc.poll() is not None:
      pytest.fail(f'the run ended before a checkpoint:\n{proc.stderr.read()[-3000:]}')
    time.sleep(0.1)
  proc.kill()
  pytest.fail('no checkpoint in the bucket within the time limit')


def error_lines(text):
  return [line for line in text.splitlines() if line.startswith('error:')]


def write_config(path, config):
  path.write_text(textwrap.dedent(f'''
      import ml_collections
      def get_config():
        return ml_collections.ConfigDict({config!r})
      '''))
  return str(path)


def digits_config():
  sys.path.insert(0, os.path.join(REPO, 'configs'))
  try:
    import default  # pylint: disable=g-import-not-at-top
  finally:
    sys.path.pop(0)
  config = default.get_config()
  config.update(DIGITS_OVERRIDES)
  return config


def test_digits_job_in_a_bucket_killed_and_resumed_bit_identical(gcs, in_process, tmp_path):
  """configs/default.py with --workdir=gs://...: everything in the bucket, nothing local;
  a second run is refused while it runs; SIGKILLed, the rerun resumes from the bucket
  and ends with the params of an uninterrupted run on a local disk."""
  reference_dir = tmp_path / 'local'
  train.train_and_evaluate(digits_config(), str(reference_dir))
  _, reference = train_checkpoints.load_latest(str(reference_dir))

  cwd = tmp_path / 'cwd'
  cwd.mkdir()
  workdir = f'gs://{BUCKET}/digits'
  args = [f'--config={REPO}/configs/default.py',
          *(f'--config.{k}={v}' for k, v in DIGITS_OVERRIDES.items())]
  first = start_main(gcs, workdir, *args, cwd=cwd)
  wait_for_checkpoint(gcs, 'digits', first)
  second = start_main(gcs, workdir, *args, cwd=cwd)  # the same command, while it runs
  _, err = second.communicate(timeout=120)
  assert second.returncode == 2 and len(error_lines(err)) == 1, err[-3000:]
  assert 'is in use by another run' in err and f'pid {first.pid}' in err
  first.send_signal(signal.SIGKILL)
  first.wait(timeout=60)
  killed_at = committed_steps(gcs, 'digits')[-1]
  assert killed_at < DIGITS_OVERRIDES['total_steps']
  assert 'digits/final_metrics.json' not in gcs.objects('digits/')
  assert 'digits/.lock' in gcs.objects('digits/')  # a killed run cannot release it

  rerun = start_main(gcs, workdir, *args, cwd=cwd)
  _, err = rerun.communicate(timeout=600)
  assert rerun.returncode == 0, err[-3000:]
  assert 'Resuming from step' in err
  assert f'from pid {first.pid} on host' in err and 'killed?' in err  # the stale lock

  names = gcs.objects('digits/')
  for name in ('config.json', 'metrics.jsonl', 'final_metrics.json', 'params.npz'):
    assert f'digits/{name}' in names
  assert any(n.startswith('digits/events.out.tfevents.') for n in names)
  assert committed_steps(gcs, 'digits')[-1] == DIGITS_OVERRIDES['total_steps']
  assert 'digits/.lock' not in names  # released at exit
  assert list(cwd.iterdir()) == []  # nothing written locally (no ./gs:/ folder)
  final = json.loads(gcs.read('digits/final_metrics.json'))
  assert final['step'] == DIGITS_OVERRIDES['total_steps'] and not final['preempted']
  steps = [json.loads(line)['step'] for line in gcs.read('digits/metrics.jsonl').splitlines()
           if b'train_loss' in line]
  assert steps[-1] == DIGITS_OVERRIDES['total_steps']
  assert json.loads(gcs.read('digits/config.json'))['total_steps'] == 12

  _, state = train_checkpoints.load_latest(workdir)
  jax.tree.map(np.testing.assert_array_equal, state['params'], reference['params'])
  exported = tmp_path / 'params.npz'
  exported.write_bytes(gcs.read('digits/params.npz'))
  jax.tree.map(np.testing.assert_array_equal, checkpoint.load(exported), reference['params'])


def test_bucket_that_does_not_exist_is_one_error_line_before_training(gcs, tmp_path):
  proc = start_main(gcs, 'gs://no-such-bucket/run', f'--config={REPO}/configs/default.py',
                    cwd=tmp_path)
  _, err = proc.communicate(timeout=120)
  assert proc.returncode == 2, err[-3000:]
  assert error_lines(err) == [
      "error: --workdir 'gs://no-such-bucket/run' cannot be written: bucket 'no-such-bucket' "
      'does not exist (or this account cannot see it)'], err[-3000:]
  assert 'JAX' not in err  # refused before JAX started
  assert list(tmp_path.iterdir()) == []


def test_storage_stopped_during_a_save_then_resumed_and_sigterm(tmp_path):
  """The bucket stops answering mid-run: the run stops at that save with one line and the
  checkpoints before it intact; once storage is back the rerun resumes, and SIGTERM then
  saves a checkpoint in the bucket and releases the lock."""
  emulator = Emulator(data_dir=str(tmp_path / 'bucket')).start()
  try:
    config = write_config(tmp_path / 'config.py', TINY)
    retries = {storage.GCS_RETRIES_ENV: '1'}
    proc = start_main(emulator, 'gs://bkt/run', f'--config={config}', cwd=tmp_path,
                      extra_env=retries)
    saved = wait_for_checkpoint(emulator, 'run', proc)
    emulator.stop()
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 2, err[-3000:]
    lines = error_lines(err)
    assert len(lines) == 1 and 'Traceback' not in err, err[-3000:]
    assert lines[0].startswith('error: Cloud Storage failed while saving the checkpoint '
                               'gs://bkt/run/checkpoints/')
    assert 'the checkpoints saved before it are intact' in lines[0]

    emulator.start()  # the same port and objects
    intact = committed_steps(emulator, 'run')
    assert saved in intact
    rerun = start_main(emulator, 'gs://bkt/run', f'--config={config}', cwd=tmp_path,
                       extra_env=retries)
    wait_for_checkpoint(emulator, 'run', rerun, after=intact[-1])
    rerun.send_signal(signal.SIGTERM)
    _, err = rerun.communicate(timeout=300)
    assert rerun.returncode == 143, err[-3000:]
    assert f'Resuming from step {intact[-1]}' in err
    assert 'after saving a checkpoint in gs://bkt/run/checkpoints' in err
    assert committed_steps(emulator, 'run')[-1] > intact[-1]
    assert 'run/.lock' not in emulator.objects('run/')
  finally:
    emulator.stop()


# -- published checkpoints in a bucket ---------------------------------------------------

NPZ_CONFIG = dict(TINY, total_steps=1, warmup_steps=0, checkpoint_every=0, num_classes=3)


def _published_npz(path):
  """A ViT-Test_4 checkpoint in the published layout (1000-class head), written here."""
  from vit_jax import validation  # pylint: disable=g-import-not-at-top
  from vit_jax.configs import schema  # pylint: disable=g-import-not-at-top
  config = schema.resolve(ml_collections.ConfigDict(dict(NPZ_CONFIG, num_classes=1000)))
  model = validation.build_model(config, 1000)
  params = model.init(jax.random.key(7), np.zeros((1, 8, 8, 3), np.float32), train=False)
  checkpoint.save(params['params'], path)
  return path


def test_published_npz_in_a_bucket_fine_tunes(gcs, in_process, tmp_path):
  local = _published_npz(tmp_path / 'ViT-Test_4.npz')
  gcs.upload('published/ViT-Test_4.npz', local.read_bytes())
  url = f'gs://{BUCKET}/published/ViT-Test_4.npz'
  from_bucket, from_disk = checkpoint.load_flat(url), checkpoint.load_flat(local)
  assert from_bucket.keys() == from_disk.keys()
  for key in from_disk:
    np.testing.assert_array_equal(from_bucket[key], from_disk[key])
  config = ml_collections.ConfigDict(dict(NPZ_CONFIG, pretrained_path=url))
  result = train.train_and_evaluate(config, str(tmp_path / 'finetune'),
                                    devices=jax.devices()[:1])  # one device: a quick compile
  assert result['step'] == 1
  _, state = train_checkpoints.load_latest(str(tmp_path / 'finetune'))
  assert state['params']['head']['kernel'].shape[-1] == 3  # a new head; the rest from the file


class _CountingFile:
  """Counts the bytes read through a file object."""

  def __init__(self, f, counter):
    self._f, self._counter = f, counter

  def read(self, n=-1):
    data = self._f.read(n)
    self._counter.append(len(data))
    return data

  def __getattr__(self, name):
    return getattr(self._f, name)

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self._f.close()


def test_terabyte_declared_array_in_a_bucket_refused_without_reading_it(gcs, in_process,
                                                                       tmp_path, monkeypatch):
  path = tmp_path / 'huge.npz'
  with zipfile.ZipFile(path, 'w') as zf:  # 1 TiB declared; 8 MiB of zeros really stored
    with zf.open('head/kernel.npy', 'w', force_zip64=True) as f:
      np.lib.format.write_array_header_1_0(f, {'descr': '<f4', 'fortran_order': False,
                                               'shape': (2**38,)})
      f.write(bytes(8 << 20))
  gcs.upload('huge.npz', path.read_bytes())
  read = []
  opened = storage.open
  monkeypatch.setattr(storage, 'open', lambda *a, **k: _CountingFile(opened(*a, **k), read))
  with pytest.raises(ValueError, match=r"'head/kernel' declares shape \(274877906944,\) "
                     r'float32, 1.0 TiB, more than the [0-9.]+ GiB limit'):
    checkpoint.load(f'gs://{BUCKET}/huge.npz')
  assert 0 < sum(read) < 64 << 10  # the zip directory and one header, not the data


_MEMORY_CHILD = textwrap.dedent('''
    import json, resource, sys, tracemalloc
    from vit_jax import checkpoint
    import etils.epath, gcsfs  # the bucket's clients, imported before measuring
    tracemalloc.start()  # numpy's buffers and the clients' bytes are traced
    flat = checkpoint.load_flat(sys.argv[1])
    print(json.dumps({'peak': tracemalloc.get_traced_memory()[1],
                      'maxrss_kib': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                      'bytes': sum(v.nbytes for v in flat.values())}))
''')


def _load_peak(gcs, path):
  env = dict(os.environ, **gcs.env, PYTHONPATH=REPO)
  proc = subprocess.run([sys.executable, '-c', _MEMORY_CHILD, path], capture_output=True,
                        text=True, env=env, timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  return json.loads(proc.stdout.strip().splitlines()[-1])


def test_bucket_checkpoint_loads_in_about_the_memory_of_a_local_one(gcs, tmp_path):
  path = tmp_path / 'big.npz'
  rng = np.random.default_rng(0)
  checkpoint.save({'Transformer': {'encoder_norm': {
      'scale': rng.normal(size=(48 << 20) // 4).astype(np.float32),
      'bias': rng.normal(size=(16 << 20) // 4).astype(np.float32)}}}, path)
  gcs.upload('big.npz', path.read_bytes())
  disk, bucket = _load_peak(gcs, str(path)), _load_peak(gcs, f'gs://{BUCKET}/big.npz')
  assert disk['bytes'] == bucket['bytes'] == 64 << 20
  print(f'loading 64 MiB of arrays: peak {disk["peak"] >> 20} MiB allocated from disk, '
        f'{bucket["peak"] >> 20} MiB from the bucket; process peak RSS '
        f'{disk["maxrss_kib"] >> 10} / {bucket["maxrss_kib"] >> 10} MiB')
  assert disk['peak'] >= 64 << 20
  assert bucket['peak'] <= 1.5 * disk['peak'], (disk, bucket)
  assert bucket['maxrss_kib'] <= 1.5 * disk['maxrss_kib'], (disk, bucket)
