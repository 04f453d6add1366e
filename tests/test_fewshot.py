"""vit_jax.fewshot: the closed form against independent solvers, the picks, devices, digits.

- `ridge_weights` equals `numpy.linalg.lstsq` on the augmented system
  [A; sqrt(l2) I] W = [Y; 0] to 1e-4, in both its primal and dual forms.
- The whole protocol's predictions equal scikit-learn's `RidgeClassifier` on the
  same standardised features (sklearn fits an unregularised intercept; on
  centred features with balanced shots that shifts every class score by the
  same amount, so the predicted classes are the same).
- The picks are a pure function of the seed, nested over k, disjoint from the
  held-out images; too few images of a class is a clear error.
- `FewShotEvaluator` gives the same features and result on 1 and 8 devices.
- On the embedded digits, a ViT-Test_4 trained 250 steps (a subprocess on one
  device, shared with tests/test_evaluate.py) gives 10-shot accuracy far above
  chance (10%) and above its random initialisation.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from vit_jax import fewshot
from vit_jax import parallel
from vit_jax import validation
from vit_jax.configs import schema

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN_STEPS = 250


def tiny_config(data_dir: str, **fields):
  """configs/default.py with ViT-Test_4 (16x16) and small batches, on `data_dir`."""
  values = schema.load_file(os.path.join(REPO, 'configs', 'default.py:ViT-Test_4')).to_dict()
  values.update(data_dir=data_dir, batch_size=32, eval_batch_size=64)
  values.update(fields)
  return schema.resolve(values)


_RUNS: dict = {}  # root -> (subprocess, workdir, data_dir, log path)


def start_digits_run(tmp_path_factory) -> None:
  """Starts the session's short digits run in the background, once.

  `python -m vit_jax.main` in a subprocess with one device (as a user runs it;
  eight fake devices make each step several times slower). Its cost is
  start-up and compilation, so it runs while the tests that need no trained
  model do.
  """
  root = tmp_path_factory.getbasetemp() / 'fewshot_digits_run'
  if str(root) in _RUNS:
    return
  root.mkdir(exist_ok=True)
  workdir, data_dir, log = str(root / 'workdir'), str(root / 'tfds'), str(root / 'train.log')
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL='2')
  env.pop('XLA_FLAGS', None)
  command = [sys.executable, '-m', 'vit_jax.main',
             '--config=configs/default.py:ViT-Test_4', f'--workdir={workdir}',
             f'--config.data_dir={data_dir}', f'--config.total_steps={TRAIN_STEPS}',
             '--config.warmup_steps=20', '--config.batch_size=32',
             '--config.eval_batch_size=64', '--config.eval_every=0',
             '--config.checkpoint_every=0', '--config.log_every=50']
  with open(log, 'w', encoding='utf-8') as f:  # a file: a full pipe would stall the run
    proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT)
  _RUNS[str(root)] = (proc, workdir, data_dir, log)


def shared_digits_run(tmp_path_factory) -> tuple[str, str]:
  """(workdir, data_dir) of the session's digits run (both test files share it)."""
  start_digits_run(tmp_path_factory)
  root = str(tmp_path_factory.getbasetemp() / 'fewshot_digits_run')
  proc, workdir, data_dir, log = _RUNS[root]
  returncode = proc.wait(timeout=600)
  if returncode != 0:
    with open(log, encoding='utf-8') as f:
      pytest.fail(f'the digits run failed ({returncode}):\n{f.read()[-4000:]}')
  return workdir, data_dir


def start_if_needed(request, tmp_path_factory) -> None:
  """Starts the run early when a selected test of the session will need it."""
  if any('digits_run' in getattr(item, 'fixturenames', ()) for item in request.session.items):
    start_digits_run(tmp_path_factory)


@pytest.fixture(scope='module', autouse=True)
def _training_starts_first(request, tmp_path_factory):
  start_if_needed(request, tmp_path_factory)


@pytest.fixture(scope='session')
def digits_run(tmp_path_factory):
  return shared_digits_run(tmp_path_factory)


# ---------------------------------------------------------------------------
# The closed form.
# ---------------------------------------------------------------------------

def _lstsq_ridge(a: np.ndarray, y: np.ndarray, l2: float) -> np.ndarray:
  """Ridge regression as ordinary least squares on rows sqrt(l2) I appended."""
  p = a.shape[1]
  stacked = np.concatenate([a, np.sqrt(l2) * np.eye(p)])
  targets = np.concatenate([y, np.zeros((p, y.shape[1]))])
  return np.linalg.lstsq(stacked, targets, rcond=None)[0]


