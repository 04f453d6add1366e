"""Pre-train a ViT from scratch on ImageNet-1k (ILSVRC-2012) with the paper's recipe.

  python -m vit_jax.main --config=configs/pretrain_imagenet1k.py:ViT-B_16 --workdir=DIR

The recipe is the row `vit_jax.configs.recipes.pretrain_recipe(model, 'imagenet2012')`
(paper Table 3). Dataset: TFDS imagenet2012 (prepared in `config.data_dir`).
Add ',runlocal' for a seconds-long run on a tiny model and the embedded digits.
"""

from vit_jax.configs import recipes, schema


def get_config(arg=None):
  arg = schema.parse_arg(arg, model='ViT-B_16', runlocal=False)
  config = recipes.pretrain_config(arg.model, 'imagenet2012')
  config.eval_split = 'validation'
  return recipes.runlocal(config) if arg.runlocal else config
