"""One path layer for a run's files, on a local disk or in a Cloud Storage bucket.

A workdir, a checkpoint file or an export target may be a local path or a
`gs://bucket/path` URL. Every file the project writes or reads there goes
through this module, which hands URLs to etils `epath` (what Orbax itself
uses: gcsfs, or TensorFlow's gfile where `EPATH_USE_TF` is not `false`) and
local paths to the operating system. Orbax writes the arrays of a run's
checkpoints through TensorStore, which speaks GCS itself.

Object stores have no appends, no atomic directory renames and no `flock`:

- a single object appears whole or not at all, so a file written in one piece
  (config.json, final_metrics.json, an `.npz`) needs no write-beside-then-
  replace there;
- files that grow (metrics.jsonl, TensorBoard event files) are kept in memory
  and the whole object is rewritten at each `sync()`: the training loop syncs
  them at every checkpoint and at the end (`BufferedObject`);
- the workdir lock is an object created only if absent (vit_jax.bucket_lock).

Transient errors are retried by the clients' own retries: TensorStore's
`gcs_request_retries` (configured by `configure_retries`, below) and gcsfs's
(6 tries with exponential backoff, its default). A request that still fails
raises `StorageError`, reported as one `error:` line.

Pointing the clients at an emulator takes their own variables only:
`STORAGE_EMULATOR_HOST` (gcsfs), `TENSORSTORE_GCS_HTTP_URL` and
`GOOGLE_AUTH_TOKEN_FOR_TESTING` (TensorStore), `EPATH_USE_TF=false` (epath).
"""

from __future__ import annotations

import builtins
import errno
import io
import logging as std_logging
import os
import posixpath
import socket
import zipfile
from typing import IO, Any, Iterator, Optional, Union

from absl import logging

PathLike = Union[str, os.PathLike]

# TensorStore's retries of a failed GCS request (its defaults are 32 tries up to
# 32 s apart: a quarter of an hour before a save can fail); $VIT_JAX_GCS_RETRIES
# sets the number of tries.
GCS_RETRIES_ENV = 'VIT_JAX_GCS_RETRIES'
TENSORSTORE_RETRIES = {'max_retries': 8, 'initial_delay': '1s', 'max_delay': '16s'}

READ_BLOCK_BYTES = 1 << 20

# The bucket a request failed on for good (after the retries), if any: the files
# still to be written there at exit (metrics, the lock) are then left alone
# instead of each waiting out its own retries.
_down: Optional[str] = None


class StorageError(OSError):
  """A bucket that is missing, cannot be written, or stopped answering."""

  def one_line(self) -> str:
    return str(self.strerror)


def mark_down(url: str) -> None:
  """Records that `url`'s bucket stopped answering (see `is_down`)."""
  global _down
  _down = bucket_of(url)


def is_down(url: str) -> bool:
  """Whether a request to `url`'s bucket has failed for good in this process."""
  return is_remote(url) and _down == bucket_of(url)


def bucket_of(url: str) -> str:
  return os.fspath(url).split('://', 1)[-1].split('/', 1)[0]


def is_remote(path: PathLike) -> bool:
  """True for a URL (`gs://...`, any `scheme://`)."""
  return '://' in os.fspath(path)


def resolve(path: PathLike) -> str:
  """A URL as given (without a trailing '/'), a local path absolute with '~' expanded."""
  path = os.fspath(path)
  if is_remote(path):
    return path.rstrip('/')
  return os.path.abspath(os.path.expanduser(path))


def join(base: PathLike, *parts: str) -> str:
  base = os.fspath(base)
  return posixpath.join(base, *parts) if is_remote(base) else os.path.join(base, *parts)


def epath_of(path: PathLike):
  """`path` as an etils `epath.Path` (what Orbax takes)."""
  from etils import epath  # pylint: disable=g-import-not-at-top
  configure()
  return epath.Path(resolve(path))


def exists(path: PathLike) -> bool:
  if not is_remote(path):
    return os.path.exists(resolve(path))
  return epath_of(path).exists()


def isdir(path: PathLike) -> bool:
  if not is_remote(path):
    return os.path.isdir(resolve(path))
  return epath_of(path).is_dir()


def isfile(path: PathLike) -> bool:
  if not is_remote(path):
    return os.path.isfile(resolve(path))
  p = epath_of(path)
  return p.exists() and not p.is_dir()