@pytest.mark.parametrize('n,d', [(10, 32), (200, 16)])  # dual (n <= p) and primal forms
def test_ridge_weights_equal_lstsq(n, d):
  rng = np.random.default_rng(0)
  a = fewshot.with_bias(rng.standard_normal((n, d)))
  y = fewshot.pm1_targets(rng.integers(5, size=n), 5)
  grid = (1e-3, 0.25, 1.0, 64.0)
  weights = fewshot.ridge_weights(a, y, grid)
  assert weights.shape == (len(grid), d + 1, 5)
  for w, l2 in zip(weights, grid):
    np.testing.assert_allclose(w, _lstsq_ridge(a, y, l2), atol=1e-4, rtol=1e-4)


def test_protocol_predictions_equal_sklearn_ridge_classifier():
  sklearn_linear = pytest.importorskip('sklearn.linear_model')
  rng = np.random.default_rng(1)
  classes, dim = 6, 24
  centres = rng.standard_normal((classes, dim))
  pool_y = rng.permutation(np.repeat(np.arange(classes), 60))
  test_y = rng.integers(classes, size=240)
  pool_x = centres[pool_y] + 0.8 * rng.standard_normal((pool_y.size, dim))
  test_x = centres[test_y] + 0.8 * rng.standard_normal((test_y.size, dim))
  grid = (2.0**-6, 2.0**-2, 1.0, 4.0, 64.0)
  results = fewshot.fewshot_from_features(pool_x, pool_y, test_x, test_y, classes,
                                          shots=(1, 5, 20), seed=3, l2_grid=grid)
  picked, holdout = fewshot.pick_shots(pool_y, classes, (1, 5, 20), seed=3)
  for k, result in results.items():
    train_s, hold_s, test_s = fewshot.standardize(pool_x[picked[k]], pool_x[holdout], test_x)
    # Independent: pick the l2 by held-out accuracy with sklearn, as the module does.
    scores = []
    for l2 in grid:
      clf = sklearn_linear.RidgeClassifier(alpha=l2, solver='svd').fit(train_s, pool_y[picked[k]])
      scores.append((np.mean(clf.predict(hold_s) == pool_y[holdout]), l2, clf))
    _, best_l2, clf = max(scores, key=lambda s: (s[0], s[1]))
    assert result.l2 == best_l2, k
    expected = np.mean(clf.predict(test_s) == test_y)
    assert result.accuracy == pytest.approx(expected, abs=1e-12), k
    # And the predictions themselves, from the module's weights.
    w = fewshot.ridge_weights(fewshot.with_bias(train_s),
                              fewshot.pm1_targets(pool_y[picked[k]], classes), [best_l2])[0]
    np.testing.assert_array_equal(np.argmax(fewshot.with_bias(test_s) @ w, -1),
                                  clf.predict(test_s))
  assert results[20].accuracy > 0.8  # clusters at 2.5 noise are separable with 20 shots


def test_picks_are_seeded_nested_and_disjoint():
  labels = np.repeat(np.arange(4), 30)
  picked, holdout = fewshot.pick_shots(labels, 4, (1, 5, 10), seed=7, holdout_per_class=3)
  again, holdout_again = fewshot.pick_shots(labels, 4, (10, 5, 1), seed=7, holdout_per_class=3)
  for k in (1, 5, 10):
    np.testing.assert_array_equal(picked[k], again[k])
    assert np.all(np.bincount(labels[picked[k]], minlength=4) == k)
  np.testing.assert_array_equal(holdout, holdout_again)
  assert set(picked[1]) <= set(picked[5]) <= set(picked[10])
  assert not set(picked[10]) & set(holdout)
  other, _ = fewshot.pick_shots(labels, 4, (10,), seed=8, holdout_per_class=3)
  assert set(other[10]) != set(picked[10])
  with pytest.raises(ValueError, match=r'needs 13 train images of every class.*class 3: 12'):
    fewshot.pick_shots(np.concatenate([labels[labels < 3], [3] * 12]), 4, (10,), 0, 3)
  with pytest.raises(ValueError, match='positive'):
    fewshot.parse_shots('1,0')
  assert fewshot.parse_shots('10, 1,5,5') == (1, 5, 10)


