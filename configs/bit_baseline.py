"""Fine-tune a BiT ResNet, the paper's CNN baseline, with the BiT-HyperRule.

`--config=configs/bit_baseline.py:BiT-R50x1,dataset=cifar100` with
`--config.pretrained_path=BiT-M-R50x1.npz`. Steps, warm-up, decay points, mixup
and resolution follow the dataset's size (`recipes.bit_hyperrule`).
"""

from vit_jax.configs import recipes


def get_config(arg=None):
  return recipes.from_arg('bit', 'cifar10', arg)