def makedirs(path: PathLike) -> None:
  """Creates a local directory and its parents (a bucket has no directories)."""
  if is_remote(path):
    return
  os.makedirs(resolve(path), exist_ok=True)


def open(path: PathLike, mode: str = 'r', **kwargs) -> IO[Any]:  # pylint: disable=redefined-builtin
  """A file object; for a URL, a seekable one whose reads fetch byte ranges."""
  if not is_remote(path):
    return builtins.open(resolve(path), mode, **kwargs)
  with _errors_named(path):
    if mode == 'rb':
      # Ranged reads: a read of n bytes fetches those (small reads, e.g. zip and .npy
      # headers, share 1 MiB blocks), so a load holds little beyond its arrays.
      return filesystem(path).open(resolve(path), 'rb', cache_type='bytes',
                                   block_size=READ_BLOCK_BYTES)
    return epath_of(path).open(mode, **kwargs)


def filesystem(path: PathLike):
  """The fsspec filesystem of a URL's scheme (gcsfs for gs://), as epath uses it."""
  import fsspec  # pylint: disable=g-import-not-at-top
  configure()
  return fsspec.filesystem(os.fspath(path).split('://', 1)[0])


def read_text(path: PathLike) -> str:
  with open(path, 'r', encoding='utf-8') as f:
    return f.read()


def write_text(path: PathLike, text: str) -> None:
  """Writes `text` so that a reader sees the old file or the new one, never a part.

  Locally: a temporary file beside it, then a rename. In a bucket: one object
  upload, which is atomic.
  """
  if is_remote(path):
    with _errors_named(path):
      epath_of(path).write_text(text, encoding='utf-8')
    return
  path = resolve(path)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  partial = f'{path}.partial-{os.getpid()}'
  try:
    with builtins.open(partial, 'w', encoding='utf-8') as f:
      f.write(text)
    os.replace(partial, path)
  finally:
    if os.path.exists(partial):
      os.remove(partial)


def remove(path: PathLike) -> None:
  if is_remote(path):
    epath_of(path).unlink()
  else:
    os.remove(resolve(path))


def rename(src: PathLike, dst: PathLike) -> None:
  """Moves a file or a directory (in a bucket: copies, then deletes, object by object)."""
  if is_remote(src):
    epath_of(src).rename(epath_of(dst))
  else:
    os.replace(resolve(src), resolve(dst))


def listdir(path: PathLike) -> list[str]:
  if not is_remote(path):
    return os.listdir(resolve(path))
  return [p.name for p in epath_of(path).iterdir()]


class BufferedObject:
  """A file that grows (`write`) and reaches its bucket object whole at each `sync()`.

  GCS objects cannot be appended to; rewriting the object at each sync keeps
  it a complete file at all times. `keep=True` starts from the object's
  current contents (metrics.jsonl of a resumed run goes on after its lines).
  """

  def __init__(self, path: PathLike, *, keep: bool = False):
    self.path = resolve(path)
    self._data = io.BytesIO()
    if keep:
      with _errors_named(self.path):
        p = epath_of(self.path)
        if p.exists():
          self._data.write(p.read_bytes())
    self._synced = -1
    self.closed = False

  def write(self, data: Union[bytes, str]) -> None:
    self._data.write(data.encode('utf-8') if isinstance(data, str) else data)

  def flush(self) -> None:
    """Nothing: a bucket object is written whole, at `sync()`."""

  def sync(self) -> None:
    if self._data.tell() == self._synced:
      return
    if is_down(self.path):
      logging.warning('Not writing %s: its bucket stopped answering.', self.path)
      return
    with _errors_named(self.path):
      epath_of(self.path).write_bytes(self._data.getvalue())
    self._synced = self._data.tell()

  def close(self) -> None:
    if not self.closed:
      self.sync()
      self.closed = True


class ObjectZipFile(zipfile.ZipFile):
  """A zip archive read from a bucket object through a seekable file whose reads fetch
  byte ranges (the directory at the end, then only the members asked for); closing
  the archive closes that file."""

  def __init__(self, path: PathLike):
    self._object_file = open(path, 'rb')
    try:
      super().__init__(self._object_file)
    except BaseException:
      self._object_file.close()
      raise

  def close(self) -> None:
    try:
      super().close()
    finally:
      self._object_file.close()


# -- checks and errors -------------------------------------------------------------


