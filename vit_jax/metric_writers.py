"""Where training metrics go: the console, TensorBoard event files, JSON lines.

`create_default_writer(workdir, total_steps)` gives process 0 all three and
every other process a writer that drops everything, so a multi-host run
writes each number once. Writers take host scalars (python / numpy numbers):
the training loop fetches metrics from the devices before it writes them.

TensorBoard event files are written with the `tensorboard` package's own
writer, which needs no TensorFlow; when `tensorboard` is missing the writer
says so once in the log and the other writers carry on.

Every write reaches the operating system before `write_scalars` returns
(metrics.jsonl is flushed, the event file's queue drained), so a run killed
with SIGKILL keeps every line written so far. `flush(fsync=True)` also forces
the files to the disk, so they survive a machine crash too: the trainer calls
it whenever it saves a checkpoint, so the metrics on disk always reach at
least the latest checkpoint. In a `gs://` workdir, where objects cannot be
appended to, metrics.jsonl and the event file are kept in memory and each is
uploaded whole at every such `flush(fsync=True)` and at `close()`
(`vit_jax.storage.BufferedObject`): the bucket's copy reaches the latest
checkpoint in the same way.

Why not clu's `metric_writers` (what the flax examples use): its summary
writer is TensorFlow's `tf.summary`, and the trainer must run where TensorFlow
is missing (the GPU machine has none, ../shared/README.md); clu itself is not
installed there either. tensorboardX would add a dependency for the one writer
that the `tensorboard` package already provides. What is left here is the
console line with its ETA and a JSON-lines file.
"""

from __future__ import annotations

import json
import math
import os
import socket
import time
from typing import Any, Mapping, Optional, Sequence

from absl import logging

from vit_jax import storage

Scalars = Mapping[str, Any]


def _to_float(value: Any) -> float:
  try:
    return float(value)
  except (TypeError, ValueError):
    return float('nan')


class MetricWriter:
  """Interface: scalars at a step, hyper-parameters once, flush, close."""

  def write_scalars(self, step: int, scalars: Scalars) -> None:
    raise NotImplementedError

  def write_hparams(self, hparams: Mapping[str, Any]) -> None:
    del hparams

  def flush(self, fsync: bool = False) -> None:
    """Hands buffered writes to the OS; with `fsync`, waits until they are on disk."""
    del fsync

  def close(self) -> None:
    self.flush(fsync=True)


class NullWriter(MetricWriter):
  """Drops everything (processes other than 0)."""

  def write_scalars(self, step, scalars):
    del step, scalars


def format_duration(seconds: float) -> str:
  if not math.isfinite(seconds) or seconds < 0:
    return '?'
  seconds = int(round(seconds))
  hours, rest = divmod(seconds, 3600)
  minutes, seconds = divmod(rest, 60)
  return f'{hours}:{minutes:02d}:{seconds:02d}' if hours else f'{minutes}:{seconds:02d}'


def _format_value(value: float) -> str:
  if value == 0 or not math.isfinite(value):
    return str(value)
  if abs(value) >= 1e5 or abs(value) < 1e-3:
    return f'{value:.3e}'
  if float(value).is_integer():
    return str(int(value))
  return f'{value:.4g}'


class ConsoleWriter(MetricWriter):
  """One log line per write: `[step/total pct ETA] name=value ...`.

  The ETA uses the `steps_per_sec` scalar when the write has one, else the
  average speed since the writer was made.
  """

  def __init__(self, total_steps: Optional[int] = None, start_step: int = 0,
               print_fn=None):
    self.total_steps = total_steps
    self._start_step = start_step
    self._start_time = time.monotonic()
    self._print = print_fn or (lambda line: logging.info('%s', line))
    self._last_speed = float('nan')

  def write_scalars(self, step, scalars):
    prefix = f'step {step}'
    if self.total_steps:
      speed = _to_float(scalars.get('steps_per_sec', self._last_speed))
      if speed > 0:
        self._last_speed = speed
      else:
        elapsed = time.monotonic() - self._start_time
        done = step - self._start_step
        speed = done / elapsed if elapsed > 0 and done > 0 else float('nan')
      eta = (self.total_steps - step) / speed if speed > 0 else float('nan')
      pct = 100.0 * step / self.total_steps
      prefix = (f'[{step}/{self.total_steps} {pct:5.1f}% '
                f'ETA {format_duration(eta)}]')
    body = ' '.join(f'{k}={_format_value(_to_float(v))}' for k, v in sorted(scalars.items()))
    self._print(f'{prefix} {body}')

  def write_hparams(self, hparams):
    # The console stays short: the config is in WORKDIR/config.json and metrics.jsonl.
    del hparams



