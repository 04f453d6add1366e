"""Learning-rate schedules, optimizers and classification losses (optax).

Everything here is a pure function of the training config, so the same config
gives the same optimizer on one device or a thousand:

- `make_schedule(config)`: linear warm-up from 0 to `config.learning_rate`
  over `config.warmup_steps`, counted as the reference code and big_vision count
  it (rate = base * step / warmup_steps on optax's 0-based step, so the first
  update has rate 0), then `'cosine'`, `'linear'`, `'step'` (BiT: / 10
  at each of `config.decay_boundaries`) or `'constant'` decay (`config.schedule`) until
  `config.total_steps`, ending at `config.end_learning_rate` (0 by default).
- `make_optimizer(config, schedule)`: global-norm clipping
  (`config.grad_clip_norm`, 0 turns it off) followed by SGD with momentum
  (`'sgd'`, the paper's fine-tuning recipe) or Adam with decoupled weight decay
  (`'adamw'`, the pre-training recipe; `weight_decay=0` is plain Adam). Weight
  decay applies to the arrays named `kernel` only (big_vision's `.*/kernel$`), not to
  biases, norm scales, position embeddings or the class token; AdamW's decay per
  step is `weight_decay * lr * w`, as the AugReg file names count it (`wd_0.1`).
  `config.accumulator_dtype='bfloat16'` stores the first moment (momentum)
  in bf16, halving that part of the optimizer state.
- `make_loss(config)`: per-example softmax or sigmoid cross-entropy
  (`config.loss`) with optional label smoothing.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import optax

from vit_jax.configs import schema

OPTIMIZERS = ('sgd', 'adamw')
SCHEDULES = ('cosine', 'linear', 'step', 'constant')
LOSSES = ('softmax_xent', 'sigmoid_xent')
ACCUMULATOR_DTYPES = {None: None, 'float32': jnp.float32, 'bfloat16': jnp.bfloat16}


def validate(config: schema.Config) -> None:
  """Raises ValueError naming the config field when an optimizer setting is bad."""
  lr = config.learning_rate
  if lr is None or not isinstance(lr, (int, float)) or not lr > 0 or not math.isfinite(lr):
    raise ValueError(f'config.learning_rate must be a finite number > 0, got {lr!r}')
  end = config.end_learning_rate
  if not 0 <= end <= lr:
    raise ValueError(
        f'config.end_learning_rate must be in [0, learning_rate={lr}], got {end!r}')
  name = config.optimizer
  if name not in OPTIMIZERS:
    raise ValueError(f'Unknown config.optimizer={name!r}; expected one of {OPTIMIZERS}')
  schedule = config.schedule
  if schedule not in SCHEDULES:
    raise ValueError(f'Unknown config.schedule={schedule!r}; expected one of {SCHEDULES}')
  loss = config.loss
  if loss not in LOSSES:
    raise ValueError(f'Unknown config.loss={loss!r}; expected one of {LOSSES}')
  total = config.total_steps
  if not isinstance(total, int) or total < 1:
    raise ValueError(f'config.total_steps must be a positive integer, got {total!r}')
  warmup = config.warmup_steps
  if not isinstance(warmup, int) or not 0 <= warmup <= total:
    raise ValueError(
        f'config.warmup_steps must be an integer in [0, total_steps={total}], got {warmup!r}')
  momentum = config.momentum
  if not 0 <= momentum < 1:
    raise ValueError(f'config.momentum must be in [0, 1), got {momentum!r}')
  for field in ('b1', 'b2'):
    value = config[field]
    if not 0 <= value < 1:
      raise ValueError(f'config.{field} must be in [0, 1), got {value!r}')
  wd = config.weight_decay
  if not wd >= 0:
    raise ValueError(f'config.weight_decay must be >= 0, got {wd!r}')
  clip = config.grad_clip_norm
  if not clip >= 0:
    raise ValueError(f'config.grad_clip_norm must be >= 0 (0: no clipping), got {clip!r}')
  smoothing = config.label_smoothing
  if not 0 <= smoothing < 1:
    raise ValueError(f'config.label_smoothing must be in [0, 1), got {smoothing!r}')
  bounds = tuple(config.decay_boundaries)
  if not all(isinstance(b, (int, float)) and 0 < b < 1 for b in bounds) or list(
      bounds) != sorted(bounds):
    raise ValueError(f'config.decay_boundaries must be increasing fractions in (0, 1), '
                     f'got {bounds}')
  acc = config.accumulator_dtype
  if acc not in ACCUMULATOR_DTYPES:
    raise ValueError(f'Unknown config.accumulator_dtype={acc!r}; expected one of '
                     f'{tuple(ACCUMULATOR_DTYPES)}')


# ---------------------------------------------------------------------------
# Schedules.
# ---------------------------------------------------------------------------


def make_schedule(config: schema.Config) -> Callable[[Any], jax.Array]:
  """step -> learning rate: linear warm-up, then cosine / linear / step / constant decay."""
  base = float(config.learning_rate)
  end = float(config.end_learning_rate)
  total = int(config.total_steps)
  warmup = int(config.warmup_steps)
  kind = config.schedule
  return warmup_decay_schedule(base, total, warmup, kind, end,
                               boundaries=tuple(config.decay_boundaries))


def warmup_decay_schedule(base: float, total_steps: int, warmup_steps: int = 0,
                          decay: str = 'cosine', end: float = 0.0,
                          boundaries: tuple[float, ...] = (0.3, 0.6, 0.9)):
  """The learning rate at `step` (0-based: the rate used by the step-th update).

  Warm-up is base * step / warmup_steps, the reference code's and big_vision's
  count: the first update (step 0) has rate 0, step `warmup_steps` has base.
  The decay phase then runs from base at step `warmup_steps` to `end` at
  `total_steps`.
  """
  if decay not in SCHEDULES:
    raise ValueError(f'Unknown schedule {decay!r}; expected one of {SCHEDULES}')
  decay_steps = max(total_steps - warmup_steps, 1)

  def schedule(step):
    step = jnp.asarray(step, jnp.float32)
    if warmup_steps > 0:
      warm = jnp.minimum(step / warmup_steps, 1.0)
    else:
      warm = 1.0
    progress = jnp.clip((step - warmup_steps) / decay_steps, 0.0, 1.0)
    if decay == 'cosine':
      factor = 0.5 * (1.0 + jnp.cos(jnp.pi * progress))
    elif decay == 'linear':
      factor = 1.0 - progress
    elif decay == 'step':
      passed = sum((step >= b * total_steps).astype(jnp.float32) for b in boundaries)
      factor = 0.1 ** passed
    else:
      factor = jnp.ones_like(progress)
    rate = end + (base - end) * factor
    return jnp.where(step < warmup_steps, base * warm, rate)

  return schedule


# ---------------------------------------------------------------------------
# Optimizers.
# ---------------------------------------------------------------------------


def decay_mask(params: Any) -> Any:
  """True for the arrays that get weight decay: those named `kernel`.

  big_vision decays `.*/kernel$` only; the AugReg weight decays are counted so.
  """
  return jax.tree_util.tree_map_with_path(
      lambda path, _: getattr(path[-1], 'key', None) == 'kernel', params)


def make_optimizer(config: schema.Config, schedule: Optional[Callable] = None
                   ) -> optax.GradientTransformation:
  """Clip by global norm, then SGD-momentum or AdamW driven by `schedule`."""
  validate(config)
  schedule = make_schedule(config) if schedule is None else schedule
  name = config.optimizer
  wd = float(config.weight_decay)
  acc_dtype = ACCUMULATOR_DTYPES[config.accumulator_dtype]
  parts = []
  clip = float(config.grad_clip_norm)
  if clip > 0:
    parts.append(optax.clip_by_global_norm(clip))
  if name == 'sgd':
    momentum = float(config.momentum)
    if wd > 0:
      # Decoupled, scaled by the learning rate like AdamW's.
      parts.append(optax.add_decayed_weights(wd, mask=decay_mask))
    parts.append(optax.sgd(schedule, momentum=momentum or None,
                           accumulator_dtype=acc_dtype))
  else:
    parts.append(optax.adamw(
        schedule, b1=float(config.b1), b2=float(config.b2),
        eps=float(config.eps), mu_dtype=acc_dtype,
        weight_decay=wd, mask=decay_mask))
  return optax.chain(*parts)


# ---------------------------------------------------------------------------
# Losses: per-example values; labels are (soft) one-hot float vectors.
# ---------------------------------------------------------------------------


def smooth_labels(labels: jax.Array, smoothing: float, floor: Optional[float] = None
                  ) -> jax.Array:
  """(1 - s) * labels + s * floor; floor defaults to 1 / num_classes."""
  if not smoothing:
    return labels
  floor = 1.0 / labels.shape[-1] if floor is None else floor
  return labels * (1.0 - smoothing) + smoothing * floor


def softmax_xent(logits: jax.Array, labels: jax.Array, smoothing: float = 0.0
                 ) -> jax.Array:
  """-sum(labels * log_softmax(logits)) per example."""
  labels = smooth_labels(labels.astype(jnp.float32), smoothing)
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  return -jnp.sum(labels * logp, axis=-1)


def sigmoid_xent(logits: jax.Array, labels: jax.Array, smoothing: float = 0.0
                 ) -> jax.Array:
  """Binary cross-entropy summed over classes per example.

  Label smoothing moves each binary target towards 0.5.
  """
  labels = smooth_labels(labels.astype(jnp.float32), smoothing, floor=0.5)
  logits = logits.astype(jnp.float32)
  losses = -(labels * jax.nn.log_sigmoid(logits) +
             (1.0 - labels) * jax.nn.log_sigmoid(-logits))
  return jnp.sum(losses, axis=-1)


def make_loss(config: schema.Config) -> Callable[[jax.Array, jax.Array], jax.Array]:
  """(logits, labels) -> per-example loss, as `config.loss` and `label_smoothing` say."""
  name = config.loss
  smoothing = float(config.label_smoothing)
  if name == 'softmax_xent':
    return lambda logits, labels: softmax_xent(logits, labels, smoothing)
  if name == 'sigmoid_xent':
    return lambda logits, labels: sigmoid_xent(logits, labels, smoothing)
  raise ValueError(f'Unknown config.loss={name!r}; expected one of {LOSSES}')
