"""One run at a time in a bucket workdir: a lock object created only if absent.

An object store has no `flock`. The run holding a `gs://` workdir owns the
object `WORKDIR/.lock`, created with the precondition "this object does not
exist" (`ifGenerationMatch=0`), so of two runs that start together exactly one
creates it; the other finds it and is refused (`WorkdirLockedError` naming the
holder's host and pid), as on a local disk. The object holds the holder's host,
pid, start time and a heartbeat time, which a thread of the holder rewrites
every `HEARTBEAT_S` seconds; the holder deletes the object when it releases
the lock (at exit, after Ctrl-C or SIGTERM too).

A holder that died without releasing it (SIGKILL, a crashed or preempted host)
leaves the object behind. Like the kernel's dropped `flock`, such a lock does not
block the next run: it is stale, and taken over with a warning naming the dead
holder, when its process no longer exists on this host, or, for a holder on
another host, when its heartbeat is older than `STALE_S` seconds. So a rerun on
the host of a killed run resumes at once, and a run on a replacement host waits
out at most `STALE_S` seconds (it is refused until then, naming the holder).
"""

from __future__ import annotations

import errno
import json
import os
import socket
import threading
import time
from typing import Optional

from absl import logging

from vit_jax import storage

HEARTBEAT_S = 30.0
STALE_S = 120.0


def _filesystem():
  return storage.filesystem('gs://')


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


class BucketLock:
  """The lock object `url/name`, with the interface of `workdir_lock.DirectoryLock`."""

  def __init__(self, url: str, name: str, *, purpose: str = 'run'):
    self.directory = storage.resolve(url)
    self.path = storage.join(self.directory, name)
    self.purpose = purpose
    self.took_over: Optional[str] = None
    self._depth = 0
    self._since = ''
    self._stop = threading.Event()
    self._beat: Optional[threading.Thread] = None

  def _text(self) -> str:
    return json.dumps({'host': socket.gethostname(), 'pid': os.getpid(),
                       'since': self._since, 'heartbeat': time.time()})

  def _key(self) -> str:
    return self.path.split('://', 1)[1]

  def _holder(self, fs) -> Optional[dict]:
    try:
      info = json.loads(fs.cat_file(self._key()).decode('utf-8', 'replace'))
      return info if isinstance(info, dict) else {}
    except FileNotFoundError:
      return None
    except ValueError:
      return {}

  @staticmethod
  def _stale(holder: dict) -> bool:
    if holder.get('host') == socket.gethostname():
      return not _pid_alive(int(holder.get('pid', -1)))
    return time.time() - float(holder.get('heartbeat', 0.0)) > STALE_S

  def acquire(self, *, wait: bool = False, timeout: float = 3600.0,
              poll: float = 1.0) -> 'BucketLock':
    if self._depth:
      self._depth += 1
      return self
    from vit_jax import workdir_lock  # pylint: disable=g-import-not-at-top
    fs = _filesystem()
    deadline = time.monotonic() + timeout
    self._since = time.strftime('%Y-%m-%d %H:%M:%S')
    try:
      while True:
        holder = self._holder(fs)
        if holder is not None and self._stale(holder):
          self.took_over = workdir_lock.describe_holder(json.dumps(holder))
          logging.warning('Took over %s from %s, which ended without releasing it (killed?).',
                          self.path, self.took_over)
          fs.rm_file(self._key())
          holder = None
        if holder is None:
          try:  # ifGenerationMatch=0: of two runs creating it now, one succeeds
            fs.pipe_file(self._key(), self._text().encode(), mode='create')
            break
          except (FileExistsError, OSError) as e:
            if not _precondition_failed(e):
              raise
            continue
        described = workdir_lock.describe_holder(json.dumps(holder))
        if not wait or time.monotonic() > deadline:
          raise workdir_lock.WorkdirLockedError(
              f'{self.directory} is in use by another {self.purpose}: {described} holds '
              f'{self.path}. Wait for it to finish, stop it, or use another directory '
              f'(a lock left by a dead host is taken over after {STALE_S:.0f} s).')
        time.sleep(poll)
    except Exception as e:  # pylint: disable=broad-except
      if isinstance(e, workdir_lock.WorkdirLockedError):
        raise
      raise storage.StorageError(errno.EIO, f'Cannot lock {self.path}: '
                                 f'{storage.describe(e, self.path)}', self.path) from None
    self._depth = 1
    self._stop.clear()
    self._beat = threading.Thread(target=self._heartbeat, args=(fs,), daemon=True,
                                  name='bucket-lock-heartbeat')
    self._beat.start()
    return self

  def _heartbeat(self, fs) -> None:
    while not self._stop.wait(HEARTBEAT_S):
      try:
        fs.pipe_file(self._key(), self._text().encode())
      except Exception as e:  # pylint: disable=broad-except
        logging.warning('Could not renew the lock %s: %s', self.path, e)

  def release(self) -> None:
    if not self._depth:
      return
    self._depth -= 1
    if self._depth:
      return
    self._stop.set()
    if self._beat is not None:
      self._beat.join(timeout=5)
    if storage.is_down(self.path):
      logging.warning('Leaving the lock %s: its bucket stopped answering (the next run '
                      'takes it over).', self.path)
      return
    try:
      _filesystem().rm_file(self._key())
    except Exception as e:  # pylint: disable=broad-except
      logging.warning('Could not delete the lock %s (%s); the next run takes it over.',
                      self.path, storage.describe(e, self.path))

  @property
  def held(self) -> bool:
    return self._depth > 0

  def __enter__(self) -> 'BucketLock':
    return self.acquire()

  def __exit__(self, *exc) -> None:
    self.release()


def _precondition_failed(error: BaseException) -> bool:
  return isinstance(error, FileExistsError) or '412' in str(error) or \
      'Precondition' in str(error)