def _fsync_path(path: str) -> None:
  """fsync a file (or directory) by name: it flushes the inode, whoever wrote it."""
  fd = os.open(path, os.O_RDONLY)
  try:
    os.fsync(fd)
  finally:
    os.close(fd)


class JsonLinesWriter(MetricWriter):
  """Appends `{"step": s, name: value, ...}` lines to a file, each flushed as written."""

  def __init__(self, path: str):
    self.path = path
    self._file: Any
    if storage.is_remote(path):  # no appends in a bucket: rewritten whole at each fsync
      self._file = storage.BufferedObject(path, keep=True)
    else:
      os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
      self._file = open(path, 'a', encoding='utf-8')
    self._synced_dir = False

  def _write_line(self, line: str) -> None:
    self._file.write(line + '\n')
    # One flush per line: a kill loses nothing already written, at the cost of
    # a write() per log step, which is negligible next to a training step.
    self._file.flush()

  def write_scalars(self, step, scalars):
    record = {'step': int(step), 'time': time.time()}
    record.update({k: _to_float(v) for k, v in scalars.items()})
    self._write_line(json.dumps(record))

  def write_hparams(self, hparams):
    self._write_line(json.dumps({'hparams': dict(hparams)}, default=str))

  def flush(self, fsync: bool = False) -> None:
    if self._file.closed:
      return
    self._file.flush()
    if fsync and isinstance(self._file, storage.BufferedObject):
      self._file.sync()
    elif fsync:
      os.fsync(self._file.fileno())
      if not self._synced_dir:
        # The new file's directory entry must reach the disk too.
        _fsync_path(os.path.dirname(os.path.abspath(self.path)))
        self._synced_dir = True

  def close(self):
    if not self._file.closed:
      self.flush(fsync=True)
      self._file.close()


class TensorBoardWriter(MetricWriter):
  """Scalar summaries in a TensorBoard event file under `logdir` (no TensorFlow)."""

  def __init__(self, logdir: str):
    # pylint: disable=g-import-not-at-top
    from tensorboard.compat.proto import event_pb2, summary_pb2
    from tensorboard.summary.writer.event_file_writer import EventFileWriter
    # pylint: enable=g-import-not-at-top
    self.logdir = logdir
    self._event_pb2, self._summary_pb2 = event_pb2, summary_pb2
    if storage.is_remote(logdir):
      self._writer = _BucketEventFile(logdir, event_pb2)
    else:
      os.makedirs(logdir, exist_ok=True)
      self._writer = EventFileWriter(logdir, flush_secs=30)
    self._synced_dir = False
    self._closed = False

  def write_scalars(self, step, scalars):
    values = [self._summary_pb2.Summary.Value(tag=k, simple_value=_to_float(v))
              for k, v in scalars.items()]
    event = self._event_pb2.Event(
        wall_time=time.time(), step=int(step),
        summary=self._summary_pb2.Summary(value=values))
    self._writer.add_event(event)
    # The writer queues events for a background thread and writes them every
    # flush_secs; draining the queue now makes a kill lose nothing written.
    self._writer.flush()

  def write_hparams(self, hparams):
    # Plain text summary: readable in TensorBoard's text tab without the
    # hparams plugin's protos.
    text = json.dumps(dict(hparams), sort_keys=True, indent=1, default=str)
    meta = self._summary_pb2.SummaryMetadata(
        plugin_data=self._summary_pb2.SummaryMetadata.PluginData(plugin_name='text'))
    # pylint: disable=g-import-not-at-top
    from tensorboard.compat.proto import tensor_pb2, tensor_shape_pb2, types_pb2
    # pylint: enable=g-import-not-at-top
    tensor = tensor_pb2.TensorProto(
        dtype=types_pb2.DT_STRING, string_val=[text.encode('utf-8')],
        tensor_shape=tensor_shape_pb2.TensorShapeProto())
    value = self._summary_pb2.Summary.Value(tag='config', metadata=meta, tensor=tensor)
    self._writer.add_event(self._event_pb2.Event(
        wall_time=time.time(), step=0, summary=self._summary_pb2.Summary(value=[value])))
    self._writer.flush()

  @property
  def event_file(self) -> Optional[str]:
    """The event file's path (None if the tensorboard writer does not say)."""
    return getattr(self._writer, '_file_name', None)

  def flush(self, fsync: bool = False) -> None:
    if self._closed:
      return
    self._writer.flush()
    path = self.event_file
    if fsync and isinstance(self._writer, _BucketEventFile):
      self._writer.sync()
    elif fsync and path and os.path.exists(path):
      _fsync_path(path)
      if not self._synced_dir:
        _fsync_path(self.logdir)
        self._synced_dir = True

  def close(self):
    if self._closed:
      return
    self.flush(fsync=True)
    self._writer.close()
    self._closed = True


