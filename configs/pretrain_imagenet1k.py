"""Pre-train a ViT from scratch on ImageNet-1k (TFDS imagenet2012): paper Table 3.

300 epochs, lr 3e-3 with cosine decay, weight decay 0.3, dropout 0.1, batch 4096
(`recipes.PRETRAIN`). `:ViT-S_16` picks the preset, `,runlocal` a tiny CPU run.
"""

from vit_jax.configs import recipes


def get_config(arg=None):
  return recipes.from_arg('pretrain', 'imagenet2012', arg)