# ---------------------------------------------------------------------------
# The evaluator on devices.
# ---------------------------------------------------------------------------

def _init_params(model, seed: int = 0):
  images = np.zeros((1, 16, 16, 3), np.float32)
  return model.init(jax.random.key(seed), images, train=False)['params']


def test_one_and_eight_devices_agree():
  assert jax.device_count() == 8  # tests/conftest.py
  # Synthetic data (noisy colour templates, no TensorFlow): the batches are the
  # same numpy arrays whatever the mesh, as the pipeline's are.
  config = schema.resolve({'dataset': 'synthetic', 'model_name': 'ViT-Test_4',
                           'image_size': (16, 16), 'batch_size': 64, 'eval_batch_size': 64,
                           'num_classes': 4, 'num_eval_examples': 200, 'synthetic_noise': 1.0})
  model = validation.build_model(config, 4)
  params = _init_params(model)
  results, features = [], []
  for devices in (jax.devices()[:1], jax.devices()):
    evaluator = fewshot.FewShotEvaluator(model, config, parallel.make_mesh(devices),
                                         shots=(1, 5))
    results.append(evaluator.run(params))
    features.append(evaluator.features(params))
    details = evaluator.details
  for one, eight in zip(features[0], features[1]):
    np.testing.assert_allclose(one, eight, rtol=1e-5, atol=1e-5)
  assert results[0] == results[1]
  assert set(results[1]) == {'fewshot/1shot_accuracy', 'fewshot/5shot_accuracy'}
  assert details[5].num_train == 20 and details[5].num_test == 200
  assert details[5].l2 in fewshot.DEFAULT_L2_GRID
  # The pool stops once every class has holdout + 5 images (a batch or two of
  # 64), not at the cap of fewshot._MAX_SYNTHETIC_POOL_BATCHES batches.
  assert features[1][0].shape[0] in (64, 128, 192)
  assert 0.25 < results[1]['fewshot/5shot_accuracy'] <= 1  # chance is 0.25


@pytest.mark.slow
def test_trained_digits_features_are_far_above_chance(digits_run):
  from vit_jax import train_checkpoints  # pylint: disable=g-import-not-at-top
  workdir, data_dir = digits_run
  config = tiny_config(data_dir)
  model = validation.build_model(config, 10)
  evaluator = fewshot.FewShotEvaluator(model, config, parallel.make_mesh())
  _, state = train_checkpoints.load_latest(workdir)
  trained = evaluator.run(state['params'])
  assert set(trained) == {fewshot.metric_name(k) for k in fewshot.DEFAULT_SHOTS}
  random_init = evaluator.run(_init_params(model))
  with open(os.path.join(workdir, 'final_metrics.json')) as f:
    top1 = json.load(f)['eval_accuracy']
  print(f'ViT-Test_4 after {TRAIN_STEPS} steps (top-1 {top1:.3f}): trained '
        f'{ {k: round(v, 3) for k, v in trained.items()} }, random init '
        f'{ {k: round(v, 3) for k, v in random_init.items()} }')
  assert trained['fewshot/10shot_accuracy'] > 0.6  # chance is 0.1
  assert trained['fewshot/10shot_accuracy'] > random_init['fewshot/10shot_accuracy'] + 0.1
  assert trained['fewshot/1shot_accuracy'] <= trained['fewshot/25shot_accuracy'] + 0.05


@pytest.mark.slow
def test_training_loop_logs_fewshot(tmp_path):
  """`config.fewshot_every`: the loop runs the few-shot evaluator and logs it like eval top-1."""
  from vit_jax import train  # pylint: disable=g-import-not-at-top
  config = dict(model_name='ViT-Test_4', dataset='synthetic', num_classes=4, image_size=8,
                num_eval_examples=32, batch_size=16, eval_batch_size=16, total_steps=4,
                warmup_steps=1, eval_every=0, checkpoint_every=0, log_every=2,
                fewshot_every=2, fewshot_shots=(1, 2), optimizer='adamw', learning_rate=1e-3)
  final = train.train_and_evaluate(config, str(tmp_path))
  assert 0.0 <= final['fewshot/2shot_accuracy'] <= 1.0
  with open(tmp_path / 'metrics.jsonl') as f:
    logged = [json.loads(line) for line in f if 'fewshot/1shot_accuracy' in line]
  assert sorted({r['step'] for r in logged}) == [2, 4]
