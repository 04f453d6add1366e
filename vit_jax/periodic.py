"""The training loop's periodic work and its clock, kept out of the loop.

- `Schedule` says which periodic actions (log, eval, checkpoint) fall on a step.
- `Chrono` measures training time only: the first step (compilation) and
  whatever runs inside `chrono.paused()` (evaluation, checkpointing) do not count.
- `StopRequests` turns SIGTERM or SIGINT (one process) or JAX's preemption sync
  point (multi-process) into "save and stop at this step".
- `TrainMetrics` holds the step metrics still on the device and, every
  `log_every` steps, fetches them in one transfer, refuses non-finite values
  and writes their averages with throughput from the `Chrono`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import threading
import time
from typing import Any, Callable, Iterator, Optional

from absl import logging
import jax
from jax.experimental import multihost_utils
import numpy as np


class NonFiniteLossError(FloatingPointError):
  """The training loss or gradient became NaN/inf; nothing was saved after it."""


@dataclasses.dataclass(frozen=True)
class Schedule:
  """Which periodic actions a step triggers (0: at the last step only)."""
  total_steps: int
  log_every: int
  eval_every: int
  checkpoint_every: int

  def _due(self, step: int, every: int) -> bool:
    return bool(every and step % every == 0) or step == self.total_steps

  def eval(self, step: int) -> bool:
    return self._due(step, self.eval_every)

  def checkpoint(self, step: int) -> bool:
    return self._due(step, self.checkpoint_every)

  def log(self, step: int) -> bool:
    return self._due(step, self.log_every)


class Chrono:
  """Training seconds and steps, excluding compilation and paused work."""

  def __init__(self, start_step: int, clock: Callable[[], float] = time.monotonic):
    self._clock = clock
    self._mark, self._mark_step = clock(), start_step
    self.seconds, self.steps = 0.0, 0
    self.compile_seconds: Optional[float] = None
    self.last_rate = float('nan')

  def first_step_done(self, step: int) -> None:
    """Call after the first step's results are ready: its time is compilation."""
    now = self._clock()
    self.compile_seconds = now - self._mark
    self._mark, self._mark_step = now, step

  def lap(self, step: int) -> float:
    """Steps/s since the last lap (counted into the totals)."""
    now = self._clock()
    elapsed, done = now - self._mark, step - self._mark_step
    if done > 0:
      self.seconds += elapsed
      self.steps += done
    self.last_rate = done / elapsed if elapsed > 0 and done > 0 else float('nan')
    self._mark, self._mark_step = now, step
    return self.last_rate

  @contextlib.contextmanager
  def paused(self) -> Iterator[None]:
    start = self._clock()
    try:
      yield
    finally:
      self._mark += self._clock() - start

  @property
  def steps_per_sec(self) -> float:
    return self.steps / self.seconds if self.seconds > 0 else float('nan')


