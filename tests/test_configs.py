"""The config schema, the recipe table and the config files of configs/.

The expected recipes below are written from the paper (Table 3, Appendix B.1)
and the BiT paper (Sec. 3.3) as ../shared/README.md quotes them, not read
from `vit_jax.configs.recipes`: the test checks the table and every config
built from it against those figures.
"""

import glob
import os

from absl import flags
from ml_collections import config_flags
import pytest

from vit_jax import train
from vit_jax.configs import recipes
from vit_jax.configs import schema
from vit_jax.configs.image_size import image_hw

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_FILES = sorted(glob.glob(os.path.join(REPO, 'configs', '*.py')))

# Paper Table 3: (model, dataset) -> (epochs, base lr, decay, weight decay, dropout).
PAPER_PRETRAIN = {
    ('ViT-B_16', 'jft300m'): (7, 1e-3, 'linear', 0.1, 0.0),
    ('ViT-B_32', 'jft300m'): (7, 1e-3, 'linear', 0.1, 0.0),
    ('ViT-L_32', 'jft300m'): (7, 6e-4, 'linear', 0.1, 0.0),
    ('ViT-L_16', 'jft300m'): (7, 4e-4, 'linear', 0.1, 0.0),
    ('ViT-H_14', 'jft300m'): (14, 3e-4, 'linear', 0.1, 0.0),
    ('ViT-B_16', 'imagenet21k'): (90, 1e-3, 'linear', 0.03, 0.1),
    ('ViT-B_32', 'imagenet21k'): (90, 1e-3, 'linear', 0.03, 0.1),
    ('ViT-L_16', 'imagenet21k'): (90, 1e-3, 'linear', 0.03, 0.1),
    ('ViT-L_32', 'imagenet21k'): (90, 1e-3, 'linear', 0.03, 0.1),
    ('ViT-B_16', 'imagenet2012'): (300, 3e-3, 'cosine', 0.3, 0.1),
    ('ViT-L_16', 'imagenet2012'): (300, 3e-3, 'cosine', 0.3, 0.1),
    ('ViT-S_16', 'imagenet2012'): (300, 3e-3, 'cosine', 0.3, 0.1),
}
# Appendix B.1.1: fine-tuning steps per dataset.
PAPER_FINETUNE_STEPS = {'imagenet2012': 20_000, 'cifar10': 10_000, 'cifar100': 10_000,
                        'oxford_iiit_pet': 500, 'oxford_flowers102': 500}


def load(path: str, arg: str = None, overrides=()):
  """The config `--config=path[:arg] overrides...` gives on the command line."""
  argv = ['prog', f'--config={path}' + (f':{arg}' if arg else ''), *overrides]
  values = flags.FlagValues()
  # config_flags finds the override flags in sys_argv (default: sys.argv).
  config_flags.DEFINE_config_file('config', None, flag_values=values, lock_config=True,
                                  sys_argv=argv)
  values(argv)
  return values.config


@pytest.mark.parametrize('key', sorted(PAPER_PRETRAIN))
def test_pretrain_recipe_equals_paper(key):
  model, dataset = key
  epochs, lr, decay, wd, dropout = PAPER_PRETRAIN[key]
  row = recipes.pretrain_recipe(model, dataset)
  assert (row.epochs, row.learning_rate, row.schedule, row.weight_decay, row.dropout) == (
      epochs, lr, decay, wd, dropout)
  config = recipes.pretrain_config(model, dataset)
  # Shared by every row: Adam(0.9, 0.999), batch 4096, 10k warm-up, clip 1, 224 px.
  assert (config.optimizer, config.b1, config.b2) == ('adamw', 0.9, 0.999)
  assert (config.batch_size, config.warmup_steps, config.grad_clip_norm) == (4096, 10_000, 1.0)
  assert tuple(config.image_size) == (224, 224)
  assert (config.learning_rate, config.schedule, config.weight_decay) == (lr, decay, wd)
  assert config.model.transformer.dropout_rate == dropout
  images = {'jft300m': 303e6, 'imagenet21k': 14.2e6, 'imagenet2012': 1.28e6}[dataset]
  assert config.total_steps == pytest.approx(epochs * images / 4096, rel=0.01)
  train.validate_config(config)


