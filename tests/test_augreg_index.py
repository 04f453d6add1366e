"""The AugReg index: the table, the reference's checkpoint choice, configs/augreg.py, errors."""

import csv
import importlib.util
import os
import subprocess
import sys

import numpy as np
import pytest

from vit_jax import augreg
from vit_jax import checkpoint
from vit_jax.configs import models as model_configs
from vit_jax.configs import schema

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COLUMNS = ['name', 'ds', 'lr', 'aug', 'wd', 'do', 'sd', 'best_val', 'final_val', 'final_test',
           'adapt_ds', 'adapt_lr', 'adapt_steps', 'adapt_resolution', 'adapt_final_val',
           'adapt_final_test', 'params', 'infer_samples_per_sec', 'filename', 'adapt_filename']


def stem(short, ds, aug, wd, epochs=300):
  return f'{short}-{ds}-{epochs}ep-lr_0.001-aug_{aug}-wd_{wd}-do_0.0-sd_0.0'


BEST = stem('R26_S_32', 'i21k', 'light1', '0.1')
# (model, ds, aug, wd, final_val, adapt_ds, adapt_final_val, adapt_final_test)
ROWS = [
    ('R26+S/32', 'i21k', 'none', '0.03', 0.441, 'imagenet2012', 0.820, 0.818),
    ('R26+S/32', 'i21k', 'light1', '0.1', 0.472, 'imagenet2012', 0.838, 0.8385),
    ('R26+S/32', 'i21k', 'light1', '0.1', 0.472, 'cifar100', 0.905, 0.901),
    ('R26+S/32', 'i1k', 'medium2', '0.1', 0.801, 'imagenet2012', 0.801, 0.799),  # not i21k
    ('R26+S/32', 'i21k_30', 'light1', '0.1', 0.460, 'imagenet2012', 0.830, 0.829),
    ('B/16', 'i21k', 'medium1', '0.1', 0.490, 'imagenet2012', 0.856, 0.8549),
]


def write_index(path, rows=ROWS, columns=COLUMNS):
  with open(path, 'w', newline='', encoding='utf-8') as f:
    writer = csv.writer(f)
    writer.writerow(columns)
    for name, ds, aug, wd, final_val, adapt_ds, ft_val, ft_test in rows:
      short = augreg.short_name(name)
      epochs = 30 if ds == 'i21k_30' else 300
      up = stem(short, ds, aug, wd, epochs)
      values = dict(name=name, ds=ds, lr='0.001', aug=aug, wd=wd, do='0.0', sd='0.0',
                    best_val=final_val, final_val=final_val, final_test=final_val - 0.01,
                    adapt_ds=adapt_ds, adapt_lr='0.01', adapt_steps='20000',
                    adapt_resolution='384', adapt_final_val=ft_val, adapt_final_test=ft_test,
                    params='36431912', infer_samples_per_sec='1000', filename=up,
                    adapt_filename=f'{up}--{adapt_ds}-steps_20k-lr_0.01-res_384')
      writer.writerow([values[c] for c in columns])


@pytest.fixture(scope='module')
def release(tmp_path_factory):
  """A release folder: the index and the one file the reference's choice needs.

  The file is R26+ViT-S_32's at 224 px (7x7+1 position embeddings) with its whole
  ResNet and widths but 1 of its 12 blocks (CI time); runs set
  `--config.model.transformer.num_layers=1` to match.
  """
  root = tmp_path_factory.mktemp('augreg')
  write_index(root / 'index.csv')
  config = model_configs.get_config('R26+ViT-S_32')
  config.transformer.num_layers = 1
  shapes = checkpoint.flatten(checkpoint.abstract_params(config, 100, (224, 224)))
  rng = np.random.default_rng(0)
  flat = {k: 0.02 * rng.standard_normal(s.shape, dtype=np.float32) for k, s in shapes.items()}
  for k in flat:
    if k.endswith('/scale'):
      flat[k] += 1.0
  checkpoint.save(checkpoint.unflatten(flat), root / f'{BEST}.npz')
  return str(root)


