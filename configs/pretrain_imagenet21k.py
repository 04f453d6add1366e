"""Pre-train a ViT from scratch on ImageNet-21k with the paper's recipe.

  python -m vit_jax.main --config=configs/pretrain_imagenet21k.py:ViT-B_16 --workdir=DIR

The recipe is the row `vit_jax.configs.recipes.pretrain_recipe(model, 'imagenet21k')`
(paper Table 3). ImageNet-21k is not in TFDS: point `config.dataset` at an image folder
(`image_folder:/path`, one sub-folder per class) or a TFDS dataset you prepared.
Loss: sigmoid cross-entropy over the 21k classes, head bias starting at -10.
Add ',runlocal' for a seconds-long run on a tiny model and the embedded digits.
"""

from vit_jax.configs import recipes, schema


def get_config(arg=None):
  arg = schema.parse_arg(arg, model='ViT-B_16', runlocal=False)
  config = recipes.pretrain_config(arg.model, 'imagenet21k')
  config.train_split, config.eval_split = 'train[:99%]', 'train[99%:]'  # no official val split
  config.loss = 'sigmoid_xent'  # multi-label friendly
  config.model.head_bias_init = -10.0  # start every sigmoid near p = 5e-5
  return recipes.runlocal(config) if arg.runlocal else config