class TrainMetrics:
  """Step metrics waiting on the device, fetched and written together."""

  def __init__(self, writer: Any, chrono: Chrono, batch_size: int, num_train_examples: int,
               describe_last_good: Callable[[], str],
               restored: Optional[tuple[int, str]] = None,
               examples_seen: Optional[Callable[[int], int]] = None):
    """`restored`: (step, checkpoint directory) the run resumed from; step 0: a fresh start.
    `examples_seen(step)`: the examples consumed up to `step` (default: step * batch)."""
    self._writer, self._chrono = writer, chrono
    self._examples_seen = examples_seen or (lambda step: step * batch_size)
    self._batch, self._examples = batch_size, max(num_train_examples, 1)
    self._describe_last_good = describe_last_good
    self._restored = restored if restored and restored[0] > 0 else None
    self._pending: list[tuple[int, dict]] = []
    self.last: dict[str, float] = {}

  def add(self, step: int, metrics: dict) -> None:
    self._pending.append((step, metrics))

  def flush(self) -> None:
    """Fetches pending metrics; raises NonFiniteLossError; writes their averages."""
    if not self._pending:
      return
    steps = [s for s, _ in self._pending]
    fetched = jax.device_get([m for _, m in self._pending])
    self._pending = []
    for step, m in zip(steps, fetched):
      if not (np.isfinite(m['loss']) and np.isfinite(m['grad_norm'])):
        values = (f'Non-finite training loss {float(m["loss"])} (grad norm '
                  f'{float(m["grad_norm"])}) at step {step}')
        if self._restored and step == self._restored[0] + 1:
          # The very first step from a checkpoint: the checkpoint, not the recipe, is the
          # likely cause (e.g. a corrupt but finite weight, saved before checksums were).
          restored_step, directory = self._restored
          raise NonFiniteLossError(
              f'{values}, the first step after restoring the checkpoint of step '
              f'{restored_step} in {directory}; stopping without saving. That checkpoint is '
              f'suspect: move {os.path.join(directory, str(restored_step))} aside (e.g. into '
              'checkpoints_corrupt/) to resume from the one before it.')
        raise NonFiniteLossError(
            f'{values}; stopping without saving. '
            f'{self._describe_last_good()} Lower config.learning_rate, keep '
            'config.grad_clip_norm > 0, or use config.dtype="float32".')
    speed = self._chrono.lap(steps[-1])
    self.last = {
        'train_loss': float(np.mean([m['loss'] for m in fetched])),
        'grad_norm': float(np.mean([m['grad_norm'] for m in fetched])),
        'learning_rate': float(fetched[-1]['learning_rate']),
        'steps_per_sec': speed,
        'images_per_sec': speed * self._batch,
        'examples_seen': float(self._examples_seen(steps[-1])),
        'epoch': self._examples_seen(steps[-1]) / self._examples,
    }
    self._writer.write_scalars(steps[-1], self.last)


INTERRUPTED_AGAIN_STATUS = 130  # 128 + SIGINT, as a shell reports Ctrl-C


class StopRequests:
  """SIGTERM or SIGINT (one process), or the JAX preemption sync point (multi-process).

  Ctrl-C is a request like SIGTERM: the loop saves at the current step and stops
  (`signal` says which one came). A second SIGINT while that is under way exits
  the process at once with status 130, without waiting for the save: Orbax writes
  a checkpoint under a temporary name and renames it when complete, so the
  checkpoints before it stay intact.
  """

  _SIGNALS = (signal.SIGTERM, signal.SIGINT)

  def __init__(self):
    self.requested = False
    self.signal: Optional[int] = None  # the first signal received
    self._previous: dict[int, Any] = {}

  def __enter__(self):
    if threading.current_thread() is threading.main_thread() and jax.process_count() == 1:
      self._previous = {s: signal.signal(s, self._handler) for s in self._SIGNALS}
    return self

  def _handler(self, signum, frame):
    del frame
    if self.requested and signum == signal.SIGINT:
      os.write(2, b'error: interrupted again (Ctrl-C): exiting without waiting for the '
                  b'checkpoint being saved; the earlier checkpoints are intact.\n')
      os._exit(INTERRUPTED_AGAIN_STATUS)  # pylint: disable=protected-access
    if self.requested:
      return
    name = signal.Signals(signum).name
    logging.warning('Received %s: saving a checkpoint and stopping%s.', name,
                    ' (Ctrl-C again exits at once)' if signum == signal.SIGINT else '')
    self.requested, self.signal = True, signum

  def __exit__(self, *exc):
    for signum, previous in self._previous.items():
      signal.signal(signum, previous)
    self._previous = {}

  def should_stop(self, step: int) -> bool:
    if jax.process_count() > 1:
      try:
        return bool(multihost_utils.reached_preemption_sync_point(step))
      except Exception:  # pylint: disable=broad-except
        return False  # No preemption service (not started via jax.distributed).
    return self.requested
