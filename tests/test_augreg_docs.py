"""README's AugReg table and the AugReg commands of README.md / docs/checkpoints.md.

The table is checked against the reference README's recommended checkpoints (the
shared facts, written out here), and each row's `configs/augreg.py:<model>` is
resolved against a release folder written here, in which the recommended file is
the best i21k row of its model: it must pick that file and that preset. The
documented commands run with /data/augreg replaced by that folder (the fine-tuning
command itself runs in tests/test_augreg_index.py::test_finetunes_on_digits).
"""

import os
import re
import shlex

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vit_jax import checkpoint
from vit_jax.configs import models as model_configs
from vit_jax.configs import schema

from test_augreg_index import COLUMNS, _augreg_config  # pylint: disable=g-bad-import-order

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The reference README's recommendation: short name -> (recipe of the file, ImageNet top-1).
RECOMMENDED = {
    'L_16': ('aug_strong1-wd_0.1-do_0.0-sd_0.0', '85.59'),
    'B_16': ('aug_medium1-wd_0.1-do_0.0-sd_0.0', '85.49'),
    'S_16': ('aug_light1-wd_0.03-do_0.0-sd_0.0', '83.73'),
    'R50_L_32': ('aug_medium1-wd_0.1-do_0.1-sd_0.1', '85.99'),
    'R26_S_32': ('aug_light1-wd_0.1-do_0.0-sd_0.0', '83.85'),
    'Ti_16': ('aug_none-wd_0.03-do_0.0-sd_0.0', '78.22'),
    'B_32': ('aug_light1-wd_0.1-do_0.0-sd_0.0', '83.59'),
    'S_32': ('aug_none-wd_0.1-do_0.0-sd_0.0', '79.58'),
    'R_Ti_16': ('aug_none-wd_0.03-do_0.0-sd_0.0', '75.40'),
}
INDEX_NAMES = {'L_16': 'L/16', 'B_16': 'B/16', 'S_16': 'S/16', 'R50_L_32': 'R50+L/32',
               'R26_S_32': 'R26+S/32', 'Ti_16': 'Ti/16', 'B_32': 'B/32', 'S_32': 'S/32',
               'R_Ti_16': 'R+Ti/16'}


def readme_rows():
  with open(os.path.join(REPO, 'README.md'), encoding='utf-8') as f:
    text = f.read()
  section = text[text.index('## AugReg checkpoints'):text.index('## Recipes')]
  rows = [line for line in section.splitlines() if re.match(r'\| R?[0-9]*\+?ViT-', line)]
  return [[cell.strip().strip('`') for cell in row.strip('|').split('|')] for row in rows]


def test_table_is_the_reference_recommendation():
  rows = readme_rows()
  assert {row[1]: (row[2], row[3]) for row in rows} == RECOMMENDED
  for paper_name, short, _, _ in rows:
    # 'R50+ViT-L/32' is the preset `R50+ViT-L_32`, spelt `R50_L_32` in file names.
    assert model_configs.canonical_name(paper_name) == model_configs.canonical_name(short)


@pytest.fixture(scope='module')
def release(tmp_path_factory):
  """index.csv with, per model, the recommended i21k file and a worse one; empty .npz
  files of those names (choosing reads no arrays)."""
  root = tmp_path_factory.mktemp('augreg_docs')
  lines = [','.join(COLUMNS)]
  for short, (recipe, top1) in RECOMMENDED.items():
    for stem_recipe, final_val in [(recipe, '0.5'), ('aug_strong2-wd_0.03-do_0.0-sd_0.0', '0.4')]:
      stem = f'{short}-i21k-300ep-lr_0.001-{stem_recipe}'
      aug, wd, do, sd = (part.split('_', 1)[1] for part in stem_recipe.split('-'))
      row = dict(name=INDEX_NAMES[short], ds='i21k', lr='0.001', aug=aug, wd=wd, do=do, sd=sd,
                 best_val=final_val, final_val=final_val, final_test=final_val,
                 adapt_ds='imagenet2012', adapt_lr='0.03', adapt_steps='20000',
                 adapt_resolution='384', adapt_final_val=str(float(top1) / 100),
                 adapt_final_test=str(float(top1) / 100), params='1', infer_samples_per_sec='1',
                 filename=stem, adapt_filename=f'{stem}--imagenet2012-steps_20k-lr_0.03-res_384')
      lines.append(','.join(row[c] for c in COLUMNS))
      (root / f'{stem}.npz').write_bytes(b'')
  (root / 'index.csv').write_text('\n'.join(lines) + '\n')
  return str(root)


@pytest.mark.parametrize('short', sorted(RECOMMENDED))
def test_each_row_command_picks_the_recommended_file(release, short):
  config = _augreg_config(short)
  config.pretrained_dir = release
  config = schema.resolve(config)
  assert config.model_name == model_configs.canonical_name(short)
  assert os.path.basename(config.pretrained_path) == (
      f'{short}-i21k-300ep-lr_0.001-{RECOMMENDED[short][0]}.npz')


def documented(program):
  commands = []
  for path in ('README.md', 'docs/checkpoints.md'):
    with open(os.path.join(REPO, path), encoding='utf-8') as f:
      text = re.sub(r'\\\n\s*', ' ', f.read())
    commands += [line.strip() for line in text.splitlines()
                 if line.strip().startswith(f'python -m {program} ') and 'augreg' in line]
  assert commands, program
  return commands


def test_documented_index_command(release, capsys):
  from vit_jax import augreg  # pylint: disable=g-import-not-at-top
  for command in documented('vit_jax.augreg'):
    argv = shlex.split(command.replace('/data/augreg', release))[3:]
    assert augreg.main(argv) == 0, command
    out = capsys.readouterr().out.splitlines()
    assert out[1].split()[0] == 'R26_S_32' and RECOMMENDED['R26_S_32'][0].split('-')[0][4:] in out[1]
    assert out[-1] == '(2 of 2 matching rows)'


def test_documented_predict_command(tmp_path, capsys):
  from PIL import Image  # pylint: disable=g-import-not-at-top
  from vit_jax import predict  # pylint: disable=g-import-not-at-top
  for command in documented('vit_jax.predict'):
    argv = shlex.split(command.replace('/data/augreg', str(tmp_path)).replace(
        '/data/cat.jpg', str(tmp_path / 'cat.jpg')))[3:]
    Image.fromarray(np.full((48, 64, 3), 128, np.uint8)).save(tmp_path / 'cat.jpg')
    path = argv[argv.index('--checkpoint') + 1]
    # A Ti/16 fine-tuned at 384 px (24x24 patches) to 1000 classes, as the name says.
    model = model_configs.build_model('ViT-Ti_16', 1000)
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 384, 384, 3))))
    rng = np.random.default_rng(0)
    checkpoint.save(jax.tree.map(lambda s: 0.1 * rng.standard_normal(s.shape, np.float32),
                                 shapes['params']), path)
    assert predict.main(argv) == 0, command
    assert '(384x384, ViT-Ti_16): top-5' in capsys.readouterr().out