def test_table_best_first(release, capsys):
  index = os.path.join(release, 'index.csv')
  assert augreg.main(['--index', index, '--model', 'R26_S_32', '--ds', 'i21k',
                      '--adapt_ds', 'imagenet2012', '--top', '10']) == 0
  out = capsys.readouterr().out.splitlines()
  assert out[0].split() == ['model', 'ds', 'aug', 'wd', 'do', 'sd', 'up_val', 'adapt_ds', 'res',
                            'ft_val', 'ft_test', 'file']
  rows = [line.split() for line in out[1:-1]]
  assert [r[2] for r in rows] == ['light1', 'none']  # by fine-tuned accuracy
  assert rows[0][:8] == ['R26_S_32', 'i21k', 'light1', '0.1', '0.0', '0.0', '47.20',
                         'imagenet2012']
  assert rows[0][9:] == ['83.80', '83.85', f'{BEST}--imagenet2012-steps_20k-lr_0.01-res_384.npz']
  assert out[-1] == '(2 of 2 matching rows)'
  # Without filters: every model, by upstream accuracy; --top cuts.
  assert augreg.main(['--index', index, '--top', '2']) == 0
  out = capsys.readouterr().out.splitlines()
  assert out[1].split()[:2] == ['R26_S_32', 'i1k'] and out[-1] == '(2 of 6 matching rows)'


def test_reference_choice_is_best_i21k_final_val(release):
  index = os.path.join(release, 'index.csv')
  # i1k's 0.801 is higher but not ImageNet-21k; i21k_30 is another ds.
  assert augreg.best_pretrained(index, 'R26_S_32') == BEST
  assert augreg.best_pretrained(index, 'R26+ViT-S_32') == BEST
  assert augreg.best_pretrained(index, 'B_16') == stem('B_16', 'i21k', 'medium1', '0.1')


