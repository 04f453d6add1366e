"""Fine-tune a BiT ResNet (the paper's CNN baseline) with the BiT-HyperRule.

  python -m vit_jax.main --config=configs/bit_baseline.py:BiT-R50x1,dataset=cifar100 \
      --workdir=DIR --config.pretrained_path=/path/to/BiT-M-R50x1.npz

Arguments: the preset (BiT-R50x1, BiT-R101x3, BiT-R152x4, ...), `dataset=` (a
dataset of `vit_jax.configs.recipes.FINETUNE`, default cifar10) and `runlocal`.
The recipe is `vit_jax.configs.recipes.bit_hyperrule` for that dataset's size.
"""

from vit_jax.configs import recipes, schema


def get_config(arg=None):
  arg = schema.parse_arg(arg, model='BiT-R50x1', dataset='cifar10', runlocal=False)
  config = recipes.bit_config(arg.dataset, arg.model)
  return recipes.runlocal(config) if arg.runlocal else config
