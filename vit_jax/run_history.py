"""What a run's history depends on, carried by its checkpoints and checked on resume.

Every checkpoint's metadata records, besides the step (the input pipeline's and the
schedule's position):

- `config`: the config the run had, flattened (`'pp.train': 'plain', ...`);
- `examples_seen`: the training examples consumed so far, counted step by step (a
  resume with another batch size adds its own);
- `learning_rate_next`: the rate the schedule gives the next step;
- `train_seconds`, `timed_steps`, `timed_examples`, `train_loss`: the training
  figures so far (compilation, evaluation and checkpointing excluded), so that the
  final metrics of a resumed, re-evaluated or exported run cover its whole history;
- `resume_changes`: the history fields changed by earlier resumes.

A resume whose config differs from the checkpoint's in a field the trained weights
depend on (`batch_size`, `total_steps`, the schedule, the optimizer, the data, the
model...) is refused with a ValueError naming each field and both values, unless
`config.resume_changes='continue'`: then the run goes on with the new values from
the checkpoint's step, logs the learning rate before and after, counts examples
truly and records the change. Fields that do not change what is computed (logging,
evaluation, checkpointing, device layout, where files live) never count.
"""

from __future__ import annotations

import json
import math
from typing import Any, Optional

import flax

RESUME_CHANGES = ('refuse', 'continue')

# Fields that do not change the trained weights: bookkeeping, evaluation, device layout,
# where files are, and what only a fresh start reads (`pretrained_path`, ...).
NOT_HISTORY = frozenset({
    'async_checkpoints', 'bad_images', 'cache', 'checkpoint_every', 'data_dir',
    'eval_batch_size', 'eval_every', 'eval_split', 'export_params', 'fewshot_every',
    'fewshot_shots', 'fsdp', 'grad_accum_steps', 'keep_checkpoints', 'log_every', 'mesh',
    'model.attention_implementation', 'model.remat_policy', 'num_eval_examples',
    'posemb_resize', 'pp.eval', 'prefetch', 'pretrained_path', 'reset_head',
    'resume_changes',
})


def config_record(config) -> dict[str, Any]:
  """The config as saved with a checkpoint: flat, JSON values (tuples as lists)."""
  flat = flax.traverse_util.flatten_dict(config.to_dict(), sep='.')
  return json.loads(json.dumps(flat, default=str))


def changed_fields(saved: dict[str, Any], config) -> dict[str, tuple[Any, Any]]:
  """{field: (saved value, value now)} of the history fields that differ.

  Fields missing on either side (saved before the field existed) are not compared.
  """
  now = config_record(config)
  return {k: (saved[k], now[k]) for k in sorted(saved.keys() & now.keys())
          if k not in NOT_HISTORY and saved[k] != now[k]}


def _listed(changes: dict[str, tuple[Any, Any]]) -> str:
  return ', '.join(f'{k} {old!r} -> {new!r}' for k, (old, new) in changes.items())


def check_resume(meta: dict, config, step: int, directory: str,
                 learning_rate_now: Optional[float] = None) -> None:
  """Refuses (ValueError) a resume from `meta` that changes history fields, unless
  `config.resume_changes == 'continue'`: then logs the changes (and the learning
  rate of the next step before and after)."""
  policy = config.get('resume_changes', 'refuse')
  if policy not in RESUME_CHANGES:
    raise ValueError(f'Unknown config.resume_changes={policy!r}; expected one of '
                     f'{RESUME_CHANGES}')
  saved = meta.get('config')
  if not isinstance(saved, dict):
    return  # A checkpoint written before configs were saved with it.
  changes = changed_fields(saved, config)
  if not changes:
    return
  if policy == 'refuse':
    raise ValueError(
        f'The checkpoint at step {step} in {directory} was trained with other values of '
        f'fields its history depends on: {_listed(changes)} (checkpoint -> now). Resume '
        'with the checkpoint\'s values, use a new workdir, or set '
        'config.resume_changes=continue to go on with the new values from this step.')
  before = meta.get('learning_rate_next')
  rates = ('' if before is None or learning_rate_now is None else
           f'; the learning rate of step {step + 1} is {learning_rate_now:.4g} (it was '
           f'{before:.4g} under the checkpoint\'s schedule)')
  from absl import logging  # pylint: disable=g-import-not-at-top
  logging.warning('Resuming step %d with changed history fields (resume_changes=continue): '
                  '%s%s.', step, _listed(changes), rates)


class History:
  """The figures a run carries across its resumes (see the module docstring)."""

  def __init__(self, meta: Optional[dict], start_step: int, config):
    """`meta`: the checkpoint resumed from (None: a fresh start); `config`: the run's now."""
    meta = meta or {}
    batch_size = int(config.batch_size)
    self.start_step = int(start_step)
    self.batch_size = batch_size
    # Checkpoints without the count had one batch size throughout.
    self.examples_at_start = int(meta.get('examples_seen', start_step * batch_size))
    self.seconds_before = float(meta.get('train_seconds', 0.0))
    self.steps_before = int(meta.get('timed_steps', 0))
    self.examples_before = int(meta.get('timed_examples', 0))
    loss = meta.get('train_loss')
    self.loss_before = math.nan if loss is None else float(loss)
    self.changes = list(meta.get('resume_changes', []))
    saved = meta.get('config')
    changes = changed_fields(saved, config) if isinstance(saved, dict) else {}
    if changes:  # allowed by check_resume (resume_changes='continue')
      self.changes.append({'step': self.start_step,
                           'changes': {k: list(v) for k, v in changes.items()}})

  def examples_seen(self, step: int) -> int:
    return self.examples_at_start + (int(step) - self.start_step) * self.batch_size

  def figures(self, step: int, chrono, train_loss: Optional[float]) -> dict[str, Any]:
    """Training figures over the whole history up to `step` (this process's `chrono`)."""
    seconds = self.seconds_before + chrono.seconds
    steps = self.steps_before + chrono.steps
    examples = self.examples_before + chrono.steps * self.batch_size
    return {
        'examples_seen': float(self.examples_seen(step)),
        'train_loss': self.loss_before if train_loss is None else float(train_loss),
        'train_seconds': seconds,
        'steps_per_sec': steps / seconds if seconds > 0 else math.nan,
        'images_per_sec': examples / seconds if seconds > 0 else math.nan,
    }

  def meta(self, step: int, chrono, train_loss: Optional[float], config,
           learning_rate_next: float) -> dict[str, Any]:
    """The history part of a checkpoint's metadata at `step`."""
    figures = self.figures(step, chrono, train_loss)
    return {
        'examples_seen': int(figures['examples_seen']),
        'train_seconds': figures['train_seconds'],
        'timed_steps': self.steps_before + chrono.steps,
        'timed_examples': self.examples_before + chrono.steps * self.batch_size,
        'train_loss': None if math.isnan(figures['train_loss']) else figures['train_loss'],
        'learning_rate_next': float(learning_rate_next),
        'config': config_record(config),
        'resume_changes': self.changes,
    }
