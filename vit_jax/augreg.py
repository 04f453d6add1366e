"""The AugReg release's `index.csv`: browse it, and pick the checkpoint to fine-tune.

The release (Steiner et al. 2021, "How to train your ViT?") indexes its .npz
files in an `index.csv` with one row per fine-tuning: the pre-training run
(`name` such as 'R26+S/32', `ds`, `lr`, `aug`, `wd`, `do`, `sd`, its upstream
accuracies `best_val` / `final_val` / `final_test`, `filename`) and the fine-tuning
(`adapt_ds`, `adapt_lr`, `adapt_steps`, `adapt_resolution`, `adapt_final_val`,
`adapt_final_test`, `adapt_filename`); file names without `.npz`.

  python -m vit_jax.augreg --index augreg/index.csv --model R26_S_32 --adapt_ds imagenet2012

prints the matching rows, best first. `best_pretrained(index, 'R26_S_32')` is the
reference's choice for `configs/augreg.py:R26_S_32`: the ImageNet-21k file of that
model with the highest `final_val`. Read with the csv module; a malformed index
is one error naming the column, the model (and the models it has) or the path.
"""

from __future__ import annotations

import csv
import os
import sys
from typing import Optional, Sequence

from vit_jax import cli

PRETRAIN_COLUMNS = ('name', 'ds', 'aug', 'wd', 'do', 'sd', 'final_val', 'filename')
ADAPT_COLUMNS = ('adapt_ds', 'adapt_resolution', 'adapt_final_val', 'adapt_final_test',
                 'adapt_filename')
_NUMERIC = ('final_val', 'adapt_final_val', 'adapt_final_test')
# Bounds what a stray path (not an index) makes us read.
MAX_INDEX_BYTES = 64 << 20


def short_name(index_name: str) -> str:
  """The index's model name as file names spell it: 'R26+S/32' -> 'R26_S_32', 'B/16' -> 'B_16'."""
  return index_name.replace('+', '_').replace('/', '_')


def read_index(path: str, columns: Sequence[str] = PRETRAIN_COLUMNS) -> list[dict[str, str]]:
  """The rows of an index.csv (dicts of strings), its columns and numbers checked."""
  path = os.path.expanduser(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f'no such index: {path!r}')
  if os.path.getsize(path) > MAX_INDEX_BYTES:
    raise ValueError(f'{path!r} is {os.path.getsize(path)} bytes: not an index.csv '
                     f'(limit {MAX_INDEX_BYTES})')
  with open(path, newline='', encoding='utf-8') as f:
    reader = csv.DictReader(f)
    header = reader.fieldnames or []
    missing = [c for c in columns if c not in header]
    if missing:
      raise ValueError(f'{path!r} has no column {missing[0]!r} (an AugReg index.csv has '
                       f'{", ".join(columns)}; this one has {", ".join(header) or "no header"})')
    rows = list(reader)
  for line, row in enumerate(rows, start=2):
    for column in _NUMERIC:
      value = row.get(column)
      if value in (None, '') and column != 'final_val':
        continue
      try:
        float(value)
      except (TypeError, ValueError):
        raise ValueError(f'{path!r} line {line}: column {column!r} is {value!r}, not a '
                         'number') from None
  return rows


def _models(rows) -> list[str]:
  return sorted({short_name(r['name']) for r in rows})


def select(rows, model: Optional[str] = None, ds: Optional[str] = None,
           adapt_ds: Optional[str] = None, index: str = 'index.csv') -> list[dict[str, str]]:
  """Rows of `model` (a short or preset name), `ds` and `adapt_ds`, best first.

  Best: the highest fine-tuned validation accuracy when `adapt_ds` is given,
  else the highest upstream `final_val` (ties: the fine-tuned one).
  """
  from vit_jax.configs import models  # pylint: disable=g-import-not-at-top
  if model:
    short = models.short_name(models.canonical_name(model))
    chosen = [r for r in rows if short_name(r['name']) == short]
    if not chosen:
      raise ValueError(f'{index!r} has no row for model {model!r}; its models: '
                       f'{", ".join(_models(rows)) or "none"}')
    rows = chosen
  if ds:
    rows = [r for r in rows if r['ds'] == ds]
  if adapt_ds:
    rows = [r for r in rows if r.get('adapt_ds') == adapt_ds]
  first, then = ('adapt_final_val', 'final_val') if adapt_ds else ('final_val', 'adapt_final_val')
  return sorted(rows, key=lambda r: (_number(r, first), _number(r, then)), reverse=True)


