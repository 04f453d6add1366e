"""`python -m vit_jax.evaluate`: a run's workdir and .npz files on the embedded digits.

- On the workdir of a short digits run (shared with tests/test_fewshot.py) it
  reports the run's final eval top-1 exactly (and its loss), although the config
  file names another model: the run's recorded model wins. Per-class accuracy,
  the confusion matrix and top-1 agree with each other; metrics.json,
  confusion.png and few-shot accuracy are written; progress goes to stderr.
- The same params as an .npz give the same numbers; an .npz whose head has
  1000 classes gets few-shot accuracy only, and without --fewshot exits 2.
- User errors print one line and exit 2.
"""

from __future__ import annotations

import io
import json
import os

import jax
import numpy as np
import pytest

from vit_jax import checkpoint
from vit_jax import evaluate
from vit_jax import train_checkpoints
from vit_jax import validation

from test_fewshot import shared_digits_run, start_if_needed, tiny_config  # pylint: disable=g-bad-import-order

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_CONFIG = os.path.join(REPO, 'configs', 'default.py')


@pytest.fixture(scope='module', autouse=True)
def _training_starts_first(request, tmp_path_factory):
  start_if_needed(request, tmp_path_factory)  # the cheap tests below run meanwhile


@pytest.fixture(scope='session')
def digits_run(tmp_path_factory):
  return shared_digits_run(tmp_path_factory)


def _read(path):
  with open(path, encoding='utf-8') as f:
    return json.load(f)


def test_user_errors_exit_2_with_one_line(tmp_path, capsys):
  broken = tmp_path / 'broken.py'
  broken.write_text('def get_config():\n  raise RuntimeError("no such recipe")\n')
  not_a_run = tmp_path / 'empty_dir'
  not_a_run.mkdir()
  cases = [
      (['--checkpoint', str(tmp_path / 'missing.npz'), '--config', DEFAULT_CONFIG],
       'no such checkpoint'),
      (['--checkpoint', str(not_a_run), '--config', DEFAULT_CONFIG], 'not the workdir'),
      (['--checkpoint', str(not_a_run), '--config', str(tmp_path / 'nope.py')],
       'does not exist'),
      (['--checkpoint', str(not_a_run), '--config', str(broken)], 'no such recipe'),
      (['--checkpoint', str(not_a_run), '--config', DEFAULT_CONFIG, '--fewshot', '1,x'],
       'shots must be positive'),
      (['--checkpoint', str(not_a_run), '--config', DEFAULT_CONFIG, '--model', 'ViT-Nope'],
       'ViT-Nope'),
  ]
  for args, message in cases:
    assert evaluate.main(args) == 2, args
    err = capsys.readouterr().err
    assert err.startswith('error: ') and err.count('\n') == 1 and message in err, (args, err)
  assert not os.listdir(not_a_run)  # nothing created in a directory that is not a run


def test_progress_reports_eta():
  stream = io.StringIO()
  now = [0.0]
  progress = evaluate.Progress(stream, every_s=5.0, clock=lambda: now[0])
  for done in range(1, 11):
    now[0] = done * 2.0
    progress('eval test', done, 10)
  lines = stream.getvalue().splitlines()
  # The first batch, then at most one line per 5 s, and always the last.
  assert lines[0].startswith('eval test: 1/10 batches') and len(lines) <= 6
  assert lines[-1] == 'eval test: 10/10 batches, 0:18 elapsed, ETA 0:00'
  assert 'ETA 0:' in lines[1]


@pytest.mark.slow
def test_workdir_reports_the_runs_final_eval(digits_run, tmp_path, capsys):
  workdir, data_dir = digits_run
  out = str(tmp_path / 'eval')
  rc = evaluate.main(['--checkpoint', workdir, '--config', DEFAULT_CONFIG, '--data_dir',
                      data_dir, '--fewshot', '1,10', '--out', out])
  captured = capsys.readouterr()
  assert rc == 0, captured.err
  final = _read(os.path.join(workdir, 'final_metrics.json'))
  metrics = _read(os.path.join(out, 'metrics.json'))
  print(f"top-1 {metrics['top1_accuracy']:.4f} (run: {final['eval_accuracy']:.4f}), "
        f"10-shot {metrics['fewshot/10shot_accuracy']:.4f}")
  # The config file says ViT-Digits_4; the run trained ViT-Test_4 and recorded it.
  assert metrics['model_name'] == 'ViT-Test_4' and metrics['checkpoint_kind'] == 'workdir'
  assert metrics['step'] == final['step']
  assert metrics['top1_accuracy'] == final['eval_accuracy']
  assert metrics['loss'] == pytest.approx(final['eval_loss'], rel=1e-5)
  assert metrics['num_examples'] == 355 and metrics['image_size'] == [16, 16]
  assert metrics['top1_accuracy'] <= metrics['top5_accuracy'] <= 1
  counts = np.array(metrics['per_class_count'])
  per_class = np.array(metrics['per_class_accuracy'])
  confusion = np.array(metrics['confusion'])
  assert counts.sum() == 355 and confusion.shape == (10, 10)
  np.testing.assert_array_equal(confusion.sum(axis=1), counts)
  assert np.trace(confusion) / 355 == pytest.approx(metrics['top1_accuracy'])
  assert np.sum(per_class * counts) / 355 == pytest.approx(metrics['top1_accuracy'])
  assert metrics['fewshot/10shot_accuracy'] > 0.5
  assert set(metrics['fewshot']['shots']) == {'1', '10'}
  with open(os.path.join(out, 'confusion.png'), 'rb') as f:
    assert f.read(8) == b'\x89PNG\r\n\x1a\n'
  assert 'ETA' in captured.err
  assert 'top-1' in captured.out and '10-shot' in captured.out
  # The same params as an .npz (published layout) give the same numbers.
  _, state = train_checkpoints.load_latest(workdir)
  npz = str(tmp_path / 'run.npz')
  checkpoint.save(state['params'], npz)
  result = evaluate.evaluate(npz, tiny_config(data_dir))
  assert result['checkpoint_kind'] == 'npz'
  assert result['top1_accuracy'] == metrics['top1_accuracy']
  assert result['loss'] == pytest.approx(metrics['loss'], rel=1e-5)


@pytest.mark.slow
def test_other_head_gets_fewshot_only(digits_run, tmp_path, capsys):
  _, data_dir = digits_run
  config = tiny_config(data_dir)
  model = validation.build_model(config, 1000)
  params = model.init(jax.random.key(1), np.zeros((1, 16, 16, 3), np.float32),
                      train=False)['params']
  npz = str(tmp_path / 'imagenet_head.npz')
  checkpoint.save(jax.tree.map(np.asarray, params), npz)
  args = ['--checkpoint', npz, '--config', DEFAULT_CONFIG, '--model', 'ViT-Test_4',
          '--data_dir', data_dir, '--quiet']
  assert evaluate.main(args) == 2
  err = capsys.readouterr().err
  assert err.count('\n') == 1 and 'only few-shot evaluation applies' in err, err
  out = str(tmp_path / 'eval')
  assert evaluate.main(args + ['--fewshot', '5', '--out', out]) == 0
  metrics = _read(os.path.join(out, 'metrics.json'))
  assert 'top1_accuracy' not in metrics and not os.path.exists(os.path.join(out, 'confusion.png'))
  assert 0.1 < metrics['fewshot/5shot_accuracy'] <= 1
