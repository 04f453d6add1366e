"""Framework-neutral measuring helpers shared by the JAX and timm workers.

A worker is one process that measures one thing (say, JAX ViT-S/16 training
at batch 8). It sets everything up and warms up (compiles), then serves timed
repeats one at a time when the parent asks for them, so the parent can
interleave the repeats of several workers: on a machine shared with other
jobs, slow and fast moments then fall on every contender alike. Keeping each
contender in its own process also keeps their memory peaks apart.

Protocol on stdin/stdout (one line each; other output is ignored):
  worker -> parent  `@@READY {json}`   set-up done (compile time, steps per repeat)
  parent -> worker  `run`              time one repeat
  worker -> parent  `@@TIME {json}`    {"seconds": s, "steps": n}
  parent -> worker  `done`
  worker -> parent  `@@RESULT {json}`  memory figures and the rest, then exit
  worker -> parent  `@@ERROR {json}`   set-up or a repeat failed; then exit
"""

from __future__ import annotations

import json
import math
import os
import platform
import resource
import sys
import threading
import time
import traceback
from typing import Any, Callable, Optional

PREFIX = '@@'
_PAGE_SIZE = os.sysconf('SC_PAGE_SIZE') if hasattr(os, 'sysconf') else 4096


def num_cores() -> int:
  """CPU cores this process may run on (affinity-aware)."""
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:  # not Linux
    return os.cpu_count() or 1


# CPU features that decide which matmul kernels a library can use: PyTorch's
# oneDNN/MKL take AMX for bf16 where present; XLA:CPU does not.
_ISA_FLAGS = ('avx2', 'avx512f', 'avx512_bf16', 'amx_bf16')


def host_cpu(cpuinfo: str = '/proc/cpuinfo') -> str:
  """The host CPU's model name and matmul-relevant ISA, e.g. 'AMD EPYC (avx2)'."""
  model, flags = platform.processor() or platform.machine(), set()
  try:
    with open(cpuinfo) as f:
      for line in f:
        key, _, value = line.partition(':')
        if key.strip() == 'model name' and value.strip():
          model = value.strip()
        elif key.strip() == 'flags':
          flags = set(value.split())
          break
  except OSError:
    pass
  isa = [flag for flag in _ISA_FLAGS if flag in flags]
  return f"{model} ({', '.join(isa) if isa else 'no AVX2'})" if flags else model


def rss_bytes() -> int:
  """Current resident set size of this process."""
  try:
    with open('/proc/self/statm') as f:
      return int(f.read().split()[1]) * _PAGE_SIZE
  except OSError:
    try:
      import psutil
      return psutil.Process().memory_info().rss
    except ImportError:
      return 0


def cpu_seconds() -> float:
  """User + system CPU time of this process, all threads."""
  usage = resource.getrusage(resource.RUSAGE_SELF)
  return usage.ru_utime + usage.ru_stime


def peak_rss_bytes() -> int:
  """Highest RSS this process ever had (compilation included)."""
  peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  return peak if sys.platform == 'darwin' else peak * 1024


class RssSampler:
  """Tracks the highest RSS while active, polling from a background thread."""

  def __init__(self, interval_s: float = 0.005):
    self.interval_s = interval_s
    self.peak = 0
    self._stop = threading.Event()
    self._thread = None

  def __enter__(self):
    self._stop.clear()
    self.peak = max(self.peak, rss_bytes())
    self._thread = threading.Thread(target=self._poll, daemon=True)
    self._thread.start()
    return self

  def _poll(self):
    while not self._stop.wait(self.interval_s):
      self.peak = max(self.peak, rss_bytes())

  def __exit__(self, *exc):
    self._stop.set()
    self._thread.join()
    self.peak = max(self.peak, rss_bytes())


def machine_busy_seconds() -> Optional[float]:
  """CPU-seconds spent busy by the whole machine since boot (None off Linux)."""
  try:
    with open('/proc/stat') as f:
      fields = [int(x) for x in f.readline().split()[1:]]
  except (OSError, ValueError):
    return None
  # user nice system idle iowait irq softirq steal ...
  busy = sum(fields[:3]) + sum(fields[5:8])
  return busy / os.sysconf('SC_CLK_TCK')


def wait_for_quiet(max_wait_s: float, max_busy_cores: float = 0.2,
                   window_s: float = 0.5) -> tuple[float, Optional[float]]:
  """Waits (up to `max_wait_s`) until other processes use < `max_busy_cores`.

  Returns (seconds waited, busy cores in the last window). For measuring on a
  machine shared with other jobs: a repeat then starts in a quiet moment.
  """
  start = time.perf_counter()
  busy = None
  while True:
    before = machine_busy_seconds()
    if before is None:
      return 0.0, None
    time.sleep(window_s)
    busy = (machine_busy_seconds() - before) / window_s
    waited = time.perf_counter() - start
    if busy < max_busy_cores or waited >= max_wait_s:
      return waited, busy


def steps_for(seconds_per_step: float, min_repeat_seconds: float, max_steps: int = 1000) -> int:
  """Steps per timed repeat so that one repeat lasts at least `min_repeat_seconds`."""
  if seconds_per_step <= 0:
    return max_steps
  return int(min(max_steps, max(1, math.ceil(min_repeat_seconds / seconds_per_step))))


_channel = None


def claim_stdout() -> None:
  """Keeps stdout for protocol messages; anything else printing to fd 1 goes to stderr.

  So chatty libraries cannot fill the pipe the parent only reads now and then.
  """
  global _channel
  sys.stdout.flush()
  _channel = os.fdopen(os.dup(1), 'w')
  os.dup2(2, 1)


def emit(tag: str, payload: dict) -> None:
  out = _channel or sys.stdout
  out.write(f'{PREFIX}{tag} {json.dumps(payload)}\n')
  out.flush()


def serve(setup: Callable[[], tuple[dict, Callable[[int], None], Callable[[], dict]]]) -> int:
  """Runs a worker: `setup()` -> (ready_info, run(steps), finish()).

  `run(steps)` must return only when the work of `steps` steps is complete
  (device synchronised). The timed repeats are served on request.
  """
  try:
    ready, run, finish = setup()
  except Exception as e:  # reported to the parent, which carries on
    emit('ERROR', {'error': f'{type(e).__name__}: {e}', 'trace': traceback.format_exc()})
    return 1
  steps = int(ready['steps'])
  emit('READY', ready)
  sampler = RssSampler()
  for line in sys.stdin:
    command = line.strip()
    if command == 'run':
      try:
        with sampler:
          cpu_start = cpu_seconds()
          start = time.perf_counter()
          run(steps)
          seconds = time.perf_counter() - start
          cpu = cpu_seconds() - cpu_start
      except Exception as e:
        emit('ERROR', {'error': f'{type(e).__name__}: {e}', 'trace': traceback.format_exc()})
        return 1
      emit('TIME', {'seconds': seconds, 'steps': steps, 'cpu_seconds': cpu})
    elif command == 'done':
      break
  result = finish()
  result.update(rss_steps_bytes=sampler.peak, rss_peak_bytes=peak_rss_bytes(),
                tensorflow_imported='tensorflow' in sys.modules,
                cpu_seconds=cpu_seconds())
  emit('RESULT', result)
  return 0


def dumps_spec(spec: dict[str, Any]) -> str:
  return json.dumps(spec, sort_keys=True)
