"""Fine-tune a pre-trained ViT on Oxford-IIIT Pets: the row FINETUNE['oxford_iiit_pet'] of recipes.py.

`--config=configs/finetune_oxford_iiit_pet.py:ViT-L_16` picks the preset; `:ViT-L_16,runlocal`
a seconds-long CPU run of the recipe. Command: README.md, "The main jobs".
"""

from vit_jax.configs import recipes


def get_config(arg=None):
  return recipes.from_arg('finetune', 'oxford_iiit_pet', arg)
