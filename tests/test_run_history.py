"""A run never lies about its history, never loses work, and stops in one line.

- resuming with a changed field the trained weights depend on is refused naming the
  field and both values (or, with `resume_changes='continue'`, goes on with true
  figures); rerunning a finished run (export, evaluation) keeps its training figures;
- a checkpoint save on a full disk (a small tmpfs) stops the run at once with one line;
- Ctrl-C saves a checkpoint and exits with 130, a second one exits at once; the run
  resumes from what was saved.

Every case: the exit status, exactly one `error:` line, no traceback, the checkpoints
written before intact.
"""

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time

import ml_collections
import numpy as np
import pytest

from vit_jax import optimizers
from vit_jax import train
from vit_jax import train_checkpoints
from vit_jax.configs import schema

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

RUN = dict(
    model_name='ViT-Test_4', model=dict(transformer=dict(num_layers=1)), dataset='synthetic',
    num_classes=4, image_size=(8, 8), synthetic_noise=0.3, num_eval_examples=32, batch_size=16,
    eval_batch_size=16, seed=3, optimizer='adamw', learning_rate=3e-3, weight_decay=0.01,
    schedule='cosine', warmup_steps=3, total_steps=20, grad_clip_norm=1.0, log_every=5,
    eval_every=0, checkpoint_every=10, keep_checkpoints=3)
TRAINING_FIGURES = ('train_loss', 'train_seconds', 'steps_per_sec', 'images_per_sec',
                    'examples_seen', 'step')


def run_config(**overrides) -> ml_collections.ConfigDict:
  config = schema.base_config()
  config.update({**RUN, **overrides})
  return config


def write_config(path, **overrides):
  """A config file holding every schema field (so that any can be overridden)."""
  values = {**RUN, **overrides}
  path.write_text(textwrap.dedent(f'''
      from vit_jax.configs import schema
      def get_config():
        config = schema.base_config()
        config.update({values!r})
        return config
      '''))
  return str(path)


def error_lines(err: str) -> list[str]:
  return [line for line in err.splitlines() if line.startswith('error:')]


def assert_one_clean_error(err: str) -> str:
  """The one `error:` line of a console that shows no traceback."""
  assert 'Traceback' not in err and 'KeyboardInterrupt' not in err, err[-3000:]
  lines = error_lines(err)
  assert len(lines) == 1, err[-3000:]
  return lines[0]


def checkpoint_files(workdir) -> dict[str, bytes]:
  root = os.path.join(workdir, 'checkpoints')
  out = {}
  for folder, _, files in os.walk(root):
    for name in files:
      path = os.path.join(folder, name)
      with open(path, 'rb') as f:
        out[os.path.relpath(path, root)] = f.read()
  return out


def assert_every_checkpoint_restores(workdir):
  checkpointer = train_checkpoints.RunCheckpointer(str(workdir), async_save=False)
  try:
    steps = checkpointer.all_steps()
    assert steps
    for step in steps:
      state, meta = checkpointer.restore(step)
      train_checkpoints._verify_checksums(state, meta)  # pylint: disable=protected-access
    return steps
  finally:
    checkpointer.close()


