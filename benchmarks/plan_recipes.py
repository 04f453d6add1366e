"""Plans of the paper's pre-training recipes on TPU slices and H100 nodes (docs/scale.md).

    python benchmarks/plan_recipes.py --run B16-i21k@v5e:4x4 --out docs/results/plans
    python benchmarks/plan_recipes.py --table --out docs/results/plans

`--run CELL ...` plans each cell (recipe @ target) with `python -m vit_jax.plan`,
one process each, writing CELL.json into `--out`; `--run all` plans every cell
(hours on a small CPU: each large step compiles for minutes). `--table` prints the
markdown table of the JSON files present, with the paper's TPUv3-core-days
(Table 2) beside each recipe; a cell without a file shows `-`. A second table
gives the recipes after the paper (AugReg B/16 on ImageNet-21k, the plain ViT-S/16
on ImageNet-1k) on a 4-chip TPU v4 slice, with the hours 90 epochs take at 50% MFU.

A cell's overrides are the mesh, remat policy and accumulation the planner
reported to fit (or, for a cell planned with its search, what it suggested).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from typing import Optional

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GIB = 2**30

# Recipe name -> (config argument, extra overrides, paper TPUv3-core-days or None).
RECIPES = {
    'B16-i21k': ('configs/pretrain_imagenet21k.py:ViT-B_16', [], None),
    'B16-jft': ('configs/pretrain_jft300m.py:ViT-B_16', [], None),
    'L16-i21k': ('configs/pretrain_imagenet21k.py:ViT-L_16', [], '0.23k'),
    'L16-jft': ('configs/pretrain_jft300m.py:ViT-L_16', [], '0.68k'),
    'H14-jft': ('configs/pretrain_jft300m.py:ViT-H_14', [], '2.5k'),
    # The paper has no ViT-g/14 row: the H/14 JFT recipe with the g/14 model.
    'g14-jft': ('configs/pretrain_jft300m.py:ViT-H_14', ['--config.model_name=ViT-g_14'], None),
}
# The recipes after the paper, planned on a 4-chip slice beside the plain-ViT paper's
# reported 6-7 h for 90 epochs on a TPU v3-8: recipe -> (config, overrides, images an epoch).
MODERN = {
    'AugReg-B16-i21k': ('configs/pretrain_augreg.py:B_16,i21k', [], 0.99 * 14_197_122),
    'plain-S16-i1k': ('configs/pretrain_plain_vit.py', [], 0.99 * 1_281_167),
}
MODERN_TARGET = 'v4:2x2x1'
EPOCHS = 90
# Target name -> plan flags.
TARGETS = {
    'v4:4x4x4': ['--topology=v4:4x4x4'],
    'v5e:8x8': ['--topology=v5e:8x8'],
    'v5p:4x4x4': ['--topology=v5p:4x4x4'],
    'v6e:8x8': ['--topology=v6e:8x8'],
    '8xH100': ['--gpu=h100', '--gpus_per_node=8'],
    # The two cells docs/scale.md names beside the table.
    'v5e:4x4': ['--topology=v5e:4x4'],
    'v5e:2x2': ['--topology=v5e:2x2'],
    MODERN_TARGET: [f'--topology={MODERN_TARGET}'],
}
FSDP8 = "--config.mesh=(('data',-1),('fsdp',8))"
BLOCK = '--config.model.remat_policy=block'
# Cell -> overrides chosen for it (mesh, remat, accumulation); default: none.
OVERRIDES = {
    'H14-jft@v4:4x4x4': [FSDP8], 'H14-jft@v6e:8x8': [FSDP8],
    'g14-jft@v4:4x4x4': [FSDP8], 'g14-jft@v6e:8x8': [FSDP8],
    # 16 GiB chips: H/14 and g/14 with the default policy need ~15 GiB of activations
    # per chip at batch 64 per chip (v5p:4x4x4 plans), so these start from 'block'.
    'H14-jft@v5e:8x8': [FSDP8, BLOCK], 'g14-jft@v5e:8x8': [FSDP8, BLOCK],
    'g14-jft@v5p:4x4x4': [FSDP8],
    # 1024 images per chip: four micro-batches of 256, as B16-i21k@v5e:4x4 takes at once.
    f'AugReg-B16-i21k@{MODERN_TARGET}': ['--config.grad_accum_steps=4'],
}


def cells() -> list[str]:
  main = [f'{r}@{t}' for r in RECIPES for t in TARGETS if not t.startswith('v5e:') or
          t == 'v5e:8x8']
  return main + ['B16-i21k@v5e:4x4', 'L16-i21k@v5e:2x2'] + [
      f'{r}@{MODERN_TARGET}' for r in MODERN]


def command(cell: str, out: str) -> list[str]:
  recipe, target = cell.split('@')
  config, extra, _ = RECIPES[recipe] if recipe in RECIPES else MODERN[recipe]
  return ([sys.executable, '-m', 'vit_jax.plan', f'--config={config}', *extra,
           *TARGETS[target], *OVERRIDES.get(cell, []),
           f'--json={os.path.join(out, cell.replace(":", "_") + ".json")}'])


def run(cell: str, out: str) -> int:
  argv = command(cell, out)
  print('$', ' '.join(argv[1:]), flush=True)
  return subprocess.call(argv, cwd=REPO)


def _load(out: str, cell: str) -> Optional[dict]:
  path = os.path.join(out, cell.replace(':', '_') + '.json')
  if not os.path.isfile(path):
    return None
  with open(path, encoding='utf-8') as f:
    return json.load(f)


def _cell_text(plan: Optional[dict]) -> str:
  if plan is None:
    return '-'
  if plan.get('suggested_plan'):
    plan = dict(plan['suggested_plan'], searched=True)
  total = plan['per_chip_bytes']['total']
  memory = f'{total / GIB:.1f}/{plan["usable_bytes"] / GIB:.0f} GiB' if total else 'n/a'
  settings = [f'fsdp {plan["mesh"]["fsdp"]}'] if plan['mesh']['fsdp'] > 1 else []
  settings.append(f'remat {plan["remat_policy"]}')
  if plan['grad_accum_steps'] > 1:
    settings.append(f'accum {plan["grad_accum_steps"]}')
  verdict = 'fits' if plan['fits'] else '**does not fit**'
  speed = plan.get('images_per_second_at_mfu')
  speed_text = f', {speed:,.0f} img/s' if speed else ''
  return f'{verdict}: {memory}; {", ".join(settings)}{speed_text}'


def table(out: str) -> str:
  targets = [t for t in TARGETS if not t.startswith('v5e:') or t == 'v5e:8x8']
  lines = ['| recipe | TPUv3-core-days (paper) | ' + ' | '.join(targets) + ' |',
           '|---|---|' + '---|' * len(targets)]
  for recipe, (_, _, days) in RECIPES.items():
    row = [_cell_text(_load(out, f'{recipe}@{t}')) for t in targets]
    lines.append(f'| {recipe} | {days or "-"} | ' + ' | '.join(row) + ' |')
  return '\n'.join(lines)


def modern_table(out: str) -> str:
  """The recipes after the paper on the 4-chip slice, with hours for 90 epochs at 50% MFU."""
  lines = [f'| recipe | {MODERN_TARGET} | hours for {EPOCHS} epochs at 50% MFU |',
           '|---|---|---|']
  for recipe, (_, _, images) in MODERN.items():
    plan = _load(out, f'{recipe}@{MODERN_TARGET}')
    speed = (plan or {}).get('images_per_second_at_mfu')
    hours = f'{EPOCHS * images / speed / 3600:.1f}' if speed else '-'
    lines.append(f'| {recipe} | {_cell_text(plan)} | {hours} |')
  return '\n'.join(lines)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--run', nargs='*', default=[], help="cells to plan, or 'all'")
  parser.add_argument('--table', action='store_true', help='print the markdown table')
  parser.add_argument('--out', default=os.path.join(REPO, 'docs', 'results', 'plans'))
  args = parser.parse_args(argv)
  known = cells()
  todo = known if args.run == ['all'] else args.run
  unknown = [c for c in todo if c not in known]
  if unknown:
    parser.error(f'unknown cells {unknown}; known: {", ".join(known)}')
  os.makedirs(args.out, exist_ok=True)
  failed = [cell for cell in todo if run(cell, args.out)]
  if args.table or not todo:
    print(table(args.out))
    print()
    print(modern_table(args.out))
  return 1 if failed else 0


if __name__ == '__main__':
  sys.exit(main())
