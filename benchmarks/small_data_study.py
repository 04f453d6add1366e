"""AugReg's central finding in small: with little data, augmentation and regularisation buy accuracy.

  python benchmarks/small_data_study.py --json /tmp/small_data.json

Trains ViT-Digits_4 (`configs/default.py`'s recipe: AdamW 2e-3, wd 0.05, label
smoothing 0.1, 16 px, no crop or flip) on a small slice of the embedded digits'
training split (`--train-split`, default `train[:20%]`: 288 images) for a fixed
budget (`--steps` updates of `--batch-size`), once per arm and seed:

- `none`, `light1`, `medium2`: the AugReg levels' RandAugment and mixup
  (`recipes.AUG_LEVELS`, big_vision's mixup form);
- `sd0.1`: no augmentation, stochastic depth 0.1.

Prints a markdown table of mean +/- sample standard deviation of the test top-1
over the seeds (and each seed's figure), and writes it with the settings to `--json`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from typing import Any, Optional, Sequence

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from vit_jax.configs import recipes  # pylint: disable=g-import-not-at-top

# arm -> (AugReg level, stochastic depth)
ARMS = {'none': ('none', 0.0), 'light1': ('light1', 0.0), 'medium2': ('medium2', 0.0),
        'sd0.1': ('none', 0.1)}


def arm_config(arm: str, seed: int, args: argparse.Namespace):
  """The digits recipe with the arm's augmentation / regularisation and the shared budget."""
  level, stochastic_depth = ARMS[arm]
  aug = recipes.AUG_LEVELS[level]
  c = recipes.digits_config(args.model)
  c.pp.randaug = aug.randaug
  c.mixup_alpha, c.mixup_form = aug.mixup_alpha, 'augreg'
  c.model.transformer.stochastic_depth = stochastic_depth
  c.train_split = args.train_split
  c.data_dir = args.data_dir
  c.batch_size = c.eval_batch_size = args.batch_size
  c.total_steps = args.steps
  c.warmup_steps = min(c.warmup_steps, args.steps // 10)
  c.log_every = max(1, args.steps // 4)
  c.eval_every = c.checkpoint_every = 0  # the end only
  c.shuffle_buffer = 512
  c.seed = seed
  return c


def summarise(accuracies: Sequence[float]) -> dict[str, float]:
  """Mean and sample standard deviation (n - 1; 0 for one seed), in %."""
  values = [100.0 * a for a in accuracies]
  std = statistics.stdev(values) if len(values) > 1 else 0.0
  return {'mean': statistics.fmean(values), 'std': std}


def markdown(rows: Sequence[dict[str, Any]]) -> str:
  lines = ['| arm | mixup alpha | RandAugment | stochastic depth | test top-1 (%) | per seed |',
           '|---|---|---|---|---|---|']
  for row in rows:
    seeds = ' / '.join(f'{100 * a:.1f}' for a in row['accuracies'])
    randaug = 'off' if row['randaug'] is None else str(tuple(row['randaug']))
    lines.append(f"| {row['arm']} | {row['mixup_alpha']:g} | {randaug} | "
                 f"{row['stochastic_depth']:g} | {row['mean']:.1f} +/- {row['std']:.1f} | "
                 f'{seeds} |')
  return '\n'.join(lines)


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
  from vit_jax import train  # pylint: disable=g-import-not-at-top
  rows = []
  for arm in args.arms:
    accuracies = []
    for seed in range(args.seed, args.seed + args.seeds):
      config = arm_config(arm, seed, args)
      with tempfile.TemporaryDirectory() as workdir:
        start = time.time()
        final = train.train_and_evaluate(config, workdir)
      accuracies.append(float(final['eval_accuracy']))
      print(f'{arm} seed {seed}: {100 * accuracies[-1]:.2f}% ({time.time() - start:.0f} s)',
            flush=True)
    rows.append(dict(arm=arm, mixup_alpha=config.mixup_alpha, randaug=config.pp.randaug,
                     stochastic_depth=config.model.transformer.stochastic_depth,
                     accuracies=accuracies, **summarise(accuracies)))
  return rows


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  p.add_argument('--train-split', default='train[:20%]')
  p.add_argument('--steps', type=int, default=300)
  p.add_argument('--batch-size', type=int, default=64)
  p.add_argument('--seeds', type=int, default=3)
  p.add_argument('--seed', type=int, default=0, help='first seed')
  p.add_argument('--arms', default=','.join(ARMS), help=f'of {", ".join(ARMS)}')
  p.add_argument('--model', default='ViT-Digits_4')
  p.add_argument('--data-dir', help='TFDS data directory for the digits')
  p.add_argument('--json', help='write the settings and rows here')
  args = p.parse_args(argv)
  args.arms = [a.strip() for a in args.arms.split(',') if a.strip()]
  unknown = [a for a in args.arms if a not in ARMS]
  if unknown or not args.arms:
    p.error(f'--arms: unknown {unknown or "(none given)"}; known: {", ".join(ARMS)}')
  if args.steps < 1 or args.seeds < 1 or args.batch_size < 1:
    p.error('--steps, --seeds and --batch-size must be positive')
  return args


def main(argv: Optional[Sequence[str]] = None) -> list[dict[str, Any]]:
  args = parse_args(argv)
  rows = run(args)
  settings = {k: v for k, v in vars(args).items() if k != 'json'}
  print(f"\nViT {args.model}, digits {args.train_split}, {args.steps} steps of "
        f"{args.batch_size}, seeds {args.seed}..{args.seed + args.seeds - 1}\n")
  print(markdown(rows))
  if args.json:
    tmp = args.json + '.tmp'
    with open(tmp, 'w', encoding='utf-8') as f:
      json.dump({'settings': settings, 'rows': rows}, f, indent=1)
    os.replace(tmp, args.json)
  return rows


if __name__ == '__main__':
  main()
