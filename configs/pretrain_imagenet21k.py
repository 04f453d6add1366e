"""Pre-train ViT-B/16 on ImageNet-21k with the paper's recipe.

  python -m vit_jax.main --config=configs/pretrain_imagenet21k.py:ViT-B_16 --workdir=DIR \\
      --config.dataset=image_folder:/data/imagenet21k

Recipe (paper, Sec. 4.1 and App. B.1): Adam (b1 0.9, b2 0.999) with decoupled
weight decay 0.1, batch 4096, learning rate 1e-3 (4e-4 for ViT-L and up),
10k steps of linear warm-up then linear decay, gradient clipping at global
norm 1, 224x224, dropout 0.1, 90 epochs (about 300k steps on ~13M images),
sigmoid cross-entropy over the 21k classes (multi-label friendly), and a
representation layer (tanh pre-logits of the hidden size) as in the published
ImageNet-21k checkpoints. ImageNet-21k is not in TFDS: point config.dataset at
an image folder (`image_folder:/path`, one sub-folder per class) or at a TFDS
dataset you prepared yourself.
"""

import importlib.util
import os

_spec = importlib.util.spec_from_file_location(
    'vit_jax_configs_common', os.path.join(os.path.dirname(os.path.abspath(__file__)), 'common.py'))
common = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(common)


def get_config(arg=None):
  config = common.base_config()
  config.model_name = common.model_name_from(arg, 'ViT-B_16')
  large = not config.model_name.startswith(('ViT-Ti', 'ViT-S', 'ViT-B'))
  hidden = common.models.get_config(config.model_name).get('hidden_size', None)
  config.model = dict(
      representation_size=hidden,
      transformer=dict(dropout_rate=0.1),
      # Sigmoid loss over many classes: start every logit near p = 1e-4... 1e-5.
      head_bias_init=-10.0,
  )
  config.pretrained_path = None

  config.dataset = 'imagenet21k'
  config.train_split = 'train[:99%]'
  config.eval_split = 'train[99%:]'  # i21k has no official validation split
  config.image_size = 224
  config.pp = common.ml_collections.ConfigDict(dict(
      train='pretrain', eval='resize_crop', crop_pad=None, flip=True))
  config.batch_size = 4096
  config.eval_batch_size = 4096
  config.shuffle_buffer = 250_000

  config.optimizer = 'adamw'
  config.b1 = 0.9
  config.b2 = 0.999
  config.weight_decay = 0.1
  config.learning_rate = 4e-4 if large else 1e-3
  config.schedule = 'linear'
  config.warmup_steps = 10_000
  config.total_steps = 300_000
  config.grad_clip_norm = 1.0
  config.grad_accum_steps = 1
  config.loss = 'sigmoid_xent'
  config.dtype = 'bfloat16'
  config.accumulator_dtype = 'bfloat16'

  config.log_every = 100
  config.eval_every = 10_000
  config.checkpoint_every = 5_000
  return config
