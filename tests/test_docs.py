"""README.md is a short newcomer's page over docs/; the two must not drift apart.

- README stays at most 250 lines and every page it links exists;
- every measured figure README quotes (a number with %, s, x or img/s) appears in
  the docs page that holds its dated table, so a re-measured table cannot leave a
  stale headline behind;
- the model table's parameter counts are the presets' own (`jax.eval_shape`);
- the recipe table names every config file in configs/;
- no page tells the story of the work instead of what the code does.
"""

import glob
import os
import re

import jax
import jax.numpy as jnp
import pytest

from vit_jax.configs import models

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(REPO, 'README.md')
DOCS = sorted(glob.glob(os.path.join(REPO, 'docs', '*.md')))


def readme() -> str:
  with open(README, encoding='utf-8') as f:
    return f.read()


def section(text: str, title: str) -> str:
  match = re.search(rf'^## {re.escape(title)}\n(.*?)(?=^## |\Z)', text, re.S | re.M)
  assert match, f'README has no "## {title}" section'
  return match.group(1)


def test_readme_is_short_and_links_exist():
  text = readme()
  assert len(text.splitlines()) <= 250
  links = re.findall(r'\]\(([^)#]+)(?:#[^)]*)?\)', text)
  assert links
  for link in links:
    if not link.startswith('http'):
      assert os.path.exists(os.path.join(REPO, link)), link


def test_measured_figures_appear_in_the_docs():
  figures = re.findall(r'\d+(?:\.\d+)?(?:%|x| s\b)', section(readme(), 'Measured'))
  assert len(figures) >= 5
  docs = ''.join(open(p, encoding='utf-8').read() for p in DOCS)
  plain = docs.replace('**', '')
  missing = [f for f in figures if f.rstrip('%sx ').strip() not in plain]
  assert not missing, f'README figures not found in docs/: {missing}'


@pytest.mark.parametrize('name', ['ViT-Ti_16', 'ViT-S_16', 'ViT-B_16', 'ViT-L_16', 'ViT-H_14',
                                  'Mixer-S_32', 'Mixer-B_16', 'Mixer-H_14'])
def test_model_table_counts(name):
  row = next(line for line in readme().splitlines()
             if line.startswith('| `') and f'`{name}`' in line.split('|')[1])
  names = re.findall(r'`([^`]+)`', row.split('|')[1])
  counts = re.findall(r'(\d+\.\d)M', row.split('|')[-2])
  model = models.build_model(name, 1000)
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 224, 224, 3))))
  params = sum(x.size for x in jax.tree.leaves(shapes['params']))
  assert f'{params / 1e6:.1f}' == counts[names.index(name)], (name, params)


def test_recipe_table_names_every_config():
  table = section(readme(), 'Recipes')
  for path in glob.glob(os.path.join(REPO, 'configs', '*.py')):
    assert f'`{os.path.basename(path)}`' in table, os.path.basename(path)


def test_no_story_of_the_work():
  for path in [README, *DOCS]:
    text = open(path, encoding='utf-8').read().lower()
    for phrase in ('this session', 'previous session', 'the device tool', 'not drawn'):
      assert phrase not in text, (os.path.basename(path), phrase)
