"""The paper's training recipes as data, each row with its source.

Three tables:

* `PRETRAIN`: pre-training from scratch per model group and dataset (paper
  Table 3 and Appendix B.1; Adam b1 0.9, b2 0.999, batch 4096, 10k linear
  warm-up steps, global-norm clipping at 1, 224 px for all);
* `FINETUNE`: fine-tuning a pre-trained ViT per dataset (Appendix B.1.1: SGD
  momentum 0.9, batch 512, no weight decay, clipping at 1, cosine decay after
  500 warm-up steps, learning rate swept over `FINETUNE_LEARNING_RATES`, 384 px;
  the reference code also accumulates 8 micro-batches and keeps momentum in bf16);
* `bit_hyperrule(...)`: the BiT-HyperRule for the ResNet baseline
  (Kolesnikov et al. 2020, Sec. 3.3).

`pretrain_config`, `finetune_config` and `bit_config` turn a row into a full
config over `schema.base_config()`; configs/*.py are one call each.
`runlocal(config)` shrinks any of them to a seconds-long run on the embedded
digits (big_vision's `runlocal` idea), so tests run the real configs.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import ml_collections

from vit_jax.configs import models
from vit_jax.configs import schema

PAPER = 'Dosovitskiy et al. 2020, "An Image is Worth 16x16 Words"'
BIT_PAPER = 'Kolesnikov et al. 2020, "Big Transfer (BiT)"'

# Training-set sizes used to turn epochs into steps.
DATASET_SIZES = {
    'jft300m': 303_000_000,  # paper Sec. 4.1: 18k classes, 303M images
    'imagenet21k': 14_197_122,  # paper Sec. 4.1: 21k classes, 14M images
    'imagenet2012': 1_281_167,
}

# Classes of the datasets the recipes name, for planning a run with no dataset
# present (`vit_jax.plan`); the input pipeline reads the real count from TFDS.
NUM_CLASSES = {
    'jft300m': 18_291,  # paper Sec. 4.1: "18k classes"
    'imagenet21k': 21_843,  # as in the published BiT-M / ViT i21k heads
    'imagenet2012': 1000,
    'cifar10': 10,
    'cifar100': 100,
    'oxford_iiit_pet': 37,
    'oxford_flowers102': 102,
    'digits': 10,
}


@dataclasses.dataclass(frozen=True)
class PretrainRecipe:
  models: tuple[str, ...]  # preset names the row covers
  dataset: str
  epochs: int
  learning_rate: float
  schedule: str  # decay after warm-up
  weight_decay: float
  dropout: float
  source: str
  # Shared by every row (paper Table 3 header and App. B.1).
  optimizer: str = 'adamw'
  b1: float = 0.9
  b2: float = 0.999
  batch_size: int = 4096
  warmup_steps: int = 10_000
  grad_clip_norm: float = 1.0
  image_size: int = 224

  @property
  def total_steps(self) -> int:
    return round(self.epochs * DATASET_SIZES[self.dataset] / self.batch_size)


_VIT_ALL = tuple(n for n in models.names() if n.startswith('ViT-') and '_' in n
                 and n.split('-')[1].split('_')[0] in ('Ti', 'S', 'B', 'L', 'H', 'g'))

PRETRAIN: tuple[PretrainRecipe, ...] = (
    PretrainRecipe(('ViT-B_16', 'ViT-B_32'), 'jft300m', 7, 1e-3, 'linear', 0.1, 0.0,
                   f'{PAPER}, Table 3'),
    PretrainRecipe(('ViT-L_32',), 'jft300m', 7, 6e-4, 'linear', 0.1, 0.0,
                   f'{PAPER}, Table 3'),
    PretrainRecipe(('ViT-L_16',), 'jft300m', 7, 4e-4, 'linear', 0.1, 0.0,
                   f'{PAPER}, Table 3 (7 epochs; 14 for the longest run)'),
    PretrainRecipe(('ViT-H_14',), 'jft300m', 14, 3e-4, 'linear', 0.1, 0.0,
                   f'{PAPER}, Table 3'),
    PretrainRecipe(('ViT-B_16', 'ViT-B_32'), 'imagenet21k', 90, 1e-3, 'linear', 0.03, 0.1,
                   f'{PAPER}, Table 3'),
    PretrainRecipe(('ViT-L_16', 'ViT-L_32'), 'imagenet21k', 90, 1e-3, 'linear', 0.03, 0.1,
                   f'{PAPER}, Table 3 (30 or 90 epochs)'),
    PretrainRecipe(_VIT_ALL, 'imagenet2012', 300, 3e-3, 'cosine', 0.3, 0.1,
                   f'{PAPER}, Table 3 (ViT-* on ImageNet)'),
)


@dataclasses.dataclass(frozen=True)
class FinetuneRecipe:
  dataset: str  # TFDS name
  total_steps: int
  num_train_examples: int  # of train_split; the BiT-HyperRule reads it
  native_px: int  # typical image side; the BiT-HyperRule reads it
  source: str
  train_split: str = 'train'
  eval_split: str = 'test'
  image_size: int = 384
  # Shared by every row (App. B.1.1 and the reference fine-tuning code).
  optimizer: str = 'sgd'
  momentum: float = 0.9
  batch_size: int = 512
  weight_decay: float = 0.0
  grad_clip_norm: float = 1.0
  schedule: str = 'cosine'
  warmup_steps: int = 500
  grad_accum_steps: int = 8
  accumulator_dtype: str = 'bfloat16'


# The learning rates App. B.1.1 sweeps; configs start at the largest.
FINETUNE_LEARNING_RATES = (0.001, 0.003, 0.01, 0.03)

FINETUNE: dict[str, FinetuneRecipe] = {r.dataset: r for r in (
    FinetuneRecipe('imagenet2012', 20_000, 1_281_167, 400, f'{PAPER}, App. B.1.1',
                   eval_split='validation'),
    FinetuneRecipe('cifar10', 10_000, 50_000, 32, f'{PAPER}, App. B.1.1'),
    FinetuneRecipe('cifar100', 10_000, 50_000, 32, f'{PAPER}, App. B.1.1'),
    FinetuneRecipe('oxford_iiit_pet', 500, 3_680, 400, f'{PAPER}, App. B.1.1'),
    FinetuneRecipe('oxford_flowers102', 500, 1_020, 500, f'{PAPER}, App. B.1.1'),
)}

# Published fine-tuned top-1 (%), paper Table 2, for the docs and notebooks.
PAPER_TOP1 = {
    'imagenet2012': {'ViT-H_14 (JFT)': 88.55, 'ViT-L_16 (JFT)': 87.76,
                     'ViT-L_16 (I21k)': 85.30, 'BiT-L R152x4': 87.54},
    'cifar10': {'ViT-H_14 (JFT)': 99.50, 'ViT-L_16 (JFT)': 99.42,
                'ViT-L_16 (I21k)': 99.15, 'BiT-L R152x4': 99.37},
    'cifar100': {'ViT-H_14 (JFT)': 94.55, 'ViT-L_16 (JFT)': 93.90,
                 'ViT-L_16 (I21k)': 93.25, 'BiT-L R152x4': 93.51},
    'oxford_iiit_pet': {'ViT-H_14 (JFT)': 97.56, 'ViT-L_16 (JFT)': 97.32,
                        'ViT-L_16 (I21k)': 94.67, 'BiT-L R152x4': 96.62},
    'oxford_flowers102': {'ViT-H_14 (JFT)': 99.68, 'ViT-L_16 (JFT)': 99.74,
                          'ViT-L_16 (I21k)': 99.61, 'BiT-L R152x4': 99.63},
}


@dataclasses.dataclass(frozen=True)
class BitRecipe:
  """BiT-HyperRule for one dataset size and image size."""
  total_steps: int
  mixup_alpha: float
  resize: int  # images are resized to this, then cropped to `crop`
  crop: int
  source: str = f'{BIT_PAPER}, Sec. 3.3'
  learning_rate: float = 0.003  # SGD with momentum 0.9, no weight decay, batch 512
  optimizer: str = 'sgd'
  momentum: float = 0.9
  weight_decay: float = 0.0
  batch_size: int = 512
  warmup_steps: int = 500
  schedule: str = 'step'  # rate / 10 at each of `decay_boundaries` (fractions of the steps)
  decay_boundaries: tuple[float, ...] = (0.3, 0.6, 0.9)


def bit_hyperrule(num_train_examples: int, image_px: int) -> BitRecipe:
  """The BiT-HyperRule: schedule by training-set size, resolution by image size.

  Step counts, warm-up and decay points as the BiT release's `get_schedule`
  gives them: (warm-up, decays..., end) = (100, 200, 300, 400, 500) below 20k
  examples, (500, 3k, 6k, 9k, 10k) below 500k, (500, 6k, 12k, 18k, 20k) above.
  """
  resize, crop = (160, 128) if image_px < 96 else (448, 384)
  if num_train_examples < 20_000:
    return BitRecipe(500, 0.0, resize, crop, warmup_steps=100,
                     decay_boundaries=(0.4, 0.6, 0.8))
  steps = 10_000 if num_train_examples < 500_000 else 20_000
  return BitRecipe(steps, 0.1, resize, crop)


# ---------------------------------------------------------------------------
# Rows -> configs.
# ---------------------------------------------------------------------------


def pretrain_recipe(model_name: str, dataset: str) -> PretrainRecipe:
  """The row for `model_name` on `dataset`; ValueError listing the covered pairs."""
  for row in PRETRAIN:
    if dataset == row.dataset and model_name in row.models:
      return row
  pairs = sorted({(m, r.dataset) for r in PRETRAIN for m in r.models if m in
                  ('ViT-B_16', 'ViT-B_32', 'ViT-L_16', 'ViT-L_32', 'ViT-H_14')})
  raise ValueError(f'No pre-training recipe for {model_name!r} on {dataset!r}; the paper '
                   f'gives: {", ".join(f"{m} on {d}" for m, d in pairs)} and ViT-* on '
                   'imagenet2012')


def pretrain_config(model_name: str, dataset: str) -> ml_collections.ConfigDict:
  """A from-scratch run with the paper's recipe for (model, dataset)."""
  row = pretrain_recipe(model_name, dataset)
  c = schema.base_config()
  c.model_name = model_name
  # The paper's pre-training head: an MLP with one hidden (tanh) layer.
  c.model.representation_size = models.get_config(model_name).hidden_size
  c.model.transformer.dropout_rate = row.dropout
  c.dataset = dataset
  c.image_size = (row.image_size, row.image_size)
  c.pp.train, c.pp.eval, c.pp.flip = 'inception_crop', 'resize_crop', True
  c.batch_size = c.eval_batch_size = row.batch_size
  c.shuffle_buffer = 250_000
  c.optimizer, c.b1, c.b2 = row.optimizer, row.b1, row.b2
  c.learning_rate, c.weight_decay = row.learning_rate, row.weight_decay
  c.schedule, c.warmup_steps, c.total_steps = row.schedule, row.warmup_steps, row.total_steps
  c.grad_clip_norm = row.grad_clip_norm
  c.dtype, c.accumulator_dtype = 'bfloat16', 'bfloat16'
  c.log_every, c.eval_every, c.checkpoint_every = 100, 10_000, 5_000
  return c


