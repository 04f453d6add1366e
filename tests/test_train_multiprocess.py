"""Two processes on localhost (4 CPU devices each) train like one process with 8.

Both processes run `python -m vit_jax.main` with `--coordinator_address`,
`--num_processes` and `--process_id`; each feeds its half of every global batch.
The losses they log and the params they end with must match the single-process
8-device run of the same config. Their workdir is in a Cloud Storage bucket (a local
emulator, as on a Cloud TPU slice): both write their shards of each checkpoint there.

Launch checks on the same entry point: processes given different workdirs (a
workdir that is not shared) both refuse at start in one line naming their path;
SIGTERM makes both processes save one checkpoint at an agreed step and exit with
143, and the rerun resumes from it.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

import jax
import ml_collections
import numpy as np
import pytest

from gcs_emulator import BUCKET, Emulator
from vit_jax import checkpoint
from vit_jax import train
from vit_jax import train_checkpoints

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CONFIG = dict(
    model_name='ViT-Test_4', model=dict(transformer=dict(num_layers=1)), dataset='synthetic', num_classes=4, image_size=8,
    synthetic_noise=0.3, num_eval_examples=64, batch_size=16, eval_batch_size=16, seed=1,
    optimizer='sgd', learning_rate=0.1, schedule='cosine', warmup_steps=2, total_steps=12,
    grad_clip_norm=1.0, loss='softmax_xent', log_every=4, eval_every=6,
    checkpoint_every=6, export_params=True)


def free_port():
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def losses_of(lines):
  records = [json.loads(line) for line in lines]
  return {r['step']: r['train_loss'] for r in records if 'train_loss' in r}


def train_losses(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return losses_of(f)


@pytest.mark.slow
def test_two_processes_match_one_process(tmp_path, monkeypatch):
  """The two processes share a workdir in a Cloud Storage bucket (a local emulator,
  tests/gcs_emulator.py): each writes its shards there, and they restore."""
  assert jax.device_count() == 8
  reference_dir = tmp_path / 'one_process'
  reference = train.train_and_evaluate(ml_collections.ConfigDict(CONFIG), str(reference_dir))

  config_path = tmp_path / 'config.py'
  config_path.write_text(textwrap.dedent(f'''
      import ml_collections
      def get_config():
        return ml_collections.ConfigDict({CONFIG!r})
      '''))
  bucket = Emulator().start()
  try:
    workdir = f'gs://{BUCKET}/two_processes'
    port = free_port()
    env = dict(os.environ, **bucket.env, XLA_FLAGS='--xla_force_host_platform_device_count=4',
               JAX_PLATFORMS='cpu', PYTHONUNBUFFERED='1')
    procs = [
        subprocess.Popen(
            [sys.executable, '-m', 'vit_jax.main', f'--config={config_path}',
             f'--workdir={workdir}', f'--coordinator_address=127.0.0.1:{port}',
             '--num_processes=2', f'--process_id={i}', '--platform=cpu'],
            cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        for i in range(2)
    ]
    errors = []
    try:
      for p in procs:
        _, err = p.communicate(timeout=480)
        errors.append(err)
    finally:
      for p in procs:
        if p.poll() is None:
          p.kill()
    for p, err in zip(procs, errors):
      assert p.returncode == 0, err[-4000:]
    assert 'process 1 of 2' in errors[1] or 'process 1 of 2' in errors[0]

    final = json.loads(bucket.read('two_processes/final_metrics.json'))
    assert final['num_processes'] == 2 and final['num_devices'] == 8
    assert final['eval_accuracy'] == reference['eval_accuracy']
    losses_two = losses_of(bucket.read('two_processes/metrics.jsonl').decode().splitlines())
    losses_one = train_losses(reference_dir)
    assert sorted(losses_two) == sorted(losses_one) == [4, 6, 8, 12]  # also at eval steps
    np.testing.assert_allclose([losses_two[s] for s in (4, 6, 8, 12)],
                               [losses_one[s] for s in (4, 6, 8, 12)], rtol=1e-5, atol=1e-6)
    (tmp_path / 'params.npz').write_bytes(bucket.read('two_processes/params.npz'))
    params_two = checkpoint.load(tmp_path / 'params.npz')
    params_one = checkpoint.load(reference_dir / 'params.npz')
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                 params_two, params_one)
    # Each process wrote its own shards of the last checkpoint into the bucket ...
    shards = bucket.objects('two_processes/checkpoints/12/state/')
    for i in range(2):
      assert any(name.startswith(f'two_processes/checkpoints/12/state/ocdbt.process_{i}/')
                 for name in shards), shards
    # ... and they restore (here, in one process, onto one device).
    _, like = train_checkpoints.load_latest(str(reference_dir))
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
                          like)
    bucket.point_clients_here(monkeypatch)
    restored, meta = train_checkpoints.RunCheckpointer(workdir).restore(12, target)
    assert meta['step'] == 12
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                 jax.tree.map(np.asarray, restored['params']), params_one)
  finally:
    bucket.stop()


# ---------------------------------------------------------------------------
# Launch checks: a workdir the processes do not share, SIGTERM on a cluster.
# ---------------------------------------------------------------------------

LONG = dict(CONFIG, total_steps=100_000, log_every=2, eval_every=0, checkpoint_every=0,
            export_params=False)


def write_config(path, config):
  path.write_text(textwrap.dedent(f'''
      import ml_collections
      def get_config():
        return ml_collections.ConfigDict({config!r})
      '''))
  return path


def launch(config_path, workdirs, logs):
  """Process i of 2 on localhost with `--workdir=workdirs[i]`, its output in `logs[i]`."""
  port = free_port()
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=4',
             JAX_PLATFORMS='cpu', PYTHONUNBUFFERED='1')
  procs = []
  for i, (workdir, log) in enumerate(zip(workdirs, logs)):
    with open(log, 'w') as f:
      procs.append(subprocess.Popen(
          [sys.executable, '-m', 'vit_jax.main', f'--config={config_path}',
           f'--workdir={workdir}', f'--coordinator_address=127.0.0.1:{port}',
           '--num_processes=2', f'--process_id={i}', '--platform=cpu'],
          cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=f))
  return procs


def finish(procs, logs, timeout=300):
  """Exit statuses of `procs` (killed if still running after `timeout` s) and their logs."""
  try:
    for p in procs:
      p.wait(timeout=timeout)
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
  return [p.returncode for p in procs], [open(log).read() for log in logs]


def wait_for_step(procs, metrics_path, after: int, timeout=300) -> int:
  """The first logged training step beyond `after` (waits while both processes run)."""
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline:
    assert all(p.poll() is None for p in procs), 'a process ended before training'
    if metrics_path.exists():
      steps = [json.loads(line)['step'] for line in metrics_path.read_text().splitlines()
               if line.endswith('}') and 'train_loss' in line]
      if steps and steps[-1] > after:
        return steps[-1]
    time.sleep(0.5)
  raise AssertionError(f'no training step beyond {after} logged in {timeout} s')


def error_lines(log):
  return [line for line in log.splitlines() if line.startswith('error:')]


def test_workdir_not_shared_is_refused(tmp_path):
  """Each process gets its own directory: both refuse at start, naming their path."""
  config_path = write_config(tmp_path / 'config.py', LONG)
  workdirs = [tmp_path / 'host0_disk' / 'run', tmp_path / 'host1_disk' / 'run']
  logs = [tmp_path / 'process0.log', tmp_path / 'process1.log']
  statuses, outputs = finish(launch(config_path, workdirs, logs), logs)
  for workdir, status, output in zip(workdirs, statuses, outputs):
    errors = error_lines(output)
    assert status == 2 and len(errors) == 1, output[-4000:]
    assert f"'{workdir}' is not shared by the processes" in errors[0], errors
    assert 'process 1 does not see' in errors[0], errors
    assert not (workdir / 'checkpoints').exists()
  # A refused fresh run removes its workdir; where one is left, no probe file is.
  assert not workdirs[0].exists() or not [
      f for f in os.listdir(workdirs[0]) if f.startswith('.shared-check-')]


@pytest.mark.slow
def test_sigterm_saves_once_and_every_process_exits(tmp_path):
  """SIGTERM to every process (as a scheduler sends it), then to one only: each time
  both processes agree on one step, save it once and exit with 143; a rerun resumes."""
  config_path = write_config(tmp_path / 'config.py', LONG)
  workdir = tmp_path / 'shared_run'
  metrics_path = workdir / 'metrics.jsonl'
  checkpoints = workdir / 'checkpoints'

  logs = [tmp_path / 'first0.log', tmp_path / 'first1.log']
  procs = launch(config_path, [workdir] * 2, logs)
  try:
    wait_for_step(procs, metrics_path, after=0)
  finally:
    for p in procs:
      p.send_signal(signal.SIGTERM)
  statuses, outputs = finish(procs, logs)
  assert statuses == [143, 143], '\n\n'.join(o[-3000:] for o in outputs)
  saved = sorted(int(d) for d in os.listdir(checkpoints) if d.isdigit())
  assert len(saved) == 1 and saved[0] > 0, saved
  first_stop = saved[0]
  for output in outputs:
    assert f'Stopped at step {first_stop} after saving a checkpoint' in output, output[-3000:]

  logs = [tmp_path / 'rerun0.log', tmp_path / 'rerun1.log']
  procs = launch(config_path, [workdir] * 2, logs)
  try:
    resumed_step = wait_for_step(procs, metrics_path, after=first_stop)
  finally:
    procs[1].send_signal(signal.SIGTERM)  # one process only: the stop is still agreed
  statuses, outputs = finish(procs, logs)
  assert statuses == [143, 143], '\n\n'.join(o[-3000:] for o in outputs)
  for output in outputs:
    assert f'Resuming from step {first_stop}' in output, output[-3000:]
  saved = sorted(int(d) for d in os.listdir(checkpoints) if d.isdigit())
  assert len(saved) == 2 and saved[0] == first_stop and saved[1] >= resumed_step, saved
  for output in outputs:
    assert f'Stopped at step {saved[1]} after saving a checkpoint' in output, output[-3000:]
  logged = [json.loads(line)['step'] for line in metrics_path.read_text().splitlines()
            if 'train_loss' in line]
  assert logged == sorted(set(logged)), logged  # no step trained twice
