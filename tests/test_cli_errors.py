"""User errors of every command: exit status 2, exactly one `error:` line, no traceback.

Each case runs the command as a user would (`python -m vit_jax.X ...`, a subprocess)
and checks what the console shows; the ones that touch a finished run also check
that its files (checkpoints included) are byte-for-byte unchanged. Read-only and
full disks are made with tmpfs mounts where the test runs as root (chmod does not
stop root), with chmod otherwise; the full disk needs the mount and is skipped,
saying so, where none can be made.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import subprocess
import sys

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT = os.path.join(REPO, 'configs', 'default.py')
TINY_RUN = ['--config.total_steps=2', '--config.warmup_steps=0', '--config.eval_every=2',
            '--config.checkpoint_every=1', '--config.batch_size=16',
            '--config.eval_batch_size=64', '--config.num_eval_examples=64']


def run_cli(module: str, *args: str, timeout: int = 300,
            cpu: bool = True) -> subprocess.CompletedProcess:
  hidden = ('VIT_JAX_TRACEBACK',) + (() if cpu else ('JAX_PLATFORMS', 'TF_CPP_MIN_LOG_LEVEL'))
  env = {k: v for k, v in os.environ.items() if k not in hidden}
  env.update(PYTHONPATH=REPO, **({'JAX_PLATFORMS': 'cpu'} if cpu else {}))
  return subprocess.run([sys.executable, '-m', module, *args], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=timeout)


def assert_user_error(result: subprocess.CompletedProcess, *fragments: str) -> str:
  """Exit status 2, one `error:` line holding every fragment, no traceback; the line."""
  output = result.stdout + result.stderr
  errors = [line for line in output.splitlines() if line.startswith('error:')]
  assert result.returncode == 2, output[-3000:]
  assert len(errors) == 1, output[-3000:]
  assert 'Traceback' not in output and 'During handling' not in output, output[-3000:]
  for fragment in fragments:
    assert fragment in errors[0], (fragment, errors[0])
  return errors[0]


def tree_digest(path: str) -> dict[str, str]:
  out = {}
  for root, _, files in os.walk(path):
    for name in files:
      full = os.path.join(root, name)
      with open(full, 'rb') as f:
        out[os.path.relpath(full, path)] = hashlib.sha256(f.read()).hexdigest()
  return out


class Disk:
  """A directory that can be made read-only (or is a small tmpfs) for the test's lifetime."""

  def __init__(self, path: str, size: str = '64m'):
    self.path, self.mounted = path, False
    os.makedirs(path, exist_ok=True)
    if os.geteuid() == 0:
      mount = subprocess.run(['mount', '-t', 'tmpfs', '-o', f'size={size}', 'tmpfs', path],
                             capture_output=True, text=True)
      self.mounted = mount.returncode == 0
      self.why_not = mount.stderr.strip()
    else:
      self.why_not = 'not root: no tmpfs mount'

  def read_only(self) -> None:
    if self.mounted:
      subprocess.run(['mount', '-o', 'remount,ro', self.path], check=True)
    elif os.geteuid() != 0:
      for root, dirs, files in os.walk(self.path):
        for name in dirs + files:
          os.chmod(os.path.join(root, name), 0o555)
      os.chmod(self.path, 0o555)
    else:
      pytest.skip(f'cannot make a read-only directory as root without a mount: {self.why_not}')

  def close(self) -> None:
    if self.mounted:
      subprocess.run(['umount', '-l', self.path], check=False)
    else:
      for root, dirs, _ in os.walk(self.path):
        for name in dirs:
          os.chmod(os.path.join(root, name), 0o755)
      os.chmod(self.path, 0o755)