def run_main(args, capsys, monkeypatch):
  """`python -m vit_jax.main ARGS` in this process: (exit status, stderr)."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  from vit_jax import main as vit_main  # pylint: disable=g-import-not-at-top
  monkeypatch.setenv('VIT_JAX_TRACEBACK', '0')
  monkeypatch.setattr(sys, 'excepthook', sys.excepthook)  # main filters them; put back
  monkeypatch.setattr(sys, 'unraisablehook', sys.unraisablehook)
  capsys.readouterr()
  for name in [n for n in flags.FLAGS if n.startswith('config.')]:
    delattr(flags.FLAGS, name)  # an earlier parse's overrides
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


@pytest.fixture(scope='module')
def finished_run(tmp_path_factory):
  """A finished 20-step run: (workdir, its final metrics)."""
  workdir = tmp_path_factory.mktemp('finished')
  train.train_and_evaluate(run_config(), str(workdir))
  return workdir, json.loads((workdir / 'final_metrics.json').read_text())


def copy_run(workdir, tmp_path):
  import shutil  # pylint: disable=g-import-not-at-top
  target = tmp_path / 'run'
  shutil.copytree(workdir, target)
  return target


# --- resuming with other values ----------------------------------------------------------

@pytest.mark.parametrize('field,value,shown', [
    ('batch_size', 32, 'batch_size 16 -> 32'),
    ('total_steps', 30, 'total_steps 20 -> 30'),
    ('learning_rate', 0.01, 'learning_rate 0.003 -> 0.01'),
    ('warmup_steps', 5, 'warmup_steps 3 -> 5'),
    ('schedule', 'linear', "schedule 'cosine' -> 'linear'"),
])
def test_resume_changing_history_is_refused_naming_field(finished_run, tmp_path, capsys,
                                                         monkeypatch, field, value, shown):
  workdir = copy_run(finished_run[0], tmp_path)
  before = checkpoint_files(workdir)
  status, err = run_main([f'--config={write_config(tmp_path / "config.py")}',
                          f'--workdir={workdir}', f'--config.{field}={value}'],
                         capsys, monkeypatch)
  assert status == 2
  line = assert_one_clean_error(err)
  assert line.startswith(f'error: The checkpoint at step 20 in {workdir}/checkpoints was '
                         'trained with other values')
  assert f'{shown} (checkpoint -> now)' in line and 'resume_changes=continue' in line
  assert checkpoint_files(workdir) == before
  assert json.loads((workdir / 'final_metrics.json').read_text()) == finished_run[1]


def test_resume_changes_continue_counts_examples_truly(finished_run, tmp_path, caplog):
  workdir = copy_run(finished_run[0], tmp_path)
  config = run_config(batch_size=32, total_steps=30, resume_changes='continue')
  with caplog.at_level('WARNING'):
    final = train.train_and_evaluate(config, str(workdir))
  assert final['step'] == 30
  assert final['examples_seen'] == 20 * 16 + 10 * 32  # not 30 * 32
  stated = [r.getMessage() for r in caplog.records if 'resume_changes=continue' in r.getMessage()]
  new_rate = float(optimizers.make_schedule(config)(20))
  assert stated and 'batch_size 16 -> 32, total_steps 20 -> 30' in stated[0]
  assert f'the learning rate of step 21 is {new_rate:.4g} (it was 0 under' in stated[0]
  _, meta = train_checkpoints.RunCheckpointer(str(workdir)).restore(30)
  assert meta['examples_seen'] == 640
  assert meta['resume_changes'] == [
      {'step': 20, 'changes': {'batch_size': [16, 32], 'total_steps': [20, 30]}}]
  assert meta['config']['batch_size'] == 32
  events = [json.loads(line) for line in (workdir / 'metrics.jsonl').read_text().splitlines()]
  logged = {e['step']: e['examples_seen'] for e in events if 'examples_seen' in e}
  assert logged[20] == 320 and logged[30] == 640
  # Both segments' training time count.
  assert final['train_seconds'] > finished_run[1]['train_seconds']


def test_unknown_resume_changes_value_named(finished_run, tmp_path):
  workdir = copy_run(finished_run[0], tmp_path)
  with pytest.raises(ValueError, match=r"config.resume_changes='sometimes'"):
    train.train_and_evaluate(run_config(resume_changes='sometimes', total_steps=30),
                             str(workdir))


@pytest.mark.parametrize('rerun', [
    {'export_params': True},  # as docs/visualize.md suggests
    {'eval_batch_size': 8, 'log_every': 1},  # evaluation and logging never count
])
def test_rerunning_a_finished_run_keeps_its_training_figures(finished_run, tmp_path, rerun):
  workdir = copy_run(finished_run[0], tmp_path)
  final = train.train_and_evaluate(run_config(**rerun), str(workdir))
  written = json.loads((workdir / 'final_metrics.json').read_text())
  for key in TRAINING_FIGURES:
    assert written[key] == finished_run[1][key] == final[key], key
  assert np.isfinite(written['train_loss']) and written['train_seconds'] > 0
  if rerun.get('export_params'):
    assert (workdir / 'params.npz').exists()


# --- a full disk ---------------------------------------------------------------------------

@pytest.fixture
def small_disk(tmp_path):
  """A 3 MiB tmpfs (a few checkpoints of ViT-Test_4); skipped where it cannot be mounted."""
  mount = tmp_path / 'disk'
  mount.mkdir()
  done = subprocess.run(['mount', '-t', 'tmpfs', '-o', 'size=3m', 'tmpfs', str(mount)],
                        capture_output=True, text=True)
  if done.returncode != 0:
    reason = f'cannot mount a tmpfs here: {(done.stderr or done.stdout).strip()}'
    print(reason)
    pytest.skip(reason)
  try:
    yield mount
  finally:
    subprocess.run(['umount', '-l', str(mount)], check=False)


def start_main(config_path, workdir, *extra):
  env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONUNBUFFERED='1', VIT_JAX_TRACEBACK='0')
  return subprocess.Popen([sys.executable, '-m', 'vit_jax.main', f'--config={config_path}',
                           f'--workdir={workdir}', *extra], cwd=REPO, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def logged_steps(out: str) -> list[int]:
  return [int(m) for m in re.findall(r'\] \[(\d+)/\d+ ', out)]


@pytest.mark.slow
def test_full_disk_stops_at_the_failed_save_in_one_line(tmp_path, small_disk):
  config = write_config(tmp_path / 'config.py', total_steps=400, log_every=1,
                        checkpoint_every=10, keep_checkpoints=100)
  workdir = small_disk / 'run'
  proc = start_main(config, workdir)
  out, _ = proc.communicate(timeout=400)
  assert proc.returncode == 2, out[-3000:]
  line = assert_one_clean_error(out)
  match = re.fullmatch(rf"error: No space left on device writing '{workdir}/checkpoints/(\d+)' "
                       r'\((.+) free there\)', line)
  assert match, line
  failed = int(match.group(1))
  # Nothing but the log and that line: no tracebacks of Orbax's writers, no other errors.
  others = [l for l in out.splitlines()
            if l and not l.startswith(('I', 'W')) and l != line and not l.startswith(' ')]
  assert not [l for l in others if re.search(r'orbax|asyncio|Event loop|Error', l)], others
  # The run stopped at the failed save (near a full disk, saves wait for their files).
  assert failed > 10 and max(logged_steps(out)) == failed, (failed, logged_steps(out)[-5:])
  steps = assert_every_checkpoint_restores(workdir)
  assert steps == list(range(10, failed, 10))
  assert not (workdir / 'final_metrics.json').exists()


# --- Ctrl-C ----------------------------------------------------------------------------------

def wait_for_checkpoint(proc, workdir, timeout=300):
  root = os.path.join(workdir, 'checkpoints')
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline:
    if os.path.isdir(root) and any(name.isdigit() for name in os.listdir(root)):
      return
    assert proc.poll() is None, f'the run ended before its first checkpoint:\n{proc.stdout.read()}'
    time.sleep(0.02)
  proc.kill()
  pytest.fail('no checkpoint within the time limit')


@pytest.mark.slow
@pytest.mark.parametrize('presses', [1, 2])
def test_ctrl_c_saves_and_exits_130_then_resumes(tmp_path, presses):
  config = write_config(tmp_path / 'config.py', total_steps=100, checkpoint_every=2,
                        keep_checkpoints=2, log_every=10)
  workdir = tmp_path / 'run'
  proc = start_main(config, workdir)
  wait_for_checkpoint(proc, str(workdir))
  proc.send_signal(signal.SIGINT)
  if presses == 2:
    time.sleep(0.05)
    pressed_again = time.monotonic()
    proc.send_signal(signal.SIGINT)
  out, _ = proc.communicate(timeout=120)
  assert proc.returncode == 130, out[-3000:]
  line = assert_one_clean_error(out)
  if presses == 1:
    assert re.fullmatch(rf'error: Stopped by SIGINT at step \d+ after saving a checkpoint in '
                        rf'{workdir}/checkpoints; rerun the same command to resume\.', line), line
    stopped_at = int(re.search(r'at step (\d+)', line).group(1))
    assert train_checkpoints.RunCheckpointer(str(workdir)).latest_step() == stopped_at
  else:
    assert time.monotonic() - pressed_again < 10
  assert not (workdir / 'final_metrics.json').exists()
  steps = assert_every_checkpoint_restores(workdir)
  assert steps[-1] < 100
  if presses == 2:
    return  # resuming is the same as after one press

  resumed = start_main(config, workdir, '--config.checkpoint_every=0')  # at the end only
  out, _ = resumed.communicate(timeout=400)
  assert resumed.returncode == 0, out[-3000:]
  assert f'Resuming from step {steps[-1]}' in out and not error_lines(out)
  final = json.loads((workdir / 'final_metrics.json').read_text())
  assert final['step'] == 100 and final['examples_seen'] == 100 * 16


# --- the end of a run ------------------------------------------------------------------------

def test_closing_a_training_pipeline_does_not_wait(tmp_path):
  """The run's end closes its training pipeline: no autotuning thread to wait for."""
  import gc  # pylint: disable=g-import-not-at-top
  from PIL import Image  # pylint: disable=g-import-not-at-top
  from vit_jax import input_pipeline  # pylint: disable=g-import-not-at-top
  for split in ('train', 'test'):
    for label in ('a', 'b'):
      folder = tmp_path / 'images' / split / label
      folder.mkdir(parents=True)
      for i in range(8):
        Image.fromarray(np.full((12, 12, 3), 30 * i, np.uint8)).save(folder / f'{i}.png')
  config = run_config(dataset=f'image_folder:{tmp_path / "images"}', num_classes=2,
                      batch_size=4, cache=True, shuffle_buffer=16)
  config.pp.train = 'plain'
  ds = input_pipeline.get_train_dataset(config)
  assert ds.options().autotune.enabled is False
  batches = input_pipeline.iterate_numpy(ds)
  start = time.monotonic()
  while time.monotonic() - start < 5:
    next(batches)
    time.sleep(0.02)
  closing = time.monotonic()
  batches.close()
  del batches
  gc.collect()
  assert time.monotonic() - closing < 2
