"""A training process killed (SIGKILL) or stopped (SIGTERM) mid-run resumes exactly.

The run is `python -m vit_jax.main` in a subprocess on synthetic data; the
restarted run must end with exactly the params of an uninterrupted run (and take
over the workdir lock the killed run left).
"""

import os
import signal
import subprocess
import sys
import textwrap
import time

import chex
import ml_collections
import pytest

from vit_jax import train
from vit_jax import train_checkpoints

# Whole training runs (a minute or more on 2 CPU cores): the slow tier.
pytestmark = pytest.mark.slow

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A checkpoint every other step makes the run wait for its saves, so it lasts
# long enough (seconds) to be killed part-way through, and the kill often lands
# in the middle of a save.
CONFIG = dict(
    model_name='ViT-Test_4', model=dict(transformer=dict(num_layers=1)), dataset='synthetic',
    num_classes=4, image_size=8, synthetic_noise=0.3, num_eval_examples=32, batch_size=16,
    eval_batch_size=16, seed=3, optimizer='adamw', learning_rate=3e-3, weight_decay=0.01,
    schedule='cosine', warmup_steps=3, total_steps=20, grad_clip_norm=1.0,
    loss='softmax_xent', log_every=10, eval_every=0, checkpoint_every=2, keep_checkpoints=2)


def write_config(path):
  path.write_text(textwrap.dedent(f'''
      import ml_collections
      def get_config():
        return ml_collections.ConfigDict({CONFIG!r})
      '''))
  return str(path)


def start_run(config_path, workdir, *extra_args):
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=8',
             JAX_PLATFORMS='cpu', PYTHONUNBUFFERED='1')
  return subprocess.Popen(
      [sys.executable, '-m', 'vit_jax.main', f'--config={config_path}',
       f'--workdir={workdir}', *extra_args],
      cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def wait_for_checkpoint(proc, workdir, timeout=300):
  """Waits until a complete checkpoint exists (Orbax renames a finished save to its step)."""
  ckpt_dir = os.path.join(workdir, 'checkpoints')
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline:
    if os.path.isdir(ckpt_dir) and any(name.isdigit() for name in os.listdir(ckpt_dir)):
      return
    if proc.poll() is not None:
      pytest.fail(f'run ended before its first checkpoint:\n{proc.stderr.read()[-3000:]}')
    time.sleep(0.02)
  proc.kill()
  pytest.fail('no checkpoint within the time limit')


@pytest.fixture(scope='module')
def reference(tmp_path_factory):
  """Params of the uninterrupted run (in this process, the same 8 devices)."""
  workdir = tmp_path_factory.mktemp('uninterrupted')
  config = ml_collections.ConfigDict(CONFIG)
  config.checkpoint_every = 0  # saves at the end only; the same computation
  result = train.train_and_evaluate(config, str(workdir))
  assert result['step'] == CONFIG['total_steps']
  return train_checkpoints.load_latest(str(workdir))[1]['params']


def _assert_same_params(workdir, reference):
  step, state = train_checkpoints.load_latest(str(workdir))
  assert step == CONFIG['total_steps']
  chex.assert_trees_all_equal(state['params'], reference)


def test_sigkill_then_restart_matches_uninterrupted(tmp_path, reference):
  config_path = write_config(tmp_path / 'config.py')
  workdir = tmp_path / 'run'
  proc = start_run(config_path, workdir)
  wait_for_checkpoint(proc, str(workdir))
  proc.send_signal(signal.SIGKILL)
  proc.wait(timeout=60)
  assert not (workdir / 'final_metrics.json').exists(), 'the run finished before the kill'
  killed_at = train_checkpoints.RunCheckpointer(str(workdir)).latest_step()
  assert killed_at is not None and killed_at < CONFIG['total_steps']

  # The restart also keeps freed host memory (vit_jax.host_memory): same numbers.
  restarted = start_run(config_path, workdir, '--retain_host_memory')
  _, err = restarted.communicate(timeout=600)
  assert restarted.returncode == 0, err[-3000:]
  assert 'Resuming from step' in err
  # The killed run's lock was released by the kernel; the restart says whose it took over.
  assert f'from pid {proc.pid} on host' in err and 'killed?' in err
  _assert_same_params(workdir, reference)


def test_sigterm_saves_a_checkpoint_and_exits(tmp_path):
  config_path = write_config(tmp_path / 'config.py')
  workdir = tmp_path / 'run'
  proc = start_run(config_path, workdir)
  wait_for_checkpoint(proc, str(workdir))
  proc.send_signal(signal.SIGTERM)
  _, err = proc.communicate(timeout=120)
  assert proc.returncode == 143, err[-3000:]
  assert 'after saving a checkpoint' in err
  assert not (workdir / 'final_metrics.json').exists()
  checkpointer = train_checkpoints.RunCheckpointer(str(workdir))
  stopped_at = checkpointer.latest_step()
  assert 0 < stopped_at < CONFIG['total_steps']
  _, meta = checkpointer.restore(stopped_at)
  assert meta['data_start_step'] == stopped_at
  # Resuming from such a checkpoint is exact: see the SIGKILL test above.
