"""Fine-tune a pre-trained ViT on ImageNet (ILSVRC-2012), evaluated on its validation split: the row FINETUNE['imagenet2012'] of recipes.py.

`--config=configs/finetune_imagenet2012.py:ViT-L_16` picks the preset; `:ViT-L_16,runlocal`
a seconds-long CPU run of the recipe. Command: README.md, "The main jobs".
"""

from vit_jax.configs import recipes


def get_config(arg=None):
  return recipes.from_arg('finetune', 'imagenet2012', arg)
