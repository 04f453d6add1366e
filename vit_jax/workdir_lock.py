"""One process at a time in a directory: an exclusive `flock` on `DIR/.lock`.

A training run holds the lock of its workdir for as long as it runs, so a
second run started on the same workdir is refused at once (`WorkdirLockedError`
naming the holder's host and pid) instead of the two overwriting each other's
checkpoints. Preparing a dataset into `data_dir` takes a lock the same way, but
waits for the holder instead of failing: the second process then finds the
dataset prepared.

The holder writes its host, pid and start time into the lock file and empties
it when it releases the lock. The kernel drops a `flock` when its process dies,
however it dies, so a lock left by a killed run never blocks anyone; the next
run finds the dead holder's line still in the file, reports it with a warning
and takes the lock over.

The lock file is never deleted: a process that opened it just before a delete
would lock a file no one else can see any more.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import threading
import time
from typing import Iterator, Optional

from absl import logging

LOCK_NAME = '.lock'


class WorkdirLockedError(RuntimeError):
  """Another live process holds the lock."""


def _holder_text() -> str:
  return json.dumps({'host': socket.gethostname(), 'pid': os.getpid(),
                     'since': time.strftime('%Y-%m-%d %H:%M:%S')})


def describe_holder(text: str) -> str:
  """'pid 123 on host h (since ...)' from a lock file's contents."""
  try:
    info = json.loads(text)
    return f"pid {info['pid']} on host {info['host']} (since {info['since']})"
  except (ValueError, KeyError, TypeError):
    return f'an unknown process (lock file says {text.strip()[:200]!r})'


class DirectoryLock:
  """An exclusive lock on `directory/name`; acquiring it again nests.

  `acquire()` fails at once with `WorkdirLockedError` when another open file
  (another process, or another `DirectoryLock` of this one) holds it, or with
  `wait=True` polls until it is free (up to `timeout` seconds). Usable as a
  context manager. One object is not meant to be shared between threads.
  """

  def __init__(self, directory: str, name: str = LOCK_NAME, *, purpose: str = 'run'):
    self.directory = os.path.abspath(os.path.expanduser(directory))
    self.path = os.path.join(self.directory, name)
    self.purpose = purpose
    self._fd: Optional[int] = None
    self._depth = 0
    self.took_over: Optional[str] = None  # The dead holder's description, if any.

  def acquire(self, *, wait: bool = False, timeout: float = 3600.0,
              poll: float = 0.2) -> 'DirectoryLock':
    if self._fd is not None:
      self._depth += 1
      return self
    os.makedirs(self.directory, exist_ok=True)
    # No O_TRUNC: the holder's line must stay readable until we own the lock.
    fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    deadline = time.monotonic() + timeout
    logged = False
    try:
      while True:
        try:
          fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
          break
        except BlockingIOError:
          holder = describe_holder(_read(fd))
          if not wait or time.monotonic() > deadline:
            raise WorkdirLockedError(
                f'{self.directory} is in use by another {self.purpose}: {holder} holds '
                f'{self.path}. Wait for it to finish, stop it, or use another directory.'
            ) from None
          if not logged:
            logging.info('Waiting for %s, which holds %s.', holder, self.path)
            logged = True
          time.sleep(poll)
        except OSError as e:
          if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
            raise
          # Some network filesystems have no locks: run unprotected rather than not at all.
          logging.warning('Cannot lock %s (%s): nothing stops a second %s in %s.',
                          self.path, e.strerror, self.purpose, self.directory)
          break
      left = _read(fd)
      if left.strip():
        self.took_over = describe_holder(left)
        logging.warning('Took over %s from %s, which ended without releasing it (killed?).',
                        self.path, self.took_over)
      os.ftruncate(fd, 0)
      os.pwrite(fd, (_holder_text() + '\n').encode(), 0)
      os.fsync(fd)
    except BaseException:
      os.close(fd)
      raise
    self._fd, self._depth = fd, 1
    return self

  def release(self) -> None:
    if self._fd is None:
      return
    self._depth -= 1
    if self._depth > 0:
      return
    fd, self._fd = self._fd, None
    try:
      os.ftruncate(fd, 0)  # An empty file: released cleanly, not by a death.
    finally:
      os.close(fd)  # Also drops the flock.

  @property
  def held(self) -> bool:
    return self._fd is not None

  def __enter__(self) -> 'DirectoryLock':
    return self.acquire()

  def __exit__(self, *exc) -> None:
    self.release()


def _read(fd: int) -> str:
  try:
    return os.pread(fd, 4096, 0).decode('utf-8', 'replace')
  except OSError:
    return ''


# One lock object per workdir and thread, so that main.py (which locks early, to
# refuse a second run before the slow imports) and train_and_evaluate nest, while
# two threads running in one workdir conflict as two processes do.
_WORKDIR_LOCKS: dict[tuple[str, int], DirectoryLock] = {}


def workdir_lock(workdir: str) -> DirectoryLock:
  """This thread's lock object of `workdir` (reentrant); a lock object in a bucket
  for a `gs://` workdir (vit_jax.bucket_lock)."""
  from vit_jax import storage  # pylint: disable=g-import-not-at-top
  if storage.is_remote(workdir):
    from vit_jax import bucket_lock  # pylint: disable=g-import-not-at-top
    key = (storage.resolve(workdir), threading.get_ident())
    if key not in _WORKDIR_LOCKS:
      _WORKDIR_LOCKS[key] = bucket_lock.BucketLock(key[0], LOCK_NAME, purpose='run')
    return _WORKDIR_LOCKS[key]
  key = (os.path.realpath(os.path.abspath(os.path.expanduser(workdir))), threading.get_ident())
  return _WORKDIR_LOCKS.setdefault(key, DirectoryLock(key[0], purpose='run'))


@contextlib.contextmanager
def hold(workdir: str, enabled: bool = True) -> Iterator[Optional[DirectoryLock]]:
  """Holds `workdir`'s run lock for the `with` block (nothing if not `enabled`).

  Raises WorkdirLockedError naming the holder when another run has it.
  """
  if not enabled:
    yield None
    return
  lock = workdir_lock(workdir).acquire()
  try:
    yield lock
  finally:
    lock.release()
