"""The default run: ViT-Digits_4 trained from scratch on the embedded digits.

`python -m vit_jax.main --config=configs/default.py --workdir=/tmp/digits`
trains a 0.14M-parameter ViT (4 layers, width 64, 4x4 patches) from scratch on
scikit-learn's handwritten digits (about 1,440 train / 355 test images), with
no network and no dataset download. The digits are 8x8 originals, so 16x16
input (16 patches + the class token) loses nothing and costs a quarter of
32x32: 600 steps take about 2 minutes on 2 CPU cores. See docs/training.md for
the accuracy and time it reaches.
"""

import ml_collections


def get_config():
  config = ml_collections.ConfigDict()
  config.model_name = 'ViT-Digits_4'
  config.model = None  # no preset overrides
  config.pretrained_path = None

  # Data (vit_jax.input_pipeline).
  config.dataset = 'digits'
  config.data_dir = None
  config.train_split = 'train'
  config.eval_split = 'test'
  config.image_size = 16
  # No augmentation: on these tiny, centred digits random crops (resize to 18,
  # crop 16) cost about 1% top-1 at the same step count, and flips are wrong
  # (a mirrored digit is another digit, or none).
  config.pp = ml_collections.ConfigDict(dict(train='plain', eval='resize',
                                             crop_pad=None, flip=False))
  config.mixup_alpha = 0.0
  config.shuffle_buffer = 2048
  config.cache = True
  config.batch_size = 128
  config.eval_batch_size = 128
  config.seed = 0

  # Optimisation: AdamW from scratch, warm-up then cosine decay.
  config.optimizer = 'adamw'
  config.learning_rate = 2e-3
  config.end_learning_rate = 0.0
  config.weight_decay = 0.05
  config.b1 = 0.9
  config.b2 = 0.999
  config.momentum = 0.9
  config.accumulator_dtype = None
  config.schedule = 'cosine'
  config.warmup_steps = 50
  config.total_steps = 600
  config.grad_clip_norm = 1.0
  config.grad_accum_steps = 1
  config.loss = 'softmax_xent'
  config.label_smoothing = 0.1

  config.dtype = 'float32'
  config.fsdp = False

  config.log_every = 50
  config.eval_every = 200
  config.checkpoint_every = 200
  config.keep_checkpoints = 2
  config.async_checkpoints = True
  config.export_params = False
  config.prefetch = 2
  return config