@pytest.fixture(scope='module')
def files(tmp_path_factory):
  """Checkpoints of two presets (random init, the published layout) and images."""
  import jax  # pylint: disable=g-import-not-at-top
  from PIL import Image  # pylint: disable=g-import-not-at-top
  from vit_jax import checkpoint  # pylint: disable=g-import-not-at-top
  from vit_jax.configs import models  # pylint: disable=g-import-not-at-top
  root = tmp_path_factory.mktemp('cli_files')
  for name in ('ViT-Test_4', 'ViT-Digits_4'):
    model = models.build_model(name, 10)
    params = model.init(jax.random.PRNGKey(0), np.zeros((1, 16, 16, 3), np.float32),
                        train=False)['params']
    checkpoint.save(jax.tree.map(np.asarray, params), root / f'{name}.npz')
  Image.fromarray(np.full((20, 20, 3), 128, np.uint8)).save(root / 'photo.png')
  (root / 'bad.png').write_bytes(b'not a png at all')
  (root / 'a_file').write_text('')
  return root


@pytest.fixture(scope='module')
def finished_run(tmp_path_factory):
  """(read-only disk, workdir of a finished 2-step run on it, digest of its files, the
  run's console output). The run sees the environment a user has (no JAX_PLATFORMS)."""
  disk = Disk(str(tmp_path_factory.mktemp('ro_disk') / 'mnt'))
  try:
    workdir = os.path.join(disk.path, 'run')
    result = run_cli('vit_jax.main', f'--config={DEFAULT}:ViT-Test_4', f'--workdir={workdir}',
                     *TINY_RUN, cpu=False)
    assert result.returncode == 0, result.stderr[-3000:]
    assert os.listdir(os.path.join(workdir, 'checkpoints'))
    disk.read_only()
    yield disk, workdir, tree_digest(workdir), result.stdout + result.stderr
  finally:
    disk.close()


# --- vit_jax.main: refused before JAX loads ---------------------------------------

MAIN_CASES = {
    'unknown-config-field': (['--config.foo=1'], ["--config.foo=1: the config has no field 'foo'"]),
    'misspelt-config-field': (['--config.learning_rte=0.1'], ['did you mean learning_rate']),
    'unknown-preset': ([], ["Unknown model 'ViT-Z_99'"]),
    'missing-config-file': ([], ['no such config file', 'nope.py']),
    'workdir-is-a-file': ([], ['is a file, not a directory']),
    'unknown-flag': (['--wrokdir=x'], ["Unknown command line flag 'wrokdir'"]),
}


@pytest.mark.parametrize('case', sorted(MAIN_CASES))
def test_main_refuses_before_running(case, files, tmp_path):
  extra, fragments = MAIN_CASES[case]
  config = {'unknown-preset': f'{DEFAULT}:ViT-Z_99',
            'missing-config-file': str(tmp_path / 'nope.py')}.get(case, DEFAULT)
  workdir = str(files / 'a_file') if case == 'workdir-is-a-file' else str(tmp_path / 'w')
  assert_user_error(run_cli('vit_jax.main', f'--config={config}', f'--workdir={workdir}',
                            *extra), *fragments)
  assert not os.path.exists(tmp_path / 'w')  # nothing created for a refused run


# Issue 31 (4, 6): usage and value errors of the absl commands and onnx_classify, each one
# line (no help dump, no traceback) before any work; plan's before it compiles.
ARGV_CASES = {
    'main-no-flags': ('vit_jax.main', [], '--config and --workdir are required'),
    'main-stray-word': ('vit_jax.main', ['--config={DEFAULT}', '--workdir={tmp}/w', 'stray'],
                        "unexpected argument(s) 'stray'"),
    'main-empty-workdir': ('vit_jax.main', ['--config={DEFAULT}', '--workdir='],
                           '--workdir is empty'),
    'plan-no-config': ('vit_jax.plan', ['--topology=v5e:2x2'], '--config is required'),
    'plan-stray-word': ('vit_jax.plan', ['--config={DEFAULT}', 'stray'],
                        "unexpected argument(s) 'stray'"),
    'plan-not-a-slice': ('vit_jax.plan', ['--config={DEFAULT}', '--topology=v5e:3x3'],
                         "--topology='v5e:3x3' is not a v5e slice"),
    'plan-json-is-a-directory': ('vit_jax.plan', ['--config={DEFAULT}', '--topology=v5e:2x2',
                                                  '--json={tmp}'], 'is a directory'),
    'plan-memory-fraction': ('vit_jax.plan', ['--config={DEFAULT}', '--gpu=h100',
                                              '--gpu_memory_fraction=1.5'],
                             '--gpu_memory_fraction must be in (0, 1]'),
    'plan-slices-on-gpus': ('vit_jax.plan', ['--config={DEFAULT}', '--gpu=h100',
                                             '--num_slices=2'],
                            '--num_slices does not apply to --gpu'),
    'plan-nodes-on-a-tpu': ('vit_jax.plan', ['--config={DEFAULT}', '--topology=v5e:2x2',
                                             '--nodes=2'], '--nodes does not apply'),
    'onnx-classify-no-flags': ('vit_jax.onnx_classify', [],
                               'the following arguments are required: --onnx, --image'),
}


