"""Pre-train a ViT on JFT-300M with the paper's recipe (Table 3; recipes.PRETRAIN).

JFT-300M is not public: point `--config.dataset` at `image_folder:/path` or a TFDS
build of your own in `--config.data_dir`. `vit_jax.plan` plans it with no data
present (18,291 classes). `:MODEL,runlocal` gives a seconds-long CPU run.
"""

from vit_jax.configs import recipes


def get_config(arg=None):
  return recipes.from_arg('pretrain', 'jft300m', arg)