def _number(row, column: str) -> float:
  value = row.get(column)
  return float(value) if value not in (None, '') else float('-inf')


def best_pretrained(index_path: str, model: str, ds: str = 'i21k') -> str:
  """The file stem the reference fine-tunes for `model`: best `final_val` among `ds` rows."""
  rows = select(read_index(index_path), model, ds=ds, index=index_path)
  if not rows:
    raise ValueError(f'{index_path!r} has no {ds} row for model {model!r}')
  return rows[0]['filename']


def pretrained_file(pretrained_dir: str, model_or_stem: str) -> str:
  """`configs/augreg.py`'s checkpoint: `DIR/<stem>.npz`, the stem given or picked from DIR/index.csv."""
  from vit_jax import release_names  # pylint: disable=g-import-not-at-top
  folder = os.path.expanduser(pretrained_dir)
  stem = model_or_stem
  if release_names.parse(model_or_stem + '.npz') is None:
    stem = best_pretrained(os.path.join(folder, 'index.csv'), model_or_stem)
  path = os.path.join(folder, stem + '.npz')
  if not os.path.isfile(path):
    raise FileNotFoundError(f'{path!r} is not there (config.pretrained_dir holds the '
                            'release\'s index.csv and the .npz files it names)')
  return path


def _fmt(value: Optional[str]) -> str:
  if value in (None, ''):
    return '-'
  try:
    return f'{100 * float(value):.2f}' if float(value) <= 1 else f'{float(value):.2f}'
  except ValueError:
    return value


def table(rows) -> list[str]:
  """Rows as aligned text: model, data, recipe, upstream and fine-tuned accuracy (%), file."""
  head = ('model', 'ds', 'aug', 'wd', 'do', 'sd', 'up_val', 'adapt_ds', 'res', 'ft_val',
          'ft_test', 'file')
  cells = [head] + [(
      short_name(r['name']), r['ds'], r['aug'], r['wd'], r['do'], r['sd'],
      _fmt(r['final_val']), r.get('adapt_ds') or '-', r.get('adapt_resolution') or '-',
      _fmt(r.get('adapt_final_val')), _fmt(r.get('adapt_final_test')),
      (r.get('adapt_filename') or r['filename']) + '.npz') for r in rows]
  widths = [max(len(str(row[i])) for row in cells) for i in range(len(head))]
  return ['  '.join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells]


def main(argv: Optional[Sequence[str]] = None) -> int:
  parser = cli.ArgumentParser(
      prog='python -m vit_jax.augreg',
      description='List the AugReg checkpoints of an index.csv, best first.')
  parser.add_argument('--index', required=True, help='the release\'s index.csv (a local copy)')
  parser.add_argument('--model', default=None, help='e.g. R26_S_32, B_16 or R26+ViT-S_32')
  parser.add_argument('--ds', default=None, help='pre-training data: i1k, i21k, i21k_30')
  parser.add_argument('--adapt_ds', default=None, help='fine-tuning data, e.g. imagenet2012')
  parser.add_argument('--top', type=int, default=10, help='rows to print (default 10)')
  parser.add_argument('--verbose', action='store_true', help='print the traceback of an error')
  args = parser.parse_args(argv)
  try:
    rows = select(read_index(args.index), args.model, args.ds, args.adapt_ds, args.index)
  except (ValueError, OSError) as e:
    return cli.report_user_error(e, args.verbose)
  for line in table(rows[:max(args.top, 0)]):
    print(line)
  print(f'({min(len(rows), max(args.top, 0))} of {len(rows)} matching rows)')
  return 0


if __name__ == '__main__':
  sys.exit(cli.run(main))
