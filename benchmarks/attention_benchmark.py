"""Times the attention kernels of `vit_jax.attention` against each other.

The kernel choice in `vit_jax/attention.py` (which implementation `None` picks
on each backend) rests on these figures. For one shape (default: ViT-S/16 at
224 px, batch 8: 197 tokens, 6 heads of 64) it times the forward and the
forward + backward (`jax.vjp`) of every implementation that runs on this
backend, each jitted, with the calls of all kernels interleaved round by round
so a slow moment of a shared machine hits them alike. Reported: median ms per
call and the speed-up of each kernel over `jax.nn.dot_product_attention`'s
XLA path (median of per-round ratios). No TensorFlow, no network.

  python benchmarks/attention_benchmark.py [--batch 8 --tokens 197 --heads 6 --head-dim 64]
      [--dtype fp32|bf16] [--rounds 15] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..'))
from vit_jax import attention  # pylint: disable=wrong-import-position

BASELINE = 'xla'


def kernels() -> list[str]:
  names = ['explicit', 'xla']
  if jax.default_backend() == 'gpu':
    names.append('cudnn')
  return names


def make_calls(name: str, q, k, v, g):
  def fwd(q, k, v):
    return attention.dot_product_attention(q, k, v, name)

  def fwd_bwd(q, k, v, g):
    _, pull = jax.vjp(fwd, q, k, v)
    return pull(g)

  return {'forward': jax.jit(fwd).lower(q, k, v).compile(),
          'forward+backward': jax.jit(fwd_bwd).lower(q, k, v, g).compile()}


def run(args) -> dict:
  dtype = {'fp32': jnp.float32, 'bf16': jnp.bfloat16}[args.dtype]
  shape = (args.batch, args.tokens, args.heads, args.head_dim)
  rng = np.random.default_rng(0)
  q, k, v, g = (jnp.asarray(rng.normal(size=shape), dtype) for _ in range(4))
  calls, failed = {}, {}
  for name in kernels():
    try:
      calls[name] = make_calls(name, q, k, v, g)
    except Exception as e:  # e.g. a cuDNN build that refuses the shape
      failed[name] = f'{type(e).__name__}: {str(e).splitlines()[0][:200]}'
  inputs = {'forward': (q, k, v), 'forward+backward': (q, k, v, g)}
  results = {}
  for mode, mode_inputs in inputs.items():
    times = {name: [] for name in calls}
    for name in calls:  # warm-up
      jax.block_until_ready(calls[name][mode](*mode_inputs))
    for r in range(args.rounds):
      order = list(calls) if r % 2 == 0 else list(calls)[::-1]
      for name in order:
        start = time.perf_counter()
        jax.block_until_ready(calls[name][mode](*mode_inputs))
        times[name].append(time.perf_counter() - start)
    for name, ts in times.items():
      base = times.get(BASELINE)
      ratio = (statistics.median(b / t for b, t in zip(base, ts)) if base else None)
      results.setdefault(name, {})[mode] = dict(
          ms=1e3 * statistics.median(ts), speedup_vs_xla=ratio)
  return dict(shape=dict(batch=args.batch, tokens=args.tokens, heads=args.heads,
                         head_dim=args.head_dim, dtype=args.dtype),
              backend=jax.default_backend(), device=jax.devices()[0].device_kind,
              jax=jax.__version__, rounds=args.rounds, results=results, failed=failed)


def report(out: dict) -> str:
  s = out['shape']
  lines = [f"attention, batch {s['batch']}, {s['tokens']} tokens, {s['heads']} heads x "
           f"{s['head_dim']}, {s['dtype']}; {out['backend']} ({out['device']}), "
           f"jax {out['jax']}; median of {out['rounds']} interleaved rounds",
           '| kernel | forward ms | x vs xla | forward+backward ms | x vs xla |',
           '|---|---|---|---|---|']
  for name, r in out['results'].items():
    f, b = r['forward'], r['forward+backward']
    lines.append(f"| {name} | {f['ms']:.2f} | {f['speedup_vs_xla']:.2f} | "
                 f"{b['ms']:.2f} | {b['speedup_vs_xla']:.2f} |")
  for name, why in out['failed'].items():
    lines.append(f'| {name} | failed: {why} | | | |')
  return '\n'.join(lines)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--batch', type=int, default=8)
  p.add_argument('--tokens', type=int, default=197)
  p.add_argument('--heads', type=int, default=6)
  p.add_argument('--head-dim', type=int, default=64)
  p.add_argument('--dtype', choices=['fp32', 'bf16'], default='fp32')
  p.add_argument('--rounds', type=int, default=15)
  p.add_argument('--json', help='also write the results to this file')
  args = p.parse_args(argv)
  out = run(args)
  print(report(out))
  if args.json:
    with open(args.json, 'w') as f:
      json.dump(out, f, indent=1)
  return 0


if __name__ == '__main__':
  sys.exit(main())
