"""fp32 GEMM rate of XLA against PyTorch, at the shape of a ViT MLP layer.

  python benchmarks/gemm_rate.py                      # ViT-S/16, batch 8: (1576 x 384) @ (384 x 1536)
  python benchmarks/gemm_rate.py --batch 32 --hidden 768 --mlp 3072

On a CPU, a ViT's training and inference time is mostly its dense layers, so the
rate XLA:CPU reaches on one such matrix product, against PyTorch's CPU BLAS on the
same machine and threads, bounds how close `benchmarks/benchmark.py`'s ours/timm
ratio can come to 1. Both run the same product (tokens x hidden) @ (hidden x mlp),
interleaved round by round; each round times enough repeats for `--seconds`, and
the median round is printed as GFLOP/s (2 M K N flops per product), with the CPU,
the versions and the machine's load (figures from a busy machine are noisy).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import measure  # pylint: disable=g-import-not-at-top,wrong-import-position


def _timed(run, seconds: float) -> float:
  """Seconds per call of `run` (results synced), over at least `seconds`."""
  run()  # warm-up: compilation, allocation
  calls, start = 0, time.perf_counter()
  while True:
    run()
    calls += 1
    elapsed = time.perf_counter() - start
    if elapsed >= seconds:
      return elapsed / calls


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  p.add_argument('--batch', type=int, default=8, help='images (default 8)')
  p.add_argument('--tokens', type=int, default=197, help='tokens per image (ViT/16 at 224: 197)')
  p.add_argument('--hidden', type=int, default=384, help='width (ViT-S: 384)')
  p.add_argument('--mlp', type=int, default=1536, help='MLP width (ViT-S: 1536)')
  p.add_argument('--rounds', type=int, default=5)
  p.add_argument('--seconds', type=float, default=1.0, help='timed seconds per round and library')
  p.add_argument('--threads', type=int, default=measure.num_cores())
  args = p.parse_args(argv)

  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  torch.set_num_threads(args.threads)

  m, k, n = args.batch * args.tokens, args.hidden, args.mlp
  rng = np.random.default_rng(0)
  a = rng.standard_normal((m, k), np.float32)
  b = rng.standard_normal((k, n), np.float32)
  ja, jb = jnp.asarray(a), jnp.asarray(b)
  product = jax.jit(jnp.dot)
  ta, tb = torch.from_numpy(a), torch.from_numpy(b)
  np.testing.assert_allclose(np.asarray(product(ja, jb)), (ta @ tb).numpy(), rtol=1e-3, atol=1e-2)

  flops = 2.0 * m * k * n
  runs = {'xla': lambda: product(ja, jb).block_until_ready(),
          'torch': lambda: torch.mm(ta, tb)}
  rates: dict[str, list[float]] = {name: [] for name in runs}
  load = os.getloadavg()[0]
  for r in range(args.rounds):
    for name, run in runs.items():
      rates[name].append(flops / _timed(run, args.seconds) / 1e9)
    print(f'  round {r + 1}/{args.rounds}: ' +
          ', '.join(f'{name} {rates[name][-1]:.0f}' for name in runs) + ' GFLOP/s', flush=True)
  median = {name: statistics.median(values) for name, values in rates.items()}
  ratio = statistics.median(x / t for x, t in zip(rates['xla'], rates['torch']))
  print(f'fp32 GEMM ({m} x {k}) @ ({k} x {n}): XLA {median["xla"]:.0f} GFLOP/s, PyTorch '
        f'{median["torch"]:.0f} GFLOP/s, XLA / PyTorch {ratio:.2f} (median of {args.rounds} '
        'interleaved rounds)')
  print(f'{measure.host_cpu()}, {args.threads} threads; jax {jax.__version__}, torch '
        f'{torch.__version__}; 1-min load average {load:.1f} before, '
        f'{os.getloadavg()[0]:.1f} after')
  return {'gflops': median, 'ratio': ratio, 'shape': (m, k, n)}


if __name__ == '__main__':
  main()