@pytest.mark.parametrize('case', sorted(ARGV_CASES))
def test_usage_and_value_errors_in_one_line(case, tmp_path):
  module, args, fragment = ARGV_CASES[case]
  args = [a.format(DEFAULT=DEFAULT, tmp=tmp_path) for a in args]
  assert_user_error(run_cli(module, *args, cpu=False), fragment)
  assert not os.path.exists(tmp_path / 'w')


MODEL_CASES = {
    # A ViT has no ResNet stem: the field is named, not the image size.
    'resnet-field-on-a-vit': ('--config.model.resnet.width_factor=2',
                              ["config.model.resnet.width_factor does not apply", 'no resnet']),
    # Heads that do not divide the width: the model override is named, not the image size.
    'heads-do-not-divide-width': ('--config.model.transformer.num_heads=3',
                                  ['transformer.num_heads=3', 'not divisible by num_heads 3']),
}


@pytest.mark.parametrize('case', sorted(MODEL_CASES))
def test_main_names_the_model_field(case, tmp_path):
  flag, fragments = MODEL_CASES[case]
  line = assert_user_error(run_cli('vit_jax.main', f'--config={DEFAULT}',
                                   f'--workdir={tmp_path / "w"}', flag), *fragments)
  assert 'image_size' not in line


@pytest.mark.slow
@pytest.mark.parametrize('state', ['new', 'partial', 'finished'])
def test_main_read_only_workdir(state, finished_run):
  disk, workdir, digest, _ = finished_run
  target = os.path.join(disk.path, 'new_run') if state == 'new' else workdir
  extra = ['--config.total_steps=4'] if state == 'partial' else []
  assert_user_error(run_cli('vit_jax.main', f'--config={DEFAULT}:ViT-Test_4',
                            f'--workdir={target}', *TINY_RUN, *extra),
                    'cannot be written', 'read-only' if disk.mounted else 'permission')
  assert tree_digest(workdir) == digest  # the checkpoints and metrics are intact


# --- visualize, compare -------------------------------------------------------------

VISUALIZE_CASES = {
    'index-out-of-range': ('digits:test:9999', ["no image 9999", '355 images']),
    'reversed-range': ('digits:test:5-2', ['the range 5-2 is reversed']),
    'missing-image': ('{files}/missing.png', ['Cannot read image', 'missing.png']),
    'bad-image': ('{files}/bad.png', ['Cannot read image', 'bad.png']),
}


@pytest.mark.parametrize('case', sorted(VISUALIZE_CASES))
def test_visualize_bad_image(case, files, tmp_path):
  spec, fragments = VISUALIZE_CASES[case]
  assert_user_error(run_cli('vit_jax.visualize', '--model', 'ViT-Test_4', '--random-init',
                            '--num-classes', '10', '--image-size', '16',
                            '--image', spec.format(files=files), '--out', str(tmp_path / 'vis')),
                    *fragments)


@pytest.mark.slow
def test_visualize_read_only_out(finished_run):
  disk = finished_run[0]
  assert_user_error(run_cli('vit_jax.visualize', '--model', 'ViT-Test_4', '--random-init',
                            '--image', 'digits:test:1', '--out', f'{disk.path}/vis'),
                    '--out', 'cannot be written')


