"""Fine-tune a pre-trained ViT on Oxford-IIIT Pets with the paper's recipe.

  python -m vit_jax.main --config=configs/finetune_oxford_iiit_pet.py:ViT-B_16 --workdir=DIR \\
      --config.pretrained_path=/path/to/ViT-B_16.npz --config.data_dir=/path/to/tfds

The argument names the model preset (default ViT-B_16); add ',runlocal' for a
seconds-long run of the same recipe on a tiny model and the embedded digits.
The recipe is the row `vit_jax.configs.recipes.FINETUNE['oxford_iiit_pet']`.
"""

from vit_jax.configs import recipes, schema


def get_config(arg=None):
  arg = schema.parse_arg(arg, model='ViT-B_16', runlocal=False)
  config = recipes.finetune_config('oxford_iiit_pet', arg.model)
  return recipes.runlocal(config) if arg.runlocal else config
