"""Fine-tune a pre-trained ViT on CIFAR-10: the row FINETUNE['cifar10'] of recipes.py.

`--config=configs/finetune_cifar10.py:ViT-L_16` picks the preset; `:ViT-L_16,runlocal`
a seconds-long CPU run of the recipe. Command: README.md, "The main jobs".
"""

from vit_jax.configs import recipes


def get_config(arg=None):
  return recipes.from_arg('finetune', 'cifar10', arg)