COMPARE_CASES = {
    'zero-steps': (['--steps', '0'], ['--steps must be positive, got 0']),
    'unknown-dataset': (['--dataset', 'nope', '--steps', '2'], ["Unknown dataset 'nope'"]),
}


@pytest.mark.parametrize('case', sorted(COMPARE_CASES))
def test_compare_bad_arguments(case, tmp_path):
  args, fragments = COMPARE_CASES[case]
  result = run_cli('vit_jax.compare', *args, '--out', str(tmp_path / 'cmp'))
  assert_user_error(result, *fragments)
  assert len(result.stderr.splitlines()) <= 3  # not TFDS's catalogue


@pytest.mark.slow
def test_compare_read_only_out(finished_run):
  disk = finished_run[0]
  assert_user_error(run_cli('vit_jax.compare', '--steps', '2', '--out', f'{disk.path}/cmp'),
                    '--out', 'cannot be written')


# --- convert, predict, evaluate -------------------------------------------------------

@pytest.mark.slow
def test_convert_read_only_output(files, finished_run):
  disk = finished_run[0]
  assert_user_error(run_cli('vit_jax.convert', '--from', 'npz', '--to', 'timm', '--model',
                            'ViT-Test_4', '--input', str(files / 'ViT-Test_4.npz'),
                            '--output', f'{disk.path}/out.pth'),
                    f"--output '{disk.path}/out.pth'", 'cannot be written')


def test_convert_full_disk_names_the_output(files, tmp_path):
  disk = Disk(str(tmp_path / 'small'), size='64k')
  try:
    if not disk.mounted:
      pytest.skip(f'a full disk needs a small tmpfs mount: {disk.why_not}')
    with open(os.path.join(disk.path, 'filler'), 'wb') as f:
      f.write(b'\0' * (40 << 10))
    output = os.path.join(disk.path, 'out.pth')
    line = assert_user_error(
        run_cli('vit_jax.convert', '--from', 'npz', '--to', 'timm', '--model', 'ViT-Test_4',
                '--input', str(files / 'ViT-Test_4.npz'), '--output', output),
        f"No space left on device writing '{output}'", 'free there')
    assert '.partial' not in line
    assert os.listdir(disk.path) == ['filler']  # no half-written file left behind
  finally:
    disk.close()


def test_predict_refuses_a_huge_image_size_before_allocating(files):
  assert_user_error(run_cli('vit_jax.predict', '--model', 'ViT-Test_4', '--checkpoint',
                            str(files / 'ViT-Test_4.npz'), '--image', str(files / 'photo.png'),
                            '--image_size', '2048'),
                    'image size 2048x2048 is too large for ViT-Test_4', 'at most about')


OTHER_MODEL = {
    'predict': ['--model', 'ViT-Test_4', '--checkpoint', '{ckpt}', '--image', '{files}/photo.png'],
    'evaluate': ['--checkpoint', '{ckpt}', '--config', f'{DEFAULT}:ViT-Test_4'],
    'convert': ['--from', 'npz', '--to', 'npz', '--model', 'ViT-Test_4', '--input', '{ckpt}',
                '--output', '{tmp}/out.npz'],
}


@pytest.mark.parametrize('command', sorted(OTHER_MODEL))
def test_checkpoint_of_another_model_in_one_line(command, files, tmp_path):
  args = [a.format(ckpt=files / 'ViT-Digits_4.npz', files=files, tmp=tmp_path)
          for a in OTHER_MODEL[command]]
  assert_user_error(run_cli(f'vit_jax.{command}', *args), 'fit the',
                    'shape mismatches, e.g.', 'the file fits preset ViT-Digits_4')
  assert not os.path.exists(tmp_path / 'out.npz')


def test_verbose_adds_the_traceback(tmp_path):
  env_result = subprocess.run(
      [sys.executable, '-m', 'vit_jax.main', f'--config={DEFAULT}', '--workdir',
       str(tmp_path / 'w'), '--config.model.resnet.width_factor=2', '--verbose'],
      cwd=REPO, capture_output=True, text=True, timeout=300,
      env={**os.environ, 'JAX_PLATFORMS': 'cpu'})
  assert env_result.returncode == 2
  assert 'Traceback' in env_result.stderr
  assert env_result.stderr.strip().splitlines()[-1].startswith('error: ')


