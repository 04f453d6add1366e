"""Shared pieces of the training configs: every field, and the paper's recipes.

`base_config()` lists every field `vit_jax.train` reads, with its default;
`finetune_config(...)` is the paper's fine-tuning recipe (SGD momentum 0.9,
batch 512, no weight decay, global-norm clipping at 1, linear warm-up then
cosine decay, resolution 384) for one dataset.

Config files load this module by path (see configs/finetune_cifar10.py), so
they work from any working directory. Like every config file, it imports only
ml_collections and vit_jax.configs.models: configs stay plain data.
"""

import ml_collections

from vit_jax.configs import models

# The learning rates the paper sweeps when fine-tuning.
FINETUNE_LEARNING_RATES = (0.001, 0.003, 0.01, 0.03)


def model_name_from(arg, default):
  """The model preset named by a config argument (`file.py:ViT-L_16`), checked."""
  name = models.canonical_name(arg) if arg else default
  models.get_config(name)  # ValueError listing the valid names
  return name


def base_config():
  """Every training field with its default (see docs/training.md)."""
  config = ml_collections.ConfigDict()
  # Model.
  config.model_name = 'ViT-B_16'
  config.model = None  # preset overrides, e.g. {'transformer': {'dropout_rate': 0.1}}
  config.pretrained_path = None  # published-layout .npz to fine-tune from
  config.reset_head = True  # fine-tuning starts from a fresh, zero head

  # Data (vit_jax.input_pipeline).
  config.dataset = 'digits'
  config.data_dir = None
  config.train_split = 'train'
  config.eval_split = 'test'
  config.image_size = 224
  config.pp = ml_collections.ConfigDict(dict(
      train='finetune', eval='resize', crop_pad=None, flip=True))
  config.mixup_alpha = 0.0
  config.shuffle_buffer = 50_000
  config.cache = False
  config.batch_size = 512  # global, over all devices and processes
  config.eval_batch_size = 512
  config.seed = 0
  # dataset='synthetic' only (timing, machines without TensorFlow):
  config.num_classes = 1000
  config.synthetic_noise = 0.5
  config.num_eval_examples = 10_000

  # Optimisation.
  config.optimizer = 'sgd'  # 'sgd' (momentum), 'adam' or 'adamw' (decoupled weight decay)
  config.learning_rate = 0.03
  config.end_learning_rate = 0.0
  config.momentum = 0.9
  config.b1 = 0.9
  config.b2 = 0.999
  config.weight_decay = 0.0
  config.accumulator_dtype = None  # 'bfloat16': momentum / first moment in bf16
  config.schedule = 'cosine'  # after warm-up: 'cosine', 'linear' or 'constant'
  config.warmup_steps = 500
  config.total_steps = 10_000
  config.grad_clip_norm = 1.0  # global norm; 0 turns clipping off
  config.grad_accum_steps = 1  # micro-batches per step (same result, less memory)
  config.loss = 'softmax_xent'  # or 'sigmoid_xent'
  config.label_smoothing = 0.0

  # Compute.
  config.dtype = 'float32'  # or 'bfloat16' (params and optimizer state stay float32)
  config.fsdp = False  # shard params / optimizer state over the devices

  # Bookkeeping.
  config.log_every = 50
  config.eval_every = 1000  # 0: at the end only
  config.checkpoint_every = 1000  # 0: at the end only
  config.keep_checkpoints = 3
  config.async_checkpoints = True
  config.export_params = False  # also write workdir/params.npz at the end
  config.prefetch = 2
  return config


def finetune_config(*, dataset, model_name, total_steps, learning_rate,
                    train_split='train', eval_split='test', warmup_steps=500,
                    image_size=384, batch_size=512, grad_accum_steps=8,
                    pretrained_dir='pretrained'):
  """The paper's fine-tuning recipe for `dataset` (a TFDS name)."""
  config = base_config()
  config.model_name = model_name
  # ImageNet-21k checkpoints as published (`ViT-B_16.npz`, ...); point it at yours.
  config.pretrained_path = f'{pretrained_dir}/{model_name}.npz'
  config.dataset = dataset
  config.train_split = train_split
  config.eval_split = eval_split
  config.image_size = image_size
  # Resize to ~1.14x the size and random-crop, random flips; eval: resize.
  config.pp = ml_collections.ConfigDict(dict(
      train='finetune', eval='resize', crop_pad=None, flip=True))
  config.batch_size = batch_size
  config.eval_batch_size = batch_size
  config.optimizer = 'sgd'
  config.momentum = 0.9
  config.weight_decay = 0.0
  config.learning_rate = learning_rate
  config.schedule = 'cosine'
  config.warmup_steps = warmup_steps
  config.total_steps = total_steps
  config.grad_clip_norm = 1.0
  # 512 images of 384x384 do not fit one accelerator at once for B/16 and up:
  # 8 micro-batches of 64 give the same update.
  config.grad_accum_steps = grad_accum_steps
  config.loss = 'softmax_xent'
  config.eval_every = max(total_steps // 10, 100)
  config.checkpoint_every = max(total_steps // 10, 100)
  return config
