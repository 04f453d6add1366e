"""Training speed and compiled memory of each remat policy, in one process.

`benchmark.py --xla-variants="remat=..."` runs each policy in its own worker
process; on a small shared CPU two processes of the same program can differ by
10-20% (where their pages and threads land), which is as large as the effect
being measured. Here every policy's AdamW training step (`jax_bench.setup`,
the step benchmark.py's workers time) is compiled in one process and the steps are timed round-robin, so each
round compares the policies under the same conditions; the ratio is the median
of the per-round ratios against the first policy. XLA's compiled temp memory
is the activations a policy keeps.

  python benchmarks/remat_policies.py --model ViT-S_16 --batch-size 8,32

No TensorFlow, no timm; synthetic images.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from typing import Optional

_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO_ROOT not in sys.path:
  sys.path.insert(0, _REPO_ROOT)

from benchmarks import benchmark  # noqa: E402
from benchmarks import jax_bench  # noqa: E402
from benchmarks import measure  # noqa: E402


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--model', default='ViT-S_16', help='model preset')
  parser.add_argument('--image-size', type=int, default=224)
  parser.add_argument('--batch-size', default='8,32', help='comma list')
  parser.add_argument('--dtype', choices=('fp32', 'bf16'), default='fp32')
  parser.add_argument('--policies', default='dots,none,block',
                      help='comma list; ratios are against the first')
  parser.add_argument('--rounds', type=int, default=5)
  parser.add_argument('--steps', type=int, default=2, help='training steps per timed repeat')
  args = parser.parse_args(argv)
  from vit_jax import remat  # pylint: disable=g-import-not-at-top
  args.policies = args.policies.split(',')
  for policy in args.policies:
    try:
      remat.check_policy(policy)
    except ValueError as e:
      parser.error(f'--policies: {e}')
  try:
    args.batch_size = [int(b) for b in args.batch_size.split(',')]
  except ValueError:
    parser.error(f'--batch-size must be a comma list of integers, got {args.batch_size!r}')
  if args.rounds < 1 or args.steps < 1:
    parser.error('--rounds and --steps must be >= 1')
  return args


def compile_step(model_name: str, image_size: int, batch: int, dtype: str, policy: str):
  """`policy`'s training step, built and warmed up as benchmark.py's worker does.

  Returns (run(steps), XLA temp bytes).
  """
  spec = dict(model=model_name, image_size=image_size, batch=batch, dtype=dtype,
              num_classes=1000, mode='train', remat_policy=policy, steps=1)
  _, run, finish = jax_bench.setup(spec)
  return run, finish()['compiled_memory'].get('temp_bytes', 0)


def measure_batch(args: argparse.Namespace, batch: int) -> list[list[str]]:
  runs = {p: compile_step(args.model, args.image_size, batch, args.dtype, p)
          for p in args.policies}
  seconds = {p: [] for p in args.policies}
  for _ in range(args.rounds):
    for policy, (run, _) in runs.items():
      start = time.perf_counter()
      run(args.steps)
      seconds[policy].append((time.perf_counter() - start) / args.steps)
  first = seconds[args.policies[0]]
  rows = []
  for policy in args.policies:
    ratio = statistics.median(a / b for a, b in zip(first, seconds[policy]))
    rows.append([str(batch), policy, f'{batch / statistics.median(seconds[policy]):.2f}',
                 f'{ratio:.2f}', f'{runs[policy][1] / 2**20:.1f}'])
  return rows


def main(argv: Optional[list[str]] = None) -> int:
  args = parse_args(argv)
  import jax  # pylint: disable=g-import-not-at-top
  rows = []
  for batch in args.batch_size:
    rows += measure_batch(args, batch)
  print(f'{args.model}@{args.image_size} {args.dtype} training, {args.rounds} interleaved '
        f'rounds of {args.steps} steps in one process; x = median per-round ratio vs '
        f'{args.policies[0]!r}:')
  print(benchmark.markdown_table(
      ['batch', 'policy', 'train img/s', 'x', 'XLA temp MiB'], rows))
  print(f'\n{jax.default_backend()}, {measure.num_cores()} cores of {measure.host_cpu()}; '
        f'jax {jax.__version__}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
