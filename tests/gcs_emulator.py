"""A local Cloud Storage for the tests: `gcp-storage-emulator` on a free 127.0.0.1 port.

`Emulator.start()` runs it in a subprocess (this file is its launcher) with a
default bucket, in memory or on disk (`data_dir`: objects then outlive a stop
and a restart on the same port, as a bucket outlives an outage). The clients
are pointed at it only by their own variables (`Emulator.env`):
STORAGE_EMULATOR_HOST (gcsfs), TENSORSTORE_GCS_HTTP_URL and
GOOGLE_AUTH_TOKEN_FOR_TESTING (TensorStore), EPATH_USE_TF=false (etils epath).

The launcher adds to the emulator what Cloud Storage does and it lacks, and
what TensorStore's OCDBT commits and the workdir lock rely on: the object's
generation in the `x-goog-generation` header of a media download, and the
preconditions `ifGenerationMatch` (412 when the object's generation differs; 0:
the object must not exist) and `ifGenerationNotMatch` (304 when it equals) on
downloads and uploads. It serves each connection on a thread of its own (one
client that stalls mid-request cannot hold up the others) and handles one request at
a time, so a precondition's check and the write are atomic, as in the real service.

The tests list and fetch objects with plain HTTP requests of the JSON API
(`objects`, `read`, `upload`), not through the clients under test.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from http import HTTPStatus
from typing import Optional

BUCKET = 'bkt'


def free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


class Emulator:
  """One emulator process; `stop()` and `start()` again keep the port (and, with
  a `data_dir`, the objects)."""

  def __init__(self, data_dir: Optional[str] = None, bucket: str = BUCKET):
    self.port = free_port()
    self.url = f'http://127.0.0.1:{self.port}'
    self.bucket = bucket
    self.data_dir = data_dir
    self.proc: Optional[subprocess.Popen] = None

  @property
  def env(self) -> dict[str, str]:
    return {'STORAGE_EMULATOR_HOST': self.url, 'TENSORSTORE_GCS_HTTP_URL': self.url,
            'GOOGLE_AUTH_TOKEN_FOR_TESTING': 'emulator', 'EPATH_USE_TF': 'false'}

  def start(self) -> 'Emulator':
    args = [sys.executable, os.path.abspath(__file__), 'start', '--host=127.0.0.1',
            f'--port={self.port}', f'--default-bucket={self.bucket}', '--quiet']
    env = dict(os.environ)
    if self.data_dir:
      env['STORAGE_BASE'] = self.data_dir
    else:
      args.append('--in-memory')
    self.proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL,
                                 stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
      try:
        urllib.request.urlopen(f'{self.url}/storage/v1/b/{self.bucket}', timeout=1).read()
        return self
      except (urllib.error.URLError, ConnectionError, OSError):
        if self.proc.poll() is not None:
          raise RuntimeError(f'the emulator exited: {self.proc.stderr.read()[-2000:]}')
        time.sleep(0.1)
    raise RuntimeError('the emulator did not answer within 30 s')

  def stop(self) -> None:
    if self.proc is not None and self.proc.poll() is None:
      self.proc.terminate()
      try:
        self.proc.wait(timeout=10)
      except subprocess.TimeoutExpired:
        self.proc.kill()
        self.proc.wait()
    self.proc = None

  def point_clients_here(self, monkeypatch) -> None:
    """This process's clients pointed at the emulator (for the rest of a test)."""
    import gcsfs  # pylint: disable=g-import-not-at-top
    for name, value in self.env.items():
      monkeypatch.setenv(name, value)
    # gcsfs caches its clients; one made for another emulator would be reused.
    gcsfs.GCSFileSystem.clear_instance_cache()
    # epath reads EPATH_USE_TF once per process (a cached check): a path used before
    # (a local run's) would keep gs:// on TensorFlow's client, which ignores the emulator.
    from etils.epath import gpath  # pylint: disable=g-import-not-at-top
    getattr(gpath._is_tf_installed, 'cache_clear', lambda: None)()  # pylint: disable=protected-access

  # -- the JSON API, by hand ---------------------------------------------------------

  def objects(self, prefix: str = '') -> list[str]:
    """Names of the objects under `prefix` (all pages)."""
    names, token = [], None
    while True:
      query = {'prefix': prefix, **({'pageToken': token} if token else {})}
      url = f'{self.url}/storage/v1/b/{self.bucket}/o?{urllib.parse.urlencode(query)}'
      with urllib.request.urlopen(url, timeout=30) as r:
        page = json.load(r)
      names += [item['name'] for item in page.get('items', [])]
      token = page.get('nextPageToken')
      if not token:
        return sorted(names)

  def read(self, name: str) -> bytes:
    quoted = urllib.parse.quote(name, safe='')
    url = f'{self.url}/storage/v1/b/{self.bucket}/o/{quoted}?alt=media'
    with urllib.request.urlopen(url, timeout=60) as r:
      return r.read()

  def upload(self, name: str, data: bytes) -> None:
    query = urllib.parse.urlencode({'uploadType': 'media', 'name': name})
    request = urllib.request.Request(
        f'{self.url}/upload/storage/v1/b/{self.bucket}/o?{query}', data=data, method='POST',
        headers={'Content-Type': 'application/octet-stream'})
    with urllib.request.urlopen(request, timeout=120) as r:
      r.read()