def test_pretrain_config_files_equal_their_rows():
  c21 = load(os.path.join(REPO, 'configs', 'pretrain_imagenet21k.py'), 'ViT-L_16')
  assert (c21.learning_rate, c21.weight_decay, c21.model.transformer.dropout_rate) == (
      1e-3, 0.03, 0.1)
  c1k = load(os.path.join(REPO, 'configs', 'pretrain_imagenet1k.py'), 'ViT-B_16')
  assert (c1k.dataset, c1k.learning_rate, c1k.schedule, c1k.weight_decay) == (
      'imagenet2012', 3e-3, 'cosine', 0.3)
  assert c1k.model.transformer.dropout_rate == 0.1
  assert c1k.total_steps == pytest.approx(300 * 1_281_167 / 4096, rel=1e-3)
  with pytest.raises(ValueError, match='No pre-training recipe'):
    recipes.pretrain_recipe('ViT-H_14', 'imagenet21k')


@pytest.mark.parametrize('dataset', sorted(PAPER_FINETUNE_STEPS))
def test_finetune_config_file_equals_paper(dataset):
  config = load(os.path.join(REPO, 'configs', f'finetune_{dataset}.py'), 'ViT-B_16')
  assert config.dataset == dataset
  assert config.total_steps == PAPER_FINETUNE_STEPS[dataset]
  # SGD momentum 0.9, batch 512, no weight decay, clip 1, cosine after 500 warm-up, 384 px.
  assert (config.optimizer, config.momentum, config.batch_size) == ('sgd', 0.9, 512)
  assert (config.weight_decay, config.grad_clip_norm) == (0.0, 1.0)
  assert (config.schedule, config.warmup_steps) == ('cosine', 500)
  assert tuple(config.image_size) == (384, 384)
  assert config.learning_rate in (0.001, 0.003, 0.01, 0.03)
  # The reference code: 8 micro-batches, momentum in bf16; inception crop + flip; eval resize.
  assert (config.grad_accum_steps, config.accumulator_dtype) == (8, 'bfloat16')
  assert (config.pp.train, config.pp.min_area, config.pp.max_area, config.pp.flip) == (
      'inception_crop', 0.05, 1.0, True)
  assert config.pp.eval == 'resize'
  assert config.pretrained_path.endswith('ViT-B_16.npz')


# BiT-HyperRule (the BiT release's get_schedule): (warm-up, decay steps..., total).
BIT_SCHEDULES = {'small': (100, 200, 300, 400, 500), 'medium': (500, 3000, 6000, 9000, 10_000),
                 'large': (500, 6000, 12_000, 18_000, 20_000)}


@pytest.mark.parametrize('dataset,size,mixup,crop,resize', [
    ('cifar10', 'medium', 0.1, 128, 160),  # 50k images of 32 px
    ('oxford_iiit_pet', 'small', 0.0, 384, 448),  # 3.7k images, large
    ('imagenet2012', 'large', 0.1, 384, 448),
])
def test_bit_config_follows_the_hyperrule(dataset, size, mixup, crop, resize):
  warmup, *decays, steps = BIT_SCHEDULES[size]
  config = load(os.path.join(REPO, 'configs', 'bit_baseline.py'), f'BiT-R50x1,dataset={dataset}')
  assert (config.optimizer, config.momentum, config.learning_rate) == ('sgd', 0.9, 0.003)
  assert (config.batch_size, config.warmup_steps, config.weight_decay) == (512, warmup, 0.0)
  assert (config.total_steps, config.mixup_alpha) == (steps, mixup)
  assert tuple(config.image_size) == (crop, crop)
  assert (config.pp.train, crop + config.pp.crop_pad) == ('resize_crop', resize)
  assert config.schedule == 'step'
  from vit_jax import optimizers  # the step decay: / 10 at each decay step
  rate = optimizers.make_schedule(schema.resolve(config))
  assert float(rate(warmup)) == pytest.approx(0.003, rel=1e-5)
  for k, at in enumerate(decays):
    assert float(rate(at - 1)) == pytest.approx(0.003 * 0.1 ** k, rel=1e-5)
    assert float(rate(at)) == pytest.approx(0.003 * 0.1 ** (k + 1), rel=1e-5)


OVERRIDES = ['--config.data_dir=/tmp/tfds', '--config.pretrained_path=/tmp/x.npz',
             '--config.model.transformer.dropout_rate=0.1',
             '--config.accumulator_dtype=bfloat16', '--config.image_size=(384,512)',
             '--config.model.representation_size=32', '--config.pp.crop_pad=8']