def finetune_config(dataset: str, model_name: str,
                    pretrained_dir: str = 'pretrained') -> ml_collections.ConfigDict:
  """Fine-tuning `model_name` on `dataset` with the paper's recipe."""
  if dataset not in FINETUNE:
    raise ValueError(f'No fine-tuning recipe for {dataset!r}; known: {", ".join(FINETUNE)}')
  row = FINETUNE[dataset]
  c = schema.base_config()
  c.model_name = model_name
  # ImageNet-21k checkpoints as published (`ViT-B_16.npz`, ...): point it at yours.
  c.pretrained_path = f'{pretrained_dir}/{model_name}.npz'
  c.dataset, c.train_split, c.eval_split = dataset, row.train_split, row.eval_split
  c.image_size = (row.image_size, row.image_size)
  # The reference's fine-tuning crop: inception crop -> resize, flip; eval: resize.
  c.pp.train, c.pp.eval, c.pp.flip = 'inception_crop', 'resize', True
  _set_sgd_recipe(c, row, FINETUNE_LEARNING_RATES[-1])
  c.grad_clip_norm = row.grad_clip_norm
  c.grad_accum_steps, c.accumulator_dtype = row.grad_accum_steps, row.accumulator_dtype
  if models.get_config(model_name).get('model_type') == 'mixer':
    _mixer_finetune_resolution(c, models.get_config(model_name), row.image_size)
  return c


