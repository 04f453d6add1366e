"""Fine-tune a checkpoint of the AugReg release (Steiner et al. 2021), as the reference's augreg.py.

  python -m vit_jax.main --config=configs/augreg.py:R26_S_32 \
      --config.pretrained_dir=augreg --workdir=/tmp/r26

`:R26_S_32` (any release short name) takes the ImageNet-21k checkpoint of that model
with the best `final_val` in `pretrained_dir/index.csv`; `:<file stem>` takes that
file. Defaults and every override: vit_jax/configs/augreg_recipe.py; the table of
the recommended checkpoints: README.md.
"""

from vit_jax.configs import augreg_recipe


def get_config(arg=None):
  return augreg_recipe.augreg_config(arg)