def test_one_line_summary_of_a_model_mismatch():
  """The one-line form names the first row of each kind and the preset the shapes fit."""
  from vit_jax import checkpoint  # pylint: disable=g-import-not-at-top
  from vit_jax import cli  # pylint: disable=g-import-not-at-top
  specs = {'embedding/kernel': np.zeros((16, 16, 3, 384)), 'cls': np.zeros((1, 1, 384)),
           'Transformer/posembed_input/pos_embedding': np.zeros((1, 197, 384)),
           'head/kernel': np.zeros((384, 1000))}
  for i in range(12):
    block = f'Transformer/encoderblock_{i}/'
    specs[block + 'MultiHeadDotProductAttention_1/query/kernel'] = np.zeros((384, 6, 64))
    specs[block + 'MlpBlock_3/Dense_0/kernel'] = np.zeros((384, 1536))
  assert checkpoint.guess_presets(specs) == ['ViT-S_16']
  error = checkpoint.ModelMismatchError(
      'Checkpoint x does not fit the model:', ['a: model (2,), not in checkpoint'], [],
      ['b: checkpoint (3,) vs model (4,)', 'c: checkpoint (5,) vs model (6,)'], specs)
  line = cli.user_error_message(error)
  assert '\n' not in line
  assert line == ('Checkpoint x does not fit the model: 2 shape mismatches, e.g. b: checkpoint '
                  '(3,) vs model (4,); 1 missing key: a: model (2,), not in checkpoint; the file '
                  'fits preset ViT-S_16 (--verbose lists all)')
  assert 'missing keys (1):\n  a: model (2,)' in str(error)  # the full listing stays


@pytest.mark.slow
def test_console_is_quiet_and_the_config_is_a_file(finished_run):
  """A run's console: its own progress lines, one line naming WORKDIR/config.json, no
  config dump, no library banners (TPU probing, TensorFlow's CPU and oneDNN notes)."""
  import json  # pylint: disable=g-import-not-at-top
  _, workdir, _, console = finished_run
  with open(os.path.join(workdir, 'config.json'), encoding='utf-8') as f:
    config = json.load(f)
  assert config['model_name'] == 'ViT-Test_4' and config['total_steps'] == 2
  assert config['learning_rate'] > 0  # every field, defaults included
  # The embedded dataset is prepared once per TFDS data_dir (a fresh one per test
  # worker): TFDS's progress bars of that step are left out of the count.
  preparing = ('Generating', 'Shuffling', 'Downloading and preparing', 'downloaded and prepared',
               'dataset_info.json')
  # tqdm's redraws leave lines of cursor movements alone ('\x1b[A'): not lines of text.
  text = re.sub(r'\x1b\[[0-9;]*[A-Za-z]', '', console)
  lines = [line for line in text.splitlines()
           if line.strip() and not any(p in line for p in preparing)]
  assert sum(f'Config: {workdir}/config.json' in line for line in lines) == 1, console
  for noise in ('hparams:', 'learning_rate: ', 'xla_bridge', "backend 'tpu'", 'host bounds',
                'oneDNN', 'cpu_feature_guard', 'dataset_info.py', 'reader.py'):
    assert noise not in console, (noise, console)
  assert len(lines) <= 12, console


@pytest.mark.parametrize('preset,size', [
    ('ViT-Test_4', 16), ('ViT-Digits_4', 16), ('Mixer-Test_4', 16), ('Mixer-Digits_4', 16),
    ('BiT-Test', 32), ('R-Test+ViT-Test_1', 32)])
def test_guess_presets_names_each_tiny_preset_from_its_shapes(preset, size):
  """Each family's tree (shapes only, as an .npz's headers give them) names its own preset."""
  from vit_jax import checkpoint  # pylint: disable=g-import-not-at-top
  shapes = checkpoint.flatten(checkpoint.abstract_params(preset, 7, (size, size)))
  assert checkpoint.guess_presets(shapes) == [preset]