class _BucketEventFile:
  """An event file in a bucket, with the calls TensorBoardWriter makes of tensorboard's
  EventFileWriter (whose TensorFlow-free file layer cannot write to `gs://`).

  The records (TFRecord framing, tensorboard's `RecordWriter`) collect in a
  `storage.BufferedObject`, uploaded whole at each `sync()` (every checkpoint).
  """

  def __init__(self, logdir: str, event_pb2):
    from tensorboard.summary.writer.record_writer import RecordWriter  # pylint: disable=g-import-not-at-top
    # The name TensorBoard looks for, as its own writer makes it.
    self._file_name = storage.join(logdir, 'events.out.tfevents.%010d.%s.%s.0' % (
        time.time(), socket.gethostname(), os.getpid()))
    self._object = storage.BufferedObject(self._file_name)
    self._records = RecordWriter(self._object)
    self.add_event(event_pb2.Event(wall_time=time.time(), file_version='brain.Event:2'))

  def add_event(self, event) -> None:
    self._records.write(event.SerializeToString())

  def flush(self) -> None:
    """Nothing: the object is written whole, at `sync()`."""

  def sync(self) -> None:
    self._object.sync()

  def close(self) -> None:
    self._object.close()


class MultiWriter(MetricWriter):
  """Sends every call to each of `writers`."""

  def __init__(self, writers: Sequence[MetricWriter]):
    self.writers = list(writers)

  def write_scalars(self, step, scalars):
    for w in self.writers:
      w.write_scalars(step, scalars)

  def write_hparams(self, hparams):
    for w in self.writers:
      w.write_hparams(hparams)

  def flush(self, fsync: bool = False) -> None:
    for w in self.writers:
      w.flush(fsync=fsync)

  def close(self):
    for w in self.writers:
      w.close()


def create_default_writer(workdir: Optional[str], total_steps: Optional[int] = None,
                          start_step: int = 0, *, just_logging: bool = False,
                          tensorboard: bool = True) -> MetricWriter:
  """Console + TensorBoard (`workdir`) + JSON lines (`workdir/metrics.jsonl`).

  `just_logging=True` (processes other than 0) returns a `NullWriter`.
  """
  if just_logging:
    return NullWriter()
  writers: list[MetricWriter] = [ConsoleWriter(total_steps, start_step)]
  if workdir:
    writers.append(JsonLinesWriter(os.path.join(workdir, 'metrics.jsonl')))
    if tensorboard:
      try:
        writers.append(TensorBoardWriter(storage.resolve(workdir)))
      except ImportError as e:
        logging.warning('No TensorBoard event files (%s); console and JSON only.', e)
  return MultiWriter(writers)


def write_json(path: str, data: Mapping[str, Any]) -> None:
  """Writes `data` as JSON atomically (temporary file, then rename; one object in a bucket)."""
  storage.write_text(path, json.dumps(dict(data), indent=2, sort_keys=True,
                                      default=_json_default) + '\n')


def _json_default(value):
  try:
    return float(value)
  except (TypeError, ValueError):
    return str(value)