@pytest.mark.parametrize('path', CONFIG_FILES, ids=os.path.basename)
def test_every_field_is_overridable_on_every_config(path):
  config = load(path, overrides=OVERRIDES)
  assert config.data_dir == '/tmp/tfds' and config.pretrained_path == '/tmp/x.npz'
  assert config.model.transformer.dropout_rate == 0.1
  assert config.accumulator_dtype == 'bfloat16'
  assert tuple(config.image_size) == (384, 512)
  assert config.pp.crop_pad == 8
  # Same schema everywhere: every config has exactly the schema's fields.
  assert set(config.keys()) == set(schema.base_config().keys())
  square = load(path, overrides=['--config.image_size=96'])
  assert image_hw(square.image_size) == (96, 96)


def test_model_overrides_apply_and_refuse_wrong_family():
  config = load(os.path.join(REPO, 'configs', 'default.py'),
                overrides=['--config.model.transformer.dropout_rate=0.1',
                           '--config.model.hidden_size=32'])
  model = schema.model_config(config)
  assert model.transformer.dropout_rate == 0.1 and model.hidden_size == 32
  assert model.remat_policy == 'dots'  # the preset's default policy
  assert model.transformer.num_layers == 4  # the preset's, not overridden
  config = load(os.path.join(REPO, 'configs', 'resnet_baseline.py'),
                overrides=['--config.model.transformer.dropout_rate=0.1'])
  with pytest.raises(ValueError, match='config.model.transformer does not apply'):
    train.validate_config(config)


def test_bad_values_fail_naming_the_field():
  path = os.path.join(REPO, 'configs', 'default.py')
  with pytest.raises(flags.IllegalFlagValueError, match='dropout_rate'):
    load(path, overrides=['--config.model.transformer.dropout_rate=high'])
  for override, field in (('--config.optimizer=lamb', 'config.optimizer'),
                          ('--config.posemb_resize=nearest', 'config.posemb_resize'),
                          ('--config.image_size=(0,16)', 'config.image_size'),
                          ('--config.pp.train=finetune', 'config.pp.train'),
                          ('--config.model_name=ViT-Q_16', 'config.model_name'),
                          ('--config.model.remat_policy=sometimes',
                           'config.model.remat_policy')):
    config = load(path, overrides=[override])
    with pytest.raises(ValueError, match=field.replace('.', r'\.')):
      config = schema.resolve(config)
      train.validate_config(config)
      from vit_jax import input_pipeline  # pp is checked when the pipeline is built
      input_pipeline.get_train_dataset(config, process_index=0, process_count=1)
  with pytest.raises(ValueError, match=r'Unknown field config\.learning_rat\b'):
    schema.resolve({'learning_rat': 0.1})
  with pytest.raises(ValueError, match=r'config\.batch_size'):
    schema.resolve({'batch_size': 'large'})


def test_parse_arg():
  arg = schema.parse_arg('ViT-L/16,runlocal,dataset=cifar100', model='ViT-B_16',
                         dataset='cifar10', runlocal=False)
  assert (arg.model, arg.dataset, arg.runlocal) == ('ViT-L_16', 'cifar100', True)
  with pytest.raises(ValueError, match='Unknown config argument'):
    schema.parse_arg('steps=3', model='ViT-B_16')
  with pytest.raises(ValueError, match='Unknown model'):
    schema.parse_arg('ViT-Z_3', model='ViT-B_16')


# finetune_cifar10.py and pretrain_imagenet1k.py run as runlocal from README's
# commands in tests/test_documented_commands.py; these are documented inline only.
RUNLOCAL = [('bit_baseline.py', 'runlocal'), ('pretrain_imagenet21k.py', 'runlocal'),
            ('finetune_cifar10.py', 'Mixer-B_16,runlocal')]


@pytest.mark.slow
@pytest.mark.parametrize('name,arg', RUNLOCAL)
def test_runlocal_variant_trains(name, arg, tmp_path, digits_data_dir):
  config = load(os.path.join(REPO, 'configs', name), arg,
                overrides=[f'--config.data_dir={digits_data_dir}'])
  full = load(os.path.join(REPO, 'configs', name), arg.replace('runlocal', '').strip(','))
  # The recipe is kept; only size, data and length shrink.
  for field in ('optimizer', 'schedule', 'weight_decay', 'learning_rate', 'loss'):
    assert config[field] == full[field], field
  assert config.pp.train == full.pp.train
  final = train.train_and_evaluate(config, str(tmp_path))
  assert final['step'] == config.total_steps
  assert 0.0 <= final['eval_accuracy'] <= 1.0


@pytest.fixture(scope='module')
def digits_data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp('tfds'))
