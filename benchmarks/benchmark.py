"""ViT throughput, memory and FLOPs: vit_jax (JAX/Flax) against timm (PyTorch).

Prints three tables, optionally writes everything as JSON:

1. images/s for inference and for one training step (AdamW, softmax
   cross-entropy), ours and timm's for the same shapes, and the ratio ours/timm;
2. FLOPs per image, XLA's cost analysis next to the analytic count
   (`vit_jax.flops`), achieved FLOP/s, MFU (on a GPU with a known peak) and
   peak memory (process RSS on CPU; device memory on an accelerator);
3. weak scaling of the training step over 1, 2, 4, 8 devices (fake CPU devices
   via `--xla_force_host_platform_device_count` when there are no real ones).

Each measured cell runs in its own worker process (so memory peaks do not mix),
compiles and warms up first, then times `--repeats` repeats of enough steps to
last `--min-repeat-seconds`; the median repeat is reported. On CPU the repeats
of the contenders of one cell (ours and timm's, or the device counts of the
scaling table) are interleaved ABBA-style: on a machine shared with other jobs
every contender then sees the same load, which keeps the ratios honest.

    python benchmarks/benchmark.py --preset quick            # < 5 min on 2 CPU cores
    python benchmarks/benchmark.py --preset full --json out.json
    python benchmarks/benchmark.py --models ViT-S_16 --batch-size 8 --dtypes fp32 \
        --no-scaling

Synthetic data only; TensorFlow is never imported. timm is optional: without
torch/timm its columns say why they are missing.

`--onnx` adds a deployment contender to float32 inference: the same model
exported by `vit_jax.export` and run by ONNX Runtime (benchmarks/onnx_bench.py;
same thread count, `allow_spinning` off), in its own table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any, Optional

_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO_ROOT not in sys.path:
  sys.path.insert(0, _REPO_ROOT)
for _path in reversed(os.environ.get('PYTHONPATH', '').split(os.pathsep)):
  # A worker told to use another checkout (`code=DIR`) imports vit_jax from there.
  if _path and _path != _REPO_ROOT and os.path.isdir(os.path.join(_path, 'vit_jax')):
    sys.path.insert(0, _path)

from benchmarks import measure  # noqa: E402
from vit_jax.remat import POLICIES as _REMAT  # noqa: E402  (no device work at import)

REMAT_POLICIES = tuple(_REMAT)
ATTENTION_CHOICES = ('explicit', 'xla', 'cudnn')
TIMM_VARIANTS = ('eager', 'compiled')

# Dense bf16 peak FLOP/s of accelerators we can quote MFU against (paper specs).
PEAK_FLOPS = {
    'H100': 989e12,
    'H200': 989e12,
    'A100': 312e12,
}

PRESETS = {
    # CI: a seconds-long run of every code path.
    'smoke': dict(models=['ViT-Test_4@32'], batch_size=[8], dtypes=['fp32'],
                  repeats=2, min_repeat_seconds=0.1,
                  scaling_model='ViT-Test_4@32', scaling_batch_per_device=4,
                  scaling_devices=[1, 2]),
    # A few minutes on 2 CPU cores.
    'quick': dict(models=['ViT-Ti_16@224'], batch_size=[8],
                  dtypes=['fp32', 'bf16'], repeats=3, min_repeat_seconds=1.0,
                  scaling_model='ViT-Test_4@32', scaling_batch_per_device=16,
                  scaling_devices=[1, 2, 4, 8]),
    # The paper sizes at 224; long on a CPU (ViT-B/16 training dominates).
    'full': dict(models=['ViT-Ti_16@224', 'ViT-S_16@224', 'ViT-B_16@224'], batch_size=[8],
                 dtypes=['fp32', 'bf16'], repeats=5, min_repeat_seconds=2.0,
                 scaling_model='ViT-Ti_16@224', scaling_batch_per_device=4,
                 scaling_devices=[1, 2, 4, 8]),
}

_DEVICE_COUNT_FLAG = '--xla_force_host_platform_device_count'


# ---------------------------------------------------------------------------
# Worker side.
# ---------------------------------------------------------------------------


def _probe() -> int:
  """Reports platform, devices and versions (run in a child process)."""
  import jax
  import jaxlib
  import flax
  info = dict(platform=jax.default_backend(), device_kind=jax.devices()[0].device_kind,
              device_count=jax.device_count(), cores=measure.num_cores(),
              host_cpu=measure.host_cpu(),
              python=sys.version.split()[0], jax=jax.__version__, jaxlib=jaxlib.__version__,
              flax=flax.__version__, torch=None, timm=None, torch_cuda=False)
  # Cheap check here (importing torch takes seconds); the timm workers import it.
  import importlib.metadata
  import importlib.util
  missing = [m for m in ('torch', 'timm') if importlib.util.find_spec(m) is None]
  info['timm_missing'] = f'{", ".join(missing)} not installed' if missing else None
  if not missing:
    info.update(torch=importlib.metadata.version('torch'),
                timm=importlib.metadata.version('timm'))
    if info['platform'] != 'cpu':
      import torch
      info['torch_cuda'] = bool(torch.cuda.is_available())
  measure.emit('RESULT', info)
  return 0


def _worker(spec: dict[str, Any]) -> int:
  measure.claim_stdout()
  threads = spec.get('threads')
  if threads and hasattr(os, 'sched_setaffinity'):
    allowed = sorted(os.sched_getaffinity(0))
    if threads < len(allowed):
      # Before JAX starts: XLA sizes its CPU thread pool from the affinity mask.
      os.sched_setaffinity(0, allowed[:threads])
  if spec['kind'] == 'probe':
    return _probe()
  if spec.get('host_memory') == 'retain':
    # Both frameworks alike, before either starts threads (see vit_jax.host_memory).
    try:
      from vit_jax import host_memory
    except ImportError:  # a `code=DIR` checkout from before the module existed
      spec['host_memory'] = 'unavailable'
    else:
      if not host_memory.retain_freed_memory():
        spec['host_memory'] = 'unsupported'
  if spec['framework'] == 'jax':
    from benchmarks import jax_bench as bench
  elif spec['framework'] == 'onnx':
    from benchmarks import onnx_bench as bench
  else:
    from benchmarks import timm_bench as bench

  def setup():
    ready, run, finish = bench.setup(spec)
    return ready, run, lambda: dict(finish(), host_memory=spec.get('host_memory'))

  return measure.serve(setup)


# ---------------------------------------------------------------------------
# Parent side: processes.
# ---------------------------------------------------------------------------


def child_env(extra_xla_flags: str, num_devices: int, share_accelerator: bool,
              code: Optional[str] = None, extra_env: Optional[dict] = None) -> dict:
  """The environment of one worker process (also used by `max_batch.py`)."""
  env = dict(os.environ)
  env.update(extra_env or {})
  flags = [f for f in env.get('XLA_FLAGS', '').split() if not f.startswith(_DEVICE_COUNT_FLAG)]
  flags += extra_xla_flags.split()
  # Only affects the CPU platform: N fake CPU devices.
  flags.append(f'{_DEVICE_COUNT_FLAG}={num_devices}')
  env['XLA_FLAGS'] = ' '.join(flags)
  env.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
  if share_accelerator:
    # Several workers hold the same GPU at once: allocate on demand.
    env['XLA_PYTHON_CLIENT_PREALLOCATE'] = 'false'
  env['PYTHONPATH'] = os.pathsep.join(
      ([code] if code else []) + [_REPO_ROOT]
      + [p for p in env.get('PYTHONPATH', '').split(os.pathsep) if p])
  return env


class Worker:
  """One measuring child process and its end of the protocol in `measure`."""

  def __init__(self, spec: dict, env: dict):
    self.spec = spec
    self.stderr = tempfile.TemporaryFile(mode='w+')
    self.proc = subprocess.Popen(
        [sys.executable, os.path.abspath(__file__), '--worker', measure.dumps_spec(spec)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.stderr, text=True,
        env=env, cwd=_REPO_ROOT)
    self.error: Optional[str] = None
    self.ready: Optional[dict] = None
    self.times: list[dict] = []
    self.discarded: list[dict] = []
    self.result: Optional[dict] = None

  def _read(self, want: str) -> Optional[dict]:
    """Next protocol message; records an error (and returns None) on failure."""
    for line in self.proc.stdout:
      if not line.startswith(measure.PREFIX):
        continue
      tag, _, payload = line[len(measure.PREFIX):].partition(' ')
      data = json.loads(payload)
      if tag == 'ERROR':
        self._fail(data['error'])
        return None
      if tag == want:
        return data
    self._fail(f'worker exited (rc={self.proc.wait()})')
    return None

  def _fail(self, message: str) -> None:
    self.stderr.seek(0)
    tail = self.stderr.read()[-2000:]
    self.error = message if not tail.strip() else f'{message}\n{tail}'
    self.proc.kill()
    self.proc.wait()

  def _send(self, command: str) -> bool:
    try:
      self.proc.stdin.write(command + '\n')
      self.proc.stdin.flush()
      return True
    except (BrokenPipeError, OSError):
      self._fail('worker pipe closed')
      return False

  def wait_ready(self) -> None:
    if self.error is None and self.ready is None:
      self.ready = self._read('READY')

  def repeat(self, quiet_wait_s: float = 0.0, max_others_cores: Optional[float] = None,
             retries: int = 4) -> None:
    """One timed repeat; with `max_others_cores`, redone while other processes were busy."""
    for attempt in range(retries + 1):
      if self.error is not None:
        return
      waited, busy_before = (measure.wait_for_quiet(quiet_wait_s) if quiet_wait_s
                             else (0.0, None))
      machine_before = measure.machine_busy_seconds()
      if not self._send('run'):
        return
      timing = self._read('TIME')
      if timing is None:
        return
      if machine_before is not None:
        # CPU time of everything else on the machine during the repeat.
        others = measure.machine_busy_seconds() - machine_before - timing['cpu_seconds']
        timing['others_cores'] = max(0.0, others) / timing['seconds']
      timing.update(quiet_waited_s=waited, busy_cores_before=busy_before, attempt=attempt)
      contended = (max_others_cores is not None and
                   timing.get('others_cores', 0.0) > max_others_cores)
      if not contended or attempt == retries:
        self.times.append(timing)
        return
      self.discarded.append(timing)

  def finish(self) -> dict:
    if self.error is None and self._send('done'):
      self.result = self._read('RESULT')
      if self.error is None:
        self.proc.wait()
    self.stderr.close()
    return self.summary()

  def summary(self) -> dict:
    out = dict(spec=self.spec)
    if self.error is not None:
      out['error'] = self.error
      return out
    out.update(self.result or {}, ready=self.ready)
    if not self.times:  # set up and warmed up only (benchmarks/max_batch.py)
      return out
    rates = [self.spec['batch'] * t['steps'] / t['seconds'] for t in self.times]
    out.update(images_per_s=statistics.median(rates),
               repeats_images_per_s=rates, steps_per_repeat=self.times[0]['steps'],
               seconds_per_step=statistics.median(t['seconds'] / t['steps'] for t in self.times),
               cpu_seconds_per_image=statistics.median(
                   t['cpu_seconds'] / (t['steps'] * self.spec['batch']) for t in self.times),
               cpu_utilisation=statistics.median(
                   t['cpu_seconds'] / t['seconds'] for t in self.times),
               others_cores=(statistics.median(t['others_cores'] for t in self.times)
                             if 'others_cores' in self.times[0] else None),
               repeats=self.times, discarded_repeats=self.discarded)
    return out


def run_group(specs: list[dict], envs: list[dict], repeats: int, interleave: bool,
              settle_s: float, log, quiet_wait_s: float = 0.0,
              max_others_cores: Optional[float] = None) -> list[dict]:
  """Measures the specs; interleaved ABBA when `interleave`, else one after another."""
  if not interleave:
    results = []
    for spec, env in zip(specs, envs):
      worker = Worker(spec, env)
      worker.wait_ready()
      for _ in range(repeats):
        worker.repeat(quiet_wait_s, max_others_cores)
      results.append(worker.finish())
      log(_describe(results[-1]))
    return results
  workers = [Worker(spec, env) for spec, env in zip(specs, envs)]
  try:
    return _interleaved(workers, repeats, settle_s, log, quiet_wait_s, max_others_cores)
  finally:
    for worker in workers:
      if worker.proc.poll() is None:
        worker.proc.kill()


def _interleaved(workers, repeats, settle_s, log, quiet_wait_s, max_others_cores):
  for worker in workers:
    worker.wait_ready()
  for r in range(repeats):
    for worker in (workers if r % 2 == 0 else workers[::-1]):
      time.sleep(settle_s)  # let the previous worker's spinning threads go idle
      worker.repeat(quiet_wait_s, max_others_cores)
    log(f'  round {r + 1}/{repeats}: ' + ', '.join(
        '-' if w.error or len(w.times) <= r else
        f"{w.spec['batch'] * w.times[r]['steps'] / w.times[r]['seconds']:.2f}"
        for w in workers) + ' img/s')
  results = [worker.finish() for worker in workers]
  for result in results:
    log(_describe(result))
  return results


def _describe(result: dict) -> str:
  spec = result['spec']
  name = (f"{spec['framework']:4s} {spec['mode']:5s} {spec['model']}@{spec['image_size']} "
          f"b{spec['batch']} {spec['dtype']} x{spec.get('devices', 1)}dev"
          + (f" XLA_FLAGS='{spec['xla_flags']}'" if spec.get('xla_flags') else '')
          + (f" code={spec['code']}" if spec.get('code') else ''))
  if 'error' in result:
    return f'{name}: FAILED {result["error"].splitlines()[0]}'
  return (f"{name}: {result['images_per_s']:.2f} img/s "
          f"(repeats {', '.join(f'{r:.2f}' for r in result['repeats_images_per_s'])}; "
          f"{result['steps_per_repeat']} steps each; cores busy: {result['cpu_utilisation']:.2f} "
          f"this, {_num(result['others_cores'])} other processes)")


# ---------------------------------------------------------------------------
# Parent side: what to measure and the report.
# ---------------------------------------------------------------------------


def split_variant(variant: str, default_devices: int
                  ) -> tuple[int, str, Optional[str], dict[str, str], dict[str, str]]:
  """'devices=2 code=DIR env:NAME=V host_memory=default --xla_flag=x'
  -> (2, '--xla_flag=x', DIR, {NAME: V}, {'host_memory': 'default'}).

  `devices=N` (data parallel over N devices), `code=DIR` (import vit_jax from
  another checkout, to A/B a code change), `env:NAME=VALUE` (an environment
  variable of that worker only), `host_memory=retain|default` (that worker's
  allocator setting), `remat=POLICY` (the model's `remat_policy`) and
  `attention=explicit|xla|cudnn` are optional; the rest is XLA_FLAGS.
  """
  devices, flags, code, env, spec = default_devices, [], None, {}, {}
  for token in variant.split():
    if token.startswith('attention='):
      value = token.split('=', 1)[1]
      if value not in ATTENTION_CHOICES:
        raise ValueError(f'variant token {token!r}: attention is one of {ATTENTION_CHOICES}')
      spec['attention'] = value
    elif token.startswith('remat='):
      value = token.split('=', 1)[1]
      if value not in REMAT_POLICIES:
        raise ValueError(f'variant token {token!r}: remat is one of {REMAT_POLICIES}')
      spec['remat_policy'] = value
    elif token.startswith('host_memory='):
      value = token.split('=', 1)[1]
      if value not in ('retain', 'default'):
        raise ValueError(f'variant token {token!r}: host_memory is retain or default')
      spec['host_memory'] = value
    elif token.startswith('devices='):
      devices = int(token.split('=', 1)[1])
    elif token.startswith('code='):
      code = os.path.abspath(os.path.expanduser(token.split('=', 1)[1]))
    elif token.startswith('env:'):
      name, sep, value = token[4:].partition('=')
      if not name or not sep:
        raise ValueError(f'variant token {token!r}: expected env:NAME=VALUE')
      env[name] = value
    else:
      flags.append(token)
  return devices, ' '.join(flags), code, env, spec


def parse_model(entry: str, default_size: int) -> tuple[str, int]:
  name, _, size = entry.partition('@')
  return name.replace('/', '_'), int(size) if size else default_size


def analytic(model: str, size: int, num_classes: int) -> dict:
  from vit_jax import flops
  from vit_jax.configs import models
  config = models.get_config(model)
  try:
    return dict(forward=flops.vit_flops(config, size, num_classes),
                train=flops.vit_flops(config, size, num_classes, train=True))
  except ValueError:
    return dict(forward=None, train=None)


def peak_flops(probe: dict) -> Optional[float]:
  if probe['platform'] != 'gpu':
    return None
  for key, value in PEAK_FLOPS.items():
    if key in probe['device_kind']:
      return value
  return None


def _mib(x: Optional[float]) -> str:
  return '-' if not x else f'{x / 2**20:.0f}'


def _num(x: Optional[float], fmt: str = '.2f') -> str:
  return '-' if x is None else format(x, fmt)


def markdown_table(headers: list[str], rows: list[list[str]]) -> str:
  """A GitHub-style table with padded columns (also used by `max_batch.py`)."""
  widths = [max(len(str(c)) for c in col) for col in zip(headers, *rows)]
  line = lambda cells: '| ' + ' | '.join(str(c).ljust(w) for c, w in zip(cells, widths)) + ' |'
  return '\n'.join([line(headers), '|' + '|'.join('-' * (w + 2) for w in widths) + '|']
                   + [line(r) for r in rows])


def _rate(cell: Optional[dict]) -> Optional[float]:
  return None if not cell or 'error' in cell else cell['images_per_s']


def paired_ratio(a: Optional[dict], b: Optional[dict]) -> Optional[float]:
  """Median over rounds of rate_a / rate_b, each pair timed back to back.

  With interleaved repeats this cancels load that drifts between rounds, which
  a ratio of the two medians does not.
  """
  if not _rate(a) or not _rate(b):
    return None
  pairs = list(zip(a['repeats_images_per_s'], b['repeats_images_per_s']))
  if not pairs:
    return None
  return statistics.median(x / y for x, y in pairs)


def _memory(cell: Optional[dict], probe: dict) -> Optional[float]:
  """Peak memory of a cell: device peak on an accelerator, process peak RSS on CPU."""
  if not cell or 'error' in cell:
    return None
  device = (cell.get('device_memory') or {}).get('peak_bytes_in_use')
  if probe['platform'] != 'cpu' and device:
    return device
  return cell.get('rss_peak_bytes')


def _temp(cell: Optional[dict]) -> Optional[float]:
  """XLA's temp buffers of the compiled step (the activations), from `memory_analysis()`."""
  if not cell or 'error' in cell:
    return None
  return (cell.get('compiled_memory') or {}).get('temp_bytes')


def report(meta: dict, rows: list[dict], scaling: list[dict]) -> str:
  probe = meta['probe']
  timm_note = meta.get('timm_note')
  out = []
  hdr = ['model', 'image', 'batch', 'dtype']
  table = []
  for row in rows:
    c = row['cells']
    key = [row['model'], row['image_size'], row['batch'], row['dtype']]
    ratio = lambda a, b: _num(paired_ratio(a, b))
    table.append(key + [
        _num(_rate(c.get('jax_infer'))), _num(_rate(c.get('timm_infer'))),
        ratio(c.get('jax_infer'), c.get('timm_infer')),
        _num(_rate(c.get('jax_train'))), _num(_rate(c.get('timm_train'))),
        ratio(c.get('jax_train'), c.get('timm_train'))])
  out.append(f'Throughput, images/s (median of {meta["repeats"]} repeats; ratio = ours / timm, '
             'median of per-round ratios):')
  out.append(markdown_table(hdr + ['infer ours', 'infer timm', 'ratio', 'train ours',
                                   'train timm', 'ratio'], table))
  if timm_note:
    out.append(f'timm columns empty: {timm_note}')
  onnx_rows = [r for r in rows if 'onnx_infer' in r['cells']]
  if onnx_rows:
    out.append('')
    out.append('ONNX Runtime inference (our model exported by vit_jax.export), images/s; '
               'ratio = ONNX Runtime / ours:')
    out.append(markdown_table(hdr + ['ours (JAX)', 'timm', 'ONNX Runtime', 'ratio'], [
        [r['model'], r['image_size'], r['batch'], r['dtype'],
         _num(_rate(r['cells'].get('jax_infer'))), _num(_rate(r['cells'].get('timm_infer'))),
         _num(_rate(r['cells'].get('onnx_infer'))),
         _num(paired_ratio(r['cells'].get('onnx_infer'), r['cells'].get('jax_infer')))]
        for r in onnx_rows]))

  peak = peak_flops(probe)
  mem_kind = 'device peak' if probe['platform'] != 'cpu' else 'peak RSS'
  table = []
  for row in rows:
    c = row['cells']
    a = row['analytic']
    xla_fwd = (c.get('jax_infer') or {}).get('xla_flops_per_image')
    xla_train = (c.get('jax_train') or {}).get('xla_flops_per_image')
    g = lambda x: _num(x / 1e9 if x else None, '.3g')
    achieved = lambda cell, per_image: (
        _rate(cell) * per_image if _rate(cell) and per_image else None)
    inf_flops = achieved(c.get('jax_infer'), a['forward'])
    train_flops = achieved(c.get('jax_train'), a['train'])
    mfu = (_num(100 * train_flops / peak, '.1f') + '%') if peak and train_flops else '-'
    table.append([row['model'], row['image_size'], row['batch'], row['dtype'],
                  g(a['forward']), g(xla_fwd), g(a['train']), g(xla_train),
                  g(inf_flops), g(train_flops), mfu,
                  f"{_mib(_memory(c.get('jax_infer'), probe))} / "
                  f"{_mib(_memory(c.get('jax_train'), probe))}",
                  f"{_mib(_temp(c.get('jax_infer')))} / {_mib(_temp(c.get('jax_train')))}",
                  f"{_mib(_memory(c.get('timm_infer'), probe))} / "
                  f"{_mib(_memory(c.get('timm_train'), probe))}"])
  out.append('')
  out.append('Compute and memory (GFLOP per image: analytic count / XLA cost analysis; '
             'achieved GFLOP/s from the analytic count; MFU of the train step against '
             'the bf16 dense peak, accelerators only):')
  out.append(markdown_table(hdr + ['fwd GFLOP/img', 'fwd XLA', 'train GFLOP/img', 'train XLA',
                                   'infer GFLOP/s', 'train GFLOP/s', 'MFU',
                                   f'ours {mem_kind} MiB infer/train',
                                   'ours XLA temp MiB infer/train',
                              f'timm {mem_kind} MiB infer/train'], table))

  if scaling:
    base = _rate(scaling[0]) if scaling[0]['spec']['devices'] == 1 else None
    table = []
    for cell in scaling:
      n = cell['spec']['devices']
      rate = _rate(cell)
      table.append([n, cell['spec']['batch'], _num(rate), _num(rate / n if rate else None),
                    _num(rate / base if rate and base else None),
                    _num(100 * rate / (n * base) if rate and base else None, '.0f') + '%'
                    if rate and base else '-'])
    spec = scaling[0]['spec']
    fake = probe['platform'] == 'cpu'
    out.append('')
    out.append(f"Weak scaling, train step, {spec['model']}@{spec['image_size']} "
               f"{spec['dtype']}, {meta['scaling_batch_per_device']} images per device"
               + (f' ({probe["cores"]} CPU cores shared by fake CPU devices: the ideal is a '
                  'flat total, not n-fold)' if fake else '') + ':')
    out.append(markdown_table(['devices', 'global batch', 'img/s', 'img/s per device',
                               'speed-up vs 1', 'efficiency'], table))
  if meta.get('xla_variants'):
    table = []
    for row in rows:
      c = row['cells']
      for i, flags in enumerate(meta['variants']):
        suffix = f'@{i}' if i else ''
        cells = [c.get(f'jax_{m}{suffix}') for m in ('infer', 'train')]
        bases = [c.get(f'jax_{m}') for m in ('infer', 'train')]
        vs = [_num(paired_ratio(x, b)) for x, b in zip(cells, bases)]
        table.append([row['model'], row['image_size'], row['batch'], row['dtype'],
                      flags, _num(_rate(cells[0])), vs[0],
                      _num(_rate(cells[1])), vs[1], _mib(_memory(cells[1], probe)),
                      _mib(_temp(cells[1]))])
    out.append('')
    out.append('Variants of ours (--xla-variants: XLA flags, devices=, code=, env:, '
               'host_memory=, remat=; interleaved with the rows above; x = vs first line):')
    out.append(markdown_table(hdr + ['variant', 'infer img/s', 'x', 'train img/s', 'x',
                                     f'train {mem_kind} MiB', 'train XLA temp MiB'], table))
  errors = [cell for row in rows for cell in row['cells'].values() if 'error' in cell]
  errors += [cell for cell in scaling if 'error' in cell]
  for cell in errors:
    out.append(f"FAILED {_describe(cell)}")
  return '\n'.join(out)


def contenders_table(meta: dict, rows: list[dict]) -> str:
  """One table, a row per contender (ours per variant, timm per variant) of every row."""
  probe = meta['probe']
  peak = peak_flops(probe)
  mem_kind = 'device peak' if probe['platform'] != 'cpu' else 'peak RSS'
  names = [('jax', i, 'ours' + (f' {v}' if i else '')) for i, v in enumerate(meta['variants'])]
  names += [('timm', i, f'timm {v}') for i, v in enumerate(meta.get('timm_variants') or [])]
  table = []
  for row in rows:
    c = row['cells']
    for framework, i, label in names:
      suffix = f'@{i}' if i else ''
      infer, train = (c.get(f'{framework}_{m}{suffix}') for m in ('infer', 'train'))
      if infer is None and train is None:
        continue
      train_flops = _rate(train) * row['analytic']['train'] if _rate(train) else None
      mfu = (_num(100 * train_flops / peak, '.1f') + '%') if peak and train_flops else '-'
      table.append([row['model'], row['image_size'], row['batch'], row['dtype'], label,
                    _num(_rate(infer)), _num(_rate(train)), mfu,
                    f'{_mib(_memory(infer, probe))} / {_mib(_memory(train, probe))}',
                    _mib(_temp(train))])
  head = (f'Every contender (images/s, median of {meta["repeats"]} repeats; MFU of the train '
          f'step against the bf16 dense peak, accelerators only):')
  return head + '\n' + markdown_table(
      ['model', 'image', 'batch', 'dtype', 'contender', 'infer img/s', 'train img/s',
       'train MFU', f'{mem_kind} MiB infer/train', 'XLA temp MiB train'], table)


# ---------------------------------------------------------------------------
# Command line.
# ---------------------------------------------------------------------------


def _ints(text: str) -> list[int]:
  return [int(t) for t in text.split(',') if t.strip()]


def _strs(text: str) -> list[str]:
  return [t.strip() for t in text.split(',') if t.strip()]


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(
      description=__doc__.split('\n\n')[0], formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--preset', choices=sorted(PRESETS), default='quick',
                 help='defaults for everything below (default: quick)')
  p.add_argument('--models', type=_strs,
                 help='comma list of presets, each optionally @IMAGE_SIZE (ViT-S_16@224)')
  p.add_argument('--image-size', type=int, default=224,
                 help='image size for --models entries without @SIZE (default 224)')
  p.add_argument('--batch-size', type=_ints, help='global batch size(s), comma list')
  p.add_argument('--dtypes', type=_strs, help='fp32 and/or bf16 (compute dtype; params fp32)')
  p.add_argument('--modes', type=_strs, default=['infer', 'train'], help='infer,train')
  p.add_argument('--num-classes', type=int, default=1000)
  p.add_argument('--repeats', type=int, help='timed repeats per cell (median reported)')
  p.add_argument('--min-repeat-seconds', type=float,
                 help='steps per repeat chosen so a repeat lasts at least this long')
  p.add_argument('--steps', type=int, help='fixed steps per repeat (overrides the above)')
  p.add_argument('--no-timm', action='store_true', help='ours only')
  p.add_argument('--onnx', action='store_true',
                 help='also time float32 inference of the ONNX export in ONNX Runtime')
  p.add_argument('--scaling-devices', type=_ints,
                 help='device counts for the weak-scaling table; empty string: skip')
  p.add_argument('--no-scaling', action='store_true', help='skip the scaling table')
  p.add_argument('--scaling-model', help='MODEL@SIZE for the scaling table')
  p.add_argument('--scaling-batch-per-device', type=int)
  p.add_argument('--scaling-dtype', default='fp32', choices=['fp32', 'bf16'])
  p.add_argument('--threads', type=int, default=None,
                 help='CPU threads per worker (default: all cores); fewer pins every worker '
                      'to the first N cores and sets torch.set_num_threads(N)')
  p.add_argument('--host-memory', choices=['retain', 'default'], default='retain',
                 help="retain (default): every worker, ours and timm's, keeps freed heap "
                      "memory for reuse (vit_jax.host_memory; spares XLA:CPU ~250k page "
                      "faults per ViT-S/16 step); default: glibc's own settings")
  p.add_argument('--xla-flags', default='', help='extra XLA_FLAGS for our workers')
  p.add_argument('--devices', type=int, default=1,
                 help='devices for our rows (data parallel, batch split; on CPU fake '
                      'devices sharing the cores). Default 1')
  p.add_argument('--xla-variants', type=lambda t: [v.strip() for v in t.split(';')],
                 default=[],
                 help="';'-separated alternatives for our side, each measured as an extra "
                      "contender of every row (interleaved with the rest): XLA flags and "
                      "optionally devices=N, code=DIR, env:NAME=VALUE, "
                      "host_memory=retain|default, remat=POLICY, attention=KIND")
  p.add_argument('--timm-variants', type=lambda t: t.split(','), default=['eager'],
                 help="timm contenders: eager (default) and/or compiled (torch.compile)")
  p.add_argument('--table', choices=['full', 'contenders'], default='full',
                 help='full: every table; contenders: one table, a row per contender')
  p.add_argument('--attention', choices=list(ATTENTION_CHOICES), default=None,
                 help="attention implementation (default: the model's: 'explicit' on CPU, "
                      "else JAX's choice)")
  p.add_argument('--train-step', choices=['own', 'project'], default='own',
                 help="own: plain AdamW step, the same update timm does (default); "
                      "project: vit_jax.train.make_train_step with an AdamW config")
  p.add_argument('--remat-policy', choices=REMAT_POLICIES, default=None,
                 help="which activations our train step keeps (vit_jax.remat; default: "
                      "the preset's)")
  p.add_argument('--interleave', choices=['auto', 'on', 'off'], default='auto',
                 help="interleave the contenders' repeats (auto: on for CPU)")
  p.add_argument('--settle-seconds', type=float, default=0.2,
                 help='pause before each interleaved repeat')
  p.add_argument('--quiet-wait', type=float, default=0.0,
                 help='before each repeat wait up to this many seconds for other processes '
                      'to leave the CPU idle (shared machines; default 0: do not wait)')
  p.add_argument('--max-others-cores', type=float, default=None,
                 help='redo a repeat (up to 4 times) when other processes used more than '
                      'this many cores during it (shared machines; default: keep all)')
  p.add_argument('--json', help='write all results to this JSON file')
  p.add_argument('--worker', help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  for key, value in PRESETS[args.preset].items():
    if getattr(args, key, None) is None:
      setattr(args, key, value)
  for dtype in args.dtypes:
    if dtype not in ('fp32', 'bf16'):
      p.error(f'--dtypes: unknown dtype {dtype!r}; use fp32 and/or bf16')
  for mode in args.modes:
    if mode not in ('infer', 'train'):
      p.error(f'--modes: unknown mode {mode!r}; use infer and/or train')
  for variant in args.timm_variants:
    if variant not in TIMM_VARIANTS:
      p.error(f'--timm-variants: unknown variant {variant!r}; use eager and/or compiled')
  if args.no_scaling:
    args.scaling_devices = []
  return args


def probe_platform(xla_flags: str = '') -> dict:
  """Platform, devices, cores and versions, as a worker process sees them."""
  worker = subprocess.run(
      [sys.executable, os.path.abspath(__file__), '--worker', '{"kind": "probe"}'],
      capture_output=True, text=True, env=child_env(xla_flags, 1, False), cwd=_REPO_ROOT)
  probe = next((json.loads(l.split(' ', 1)[1]) for l in worker.stdout.splitlines()
                if l.startswith(measure.PREFIX + 'RESULT')), None)
  if probe is None:
    print(worker.stderr[-3000:], file=sys.stderr)
    raise SystemExit('could not start a JAX worker')
  return probe


def main(argv=None) -> int:
  args = parse_args(argv)
  if args.worker:
    return _worker(json.loads(args.worker))
  log = lambda msg: print(msg, file=sys.stderr, flush=True)
  start = time.perf_counter()
  load_before = os.getloadavg() if hasattr(os, 'getloadavg') else None

  probe = probe_platform(args.xla_flags)
  cpu = probe['platform'] == 'cpu'
  interleave = {'on': True, 'off': False, 'auto': cpu}[args.interleave]
  use_timm = not args.no_timm and probe['timm_missing'] is None
  timm_note = None
  if args.no_timm:
    timm_note = '--no-timm'
  elif probe['timm_missing']:
    timm_note = f"torch/timm not importable ({probe['timm_missing']})"
  torch_device = 'cuda' if (not cpu and probe['torch_cuda']) else 'cpu'
  log(f"{probe['platform']} ({probe['device_kind']}) x{probe['device_count']}, "
      f"{probe['cores']} cores of {probe.get('host_cpu')}; jax {probe['jax']}, "
      f"torch {probe['torch']}, timm {probe['timm']}; interleave={interleave}")

  # The first contender is the command line's own setting, spelled as a variant.
  variants = [f'devices={args.devices} host_memory={args.host_memory} {args.xla_flags}'.strip()
              ] + args.xla_variants
  common = dict(kind='cell', num_classes=args.num_classes, repeats=args.repeats,
                min_repeat_seconds=args.min_repeat_seconds, steps=args.steps,
                attention=args.attention, remat_policy=args.remat_policy,
                train_step=args.train_step,
                threads=args.threads or probe['cores'], torch_device=torch_device,
                host_memory=args.host_memory)
  rows = []
  for entry in args.models:
    model, size = parse_model(entry, args.image_size)
    for batch in args.batch_size:
      for dtype in args.dtypes:
        row = dict(model=model, image_size=size, batch=batch, dtype=dtype,
                   analytic=analytic(model, size, args.num_classes), cells={})
        # All contenders of a row (ours with each flag variant, timm; both modes)
        # start together and their repeats are interleaved.
        specs, envs = [], []
        for mode in args.modes:
          cell = dict(common, mode=mode, model=model, image_size=size, batch=batch,
                      dtype=dtype, devices=1)
          for i, variant in enumerate(variants):
            devices, flags, code, extra_env, extra_spec = split_variant(variant, args.devices)
            specs.append(dict(cell, framework='jax', variant=i, xla_flags=flags,
                              devices=devices, code=code, env=extra_env or None,
                              **extra_spec))
            envs.append(child_env(flags, devices, interleave and not cpu, code, extra_env))
          for i, variant in enumerate(args.timm_variants if use_timm else []):
            specs.append(dict(cell, framework='timm', variant=i,
                              torch_compile=variant == 'compiled'))
            envs.append(child_env('', 1, interleave and not cpu))
          if args.onnx and mode == 'infer' and dtype == 'fp32':
            specs.append(dict(cell, framework='onnx'))
            envs.append(child_env('', 1, interleave and not cpu))
        for result in run_group(specs, envs, args.repeats, interleave,
                                args.settle_seconds, log, args.quiet_wait,
                                args.max_others_cores):
          spec = result['spec']
          key = f"{spec['framework']}_{spec['mode']}"
          row['cells'][key + (f"@{spec['variant']}" if spec.get('variant') else '')] = result
        row['ratios'] = {m: paired_ratio(row['cells'].get(f'jax_{m}'),
                                         row['cells'].get(f'timm_{m}')) for m in args.modes}
        rows.append(row)

  scaling = []
  if args.scaling_devices:
    model, size = parse_model(args.scaling_model, args.image_size)
    counts = [n for n in args.scaling_devices if cpu or n <= probe['device_count']]
    skipped = sorted(set(args.scaling_devices) - set(counts))
    if skipped:
      log(f'scaling: skipping {skipped} devices ({probe["device_count"]} present)')
    specs = [dict(common, framework='jax', mode='train', model=model, image_size=size,
                  batch=args.scaling_batch_per_device * n, dtype=args.scaling_dtype,
                  devices=n) for n in counts]
    envs = [child_env(args.xla_flags, n, interleave and not cpu) for n in counts]
    scaling = run_group(specs, envs, args.repeats, interleave, args.settle_seconds, log,
                        args.quiet_wait, args.max_others_cores)

  meta = dict(probe=probe, preset=args.preset, argv=sys.argv[1:] if argv is None else argv,
              repeats=args.repeats, min_repeat_seconds=args.min_repeat_seconds,
              interleave=interleave, quiet_wait=args.quiet_wait,
              max_others_cores=args.max_others_cores, train_step=args.train_step,
              xla_flags=args.xla_flags, xla_variants=args.xla_variants, variants=variants,
              timm_variants=args.timm_variants if use_timm else [],
              devices=args.devices,
              host_memory=args.host_memory,
              timm_note=timm_note,
              scaling_batch_per_device=args.scaling_batch_per_device,
              threads=args.threads or probe['cores'], torch_device=torch_device,
              wall_seconds=time.perf_counter() - start, load_average_before=load_before,
              load_average_after=os.getloadavg() if hasattr(os, 'getloadavg') else None)
  text = (contenders_table(meta, rows) if args.table == 'contenders'
          else report(meta, rows, scaling))
  print(text)
  print(f"\n{probe['platform']} {probe['device_kind']}, {probe['cores']} cores of "
        f"{probe.get('host_cpu')}, "
        f"threads {args.threads or probe['cores']}, host memory {args.host_memory}; "
        f"jax {probe['jax']}, flax {probe['flax']}, "
        f"torch {probe['torch']}, timm {probe['timm']}; "
        f"wall time {meta['wall_seconds']:.0f} s"
        + (f"; 1-min load average {meta['load_average_before'][0]:.1f} before, "
           f"{meta['load_average_after'][0]:.1f} after" if load_before else ''))
  if args.json:
    with open(args.json, 'w') as f:
      json.dump(dict(meta=meta, rows=rows, scaling=scaling, table=text), f, indent=1)
  failed = any('error' in c for r in rows for c in r['cells'].values()) or any(
      'error' in c for c in scaling)
  return 1 if failed else 0


if __name__ == '__main__':
  sys.exit(main())
