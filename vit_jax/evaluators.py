"""Evaluation of a classifier on a split: the step and the pass over the batches.

`make_eval_step(model, config)` is the pure per-batch function (sums of
correct top-1, loss and example count over unmasked examples);
`ClassificationEvaluator` jit-compiles it over the device mesh and runs it over
a data source's eval batches. The training loop and the command line share it.

`SplitEvaluator` is the detailed pass of `python -m vit_jax.evaluate`: the same
forward and loss per example, with top-k, per-class accuracy and the confusion
matrix added up on the host (`SplitMetrics`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from vit_jax import optimizers
from vit_jax import parallel
from vit_jax.configs import schema


def make_eval_step(model, config: schema.Config) -> Callable[[Any, dict], dict]:
  """`(params, batch) -> sums`: 'correct' top-1, 'loss' and 'count' over unmasked examples.

  Top-1 counts an example as right when its highest logit is one of its labels.
  """
  loss_fn = optimizers.make_loss(config)

  def eval_step(params, batch: dict) -> dict:
    logits, _ = model.apply({'params': params}, batch['image'], train=False)
    labels = batch['label']
    mask = batch.get('mask', jnp.ones(labels.shape[:1], jnp.float32))
    top1 = jnp.argmax(logits, axis=-1)
    hit = jnp.take_along_axis(labels, top1[:, None], axis=-1)[:, 0] > 0
    return {'correct': jnp.sum(hit * mask),
            'loss': jnp.sum(loss_fn(logits, labels) * mask),
            'count': jnp.sum(mask)}

  return eval_step


class ClassificationEvaluator:
  """Top-1 accuracy and mean loss of params over one pass of eval batches."""

  def __init__(self, model, config, mesh, params_sharding: Any):
    self._batch_sharding = parallel.data_sharding(mesh)
    self._step = jax.jit(make_eval_step(model, config),
                         in_shardings=(params_sharding, self._batch_sharding),
                         out_shardings=parallel.replicated(mesh))

  def run(self, params: Any, batches: Iterable[dict]) -> dict[str, float]:
    totals = None
    for batch in batches:
      out = self._step(params, parallel.shard_batch(batch, self._batch_sharding))
      totals = out if totals is None else jax.tree.map(jnp.add, totals, out)
    if totals is None:
      raise ValueError('The evaluation split gave no batches')
    totals = jax.device_get(totals)
    count = max(float(totals['count']), 1.0)
    return {'eval_accuracy': float(totals['correct']) / count,
            'eval_loss': float(totals['loss']) / count,
            'eval_examples': float(totals['count'])}


# Above this many classes no confusion matrix is kept: it grows as classes^2
# (21,843 ImageNet-21k classes would take 3.8 GB) and no one reads it.
MAX_CONFUSION_CLASSES = 1000


def make_predict_step(model, config: schema.Config, top_k: int = 5) -> Callable[[Any, dict], dict]:
  """`(params, batch) -> per-example arrays`: 'top_k' class ids (best first), 'label'
  (the class of the one-hot label), 'hit1' / 'hitk' (top-1 / top-k right, as
  `make_eval_step` counts it), 'loss' (the config's loss) and 'mask'."""
  loss_fn = optimizers.make_loss(config)

  def predict_step(params, batch: dict) -> dict:
    logits, _ = model.apply({'params': params}, batch['image'], train=False)
    labels = batch['label']
    mask = batch.get('mask', jnp.ones(labels.shape[:1], jnp.float32))
    k = min(int(top_k), logits.shape[-1])
    _, best = jax.lax.top_k(logits, k)
    hits = jnp.take_along_axis(labels, best, axis=-1) > 0
    return {'top_k': best.astype(jnp.int32),
            'label': jnp.argmax(labels, axis=-1).astype(jnp.int32),
            'hit1': hits[:, 0], 'hitk': jnp.any(hits, axis=-1),
            'loss': loss_fn(logits, labels).astype(jnp.float32), 'mask': mask}

  return predict_step


@dataclasses.dataclass
class SplitMetrics:
  """What `SplitEvaluator.run` measured over one split."""
  num_examples: int
  top1: float
  topk: float
  top_k: int  # the k of `topk` (5, or the class count if smaller)
  loss: float  # mean of the config's loss (label smoothing included), as eval_loss
  per_class_accuracy: np.ndarray  # [classes] top-1 per true class; nan where none
  per_class_count: np.ndarray  # [classes] examples per true class
  confusion: Optional[np.ndarray]  # [true, predicted] counts; None above MAX_CONFUSION_CLASSES


class SplitEvaluator:
  """Top-1, top-k, loss, per-class accuracy and confusion of params over a split."""

  def __init__(self, model, config, mesh, num_classes: int, top_k: int = 5,
               params_sharding: Any = None):
    self.num_classes = int(num_classes)
    self.top_k = min(int(top_k), self.num_classes)
    self._batch_sharding = parallel.data_sharding(mesh)
    self._replicated = parallel.replicated(mesh)
    shardings = {} if params_sharding is None else {
        'in_shardings': (params_sharding, self._batch_sharding)}
    # Replicated outputs: every process adds up the same per-example results.
    self._step = jax.jit(make_predict_step(model, config, self.top_k),
                         out_shardings=self._replicated, **shardings)

  def run(self, params: Any, batches: Iterable[dict],
          progress: Optional[Callable[[int], None]] = None) -> SplitMetrics:
    """One pass over `batches`; `progress(batches_done)` is called after each."""
    if not all(isinstance(x, jax.Array) for x in jax.tree.leaves(params)):
      params = parallel.place(params, jax.tree.map(lambda _: self._replicated, params))
    k = self.num_classes
    counts = np.zeros(k, np.int64)
    right = np.zeros(k, np.int64)
    confusion = np.zeros((k, k), np.int64) if k <= MAX_CONFUSION_CLASSES else None
    hit1 = hitk = n = 0
    loss = 0.0
    for done, batch in enumerate(batches, 1):
      out = jax.device_get(self._step(params, parallel.shard_batch(batch, self._batch_sharding)))
      keep = np.asarray(out['mask']) > 0
      label, pred = out['label'][keep], out['top_k'][keep, 0]
      n += int(keep.sum())
      hit1 += int(out['hit1'][keep].sum())
      hitk += int(out['hitk'][keep].sum())
      loss += float(np.sum(out['loss'][keep], dtype=np.float64))
      np.add.at(counts, label, 1)
      np.add.at(right, label, out['hit1'][keep].astype(np.int64))
      if confusion is not None:
        np.add.at(confusion, (label, pred), 1)
      if progress is not None:
        progress(done)
    if n == 0:
      raise ValueError('The evaluation split gave no examples')
    with np.errstate(invalid='ignore', divide='ignore'):
      per_class = np.where(counts > 0, right / np.maximum(counts, 1), np.nan)
    return SplitMetrics(num_examples=n, top1=hit1 / n, topk=hitk / n, top_k=self.top_k,
                        loss=loss / n, per_class_accuracy=per_class, per_class_count=counts,
                        confusion=confusion)
