"""Fine-tune a pre-trained ViT on CIFAR-10 with the paper's recipe.

  python -m vit_jax.main --config=configs/finetune_cifar10.py:ViT-B_16 --workdir=DIR \\
      --config.pretrained_path=/path/to/ViT-B_16.npz --config.data_dir=/path/to/tfds

The argument names the model preset (default ViT-B_16); add ',runlocal' for a
seconds-long run of the same recipe on a tiny model and the embedded digits.
The recipe is the row `vit_jax.configs.recipes.FINETUNE['cifar10']`.
"""

from vit_jax.configs import recipes, schema


def get_config(arg=None):
  arg = schema.parse_arg(arg, model='ViT-B_16', runlocal=False)
  config = recipes.finetune_config('cifar10', arg.model)
  return recipes.runlocal(config) if arg.runlocal else config
