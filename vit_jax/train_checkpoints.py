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
latest complete checkpoint is always a good one. The workdir may be a `gs://`
bucket (vit_jax.storage): there Orbax marks a complete checkpoint with a commit
file instead of a rename, and a save the bucket stops answering during raises
`storage.StorageError` naming its step, the earlier checkpoints intact.

Every save records a SHA-256 digest of each array's bytes in `meta`
(`checksums`), computed on the host from the state being saved, and a restore
recomputes them: a checkpoint whose files changed after it was written (a bit
flip on disk or in a copy) fails that check. Such a checkpoint, like one that
cannot be read or holds non-finite numbers, is reported with a
`CorruptCheckpointWarning`, moved to `workdir/checkpoints_corrupt/`, and the
previous one is used instead. (In multi-process runs, arrays split over several
processes have no digest: no single host holds their bytes.)

A save that runs out of disk space raises `CheckpointDiskFullError` (an
`OSError` with errno ENOSPC naming the checkpoint's directory) instead of
Orbax's tracebacks; the checkpoints written before stay intact. A save is
refused before it starts when the free space is smaller than the arrays'
bytes, and is synchronous when less than twice that (plus 64 MiB) is free, so
that its failure stops the run at its own step; `check()`, called by the
training loop every step, raises the error of any other asynchronous save as
soon as that save has failed, rather than at the next save.

These are *run* checkpoints, for resuming; `vit_jax.checkpoint` reads and writes
the published `.npz` weight files used for fine-tuning.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import errno
import hashlib
import logging as std_logging
import os
import shutil
import time
import warnings
from typing import Any, Callable, Iterator, Optional

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

from vit_jax import storage

CHECKPOINT_DIR = 'checkpoints'
CORRUPT_DIR = 'checkpoints_corrupt'
_ITEMS = ('state', 'meta')


CHECKSUM_ALGORITHM = 'sha256'
_PARALLEL_HASH_BYTES = 64 << 20
_ROOM_MARGIN_BYTES = 64 << 20  # below 2x the state + this free, saves are synchronous


class CorruptCheckpointWarning(UserWarning):
  """A checkpoint could not be restored and an older one is used instead."""


class CheckpointDiskFullError(OSError):
  """No space was left on the device while writing a checkpoint."""


# -- checksums -----------------------------------------------------------------


def _key_name(key: Any) -> str:
  for attr in ('key', 'name', 'idx'):  # DictKey, GetAttrKey, SequenceKey / FlattenedIndexKey
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def _leaf_name(path: tuple) -> str:
  """'params/Transformer/encoder_norm/scale', 'opt_state/1/0/mu/...': as JSON keys."""
  return '/'.join(_key_name(k) for k in path)


def _host_values(leaves: list) -> list[Optional[np.ndarray]]:
  """Each leaf's whole value on this host; None for arrays split over processes."""
  out: list[Any] = [None] * len(leaves)
  fetch = []
  for i, x in enumerate(leaves):
    if not isinstance(x, jax.Array):
      out[i] = np.asarray(x)
    elif x.is_fully_addressable:
      fetch.append(i)
    else:  # Multi-process: a replicated array has a whole copy here.
      whole = [s.data for s in x.addressable_shards if s.data.shape == x.shape]
      if whole:
        out[i] = np.asarray(whole[0])
  for i, value in zip(fetch, jax.device_get([leaves[i] for i in fetch])):
    out[i] = np.asarray(value)
  return out


def checksums(state: Any) -> dict[str, str]:
  """{leaf name: SHA-256 of its dtype, shape and bytes} of the arrays of `state`."""
  named = jax.tree_util.tree_flatten_with_path(state)[0]
  values = _host_values([leaf for _, leaf in named])

  def digest(value: np.ndarray) -> str:
    h = hashlib.sha256(f'{value.dtype}{value.shape}'.encode())
    h.update(np.ascontiguousarray(value).reshape(-1).view(np.uint8))
    return h.hexdigest()

  todo = [(_leaf_name(path), v) for (path, _), v in zip(named, values) if v is not None]
  if sum(v.nbytes for _, v in todo) < _PARALLEL_HASH_BYTES:
    return {name: digest(v) for name, v in todo}
  # hashlib releases the GIL on big buffers: threads hash the leaves on all cores.
  with concurrent.futures.ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:
    return dict(zip([name for name, _ in todo], pool.map(digest, [v for _, v in todo])))


def _verify_checksums(state: Any, meta: dict) -> None:
  """Raises ValueError naming the arrays whose bytes differ from the saved digests."""
  recorded = (meta.get('checksums') or {}).get('leaves')
  if not recorded:
    return  # Saved before checksums were written.
  now = checksums(state)
  common = recorded.keys() & now.keys()
  if not common:
    logging.warning('The checkpoint\'s checksums name none of the restored arrays; '
                    'not verified.')
    return
  bad = sorted(k for k in common if recorded[k] != now[k])
  if bad:
    raise ValueError(
        f'checksum mismatch in {len(bad)} of {len(common)} arrays ({", ".join(bad[:3])}'
        f'{", ..." if len(bad) > 3 else ""}): its files changed after it was saved '
        '(disk or copy corruption)')


# -- disk full -------------------------------------------------------------------


_chain = storage.exception_chain  # `error`, its causes, contexts and group members


def is_disk_full(error: BaseException) -> bool:
  """True when `error` comes from ENOSPC (also wrapped, or as text from TensorStore)."""
  return any((isinstance(e, OSError) and e.errno == errno.ENOSPC)
             or 'No space left on device' in str(e) for e in _chain(error))


class _DropOrbaxDiskFull(std_logging.Filter):
  """Orbax logs each failed background write with its traceback (hundreds of lines for
  one full disk); the `CheckpointDiskFullError` raised instead says it in one."""

  def filter(self, record: std_logging.LogRecord) -> bool:
    error = record.exc_info[1] if record.exc_info else None
    if error is not None and (is_disk_full(error) or storage.is_storage_failure(error)):
      return False  # the same for a bucket that stopped answering (StorageError)
    # Orbax's own records, and asyncio's "Task exception was never retrieved" for
    # a write coroutine of the failed save (its message holds the exception's text).
    if '/orbax/' in record.pathname or record.name == 'asyncio':
      return 'No space left on device' not in record.getMessage()
    return True


def _install_log_filter() -> None:
  # A logger's filters see only the records made on it: both that Orbax's writers use.
  for name in ('absl', 'asyncio'):
    logger = std_logging.getLogger(name)
    if not any(isinstance(f, _DropOrbaxDiskFull) for f in logger.filters):
      logger.addFilter(_DropOrbaxDiskFull())


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
    self.workdir = storage.resolve(workdir)  # a local path or a gs:// URL
    self.directory = storage.join(self.workdir, CHECKPOINT_DIR)
    self._max_to_keep = max_to_keep
    self._async = async_save
    self._failed = False  # A save failed and its error was raised.
    self._pending: Optional[int] = None  # The step of a save that may still be writing.
    self.restored_meta: Optional[dict] = None  # The meta of the checkpoint resumed from.
    _install_log_filter()
    storage.configure()  # TensorStore's retries on gs://
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
    """Saves `state` as step `step` (async unless `wait`); False if it exists already.

    The arrays' checksums go into the metadata (see the module docstring). Raises
    CheckpointDiskFullError when the disk is full, also for an earlier
    asynchronous save that only fails now.
    """
    step = int(step)
    if step in self._manager.all_steps():
      return False
    meta = dict(meta or {})
    meta.setdefault('step', step)
    meta.setdefault('saved_at', time.time())
    meta['checksums'] = {'algorithm': CHECKSUM_ALGORITHM, 'leaves': checksums(state)}
    # Orbax waits for the previous save before it starts one: waiting here first
    # blames a failure on the step that failed.
    self.wait()
    if self._little_room(step, state):
      wait = True  # a failure is then reported at this step, not steps later
    self._pending = step
    with self._disk_full_reported(step):
      saved = self._manager.save(
          step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                        meta=ocp.args.JsonSave(meta)),
          force=True)
    if wait:
      self.wait()
    return bool(saved)

  def _little_room(self, step: int, state: Any) -> bool:
    """Whether the disk has less than twice the arrays' bytes (plus 64 MiB) free.

    Raises CheckpointDiskFullError before writing when the arrays alone cannot fit
    (a save takes more: Orbax's metadata, the checksums)."""
    if jax.process_count() > 1 or storage.is_remote(self.directory):
      return False  # Each process writes only its part; a bucket has no free space.
    need = sum(int(x.nbytes) for x in jax.tree.leaves(state) if hasattr(x, 'nbytes'))
    try:
      free = shutil.disk_usage(self.directory).free
    except OSError:
      return False
    if free < need:
      self._failed = True
      raise CheckpointDiskFullError(errno.ENOSPC, os.strerror(errno.ENOSPC),
                                    os.path.join(self.directory, str(step)))
    return free < 2 * need + _ROOM_MARGIN_BYTES

  def check(self) -> None:
    """Raises a pending asynchronous save's error (CheckpointDiskFullError for a full
    disk) as soon as that save has ended; returns at once while it is still writing.

    Called every step, it stops a run at the step after a failed save instead of
    at the next save."""
    if self._pending is None or self._manager.is_saving_in_progress():
      return
    self.wait()

  def wait(self) -> None:
    """Blocks until every asynchronous save has been written."""
    with self._disk_full_reported(self._pending):
      self._manager.wait_until_finished()
    self._pending = None

  def close(self) -> None:
    try:
      if self._failed:  # Its error was raised already; Orbax would raise it again.
        try:
          self._manager.wait_until_finished()
        except Exception:  # pylint: disable=broad-except
          pass
      else:
        self.wait()
    finally:
      self._manager.close()

  @contextlib.contextmanager
  def _disk_full_reported(self, step: Optional[int]) -> Iterator[None]:
    """Turns ENOSPC, however deep in Orbax's errors, into one CheckpointDiskFullError."""
    try:
      yield
    except Exception as e:  # pylint: disable=broad-except
      path = self.directory if step is None else storage.join(self.directory, str(step))
      if storage.is_remote(self.directory) and storage.is_storage_failure(e):
        self._failed = True
        storage.mark_down(self.directory)
        # Orbax commits a save only once complete: the earlier ones are intact.
        raise storage.StorageError(
            errno.EIO, f'Cloud Storage failed while saving the checkpoint {path} '
            f'({storage.describe(e, path)}); the checkpoints saved before it are intact: '
            'rerun the same command to resume once the bucket answers', path) from None
      if not is_disk_full(e):
        raise
      self._failed = True
      # Orbax renames a save into place only once complete: the earlier ones are intact.
      raise CheckpointDiskFullError(errno.ENOSPC, os.strerror(errno.ENOSPC), path) from None

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

  def restore_latest(self, abstract_state: Any = None, *, expect: Optional[dict] = None,
                     check: Optional[Callable[[int, dict], None]] = None
                     ) -> tuple[Optional[Any], Optional[dict]]:
    """The newest readable checkpoint as (state, meta), or (None, None) if none.

    `check(step, meta)` may refuse a readable checkpoint by raising (e.g. a resume
    that changes what the run's history depends on, vit_jax.run_history); it runs
    before the arrays are read. The meta restored is kept as `restored_meta`.

    Unreadable checkpoints, those whose arrays fail their checksums and those
    holding non-finite values are skipped with a `CorruptCheckpointWarning` and
    moved to `workdir/checkpoints_corrupt/`.
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
      if check is not None:
        check(step, meta)
      try:
        state, meta = self.restore(step, abstract_state)
        _verify_checksums(state, meta)
        if not _all_finite(state):
          raise ValueError('it holds non-finite values')
      except Exception as e:  # pylint: disable=broad-except
        self._skip(step, e)
        continue
      logging.info('Restored checkpoint at step %d from %s', step, self.directory)
      self.restored_meta = meta
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
      src = storage.join(self.directory, str(step))
      if storage.isdir(src):
        dst_root = storage.join(self.workdir, CORRUPT_DIR)
        storage.makedirs(dst_root)
        dst = storage.join(dst_root, f'{step}-{int(time.time() * 1000)}')
        if storage.is_remote(src):
          storage.rename(src, dst)
        else:
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