# The published Mixer checkpoints' pre-training resolution.
MIXER_PRETRAIN_PX = 224


def _mixer_finetune_resolution(c: ml_collections.ConfigDict, preset: ml_collections.ConfigDict,
                               recipe_px: int) -> None:
  """A Mixer fine-tunes on a whole multiple K of its pre-training patch grid.

  Its token-mixing MLP is tied to the grid; the Mixer paper's Appendix widens
  it K^2 times (block-diagonal copies of the pre-trained weights) for K^2 times
  more patches (`checkpoint.load_pretrained`). K is the smallest whole factor
  reaching the recipe's resolution: 224 -> 448 px for the ViT recipe's 384.
  """
  k = -(-recipe_px // MIXER_PRETRAIN_PX)
  c.image_size = (k * MIXER_PRETRAIN_PX, k * MIXER_PRETRAIN_PX)
  if k > 1:
    c.model.tokens_mlp_dim = k * k * preset.tokens_mlp_dim


def _set_sgd_recipe(c: ml_collections.ConfigDict, row, learning_rate: float) -> None:
  """The fields the ViT fine-tuning rows and the BiT-HyperRule share."""
  c.batch_size = c.eval_batch_size = row.batch_size
  c.optimizer, c.momentum, c.weight_decay = row.optimizer, row.momentum, row.weight_decay
  c.learning_rate, c.schedule = learning_rate, row.schedule
  c.warmup_steps, c.total_steps = row.warmup_steps, row.total_steps
  c.eval_every = c.checkpoint_every = max(row.total_steps // 10, 100)


def bit_config(dataset: str, model_name: str,
               pretrained_dir: str = 'pretrained') -> ml_collections.ConfigDict:
  """Fine-tuning a BiT ResNet on `dataset` with the BiT-HyperRule."""
  if dataset not in FINETUNE:
    raise ValueError(f'No BiT-HyperRule inputs for {dataset!r}; known: {", ".join(FINETUNE)}')
  data = FINETUNE[dataset]
  row = bit_hyperrule(data.num_train_examples, data.native_px)
  c = schema.base_config()
  c.model_name = model_name
  c.pretrained_path = f'{pretrained_dir}/BiT-M-{model_name.replace("BiT-", "")}.npz'
  c.dataset = dataset
  c.train_split, c.eval_split = data.train_split, data.eval_split
  c.image_size = (row.crop, row.crop)
  c.pp.train, c.pp.eval, c.pp.flip = 'resize_crop', 'resize', True
  c.pp.crop_pad = row.resize - row.crop
  c.mixup_alpha = row.mixup_alpha
  _set_sgd_recipe(c, row, row.learning_rate)
  c.decay_boundaries = row.decay_boundaries
  c.grad_accum_steps = 8  # same update as one batch of 512, 1/8 of the activation memory
  return c


# ---------------------------------------------------------------------------
# Pre-training after the paper: AugReg and the plain-ViT baseline (big_vision).
# ---------------------------------------------------------------------------

AUGREG_PAPER = ('Steiner et al. 2021, "How to train your ViT?" (big_vision '
                'configs/vit_i21k.py, vit_i1k.py)')
PLAIN_VIT_PAPER = ('Beyer et al. 2022, "Better plain ViT baselines for ImageNet-1k" '
                   '(big_vision configs/vit_s16_i1k.py)')


@dataclasses.dataclass(frozen=True)
class AugLevel:
  """An AugReg augmentation level: mixup alpha (0: off) and RandAugment (layers, magnitude)."""
  mixup_alpha: float
  randaug: Optional[tuple[int, int]]  # None: off


AUG_LEVELS: dict[str, AugLevel] = {
    'none': AugLevel(0.0, None),
    'light1': AugLevel(0.0, (2, 0)),
    'light2': AugLevel(0.2, (2, 10)),
    'medium1': AugLevel(0.2, (2, 15)),
    'medium2': AugLevel(0.5, (2, 15)),
    'strong1': AugLevel(0.5, (2, 20)),
    'strong2': AugLevel(0.8, (2, 20)),
}

# big_vision's default level per model (release short name) for each pre-training
# set; i21k_30 is the i21k config run for 30 epochs.
AUGREG_DEFAULT_AUG: dict[str, dict[str, str]] = {
    'i21k': {'Ti_16': 'none', 'S_32': 'none', 'S_16': 'light1', 'B_32': 'light2',
             'B_16': 'light2', 'L_16': 'medium2'},
    'i1k': {'Ti_16': 'light1', 'S_32': 'medium1', 'S_16': 'medium2', 'B_32': 'medium2',
            'B_16': 'medium2', 'L_16': 'medium2'},
}
AUGREG_DEFAULT_AUG['i21k_30'] = AUGREG_DEFAULT_AUG['i21k']


@dataclasses.dataclass(frozen=True)
class AugRegData:
  """A pre-training set of the release's file names (`i1k`, `i21k`, `i21k_30`)."""
  dataset: str  # TFDS name
  epochs: int
  head_bias_init: float  # sigmoid loss: every class starts near sigmoid(bias)
  eval_split: str
  train_split: str = 'train[:99%]'
  train_fraction: float = 0.99  # of DATASET_SIZES, for the step count


AUGREG_DATA: dict[str, AugRegData] = {
    'i1k': AugRegData('imagenet2012', 300, -6.9, 'validation'),
    'i21k': AugRegData('imagenet21k', 300, -10.0, 'train[99%:]'),
    'i21k_30': AugRegData('imagenet21k', 30, -10.0, 'train[99%:]'),
}


@dataclasses.dataclass(frozen=True)
class ModernPretrain:
  """What the AugReg and plain-ViT recipes share (big_vision's ViT configs).

  `weight_decay` is counted as the release's file names count it: decay per
  update = weight_decay x lr, on kernels only (`optimizers.decay_mask`); big_vision
  writes it pre-multiplied (wd 1e-4 at lr 1e-3 = `wd_0.1`).
  """
  source: str
  batch_size: int = 4096
  optimizer: str = 'adamw'
  b1: float = 0.9
  b2: float = 0.999
  accumulator_dtype: str = 'bfloat16'  # Adam's first moment
  learning_rate: float = 1e-3
  weight_decay: float = 0.1
  schedule: str = 'cosine'  # to 0
  warmup_steps: int = 10_000
  grad_clip_norm: float = 1.0
  loss: str = 'sigmoid_xent'
  image_size: int = 224
  mixup_form: str = 'augreg'  # big_vision's mixup


AUGREG = ModernPretrain(AUGREG_PAPER)
# The release's grid: every file name has one value of each.
AUGREG_GRID = {'wd': (0.1, 0.03), 'do': (0.0, 0.1), 'sd': (0.0, 0.1)}

PLAIN_VIT = ModernPretrain(PLAIN_VIT_PAPER, batch_size=1024, loss='softmax_xent')
PLAIN_VIT_MODEL = 'ViT-S_16'
PLAIN_VIT_EPOCHS = (90, 150, 300)  # 90: 76.5% top-1 in 6-7 h on a TPU v3-8; 300: 80%
PLAIN_VIT_AUG = AugLevel(0.2, (2, 10))


def release_preset(name: str) -> str:
  """The preset of a model name or an AugReg release short name ('B_16', 'R26_S_32')."""
  for candidate in (name, f'ViT-{name}', name.replace('_', '+ViT-', 1)):
    if models.canonical_name(candidate) in models.names():
      return models.canonical_name(candidate)
  models.get_config(name)  # ValueError listing the valid names
  raise AssertionError('unreachable')


def release_short_name(preset: str) -> str:
  """'ViT-B_16' -> 'B_16', 'R26+ViT-S_32' -> 'R26_S_32' (the release's file names)."""
  return preset.replace('ViT-', '').replace('+', '_')


def _modern_config(model_name: str, row: ModernPretrain, dataset: str, epochs: int,
                   train_split: str, eval_split: str, train_fraction: float,
                   aug: AugLevel) -> ml_collections.ConfigDict:
  c = schema.base_config()
  c.model_name = model_name
  c.dataset, c.train_split, c.eval_split = dataset, train_split, eval_split
  c.image_size = (row.image_size, row.image_size)
  # big_vision: inception_crop(224)|flip|randaug; eval resize(256)|central_crop(224).
  c.pp.train, c.pp.eval, c.pp.flip = 'inception_crop', 'resize_crop', True
  c.pp.randaug = aug.randaug
  c.mixup_alpha, c.mixup_form = aug.mixup_alpha, row.mixup_form
  c.batch_size = c.eval_batch_size = row.batch_size
  c.shuffle_buffer = 250_000
  c.optimizer, c.b1, c.b2 = row.optimizer, row.b1, row.b2
  c.accumulator_dtype = row.accumulator_dtype
  c.learning_rate, c.weight_decay = row.learning_rate, row.weight_decay
  c.schedule, c.warmup_steps = row.schedule, row.warmup_steps
  c.total_steps = round(epochs * train_fraction * DATASET_SIZES[dataset] / row.batch_size)
  c.grad_clip_norm, c.loss = row.grad_clip_norm, row.loss
  c.dtype = 'bfloat16'
  c.log_every, c.eval_every, c.checkpoint_every = 100, 10_000, 5_000
  return c


def augreg_config(model: str, ds: str, aug: Optional[str] = None, *,
                  wd: float = AUGREG.weight_decay, do: float = 0.0,
                  sd: float = 0.0) -> ml_collections.ConfigDict:
  """AugReg pre-training of `model` (preset or release short name) on `ds`.

  `aug` None: big_vision's default level for the model; `wd`, `do`, `sd` as in
  the release's file names (`wd_0.1-do_0.0-sd_0.0`), each from its grid.
  """
  preset = release_preset(model)
  if models.get_config(preset).get('model_type', 'vit') != 'vit':
    raise ValueError(f'The AugReg recipe trains ViTs (and R+ViT hybrids), not {preset!r}')
  if ds not in AUGREG_DATA:
    raise ValueError(f'Unknown AugReg dataset {ds!r}; known: {", ".join(AUGREG_DATA)}')
  short = release_short_name(preset)
  if aug is None:
    if short not in AUGREG_DEFAULT_AUG[ds]:
      raise ValueError(f'big_vision has no default augmentation level for {short} on {ds} '
                       f'(it has: {", ".join(AUGREG_DEFAULT_AUG[ds])}); give one of '
                       f'{", ".join(AUG_LEVELS)}')
    aug = AUGREG_DEFAULT_AUG[ds][short]
  if aug not in AUG_LEVELS:
    raise ValueError(f'Unknown AugReg augmentation level {aug!r}; known: '
                     f'{", ".join(AUG_LEVELS)}')
  for key, value in (('wd', wd), ('do', do), ('sd', sd)):
    if value not in AUGREG_GRID[key]:
      field = {'wd': 'weight_decay', 'do': 'model.transformer.dropout_rate',
               'sd': 'model.transformer.stochastic_depth'}[key]
      raise ValueError(f'{key}={value} is not in the AugReg release grid '
                       f'({", ".join(map(str, AUGREG_GRID[key]))}); other values: '
                       f'--config.{field}=...')
  data = AUGREG_DATA[ds]
  c = _modern_config(preset, AUGREG, data.dataset, data.epochs, data.train_split,
                     data.eval_split, data.train_fraction, AUG_LEVELS[aug])
  c.weight_decay = wd
  c.model.transformer.dropout_rate = do
  c.model.transformer.stochastic_depth = sd
  c.model.head_bias_init = data.head_bias_init
  return c


def plain_vit_config(epochs: int = PLAIN_VIT_EPOCHS[0]) -> ml_collections.ConfigDict:
  """"Better plain ViT baselines": ViT-S/16 on ImageNet-1k for 90 (150, 300) epochs."""
  if epochs not in PLAIN_VIT_EPOCHS:
    raise ValueError(f'The plain-ViT recipe has {", ".join(map(str, PLAIN_VIT_EPOCHS))} '
                     f'epochs, not {epochs}; other lengths: --config.total_steps=...')
  c = _modern_config(PLAIN_VIT_MODEL, PLAIN_VIT, 'imagenet2012', epochs, 'train[:99%]',
                     'validation', 0.99, PLAIN_VIT_AUG)
  c.model.classifier, c.model.posemb = 'gap', 'sincos2d'
  c.model.representation_size = models.get_config(PLAIN_VIT_MODEL).hidden_size  # tanh
  c.model.transformer.dropout_rate = 0.0
  return c


def _modern_from_arg(kind: str, arg: Optional[str]) -> ml_collections.ConfigDict:
  """'augreg': `MODEL,DS[,AUG][,wd=W][,do=D][,sd=S][,runlocal]`; 'plain_vit': `[EPOCHS][,runlocal]`."""
  tokens = [t.strip() for t in (arg or '').split(',') if t.strip()]
  positional = [t for t in tokens if '=' not in t and t != 'runlocal']
  named = [t for t in tokens if t not in positional]
  names = ('model', 'ds', 'aug') if kind == 'augreg' else ('epochs',)
  if len(positional) > len(names):
    raise ValueError(f'Too many arguments in {arg!r}: expected {",".join(names).upper()} '
                     'and key=value settings')
  values = dict(zip(names, positional))
  model = values.pop('model', 'ViT-B_16')  # a short name too: release_preset resolves it
  spelled = ','.join([f'{k}={v}' for k, v in values.items()] + named)
  if kind == 'augreg':
    parsed = schema.parse_arg(spelled, ds='i21k', aug='', wd=AUGREG.weight_decay, do=0.0,
                              sd=0.0, runlocal=False)
    config = augreg_config(model, parsed.ds, parsed.aug or None, wd=parsed.wd, do=parsed.do,
                           sd=parsed.sd)
  else:
    parsed = schema.parse_arg(spelled, epochs=PLAIN_VIT_EPOCHS[0], runlocal=False)
    config = plain_vit_config(parsed.epochs)
  return runlocal(config) if parsed.runlocal else config


def runlocal(config: ml_collections.ConfigDict,
             model_name: Optional[str] = None) -> ml_collections.ConfigDict:
  """`config` shrunk to a seconds-long CPU run on the embedded digits, recipe otherwise kept.

  The tiny model is `ViT-Test_4` (`BiT-Test` for a ResNet config, `Mixer-Test_4` for
  a Mixer config), with the
  recipe's model overrides (dropout, representation layer, head bias); no
  pre-trained checkpoint; 16x16 images; batch 16; 4 steps.
  """
  family = models.get_config(config.model_name).get('model_type', 'vit')
  tiny = {'resnet': 'BiT-Test', 'mixer': 'Mixer-Test_4'}
  config.model_name = model_name or tiny.get(family, 'ViT-Test_4')
  config.model.tokens_mlp_dim = None  # a widened token MLP belongs to the full-size grid
  if config.model.representation_size is not None:
    config.model.representation_size = models.get_config(config.model_name).hidden_size
  config.pretrained_path = None
  config.dataset, config.data_dir = 'digits', None
  config.train_split, config.eval_split = 'train', 'test'
  config.image_size = (16, 16)
  if config.pp.crop_pad is not None:
    config.pp.crop_pad = 2
  config.batch_size = config.eval_batch_size = 16
  config.shuffle_buffer, config.cache = 64, True
  config.grad_accum_steps = min(config.grad_accum_steps, 2)
  config.total_steps, config.warmup_steps = 4, 1
  config.dtype = 'float32'
  config.log_every, config.eval_every, config.checkpoint_every = 2, 0, 0
  return config


def digits_config(model_name: str = 'ViT-Digits_4') -> ml_collections.ConfigDict:
  """This project's default run: a small model from scratch on the embedded digits.

  A ViT or an MLP-Mixer trains with AdamW (lr 2e-3, wd 0.05, label smoothing 0.1, 600 steps);
  a BiT ResNet with SGD momentum as in BiT (lr 0.03, 200 steps). Measured
  accuracies and times: docs/training.md.
  """
  c = schema.base_config()
  c.model_name = model_name
  c.dataset = 'digits'
  c.image_size = (16, 16)  # the digits are 8x8 originals: 16x16 loses nothing
  # No augmentation: on these tiny, centred digits random crops cost about 1%
  # top-1 at the same step count, and flips are wrong (a mirrored digit is
  # another digit, or none).
  c.pp.train, c.pp.eval, c.pp.flip = 'plain', 'resize', False
  c.shuffle_buffer, c.cache = 2048, True
  c.batch_size = c.eval_batch_size = 128
  c.keep_checkpoints = 2
  if models.get_config(model_name).get('model_type', 'vit') == 'resnet':
    c.optimizer, c.momentum, c.learning_rate, c.weight_decay = 'sgd', 0.9, 0.03, 0.0
    c.warmup_steps, c.total_steps = 20, 200
    c.eval_every = c.checkpoint_every = 100
  else:
    c.optimizer, c.learning_rate, c.weight_decay = 'adamw', 2e-3, 0.05
    c.label_smoothing = 0.1
    c.warmup_steps, c.total_steps = 50, 600
    c.eval_every = c.checkpoint_every = 200
  return c


def from_arg(kind: str, dataset: str, arg: Optional[str]) -> ml_collections.ConfigDict:
  """What a configs/ file returns for `--config=FILE:ARG`: the recipe row, or its runlocal.

  `kind` is 'finetune', 'pretrain' or 'bit'; ARG names the model and may add
  `runlocal` (and `dataset=NAME` for 'bit'). 'augreg' and 'plain_vit' (no
  `dataset`) take their own ARG (`_modern_from_arg`).
  """
  if kind in ('augreg', 'plain_vit'):
    return _modern_from_arg(kind, arg)
  default_model = 'BiT-R50x1' if kind == 'bit' else 'ViT-B_16'
  extra = {'dataset': dataset} if kind == 'bit' else {}
  arg = schema.parse_arg(arg, model=default_model, runlocal=False, **extra)
  if kind == 'finetune':
    config = finetune_config(dataset, arg.model)
  elif kind == 'pretrain':
    config = pretrain_config(arg.model, dataset)
  elif kind == 'bit':
    config = bit_config(arg.dataset, arg.model)
  else:
    raise ValueError(f"kind must be 'finetune', 'pretrain' or 'bit', got {kind!r}")
  if kind == 'pretrain' and dataset == 'imagenet21k':
    config.train_split, config.eval_split = 'train[:99%]', 'train[99%:]'  # no official val
    config.loss = 'sigmoid_xent'  # multi-label friendly, as big_vision pre-trains on i21k
    config.model.head_bias_init = -10.0  # every sigmoid starts near p = 5e-5
  if kind == 'pretrain' and dataset == 'imagenet2012':
    config.eval_split = 'validation'
  return runlocal(config) if arg.runlocal else config
