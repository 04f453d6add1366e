"""The largest training batch that fits in a memory budget, ours and timm's.

For each model and framework, one worker process per tried batch size builds
the model and runs one training step (the same AdamW step `benchmark.py`
times); the batch fits when the worker's peak memory stayed within the budget
(peak RSS on CPU, peak device memory on an accelerator). A watchdog kills a
CPU worker as soon as its resident memory passes the budget, so a probe never
takes the machine's memory. Batches double from --start until one does not
fit, then bisect to a multiple of --granularity.

  python benchmarks/max_batch.py --models ViT-S_16,ViT-B_16 --memory-gb 8

Prints one table and, with --json, writes every probe.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from typing import Callable, Optional

_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO_ROOT not in sys.path:
  sys.path.insert(0, _REPO_ROOT)

from benchmarks import benchmark  # noqa: E402


def _rss_of(pid: int) -> int:
  try:
    with open(f'/proc/{pid}/status') as f:
      for line in f:
        if line.startswith('VmRSS:'):
          return int(line.split()[1]) * 1024
  except OSError:
    pass
  return 0


class _Watchdog:
  """Kills `proc` once its RSS exceeds `limit` bytes; records that it did."""

  def __init__(self, proc, limit: int, interval_s: float = 0.02):
    self.proc, self.limit, self.interval_s = proc, limit, interval_s
    self.killed_at: Optional[int] = None
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._poll, daemon=True)

  def _poll(self):
    while not self._stop.wait(self.interval_s) and self.proc.poll() is None:
      rss = _rss_of(self.proc.pid)
      if rss > self.limit:
        self.killed_at = rss
        self.proc.kill()
        return

  def __enter__(self):
    self._thread.start()
    return self

  def __exit__(self, *exc):
    self._stop.set()
    self._thread.join()


def probe(spec: dict, budget: int, cpu: bool) -> dict:
  """One worker: set-up and one training step at spec['batch']; did it fit?"""
  worker = benchmark.Worker(spec, benchmark.child_env('', 1, False))
  start = time.perf_counter()
  with _Watchdog(worker.proc, budget if cpu else 2**62) as dog:
    worker.wait_ready()
    result = worker.finish()
  if dog.killed_at is not None:
    return dict(batch=spec['batch'], fits=False, peak_bytes=dog.killed_at,
                why=f'killed at {dog.killed_at / 2**30:.2f} GiB resident',
                seconds=time.perf_counter() - start)
  if 'error' in result:
    message = result['error'].splitlines()[0]
    out_of_memory = any(s in result['error'] for s in ('RESOURCE_EXHAUSTED', 'out of memory',
                                                        'OutOfMemory', 'MemoryError'))
    if not out_of_memory:
      raise RuntimeError(f"{spec['framework']} {spec['model']} batch {spec['batch']}: {message}")
    return dict(batch=spec['batch'], fits=False, peak_bytes=None, why=message,
                seconds=time.perf_counter() - start)
  device_peak = (result.get('device_memory') or {}).get('peak_bytes_in_use')
  peak = result['rss_peak_bytes'] if cpu else device_peak
  return dict(batch=spec['batch'], fits=bool(peak and peak <= budget), peak_bytes=peak,
              temp_bytes=(result.get('compiled_memory') or {}).get('temp_bytes'),
              seconds=time.perf_counter() - start)


def largest_fitting(fits: Callable[[int], bool], start: int, granularity: int,
                    limit: int) -> Optional[int]:
  """The largest multiple of `granularity` in [start, limit] with fits(b), assuming
  monotonicity; None when even `start` does not fit."""
  if not fits(start):
    return None
  good, bad = start, None
  while bad is None:
    trial = min(2 * good, limit)
    if trial == good:
      return good
    if fits(trial):
      good = trial
    else:
      bad = trial
  while bad - good > granularity:
    mid = (good + bad) // 2 // granularity * granularity
    if mid <= good:
      break
    good, bad = (mid, bad) if fits(mid) else (good, mid)
  return good


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--models', type=lambda t: t.split(','), default=['ViT-S_16', 'ViT-B_16'])
  p.add_argument('--image-size', type=int, default=224)
  p.add_argument('--dtype', choices=['fp32', 'bf16'], default='fp32')
  p.add_argument('--frameworks', type=lambda t: t.split(','), default=['jax', 'timm'])
  p.add_argument('--memory-gb', type=float, default=8.0, help='budget in GiB (2**30 bytes)')
  p.add_argument('--start', type=int, default=8)
  p.add_argument('--granularity', type=int, default=8)
  p.add_argument('--max-batch', type=int, default=4096)
  p.add_argument('--remat-policy', choices=benchmark.REMAT_POLICIES, default=None,
                 help="ours: which activations the step keeps (default: the preset's)")
  p.add_argument('--num-classes', type=int, default=1000)
  p.add_argument('--json', help='write every probe to this JSON file')
  args = p.parse_args(argv)
  for name in args.frameworks:
    if name not in ('jax', 'timm'):
      p.error(f'--frameworks: unknown framework {name!r}; use jax and/or timm')
  return args


def main(argv=None) -> int:
  args = parse_args(argv)
  info = benchmark.probe_platform()
  cpu = info.get('platform', 'cpu') == 'cpu'
  budget = int(args.memory_gb * 2**30)
  rows, probes = [], []
  for model in args.models:
    for framework in args.frameworks:
      def fits(batch: int, model=model, framework=framework) -> bool:
        spec = dict(kind='cell', framework=framework, mode='train', model=model,
                    image_size=args.image_size, batch=batch, dtype=args.dtype, devices=1,
                    num_classes=args.num_classes, steps=1, warmup_steps=1,
                    min_repeat_seconds=0.0, threads=info.get('cores'),
                    torch_device='cpu' if cpu else 'cuda', host_memory='default',
                    remat_policy=args.remat_policy if framework == 'jax' else None)
        result = dict(probe(spec, budget, cpu), model=model, framework=framework)
        probes.append(result)
        peak = result.get('peak_bytes')
        print(f"  {framework} {model} batch {batch}: "
              f"{'fits' if result['fits'] else 'does not fit'}"
              + (f', peak {peak / 2**30:.2f} GiB' if peak else '')
              + (f" ({result['why']})" if result.get('why') else ''), flush=True)
        return result['fits']
      best = largest_fitting(fits, args.start, args.granularity, args.max_batch)
      peak = max((p['peak_bytes'] for p in probes if p['model'] == model and
                  p['framework'] == framework and p['batch'] == best and p['fits']),
                 default=None)
      rows.append([model, framework, best if best is not None else '-',
                   f'{peak / 2**30:.2f}' if peak else '-'])
  kind = 'peak RSS' if cpu else 'device peak'
  print(f'\nLargest training batch within {args.memory_gb:g} GiB ({kind}; '
        f'{args.dtype}, {args.image_size}px, one AdamW step; granularity {args.granularity}):')
  print(benchmark.markdown_table(
      ['model', 'framework', 'largest batch', f'{kind} GiB at it'], rows))
  print(f"{info.get('platform')} {info.get('device_kind')}, {info.get('cores')} cores of "
        f"{info.get('host_cpu')}; "
        f"jax {info.get('jax')}, torch {info.get('torch')}, timm {info.get('timm')}")
  if args.json:
    with open(args.json, 'w') as f:
      json.dump(dict(args=vars(args), probe=info, rows=rows, probes=probes), f, indent=1)
  return 0


if __name__ == '__main__':
  sys.exit(main())
