"""Run checkpoints (Orbax): save every N steps, keep the last K, resume.

A run's checkpoints live in `workdir/checkpoints/<step>/` with two items:

- `state`: the whole `TrainState` (step, params, optimizer state) as sharded
  `jax.Array`s, restored straight into the shardings the run uses (replicated
  or FSDP), on any number of processes;
- `meta`: JSON with the step, which is also the position of the input pipeline
  (`start_step` of the training dataset), and the config the run had.

Saves are asynchronous: `save` returns once the arrays are copied off the
devices, and the files are written while training continues. An interrupted
save leaves only a temporary directory that Orbax ignores and cleans up, so the
latest complete checkpoint is always a good one. A checkpoint that cannot be
read (or holds non-finite numbers) is reported with a warning, moved to
`workdir/checkpoints_corrupt/`, and the previous one is used instead.

These are *run* checkpoints, for resuming; `vit_jax.checkpoint` reads and writes
the published `.npz` weight files used for fine-tuning.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import time
import warnings
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

CHECKPOINT_DIR = 'checkpoints'
CORRUPT_DIR = 'checkpoints_corrupt'
_ITEMS = ('state', 'meta')


class CorruptCheckpointWarning(UserWarning):
  """A checkpoint could not be restored and an older one is used instead."""


def _all_finite(tree: Any) -> bool:
  """True when every float array of `tree` is free of NaN and inf (checked on the devices)."""
  leaves = [x for x in jax.tree.leaves(tree)
            if hasattr(x, 'dtype') and jnp.issubdtype(x.dtype, jnp.inexact)]
  if not leaves:
    return True
  check = jax.jit(lambda xs: jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in xs])))
  return bool(check(leaves))


def fingerprint(abstract_state: Any) -> str:
  """A short hash of the state's tree structure, shapes and dtypes."""
  leaves, _ = jax.tree_util.tree_flatten_with_path(abstract_state)
  text = ';'.join(f'{jax.tree_util.keystr(path)}:{tuple(leaf.shape)}:{leaf.dtype}'
                  for path, leaf in leaves)
  return hashlib.sha256(text.encode()).hexdigest()[:16]


class RunCheckpointer:
  """Saves and restores one run's `TrainState` under `workdir/checkpoints`."""

  def __init__(self, workdir: str, *, max_to_keep: Optional[int] = 3,
               async_save: bool = True):
    self.workdir = os.path.abspath(workdir)
    self.directory = os.path.join(self.workdir, CHECKPOINT_DIR)
    self._max_to_keep = max_to_keep
    self._async = async_save
    self._manager = self._make_manager()

  def _make_manager(self) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(
        max_to_keep=self._max_to_keep,
        enable_async_checkpointing=self._async,
        cleanup_tmp_directories=True,  # Left by a save that was killed.
        create=True)
    return ocp.CheckpointManager(self.directory, options=options, item_names=_ITEMS)

  # -- queries ---------------------------------------------------------------

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def latest_step(self) -> Optional[int]:
    return self._manager.latest_step()

  # -- saving ----------------------------------------------------------------

  def save(self, step: int, state: Any, meta: Optional[dict] = None, *,
           wait: bool = False) -> bool:
    """Saves `state` as step `step` (async unless `wait`); False if it exists already."""
    step = int(step)
    if step in self._manager.all_steps():
      return False
    meta = dict(meta or {})
    meta.setdefault('step', step)
    meta.setdefault('saved_at', time.time())
    saved = self._manager.save(
        step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                      meta=ocp.args.JsonSave(meta)),
        force=True)
    if wait:
      self.wait()
    return bool(saved)

  def wait(self) -> None:
    """Blocks until every asynchronous save has been written."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()

  # -- restoring -------------------------------------------------------------

  def restore(self, step: int, abstract_state: Any = None) -> tuple[Any, dict]:
    """(state, meta) of `step`; `abstract_state` gives shapes, dtypes and shardings."""
    restore_args = (ocp.args.StandardRestore(abstract_state) if abstract_state is not None
                    else ocp.args.StandardRestore())
    restored = self._manager.restore(
        int(step), args=ocp.args.Composite(state=restore_args,
                                           meta=ocp.args.JsonRestore()))
    return restored.state, dict(restored.meta or {})

  def read_meta(self, step: int) -> dict:
    """The JSON metadata saved with `step` (cheap: no arrays are read)."""
    restored = self._manager.restore(
        int(step), args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
    return dict(restored.meta or {})

  def restore_latest(self, abstract_state: Any = None, *, expect: Optional[dict] = None
                     ) -> tuple[Optional[Any], Optional[dict]]:
    """The newest readable checkpoint as (state, meta), or (None, None) if none.

    Unreadable or non-finite checkpoints are skipped with a
    `CorruptCheckpointWarning` and moved to `workdir/checkpoints_corrupt/`.
    `expect` lists metadata the checkpoint must have (e.g. the state's
    `fingerprint`): a good checkpoint of another run (a different model or
    optimizer in the same workdir) raises ValueError instead of being skipped.
    """
    for step in sorted(self._manager.all_steps(), reverse=True):
      try:
        meta = self.read_meta(step)
      except Exception as e:  # pylint: disable=broad-except
        self._skip(step, e)
        continue
      for key, value in (expect or {}).items():
        if key in meta and meta[key] != value:
          raise ValueError(
              f'The checkpoint at step {step} in {self.directory} belongs to a different '
              f'run ({key}: {meta[key]!r} there, {value!r} now; e.g. another model, '
              'optimizer or image size). Use a new workdir, or remove the old checkpoints.')
      try:
        state, meta = self.restore(step, abstract_state)
        if not _all_finite(state):
          raise ValueError('it holds non-finite values')
      except Exception as e:  # pylint: disable=broad-except
        self._skip(step, e)
        continue
      logging.info('Restored checkpoint at step %d from %s', step, self.directory)
      return state, meta
    return None, None

  def _skip(self, step: int, error: Exception) -> None:
    message = (f'Checkpoint at step {step} in {self.directory} cannot be used '
               f'({type(error).__name__}: {str(error)[:300]}); falling back to the previous '
               'one.')
    logging.warning('%s', message)
    warnings.warn(message, CorruptCheckpointWarning, stacklevel=3)
    self._quarantine(step)

  def _quarantine(self, step: int) -> None:
    """Moves a bad step directory aside, so that the run can save that step again."""
    self._manager.wait_until_finished()
    if jax.process_index() == 0:
      src = os.path.join(self.directory, str(step))
      if os.path.isdir(src):
        dst_root = os.path.join(self.workdir, CORRUPT_DIR)
        os.makedirs(dst_root, exist_ok=True)
        dst = os.path.join(dst_root, f'{step}-{int(time.time() * 1000)}')
        shutil.move(src, dst)
        logging.warning('Moved the unusable checkpoint to %s', dst)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      multihost_utils.sync_global_devices(f'quarantine_checkpoint_{step}')
    self._manager.close()
    self._manager = self._make_manager()


def load_latest(workdir: str) -> tuple[Optional[int], Optional[Any]]:
  """(step, state as a tree of numpy arrays) of `workdir`'s newest checkpoint.

  For inspection and tests; the structure is Orbax's plain-container view of
  the `TrainState` (`{'step', 'params', 'opt_state'}`).
  """
  checkpointer = RunCheckpointer(workdir, max_to_keep=None, async_save=False)
  try:
    step = checkpointer.latest_step()
    if step is None:
      return None, None
    state, _ = checkpointer.restore(step)
    return step, jax.tree.map(np.asarray, state)
  finally:
    checkpointer.close()
