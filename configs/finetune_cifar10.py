"""Fine-tune a pre-trained ViT on CIFAR-10 with the paper's recipe.

  python -m vit_jax.main --config=configs/finetune_cifar10.py:ViT-B_16 --workdir=DIR \
      --config.pretrained_path=/path/to/ViT-B_16.npz

The argument after ':' names the model preset (default ViT-B_16). Recipe: SGD
momentum 0.9, batch 512, no weight decay, clipping at global norm 1,
10_000 steps (500 warm-up, then cosine decay), 384x384, learning rate
0.03 (the paper sweeps {0.001, 0.003, 0.01, 0.03}; override with
--config.learning_rate). Dataset: TFDS cifar-10, 50k training images.
"""

import importlib.util
import os

_spec = importlib.util.spec_from_file_location(
    'vit_jax_configs_common', os.path.join(os.path.dirname(os.path.abspath(__file__)), 'common.py'))
common = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(common)


def get_config(arg=None):
  return common.finetune_config(
      dataset='cifar10', model_name=common.model_name_from(arg, 'ViT-B_16'),
      train_split='train', eval_split='test', total_steps=10_000, warmup_steps=500,
      learning_rate=0.03)