# -- the launcher ------------------------------------------------------------------------


def _with_generations(objects):
  """The emulator's object handlers, plus generation headers and preconditions."""

  def generation(storage, request, object_id):
    try:
      return str(storage.get_file_obj(request.params['bucket_name'], object_id)['generation'])
    except Exception:  # pylint: disable=broad-except
      return None  # no such object (or bucket)

  def checked(handler, media):
    def wrapper(request, response, storage, *args, **kwargs):
      object_id = request.params.get('object_id') or (request.query.get('name') or [None])[0]
      if object_id is not None:
        current = generation(storage, request, object_id)
        match = (request.query.get('ifGenerationMatch') or [None])[0]
        not_match = (request.query.get('ifGenerationNotMatch') or [None])[0]
        if match is not None and (current or '0') != match:
          response.status = HTTPStatus.PRECONDITION_FAILED
          response.json({'error': {'code': 412, 'message': 'Precondition Failed'}})
          return None
        if not_match is not None and current is not None and current == not_match:
          response.status = HTTPStatus.NOT_MODIFIED
          return None
        if media and current is not None:
          response['x-goog-generation'] = current
      return handler(request, response, storage, *args, **kwargs)
    return wrapper

  download = checked(objects.download, media=True)
  get = objects.get

  def get_or_download(request, response, storage, *args, **kwargs):
    if (request.query.get('alt') or [''])[0] == 'media':
      return download(request, response, storage, *args, **kwargs)
    return get(request, response, storage, *args, **kwargs)

  return {objects.download: download, objects.get: get_or_download,
          objects.insert: checked(objects.insert, media=False)}


def _main() -> int:
  from gcp_storage_emulator import server  # pylint: disable=g-import-not-at-top
  from gcp_storage_emulator.__main__ import main  # pylint: disable=g-import-not-at-top
  from gcp_storage_emulator.handlers import objects  # pylint: disable=g-import-not-at-top
  import http.server  # pylint: disable=g-import-not-at-top
  import threading  # pylint: disable=g-import-not-at-top

  class ThreadingServer(http.server.ThreadingHTTPServer):
    daemon_threads = True

  server.server.HTTPServer = ThreadingServer  # the `http.server` the emulator names
  one_at_a_time = threading.Lock()
  handle = server.Router.handle

  def handle_locked(self, method):
    with one_at_a_time:
      return handle(self, method)

  server.Router.handle = handle_locked
  replace = _with_generations(objects)
  for _, handlers in server.HANDLERS:
    for method, handler in list(handlers.items()):
      if handler in replace:
        handlers[method] = replace[handler]
  return main()


if __name__ == '__main__':
  sys.exit(_main())
