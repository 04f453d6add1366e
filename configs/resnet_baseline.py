"""The CNN baseline of the default run: a small BiT ResNet trained on digits.

  python -m vit_jax.main --config=configs/resnet_baseline.py --workdir=/tmp/digits_resnet

Same data (16x16, no augmentation) as configs/default.py; the model is the
BiT-Test preset (a ResNetV2 with one pre-activation bottleneck unit per stage,
base width 32, GroupNorm and weight-standardised convolutions), trained with SGD
momentum as in BiT (`vit_jax.configs.recipes.digits_config`). The argument may
name another BiT preset.
"""

from vit_jax.configs import recipes, schema


def get_config(arg=None):
  arg = schema.parse_arg(arg, model='BiT-Test')
  return recipes.digits_config(arg.model)