def _augreg_config(arg):
  spec = importlib.util.spec_from_file_location('augreg_config', os.path.join(
      REPO, 'configs', 'augreg.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def test_config_defaults_and_choice(release):
  config = _augreg_config('R26_S_32')
  config.pretrained_dir = release
  config = schema.resolve(config)
  assert config.model_name == 'R26+ViT-S_32'
  assert config.pretrained_path == os.path.join(release, f'{BEST}.npz')
  assert (config.optimizer, config.momentum, config.learning_rate) == ('sgd', 0.9, 0.03)
  assert (config.total_steps, config.warmup_steps, config.batch_size) == (500, 100, 512)
  assert config.grad_clip_norm == 1.0 and tuple(config.image_size) == (384, 384)
  assert (config.pp.train, config.pp.crop_pad, config.pp.flip) == ('resize_crop', 64, True)
  assert config.pp.eval == 'resize' and config.model.transformer.dropout_rate == 0.0
  # A full stem takes that file; the model comes from its name.
  config = _augreg_config(BEST)
  config.pretrained_dir = release
  config = schema.resolve(config)
  assert config.model_name == 'R26+ViT-S_32' and config.pretrained_path.endswith(BEST + '.npz')


def test_malformed_index_is_one_error(release, tmp_path, capsys):
  def error_of(index):
    assert augreg.main(['--index', str(index), '--model', 'R26_S_32']) == 2
    err = capsys.readouterr().err.strip()
    assert '\n' not in err and err.startswith('error: '), err
    return err

  write_index(tmp_path / 'no_final_val.csv', columns=[c for c in COLUMNS if c != 'final_val'])
  assert "has no column 'final_val'" in error_of(tmp_path / 'no_final_val.csv')
  write_index(tmp_path / 'b16_only.csv', rows=ROWS[-1:])
  assert "no row for model 'R26_S_32'; its models: B_16" in error_of(tmp_path / 'b16_only.csv')
  (tmp_path / 'bad.csv').write_text(','.join(COLUMNS) + '\n' + ','.join(
      ['B/16', 'i21k'] + ['x'] * (len(COLUMNS) - 2)) + '\n')
  assert "line 2: column 'final_val' is 'x'" in error_of(tmp_path / 'bad.csv')
  # A file the index names that is not in the folder: the path, in one line.
  missing = stem('R26_S_32', 'i21k', 'none', '0.03')
  config = _augreg_config(missing)
  config.pretrained_dir = release
  with pytest.raises(FileNotFoundError, match=f'{missing}.npz.* is not there'):
    schema.resolve(config)


@pytest.mark.slow  # a whole (2-step) training run
def test_finetunes_on_digits(release, tmp_path):
  """configs/augreg.py:R26_S_32, 2 steps at 64 px on the digits: 7x7+1 position embeddings
  resampled to 2x2+1, a fresh 10-class head (one transformer block, as the file). The
  notebook test below fine-tunes with the same settings: its steps come from the
  tests' shared compilation cache."""
  workdir = str(tmp_path / 'run')
  result = subprocess.run(
      [sys.executable, '-m', 'vit_jax.main', '--config=configs/augreg.py:R26_S_32',
       f'--config.pretrained_dir={release}', '--config.dataset=digits',
       '--config.eval_split=test', '--config.image_size=64', '--config.batch_size=8',
       '--config.eval_batch_size=8', '--config.total_steps=2', '--config.warmup_steps=1',
       '--config.eval_every=1', '--config.checkpoint_every=0', '--config.log_every=1',
       '--config.pp.crop_pad=8', '--config.model.transformer.num_layers=1',
       f'--workdir={workdir}'],
      cwd=REPO, capture_output=True, text=True, timeout=600,
      env=dict(os.environ, XLA_FLAGS=''))
  assert result.returncode == 0, result.stderr[-3000:]
  log = result.stdout + result.stderr
  assert f'Fine-tuning from {os.path.join(release, BEST)}.npz' in log, log[-3000:]
  assert 'grid 7x7 -> 2x2' in log, log[-3000:]


@pytest.mark.slow  # a notebook with a whole (2-step) training run
def test_notebook_runs_on_the_release_folder(release, tmp_path, monkeypatch):
  """notebooks/augreg.ipynb: index, choice, prediction and a 2-step fine-tune on the digits."""
  nbformat = pytest.importorskip('nbformat')
  nbclient = pytest.importorskip('nbclient')
  import test_notebooks  # pylint: disable=g-import-not-at-top
  path = os.path.join(REPO, 'notebooks', 'augreg.ipynb')
  nb = nbformat.read(path, as_version=4)
  tagged = [c for c in nb.cells if 'parameters' in c.get('metadata', {}).get('tags', [])]
  assert len(tagged) == 1 and 'VIT_JAX_NOTEBOOK_SMOKE' in tagged[0].source
  assert all(not c.get('outputs') for c in nb.cells if c.cell_type == 'code')
  env = dict(test_notebooks._kernel_env(tmp_path), VIT_JAX_AUGREG_DIR=release,  # pylint: disable=protected-access
             VIT_JAX_AUGREG_LAYERS='1')
  for key, value in env.items():
    monkeypatch.setenv(key, value)
  monkeypatch.delenv('XLA_FLAGS', raising=False)
  client = nbclient.NotebookClient(nb, kernel_name='python3', timeout=600, allow_errors=False,
                                   resources={'metadata': {'path': os.path.dirname(path)}})
  client.kernel_manager_class = test_notebooks._manager_class()  # pylint: disable=protected-access
  client.execute()
  text = '\n'.join(o.get('text', '') for c in nb.cells if c.cell_type == 'code'
                   for o in c.get('outputs', []))
  assert BEST in text and 'preset R26+ViT-S_32' in text, text[-2000:]
  assert 'test accuracy after 2 steps' in text, text[-2000:]
  figures = [o for c in nb.cells if c.cell_type == 'code' for o in c.get('outputs', [])
             if 'image/png' in o.get('data', {})]
  assert len(figures) == 3
