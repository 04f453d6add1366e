"""Tests of vit_jax.compare: equal settings for both models, costs, outputs, CLI."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from vit_jax import compare

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PNG_MAGIC = b'\x89PNG\r\n\x1a\n'
SHARED = ('dataset', 'data_dir', 'train_split', 'eval_split', 'image_size', 'batch_size',
          'eval_batch_size', 'total_steps', 'eval_every', 'seed')


def resnet_config_path():
  path = compare.DEFAULT_CONFIGS['ResNet']
  if not os.path.exists(path):
    pytest.skip(f'{path} not present')
  return path


def test_default_configs_exist_and_name_models():
  vit = compare.load_config(compare.DEFAULT_CONFIGS['ViT'])
  resnet = compare.load_config(resnet_config_path())
  mixer = compare.load_config(compare.DEFAULT_CONFIGS['Mixer'])
  from vit_jax.configs import models
  assert models.get_config(vit.model_name).model_type == 'vit'
  assert models.get_config(resnet.model_name).model_type == 'resnet'
  assert models.get_config(mixer.model_name).model_type == 'mixer'


def test_shared_settings_make_both_configs_equal():
  vit = compare.load_config(compare.DEFAULT_CONFIGS['ViT'])
  resnet = compare.load_config(resnet_config_path())
  args = compare.parse_args(['--out', 'x', '--steps', '30', '--batch-size', '8',
                             '--eval-points', '3'])
  settings = compare.shared_settings(args, vit)
  assert settings['dataset'] == 'digits'  # the embedded dataset by default
  assert settings['eval_every'] == 10
  a = compare.prepare_config(vit, settings)
  b = compare.prepare_config(resnet, settings)
  for key in SHARED:
    assert a[key] == b[key] == settings[key], key
  # A warm-up longer than the run is shortened; the originals are untouched.
  assert a.warmup_steps < a.total_steps and b.warmup_steps < b.total_steps
  assert vit.total_steps != 30


def test_shared_settings_dataset_flag():
  vit = compare.load_config(compare.DEFAULT_CONFIGS['ViT'])
  args = compare.parse_args(['--out', 'x', '--dataset', 'cifar10', '--data-dir', '/d',
                             '--image-size', '64'])
  settings = compare.shared_settings(args, vit)
  assert (settings['dataset'], settings['data_dir'], settings['image_size']) == (
      'cifar10', '/d', (64, 64))
  assert settings['total_steps'] == vit.total_steps


def test_model_costs_vit_and_resnet():
  vit = compare.load_config(compare.DEFAULT_CONFIGS['ViT'])
  with vit.unlocked():
    vit.model_name, vit.image_size = 'ViT-Test_4', (16, 16)
  costs = compare.model_costs(vit, 10)
  assert costs['model_type'] == 'vit'
  assert costs['num_params'] > 0
  # XLA also counts softmax, norms and GELU: a little above the matmul-only count.
  assert costs['forward_flops_analytic'] > 0
  assert 0.8 < costs['forward_flops_xla'] / costs['forward_flops_analytic'] < 2.0
  resnet = vit.copy_and_resolve_references()
  with resnet.unlocked():
    resnet.model_name = 'BiT-Test'
  costs = compare.model_costs(resnet, 10)
  assert costs['model_type'] == 'resnet'
  assert costs['forward_flops_analytic'] is None and costs['forward_flops_xla'] > 0


def test_eval_history(tmp_path):
  lines = [{'hparams': {'a': 1}},
           {'step': 5, 'time': 100.0, 'train_loss': 1.0},
           {'step': 10, 'time': 101.0, 'eval_accuracy': 0.5},
           {'step': 20, 'time': 102.0, 'eval_accuracy': 0.75}]
  (tmp_path / 'metrics.jsonl').write_text('\n'.join(json.dumps(l) for l in lines) + '\n')
  history = compare.eval_history(str(tmp_path))
  assert [h['step'] for h in history] == [10, 20]
  assert [h['eval_accuracy'] for h in history] == [0.5, 0.75]
  assert compare.eval_history(str(tmp_path / 'missing')) == []


def fake_row(name, acc, flops):
  return {'name': name, 'model_name': name + '-model', 'eval_accuracy': acc,
          'num_params': 1.5e6, 'forward_flops_xla': flops, 'forward_flops_analytic': None,
          'train_flops': 3 * flops * 640, 'train_images_per_sec': 123.4,
          'inference_images_per_sec': 999.0, 'wall_seconds': 12.34,
          'history': [{'step': 5, 'eval_accuracy': acc / 2, 'train_flops': 3 * flops * 320,
                       'seconds': 5.0},
                      {'step': 10, 'eval_accuracy': acc, 'train_flops': 3 * flops * 640,
                       'seconds': 10.0}]}


def test_table_and_plot():
  rows = [fake_row('ViT', 0.9, 2e7), fake_row('ResNet', 0.95, 5e8)]
  table = compare.markdown_table(rows)
  lines = table.splitlines()
  assert len(lines) == 4 and lines[0].startswith('| model |')
  assert '90.0%' in lines[2] and '1.500M' in lines[2] and '| - |' in lines[2]
  fig = compare.plot_accuracy_vs_compute(rows)
  by_flops, by_time = fig.axes[:2]
  assert len(by_flops.lines) == 2 and len(by_time.lines) == 2
  assert by_flops.get_xscale() == 'log'
  np.testing.assert_allclose(by_flops.lines[1].get_ydata(), [47.5, 95.0])


@pytest.mark.slow
def test_cli_tiny_run(tmp_path):
  """The three families, two seeds, two steps on the embedded digits, the ViT
  fine-tuned from a checkpoint: table with mean ± std and few-shot, JSON, PNG."""
  from vit_jax import checkpoint  # pylint: disable=g-import-not-at-top
  from vit_jax.configs import models  # pylint: disable=g-import-not-at-top
  vit = models.build_model('ViT-Test_4', 10)
  ckpt = str(tmp_path / 'vit.npz')
  checkpoint.save(jax.jit(lambda k: vit.init(k, np.zeros((1, 16, 16, 3)))['params'])(
      jax.random.key(1)), ckpt)
  extra = ['--seeds', '2', '--fewshot', '1', '--vit-checkpoint', ckpt,
           '--data-dir', str(tmp_path / 'tfds')]
  if not os.path.exists(compare.DEFAULT_CONFIGS['ResNet']):
    extra = ['--resnet-config', compare.DEFAULT_CONFIGS['ViT']]  # the model flag decides
  out = tmp_path / 'cmp'
  result = subprocess.run(
      [sys.executable, '-m', 'vit_jax.compare', *extra, '--out', str(out), '--steps', '2',
       '--batch-size', '8', '--eval-batch-size', '8', '--eval-points', '1',
       '--dataset', 'digits', '--image-size', '16',
       '--vit-model', 'ViT-Test_4', '--resnet-model', 'BiT-Test',
       '--mixer-model', 'Mixer-Test_4'],
      cwd=REPO, capture_output=True, text=True, timeout=1500,  # three families x two seeds
      env=dict(os.environ, MPLBACKEND='Agg', XLA_FLAGS=''))
  assert result.returncode == 0, result.stderr[-3000:]
  with open(out / 'accuracy_vs_compute.png', 'rb') as f:
    assert f.read(8) == PNG_MAGIC
  assert os.path.getsize(out / 'accuracy_vs_compute.png') > 1000
  data = json.loads((out / 'compare.json').read_text())
  rows = {r['name']: r for r in data['results']}
  assert set(rows) == {'ViT', 'ResNet', 'Mixer'}
  assert rows['ViT']['model_name'] == 'ViT-Test_4'
  assert rows['ResNet']['model_name'] == 'BiT-Test'
  assert (rows['Mixer']['model_name'], rows['Mixer']['model_type']) == ('Mixer-Test_4', 'mixer')
  for key in ('steps', 'batch_size', 'dataset', 'image_size', 'examples_seen'):
    assert rows['ViT'][key] == rows['ResNet'][key] == rows['Mixer'][key], key
  for row in rows.values():
    assert 0.0 <= row['eval_accuracy'] <= 1.0
    assert row['num_params'] > 0 and row['forward_flops_xla'] > 0
    assert row['train_flops'] == pytest.approx(3 * row['forward_flops_xla'] * 8 * 2)
    assert row['inference_images_per_sec'] > 0 and row['wall_seconds'] > 0
    assert len(row['histories']) == 2 and len(row['histories'][0]) == 1
    assert row['seeds'] == [row['seeds'][0] + i for i in range(2)]
    runs = [r['eval_accuracy'] for r in row['runs']]
    assert row['eval_accuracy'] == pytest.approx(np.mean(runs))
    assert row['eval_accuracy_std'] == pytest.approx(np.std(runs, ddof=1))
    assert 0.0 <= row['fewshot/1shot_accuracy'] <= 1.0
  assert [r['pretrained_path'] for r in rows['ViT']['runs']] == [ckpt] * 2
  assert '±' in result.stdout  # the printed table: mean ± std over the seeds
  assert rows['ResNet']['runs'][0]['pretrained_path'] is None
  table = (out / 'compare.md').read_text()
  assert 'ViT-Test_4' in table and 'BiT-Test' in table and 'Mixer-Test_4' in table
  assert table.startswith('# ViT vs ResNet vs Mixer') and table.count('1-shot linear') == 1


def test_progress_filter_keeps_vit_jax_lines_only():
  import logging
  keep = compare.VitJaxRecords()
  mine = logging.LogRecord('absl', logging.INFO, os.path.join(REPO, 'vit_jax', 'train.py'),
                           1, 'step 5', None, None)
  chatter = logging.LogRecord('absl', logging.INFO, '/site-packages/orbax/x.py', 1, 'saving',
                              None, None)
  warning = logging.LogRecord('absl', logging.WARNING, '/site-packages/orbax/x.py', 1, 'w',
                              None, None)
  assert keep.filter(mine) and not keep.filter(chatter) and keep.filter(warning)
  from absl import logging as absl_logging
  verbosity = absl_logging.get_verbosity()
  absl_logger = logging.getLogger('absl')
  try:
    compare.show_training_progress()
    compare.show_training_progress()  # idempotent: one filter
    ours = [f for f in absl_logger.filters if isinstance(f, compare.VitJaxRecords)]
    assert len(ours) == 1
  finally:
    for f in [f for f in absl_logger.filters if isinstance(f, compare.VitJaxRecords)]:
      absl_logger.removeFilter(f)
    absl_logging.set_verbosity(verbosity)
