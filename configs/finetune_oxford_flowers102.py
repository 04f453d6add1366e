"""Fine-tune a pre-trained ViT on Oxford Flowers-102: the row FINETUNE['oxford_flowers102'] of recipes.py.

`--config=configs/finetune_oxford_flowers102.py:ViT-L_16` picks the preset; `:ViT-L_16,runlocal`
a seconds-long CPU run of the recipe. Command: README.md, "The main jobs".
"""

from vit_jax.configs import recipes


def get_config(arg=None):
  return recipes.from_arg('finetune', 'oxford_flowers102', arg)
