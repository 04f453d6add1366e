"""The AugReg and plain-ViT pre-training recipes, value by value against the facts.

Every expected value is typed in from ../shared/README.md "Pre-training recipes
after the paper" (big_vision configs/vit_i21k.py, vit_i1k.py, vit_s16_i1k.py),
not read from `vit_jax.configs.recipes`. The configs are built as
`--config=configs/FILE.py:ARG` builds them (`schema.load_file`, resolved).
"""

import os

import pytest

from vit_jax.configs import schema

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
AUGREG = os.path.join(REPO, 'configs', 'pretrain_augreg.py')
PLAIN = os.path.join(REPO, 'configs', 'pretrain_plain_vit.py')

# level -> (mixup alpha, RandAugment (layers, magnitude) or None: off)
AUG_LEVELS = {'none': (0.0, None), 'light1': (0.0, (2, 0)), 'light2': (0.2, (2, 10)),
              'medium1': (0.2, (2, 15)), 'medium2': (0.5, (2, 15)),
              'strong1': (0.5, (2, 20)), 'strong2': (0.8, (2, 20))}
# big_vision's default level per model.
DEFAULT_AUG = {
    'i21k': {'Ti_16': 'none', 'S_32': 'none', 'S_16': 'light1', 'B_32': 'light2',
             'B_16': 'light2', 'L_16': 'medium2'},
    'i1k': {'Ti_16': 'light1', 'S_32': 'medium1', 'S_16': 'medium2', 'B_32': 'medium2',
            'B_16': 'medium2', 'L_16': 'medium2'},
}
# ds -> (TFDS name, epochs, head bias of the sigmoid loss, training images of the set)
DATA = {'i1k': ('imagenet2012', 300, -6.9, 1_281_167),
        'i21k': ('imagenet21k', 300, -10.0, 14_197_122),
        'i21k_30': ('imagenet21k', 30, -10.0, 14_197_122)}


def config(path, arg=None):
  return schema.resolve(schema.load_file(f'{path}:{arg}' if arg else path))


def check_shared(c, batch):
  """Adam b1 0.9 b2 0.999 first moment bf16, lr 1e-3, 10k warm-up then cosine to 0, clip 1,
  weight decay on the file names' count (big_vision 1e-4 = 0.1 x lr 1e-3), 224 px,
  inception crop + flip + randaug, eval resize 256 / central crop 224, big_vision's mixup."""
  assert (c.optimizer, c.b1, c.b2, c.accumulator_dtype) == ('adamw', 0.9, 0.999, 'bfloat16')
  assert (c.learning_rate, c.schedule, c.end_learning_rate) == (1e-3, 'cosine', 0.0)
  assert (c.warmup_steps, c.grad_clip_norm, c.batch_size) == (10_000, 1.0, batch)
  assert tuple(c.image_size) == (224, 224)
  assert (c.pp.train, c.pp.flip, c.pp.min_area, c.pp.max_area) == (
      'inception_crop', True, 0.05, 1.0)
  assert c.pp.eval == 'resize_crop' and c.pp.crop_pad in (None, 32)  # None: 224 -> 256
  assert c.mixup_form == 'augreg'


@pytest.mark.parametrize('ds', sorted(DATA))
def test_augreg_recipe_per_dataset(ds):
  dataset, epochs, bias, images = DATA[ds]
  c = config(AUGREG, f'B_16,{ds}')
  check_shared(c, 4096)
  assert c.weight_decay == 0.1 and c.weight_decay * c.learning_rate == pytest.approx(1e-4)
  assert (c.dataset, c.loss, c.model.head_bias_init) == (dataset, 'sigmoid_xent', bias)
  assert c.total_steps == round(epochs * 0.99 * images / 4096)  # train[:99%]
  assert c.train_split == 'train[:99%]'
  # The released files' model: the preset as it is (token, no representation layer).
  assert c.model_name == 'ViT-B_16' and c.model.classifier is None
  assert c.model.representation_size is None
  assert (c.model.transformer.dropout_rate, c.model.transformer.stochastic_depth) == (0.0, 0.0)


@pytest.mark.parametrize('level', sorted(AUG_LEVELS))
def test_aug_levels(level):
  alpha, randaug = AUG_LEVELS[level]
  c = config(AUGREG, f'ViT-S_16,i1k,{level}')
  assert c.mixup_alpha == alpha
  assert (tuple(c.pp.randaug) if c.pp.randaug is not None else None) == randaug


@pytest.mark.parametrize('ds,model', [(d, m) for d in DEFAULT_AUG for m in DEFAULT_AUG[d]])
def test_default_level_per_model(ds, model):
  alpha, randaug = AUG_LEVELS[DEFAULT_AUG[ds][model]]
  c = config(AUGREG, f'{model},{ds}')
  assert c.model_name == f'ViT-{model}'
  assert c.mixup_alpha == alpha
  assert (tuple(c.pp.randaug) if c.pp.randaug is not None else None) == randaug


def test_release_grid_overrides():
  c = config(AUGREG, 'L_16,i21k,strong1,wd=0.03,do=0.1,sd=0.1')
  assert c.weight_decay * c.learning_rate == pytest.approx(3e-5)  # `wd_0.03` = 3e-5 there
  assert (c.model.transformer.dropout_rate, c.model.transformer.stochastic_depth) == (0.1, 0.1)
  for bad, match in (('B_16,i21k,none,wd=0.3', 'wd=0.3 is not in the AugReg release grid'),
                     ('B_16,i21k,none,sd=0.2', 'sd=0.2'), ('B_16,i22k', "'i22k'"),
                     ('B_16,i21k,medium9', "'medium9'"), ('B_8,i1k', 'no default'),
                     ('Mixer-B_16,i1k,none', 'trains ViTs'), ('B_16,i1k,none,x', 'Too many'),
                     ('Z_16,i1k', 'Unknown model')):
    with pytest.raises(ValueError, match=match):
      config(AUGREG, bad)


@pytest.mark.parametrize('epochs', [None, 150, 300])
def test_plain_vit_recipe(epochs):
  c = config(PLAIN, None if epochs is None else str(epochs))
  epochs = epochs or 90
  check_shared(c, 1024)
  assert c.weight_decay * c.learning_rate == pytest.approx(1e-4)
  assert (c.model_name, c.dataset, c.train_split) == ('ViT-S_16', 'imagenet2012', 'train[:99%]')
  assert c.total_steps == round(epochs * 0.99 * 1_281_167 / 1024)
  assert (c.loss, c.mixup_alpha, tuple(c.pp.randaug)) == ('softmax_xent', 0.2, (2, 10))
  assert (c.model.classifier, c.model.posemb, c.model.representation_size) == (
      'gap', 'sincos2d', 384)
  assert c.model.transformer.dropout_rate == 0.0
  with pytest.raises(ValueError, match='90, 150, 300'):
    config(PLAIN, '100')
