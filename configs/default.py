"""The default run: ViT-Digits_4 trained from scratch on the embedded digits.

  python -m vit_jax.main --config=configs/default.py --workdir=/tmp/digits

A 0.14M-parameter ViT (4 layers, width 64, 4x4 patches) on scikit-learn's
handwritten digits (about 1,440 train / 355 test images) at 16x16: no network,
no dataset download. The recipe is `vit_jax.configs.recipes.digits_config`;
docs/training.md gives the accuracy and time it reaches. The argument may name
another preset (`configs/default.py:ViT-Test_4`).
"""

from vit_jax.configs import recipes, schema


def get_config(arg=None):
  arg = schema.parse_arg(arg, model='ViT-Digits_4')
  return recipes.digits_config(arg.model)
