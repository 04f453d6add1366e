"""The CNN baseline of the default run: a small BiT ResNet trained on digits.

  python -m vit_jax.main --config=configs/resnet_baseline.py --workdir=/tmp/digits_resnet

Same data (16x16, no augmentation) as configs/default.py; the model is the BiT-Test
preset (a ResNetV2 with one pre-activation bottleneck unit per stage, base
width 32, GroupNorm and weight-standardised convolutions), trained with SGD
momentum as in BiT. The argument after ':' may name another BiT preset.
"""

import importlib.util
import os

_spec = importlib.util.spec_from_file_location(
    'vit_jax_configs_default', os.path.join(os.path.dirname(os.path.abspath(__file__)), 'default.py'))
default = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(default)


def get_config(arg=None):
  config = default.get_config()
  config.model_name = arg or 'BiT-Test'
  config.optimizer = 'sgd'
  config.momentum = 0.9
  config.learning_rate = 0.03
  config.weight_decay = 0.0
  config.label_smoothing = 0.0
  config.warmup_steps = 20
  config.total_steps = 200
  config.eval_every = 100
  config.checkpoint_every = 100
  return config
