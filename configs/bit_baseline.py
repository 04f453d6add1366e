"""Fine-tune a BiT ResNet (the paper's CNN baseline) with the BiT recipe.

  python -m vit_jax.main --config=configs/bit_baseline.py:BiT-R50x1 --workdir=DIR \\
      --config.pretrained_path=/path/to/BiT-M-R50x1.npz --config.dataset=cifar100

BiT-HyperRule (Kolesnikov et al., 2020): SGD momentum 0.9, batch 512,
learning rate 0.003, no weight decay, 500 warm-up steps, 10k steps for
datasets of 20k-500k images (500 below 20k, 20k above), mixup 0.1 above 20k
images, 384x384 after a random crop for images larger than 96x96. The
published schedule divides the rate by 10 at 30/60/90% of the steps; here the
decay is cosine, like the ViT fine-tuning configs it is compared with. The
argument names the preset (BiT-R50x1, BiT-R101x3, BiT-R152x4, ...); the checkpoint
must be in this code's (Flax) parameter layout.
"""

import importlib.util
import os

_spec = importlib.util.spec_from_file_location(
    'vit_jax_configs_common', os.path.join(os.path.dirname(os.path.abspath(__file__)), 'common.py'))
common = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(common)


def get_config(arg=None):
  config = common.finetune_config(
      dataset='cifar10', model_name=common.model_name_from(arg, 'BiT-R50x1'),
      total_steps=10_000, warmup_steps=500, learning_rate=0.003)
  config.mixup_alpha = 0.1
  return config
