"""Few-shot linear evaluation of frozen features (paper Section 4.1, big_vision's evaluator).

The protocol, as the paper uses it for "linear 5-shot ImageNet top-1":

1. The model is frozen; an image's representation is `out['pre_logits']`
   (what the classification head reads), computed with the eval
   preprocessing of the config.
2. From the train split, k images of every class are the training set of a
   linear classifier, found in closed form: L2-regularised least squares from
   the features (plus a constant feature, the bias) onto targets in
   {-1, 1}^K (1 for the image's class, -1 elsewhere).
3. The regulariser is picked from a small grid on other, held-out images of
   the train split (never the test split).
4. The classifier's top-1 accuracy on the test split is the result.

`FewShotEvaluator(model, config, mesh).run(params)` does all of it and returns
`{'fewshot/1shot_accuracy': ..., 'fewshot/5shot_accuracy': ..., ...}`; the
training loop, `python -m vit_jax.evaluate --fewshot` and `compare` call it
the same way. Features are computed by one jitted forward over the device mesh,
batches sharded as evaluation batches are; the solve runs on the host in
float64 (it is small: k * classes rows), so results do not depend on the
device count. Which images are picked is a pure function of the seed.

`fewshot_from_features` is the same protocol on features already at hand.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from vit_jax import data_sources
from vit_jax import parallel
from vit_jax.configs import schema

DEFAULT_SHOTS = (1, 5, 10, 25)  # the paper's (Section 4.1, Figures 3-5 use 5)
# Regularisers tried, on features centred and scaled to unit mean squared norm
# (`standardize`), so that one grid fits every model width.
DEFAULT_L2_GRID = tuple(float(2.0**e) for e in range(-10, 11, 2))
DEFAULT_HOLDOUT_PER_CLASS = 10  # held-out train images per class that pick the regulariser
# Synthetic data has no finite train split: at most this many batches are read
# for the few-shot pool.
_MAX_SYNTHETIC_POOL_BATCHES = 64

ProgressFn = Callable[[str, int, Optional[int]], None]  # (phase, batches done, total or None)


# ---------------------------------------------------------------------------
# The closed-form classifier (host, float64).
# ---------------------------------------------------------------------------

def standardize(train: np.ndarray, *others: np.ndarray) -> list[np.ndarray]:
  """`train` and `others` centred on the mean of `train`, scaled by one number.

  The scale makes the mean squared norm of centred `train` 1, so the
  regulariser means the same for a 64-wide and a 1024-wide representation
  (measured on digits: the best l2 was 2^-6..2^0 for both). A single scale,
  not one per dimension, keeps the geometry of the features; a per-dimension
  estimate from one image per class would be noise.
  """
  train = np.asarray(train, np.float64)
  mean = train.mean(axis=0)
  centred = train - mean
  scale = math.sqrt(float(np.mean(np.sum(centred**2, axis=1))))
  scale = scale if scale > 0 else 1.0  # all-equal features: nothing to scale
  return [centred / scale] + [(np.asarray(x, np.float64) - mean) / scale for x in others]


def with_bias(features: np.ndarray) -> np.ndarray:
  """[n, d] -> [n, d + 1]: a constant 1 appended, whose weight is the bias."""
  features = np.asarray(features, np.float64)
  return np.concatenate([features, np.ones((features.shape[0], 1))], axis=1)


def pm1_targets(labels: np.ndarray, num_classes: int) -> np.ndarray:
  """Class ids [n] -> [n, K] targets: 1 at the class, -1 elsewhere."""
  return 2.0 * np.eye(num_classes)[np.asarray(labels, np.int64)] - 1.0


def ridge_weights(inputs: np.ndarray, targets: np.ndarray,
                  l2_grid: Sequence[float]) -> np.ndarray:
  """argmin_W |inputs W - targets|^2 + l2 |W|^2 for every l2: [len(l2_grid), p, K].

  `inputs` [n, p] already holds the bias column. One eigendecomposition serves
  the whole grid: of inputs inputs^T (n x n, the dual form) when there are
  fewer examples than features, as in 1-shot, else of inputs^T inputs.
  """
  a = np.asarray(inputs, np.float64)
  y = np.asarray(targets, np.float64)
  n, p = a.shape
  grid = np.asarray(list(l2_grid), np.float64)
  if grid.size == 0 or np.any(grid <= 0):
    raise ValueError(f'l2_grid must be positive regularisers, got {list(l2_grid)}')
  if n <= p:
    # W = A^T (A A^T + l2 I)^-1 Y
    s, v = np.linalg.eigh(a @ a.T)
    vty = v.T @ y
    return np.stack([a.T @ (v @ (vty / (s + l2)[:, None])) for l2 in grid])
  # W = (A^T A + l2 I)^-1 A^T Y
  s, v = np.linalg.eigh(a.T @ a)
  vtaty = v.T @ (a.T @ y)
  return np.stack([v @ (vtaty / (s + l2)[:, None]) for l2 in grid])


@dataclasses.dataclass(frozen=True)
class ShotResult:
  """One k of a few-shot evaluation."""
  shots: int
  accuracy: float  # top-1 on the test split
  l2: float  # the regulariser the held-out images picked
  holdout_accuracy: float  # top-1 of that regulariser on the held-out images
  num_train: int  # shots * classes
  num_test: int


def pick_shots(labels: np.ndarray, num_classes: int, shots: Sequence[int], seed: int,
               holdout_per_class: int = DEFAULT_HOLDOUT_PER_CLASS
               ) -> tuple[dict[int, np.ndarray], np.ndarray]:
  """({k: indices of k images per class}, held-out indices) into `labels`.

  Each class's images are permuted once (rng from `seed`, classes in order);
  the first `holdout_per_class` are held out, the next k are the k-shot set.
  So the k-shot sets are nested (the 5 shots hold the 1 shot) and disjoint
  from the held-out images, which are the same for every k.
  """
  labels = np.asarray(labels, np.int64)
  shots = sorted({int(k) for k in shots})
  if not shots or shots[0] < 1:
    raise ValueError(f'shots must be positive counts of images per class, got {shots}')
  if holdout_per_class < 1:
    raise ValueError(f'holdout_per_class must be >= 1, got {holdout_per_class}')
  need = holdout_per_class + shots[-1]
  rng = np.random.default_rng(int(seed))
  per_class, short = [], []
  for c in range(num_classes):
    members = np.flatnonzero(labels == c)
    if members.size < need:
      short.append(f'class {c}: {members.size}')
    per_class.append(rng.permutation(members))
  if short:
    raise ValueError(
        f'{shots[-1]}-shot evaluation with {holdout_per_class} held-out images per class '
        f'needs {need} train images of every class; too few in: {", ".join(short[:10])}'
        f'{" ..." if len(short) > 10 else ""}. Use fewer shots or a larger train split.')
  holdout = np.concatenate([p[:holdout_per_class] for p in per_class])
  picked = {k: np.concatenate([p[holdout_per_class:holdout_per_class + k] for p in per_class])
            for k in shots}
  return picked, holdout


def _top1(scores: np.ndarray, labels: np.ndarray) -> float:
  return float(np.mean(np.argmax(scores, axis=-1) == labels)) if labels.size else float('nan')


def fit_and_score(train_x: np.ndarray, train_y: np.ndarray, holdout_x: np.ndarray,
                  holdout_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray,
                  num_classes: int, l2_grid: Sequence[float] = DEFAULT_L2_GRID
                  ) -> tuple[float, float, float]:
  """(test top-1, chosen l2, its held-out top-1) of the least-squares classifier.

  The l2 with the best held-out top-1 wins; ties go to the larger l2, the
  more stable fit.
  """
  train_s, holdout_s, test_s = standardize(train_x, holdout_x, test_x)
  weights = ridge_weights(with_bias(train_s), pm1_targets(train_y, num_classes), l2_grid)
  holdout_a = with_bias(holdout_s)
  holdout_acc = [_top1(holdout_a @ w, np.asarray(holdout_y)) for w in weights]
  grid = list(l2_grid)
  best = max(range(len(grid)), key=lambda i: (holdout_acc[i], grid[i]))
  test_acc = _top1(with_bias(test_s) @ weights[best], np.asarray(test_y))
  return test_acc, float(grid[best]), holdout_acc[best]


def fewshot_from_features(train_features: np.ndarray, train_labels: np.ndarray,
                          test_features: np.ndarray, test_labels: np.ndarray,
                          num_classes: int, shots: Sequence[int] = DEFAULT_SHOTS,
                          seed: int = 0, l2_grid: Sequence[float] = DEFAULT_L2_GRID,
                          holdout_per_class: int = DEFAULT_HOLDOUT_PER_CLASS
                          ) -> dict[int, ShotResult]:
  """The protocol on features at hand: a pool of train features, the test features."""
  train_features = np.asarray(train_features)
  test_features = np.asarray(test_features)
  train_labels = np.asarray(train_labels, np.int64)
  test_labels = np.asarray(test_labels, np.int64)
  picked, holdout = pick_shots(train_labels, num_classes, shots, seed, holdout_per_class)
  results = {}
  for k, index in picked.items():
    accuracy, l2, holdout_acc = fit_and_score(
        train_features[index], train_labels[index], train_features[holdout],
        train_labels[holdout], test_features, test_labels, num_classes, l2_grid)
    results[k] = ShotResult(k, accuracy, l2, holdout_acc, int(index.size),
                            int(test_labels.size))
  return results


def metric_name(shots: int) -> str:
  return f'fewshot/{int(shots)}shot_accuracy'


# ---------------------------------------------------------------------------
# Features on the devices.
# ---------------------------------------------------------------------------

def parse_shots(text: str) -> tuple[int, ...]:
  """'1,5,10' -> (1, 5, 10); ValueError for anything but positive integers."""
  try:
    shots = tuple(int(t) for t in str(text).split(',') if t.strip())
  except ValueError:
    shots = ()
  if not shots or min(shots) < 1:
    raise ValueError(f'shots must be positive integers separated by commas, got {text!r}')
  return tuple(sorted(set(shots)))


class FewShotEvaluator:
  """Few-shot linear accuracy of a model's frozen `pre_logits` on `config`'s dataset.

  Build once (nothing is read or compiled until `run`), then call
  `run(params)` as often as wanted, e.g. every `fewshot_every` training steps.

  Args:
    model: the Flax module; `model.apply(..., train=False)` returns
      `(logits, out)` with `out['pre_logits']`.
    config: the run's config: dataset, data_dir, image_size, eval
      preprocessing (`pp.eval`), `eval_batch_size` (the feature batch) and
      `seed` (default seed of the picks) are read from it. The k-shot images
      come from `config.train_split`, the accuracy from `config.eval_split`.
    mesh: the device mesh (`vit_jax.parallel.make_mesh()`); batches are split
      over its data axis as evaluation batches are.
    shots: the k values (default: `DEFAULT_SHOTS`, 1, 5, 10 and 25).
    seed: which images are picked (default `config.seed`).
    l2_grid, holdout_per_class: the regularisers tried and the held-out train
      images per class that choose among them.
    train_split, test_split, batch_size: override the config's
      `train_split`, `eval_split` and `eval_batch_size`.
    progress: called as `progress(phase, batches_done, batches_total)` after
      each batch, phase 'train' (the pool) or 'test'.
  """

  def __init__(self, model: Any, config: schema.Config, mesh: Any, *,
               shots: Optional[Sequence[int]] = None, seed: Optional[int] = None,
               l2_grid: Sequence[float] = DEFAULT_L2_GRID,
               holdout_per_class: int = DEFAULT_HOLDOUT_PER_CLASS,
               train_split: Optional[str] = None, test_split: Optional[str] = None,
               batch_size: Optional[int] = None, progress: Optional[ProgressFn] = None):
    self.shots = parse_shots(','.join(str(k) for k in (shots or DEFAULT_SHOTS)))
    self.seed = int(config.seed if seed is None else seed)
    self.l2_grid = tuple(float(x) for x in l2_grid)
    if not self.l2_grid or min(self.l2_grid) <= 0:
      raise ValueError(f'l2_grid must be positive regularisers, got {list(l2_grid)}')
    self.holdout_per_class = int(holdout_per_class)
    if self.holdout_per_class < 1:
      raise ValueError(f'holdout_per_class must be >= 1, got {holdout_per_class}')
    batch_size = int(config.eval_batch_size if batch_size is None else batch_size)
    parallel.check_batch_divisible(batch_size, mesh, 'few-shot batch size')
    train_split = config.train_split if train_split is None else train_split
    test_split = config.eval_split if test_split is None else test_split
    # Both splits are read as evaluation splits: in order, eval preprocessing,
    # padded with masked examples (the pool's augmentation would make the
    # features a random function of the step).
    # The pool is not cached: it is usually read only in part (until every
    # class has enough images), and a partly read cache is thrown away anyway.
    self._train_config = schema.replace(config, eval_split=train_split, cache=False,
                                         eval_batch_size=batch_size, batch_size=batch_size)
    self._test_config = schema.replace(config, eval_split=test_split,
                                        eval_batch_size=batch_size)
    self._mesh = mesh
    self._progress = progress
    self._sharding = parallel.data_sharding(mesh)
    self._replicated = parallel.replicated(mesh)
    self._train_data = self._test_data = None
    self.details: dict[int, ShotResult] = {}  # of the latest run

    def features(params, batch):
      _, out = model.apply({'params': params}, batch['image'], train=False)
      return (out['pre_logits'].astype(jnp.float32),
              jnp.argmax(batch['label'], axis=-1).astype(jnp.int32),
              batch['mask'].astype(jnp.float32))

    # Replicated outputs: every process gets every example's features, so the
    # host-side solve is the same everywhere.
    self._features = jax.jit(features, out_shardings=self._replicated)

  # -- data ------------------------------------------------------------------

  def _data(self):
    if self._train_data is None:
      self._train_data = data_sources.get_data(self._train_config)
      self._test_data = data_sources.get_data(self._test_config)
      self.num_classes = int(self._test_data.num_classes)
    return self._train_data, self._test_data

  def _num_batches(self, data, config) -> Optional[int]:
    if config.dataset == data_sources.SYNTHETIC and data is self._train_data:
      return _MAX_SYNTHETIC_POOL_BATCHES
    return math.ceil(int(data.num_eval_examples) / int(config.eval_batch_size))

  def _pool_batches(self, data) -> Iterator[dict]:
    if self._train_config.dataset == data_sources.SYNTHETIC:
      # Synthetic data has no separate train split to read in order: its
      # training stream (no augmentation there) is the pool.
      batches = itertools.islice(data.train_batches(0), _MAX_SYNTHETIC_POOL_BATCHES)
      return (dict(b, mask=np.ones(b['label'].shape[:1], np.float32)) for b in batches)
    return iter(data.eval_batches())

  def _extract(self, params, batches: Iterable[dict], phase: str, total: Optional[int],
               enough: Optional[Callable[[np.ndarray], bool]] = None
               ) -> tuple[np.ndarray, np.ndarray]:
    """(features [n, d] float32, labels [n]) of the unmasked examples of `batches`."""
    feats, labels, counts = [], [], None
    done = 0
    for done, batch in enumerate(batches, 1):
      batch = dict(batch)
      batch.setdefault('mask', np.ones(np.asarray(batch['label']).shape[:1], np.float32))
      f, y, m = jax.device_get(self._features(
          params, parallel.shard_batch(batch, self._sharding)))
      keep = np.asarray(m) > 0
      feats.append(np.asarray(f)[keep])
      labels.append(np.asarray(y)[keep])
      if self._progress is not None:
        self._progress(phase, done, total)
      if enough is not None:
        counts = np.bincount(labels[-1], minlength=self.num_classes) + (
            0 if counts is None else counts)
        # Every process sees the same (replicated) labels, so all stop together.
        if enough(counts):
          if self._progress is not None and done != total:
            self._progress(phase, done, done)  # stopped early: this phase is complete
          break
    if not feats:
      raise ValueError(f'The few-shot {phase} split gave no batches')
    return np.concatenate(feats), np.concatenate(labels)

  def features(self, params: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(pool features, pool labels, test features, test labels) under `params`.

    The pool is the train split read in order until every class has
    `holdout_per_class + max(shots)` images (or the split ends).
    """
    train_data, test_data = self._data()
    if not all(isinstance(x, jax.Array) for x in jax.tree.leaves(params)):
      params = parallel.place(params, jax.tree.map(lambda _: self._replicated, params))
    need = self.holdout_per_class + max(self.shots)
    pool_x, pool_y = self._extract(
        params, self._pool_batches(train_data), 'train',
        self._num_batches(train_data, self._train_config),
        enough=lambda counts: bool(np.all(counts >= need)))
    test_x, test_y = self._extract(params, iter(test_data.eval_batches()), 'test',
                                   self._num_batches(test_data, self._test_config))
    return pool_x, pool_y, test_x, test_y

  # -- the evaluation --------------------------------------------------------

  def evaluate(self, params: Any) -> dict[int, ShotResult]:
    """{k: ShotResult} under `params` (also kept in `self.details`)."""
    pool_x, pool_y, test_x, test_y = self.features(params)
    self.details = fewshot_from_features(
        pool_x, pool_y, test_x, test_y, self.num_classes, self.shots, self.seed,
        self.l2_grid, self.holdout_per_class)
    return self.details

  def run(self, params: Any) -> dict[str, float]:
    """{'fewshot/<k>shot_accuracy': test top-1} for every k, as the eval metrics are logged."""
    return {metric_name(k): r.accuracy for k, r in self.evaluate(params).items()}
