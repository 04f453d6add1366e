"""Pre-train a ViT on ImageNet-21k with the paper's recipe (Table 3; recipes.PRETRAIN).

ImageNet-21k is not in TFDS: point `--config.dataset` at `image_folder:/path` or a
TFDS dataset prepared in `--config.data_dir`. The loss is sigmoid cross-entropy
over the 21k classes. `:MODEL,runlocal` gives a seconds-long CPU run.
"""

from vit_jax.configs import recipes


def get_config(arg=None):
  return recipes.from_arg('pretrain', 'imagenet21k', arg)