def probe_writable(url: str, flag: str) -> None:
  """Writes and deletes a probe object under `url`; StorageError (one line) if it cannot.

  Run before training starts, so that a missing bucket or one without write
  permission is reported at once, not at the first checkpoint.
  """
  probe = join(url, f'.probe-{socket.gethostname()}-{os.getpid()}')
  try:
    p = epath_of(probe)
    p.write_text('probe')
    p.unlink()
  except Exception as e:  # pylint: disable=broad-except
    raise StorageError(errno.EIO, f'{flag} {url!r} cannot be written: {describe(e, url)}',
                       url) from None


def describe(error: BaseException, url: str) -> str:
  """What went wrong with `url`, in a few words, from a client's exception."""
  text = f'{type(error).__name__}: {error}'
  bucket = bucket_of(url)
  if isinstance(error, FileNotFoundError) or 'Not Found' in text or '404' in text:
    return f'bucket {bucket!r} does not exist (or this account cannot see it)'
  if isinstance(error, PermissionError) or '403' in text or '401' in text:
    return f'no permission to write into bucket {bucket!r}'
  return ' '.join(text.split())[:300]


def is_storage_failure(error: BaseException) -> bool:
  """True when `error` (or what it wraps) is a bucket request that failed for good."""
  for e in exception_chain(error):
    if isinstance(e, StorageError):
      return True
    text = str(e)
    if ('retry attempts failed' in text or 'Cannot connect to host' in text
        or type(e).__name__ in ('ClientConnectorError', 'ServerDisconnectedError', 'HttpError')):
      return True
  return False


def exception_chain(error: BaseException) -> Iterator[BaseException]:
  """`error`, its causes and contexts, and the members of exception groups."""
  todo, seen = [error], set()
  while todo:
    e = todo.pop()
    if e is None or id(e) in seen:
      continue
    seen.add(id(e))
    yield e
    todo += [e.__cause__, e.__context__, *getattr(e, 'exceptions', ())]


class _errors_named:  # pylint: disable=invalid-name
  """Turns a client's failure on `path` into a StorageError naming it."""

  def __init__(self, path: PathLike):
    self.path = os.fspath(path)

  def __enter__(self):
    return self

  def __exit__(self, kind, error, tb):
    if error is None or not isinstance(error, Exception) or isinstance(error, StorageError):
      return False
    if isinstance(error, FileNotFoundError) and not is_storage_failure(error):
      raise FileNotFoundError(errno.ENOENT, f'No such object: {self.path}', self.path) from None
    if is_storage_failure(error) or isinstance(error, OSError):
      mark_down(self.path)
      raise StorageError(errno.EIO, f'Cloud Storage failed on {self.path}: '
                         f'{describe(error, self.path)}', self.path) from None
    return False


# -- client configuration ------------------------------------------------------------

_configured = False


class _QuietGcsfs(std_logging.Filter):
  """Drops two kinds of gcsfs records: the warning that it cannot tell whether a
  bucket is hierarchical (no storage-control permission, an emulator; it then works
  as for any bucket), and the traceback it logs for each request out of retries,
  which reaches the user as one StorageError line instead."""

  def filter(self, record: std_logging.LogRecord) -> bool:
    if 'Could not determine bucket type' in record.getMessage():
      return False
    return not (record.exc_info and record.exc_info[1] is not None
                and is_storage_failure(record.exc_info[1]))


def configure() -> None:
  """Sets the clients' retries and quiets gcsfs's bucket-type probe (once)."""
  global _configured
  if _configured:
    return
  _configured = True
  std_logging.getLogger('gcsfs').addFilter(_QuietGcsfs())
  configure_retries()


def configure_retries(retries: Optional[dict] = None) -> None:
  """TensorStore's GCS retries in the context Orbax opens every array with.

  Orbax builds that context from module-level defaults (no argument reaches it
  through a CheckpointManager), so the setting goes there.
  """
  try:
    from orbax.checkpoint._src.serialization import tensorstore_utils  # pylint: disable=g-import-not-at-top
  except ImportError:
    return
  setting = dict(retries or TENSORSTORE_RETRIES)
  tries = os.environ.get(GCS_RETRIES_ENV, '').strip()
  if tries:
    try:
      setting['max_retries'] = max(0, int(tries))
    except ValueError:
      raise ValueError(f'{GCS_RETRIES_ENV}={tries!r} is not a whole number') from None
  for name in ('_BASE_TS_CONTEXT', '_DEFAULT_OCDBT_TS_CONTEXT'):
    context = getattr(tensorstore_utils, name, None)
    if isinstance(context, dict):
      context['gcs_request_retries'] = setting
