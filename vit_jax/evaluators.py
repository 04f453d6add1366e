"""Evaluation of a classifier on a split: the step and the pass over the batches.

`make_eval_step(model, config)` is the pure per-batch function (sums of
correct top-1, loss and example count over unmasked examples);
`ClassificationEvaluator` jit-compiles it over the device mesh and runs it over
a data source's eval batches. The training loop and the command line share it.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable

import jax
import jax.numpy as jnp

from vit_jax import optimizers
from vit_jax import parallel
from vit_jax.configs import schema


def make_eval_step(model, config) -> Callable[[Any, dict], dict]:
  """`(params, batch) -> sums`: 'correct' top-1, 'loss' and 'count' over unmasked examples.

  Top-1 counts an example as right when its highest logit is one of its labels.
  """
  loss_fn = optimizers.make_loss(schema.resolve(config))

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
