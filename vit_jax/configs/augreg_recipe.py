"""Fine-tuning an AugReg release checkpoint with the reference's `augreg.py` defaults.

SGD with momentum, lr 0.03, 500 steps of which 100 warm-up, batch 512, gradient
clipping at norm 1, train images resized to 448 then randomly cropped to 384 and
flipped, eval images resized to 384, no dropout. The checkpoint is
`config.pretrained_dir/<stem>.npz`: the stem given, or for a model's short name
the i21k file with the best `final_val` in `pretrained_dir/index.csv`
(`vit_jax.augreg`), chosen when the config is resolved so that
`--config.pretrained_dir` applies.
"""

from __future__ import annotations

from typing import Optional

import ml_collections

from vit_jax.configs import models
from vit_jax.configs import schema

DEFAULT_DIR = 'augreg'  # a local copy of the release's folder


def _preset(model_or_stem: str) -> str:
  """The preset of a short / preset name, or of a release file stem."""
  from vit_jax import release_names  # pylint: disable=g-import-not-at-top
  name = release_names.parse(model_or_stem + '.npz')
  if name is not None:
    return name.preset
  return models.get_config(model_or_stem).name  # ValueError listing the presets


def augreg_config(arg: Optional[str]) -> ml_collections.ConfigDict:
  """`configs/augreg.py:ARG`: ARG a short model name (`R26_S_32`) or a file stem,
  optionally followed by `,dataset=NAME` (default imagenet2012)."""
  parts = [p.strip() for p in (arg or 'B_16').split(',') if p.strip()]
  model_or_stem, options = parts[0], dict(p.split('=', 1) for p in parts[1:] if '=' in p)
  unknown = sorted(set(options) - {'dataset'})
  if unknown or len(options) != len(parts) - 1:
    raise ValueError(f'configs/augreg.py:{arg}: after the model or file stem only '
                     f'dataset=NAME is understood')
  c = schema.base_config()
  c.model_name = _preset(model_or_stem)
  c.augreg_checkpoint = model_or_stem
  c.pretrained_dir = DEFAULT_DIR
  c.dataset = options.get('dataset', 'imagenet2012')
  c.train_split, c.eval_split = 'train', 'validation'
  c.image_size = (384, 384)
  c.pp.train, c.pp.crop_pad, c.pp.flip = 'resize_crop', 64, True  # 448, random 384 crop
  c.pp.eval = 'resize'
  c.optimizer, c.momentum = 'sgd', 0.9
  c.learning_rate, c.schedule, c.weight_decay = 0.03, 'cosine', 0.0
  c.total_steps, c.warmup_steps = 500, 100
  c.batch_size = c.eval_batch_size = 512
  c.grad_clip_norm = 1.0
  c.model.transformer.dropout_rate = 0.0
  c.model.transformer.attention_dropout_rate = 0.0
  c.eval_every = c.checkpoint_every = 100
  return c
