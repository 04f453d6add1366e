"""Release file names: the grammar, and commands that need no --model for such files."""

import os

import numpy as np
import pytest

from vit_jax import release_names

from test_predict import random_checkpoint  # pylint: disable=g-bad-import-order

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PRETRAIN = 'R50_L_32-i21k-300ep-lr_0.001-aug_medium1-wd_0.1-do_0.1-sd_0.1'
# A Ti/16 fine-tuned on the digits at 32 px (2x2 patches), named as the release names them.
TI_FINETUNED = ('Ti_16-i21k-300ep-lr_0.001-aug_none-wd_0.03-do_0.0-sd_0.0'
                '--digits-steps_1k-lr_0.01-res_32.npz')


def test_augreg_grammar():
  name = release_names.parse(f'/x/{PRETRAIN}--imagenet2012-steps_20k-lr_0.01-res_384.npz')
  assert name.preset == 'R50+ViT-L_32' and name.family == 'augreg'
  assert (name.upstream, name.adapt_ds, name.resolution) == ('i21k', 'imagenet2012', 384)
  assert name.recipe == dict(epochs='300', lr='0.001', aug='medium1', wd='0.1', do='0.1',
                             sd='0.1')
  upstream = release_names.parse(PRETRAIN + '.npz')
  assert upstream.preset == 'R50+ViT-L_32' and upstream.resolution is None
  assert upstream.adapt_ds is None
  for stem, preset in [('R_Ti_16-i21k_30-30ep-lr_0.001-aug_none-wd_0.03-do_0.0-sd_0.0',
                        'R+ViT-Ti_16'),
                       ('S_16-i1k-300ep-lr_0.001-aug_light1-wd_0.03-do_0.0-sd_0.0', 'ViT-S_16'),
                       ('B_8-i21k-300ep-lr_0.001-aug_medium2-wd_0.03-do_0.0-sd_0.0', 'ViT-B_8'),
                       ('R26_B_32-i21k-300ep-lr_0.001-aug_strong2-wd_0.1-do_0.0-sd_0.0',
                        'R26+ViT-B_32')]:
    assert release_names.parse(stem + '.npz').preset == preset, stem


def test_vit_paper_names():
  for file, (preset, upstream, adapt, res) in {
      'ViT-B_16.npz': ('ViT-B_16', None, None, None),
      'R50+ViT-B_16.npz': ('R50+ViT-B_16', None, None, None),
      'imagenet21k+imagenet2012_ViT-B_16-224.npz': ('ViT-B_16', 'imagenet21k', 'imagenet2012',
                                                    224),
      'imagenet21k+imagenet2012_R50+ViT-B_16.npz': ('R50+ViT-B_16', 'imagenet21k',
                                                    'imagenet2012', None),
  }.items():
    name = release_names.parse(file)
    assert (name.preset, name.upstream, name.adapt_ds, name.resolution) == (
        preset, upstream, adapt, res), file


def test_other_names_say_nothing():
  for file in ['model.npz', 'params.npz', 'ViT-Q_16.npz', 'Q_16-i21k-300ep-lr_0.001-aug_none-'
               'wd_0.1-do_0.0-sd_0.0.npz', 'B_16-i21k.npz', 'BiT-M-R50x1.npz']:
    assert release_names.parse(file) is None, file


@pytest.fixture(scope='module')
def files(tmp_path_factory):
  from PIL import Image  # pylint: disable=g-import-not-at-top
  root = tmp_path_factory.mktemp('release')
  image = str(root / 'digit.png')
  Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 40, 3), np.uint8)).save(image)
  ti = str(root / TI_FINETUNED)
  random_checkpoint(ti, 'ViT-Ti_16', num_classes=10, size=32)
  # A file named as an S/16 that holds a Ti/16: the arrays win.
  misnamed = str(root / 'S_16-i21k-300ep-lr_0.001-aug_light1-wd_0.03-do_0.0-sd_0.0.npz')
  os.link(ti, misnamed)
  plain = str(root / 'weights.npz')
  os.link(ti, plain)
  return dict(ti=ti, misnamed=misnamed, plain=plain, image=image, root=str(root))


def _one_error_line(err):
  lines = [l for l in err.splitlines() if l.strip()]
  assert len(lines) == 1 and lines[0].startswith('error: '), err
  return lines[0]


def test_predict_without_model(files, capsys):
  from vit_jax import predict  # pylint: disable=g-import-not-at-top
  assert predict.main(['--checkpoint', files['ti'], '--image', files['image'],
                       '--top_k', '3']) == 0
  out = capsys.readouterr().out
  assert '(32x32, ViT-Ti_16): top-3' in out, out
  # A --model of another preset: one line naming the right one.
  assert predict.main(['--model', 'S_16', '--checkpoint', files['ti'],
                       '--image', files['image']]) == 2
  line = _one_error_line(capsys.readouterr().err)
  assert 'is a ViT-Ti_16 checkpoint' in line and 'use --model ViT-Ti_16' in line, line
  # Name and arrays disagree: the arrays win, and the note says so.
  assert predict.main(['--checkpoint', files['misnamed'], '--image', files['image']]) == 0
  captured = capsys.readouterr()
  assert 'ViT-Ti_16): top-5' in captured.out
  assert "named as a ViT-S_16 checkpoint but its arrays are ViT-Ti_16's; the arrays win" in (
      captured.err)
  # A name that says nothing: --model is needed, as before.
  assert predict.main(['--checkpoint', files['plain'], '--image', files['image']]) == 2
  assert 'name its model with --model' in _one_error_line(capsys.readouterr().err)
  assert predict.main(['--model', 'Ti_16', '--checkpoint', files['plain'],
                       '--image', files['image'], '--top_k', '1']) == 0


def test_export_without_model(files, capsys):
  from vit_jax import export  # pylint: disable=g-import-not-at-top
  out = os.path.join(files['root'], 'ti.stablehlo')
  assert export.main(['--checkpoint', files['ti'], '--format', 'stablehlo', '--out', out]) == 0
  assert os.path.getsize(out) > 0
  capsys.readouterr()
  assert export.main(['--checkpoint', files['ti'], '--model', 'R26_S_32', '--format',
                      'stablehlo', '--out', out + '2']) == 2
  assert 'use --model ViT-Ti_16' in _one_error_line(capsys.readouterr().err)
  assert not os.path.exists(out + '2')


def test_evaluate_without_model(files, capsys):
  from vit_jax import evaluate  # pylint: disable=g-import-not-at-top
  config = os.path.join(REPO, 'configs', 'default.py')
  out = os.path.join(files['root'], 'eval')
  # The digits from the test process's TFDS folder (tests/conftest.py).
  assert evaluate.main(['--checkpoint', files['ti'], '--config', config,
                        '--batch_size', '128', '--quiet', '--out', out]) == 0
  stdout = capsys.readouterr().out
  assert 'ViT-Ti_16' in stdout, stdout
  import json  # pylint: disable=g-import-not-at-top
  with open(os.path.join(out, 'metrics.json'), encoding='utf-8') as f:
    metrics = json.load(f)
  assert metrics['model_name'] == 'ViT-Ti_16' and 0 <= metrics['top1_accuracy'] <= 1
  assert evaluate.main(['--checkpoint', files['ti'], '--config', config, '--model', 'B_16',
                        '--quiet']) == 2
  assert 'use --model ViT-Ti_16' in _one_error_line(capsys.readouterr().err)


def test_pretrained_path_checked_before_training(files):
  from vit_jax import validation  # pylint: disable=g-import-not-at-top
  from vit_jax.configs import schema  # pylint: disable=g-import-not-at-top
  config = schema.load_file(os.path.join(REPO, 'configs', 'default.py:ViT-S_16')).to_dict()
  config.update(pretrained_path=files['ti'], image_size=(32, 32))
  with pytest.raises(ValueError) as error:
    validation.validate_config(schema.resolve(config))
  message = str(error.value)
  assert 'config.pretrained_path=' in message and 'it is a ViT-Ti_16 checkpoint' in message
  assert message.endswith('set --config.model_name=ViT-Ti_16') and '\n' not in message
  config.update(model_name='Ti_16')
  validation.validate_config(schema.resolve(config))  # the short name of the right preset


def test_visualize_builds_the_named_model(files):
  from vit_jax import visualize  # pylint: disable=g-import-not-at-top
  args = visualize.parse_args(['--checkpoint', files['ti'], '--out', files['root']])
  model, params, size, _ = visualize.build_from_args(args)
  assert model.hidden_size == 192 and size == (32, 32)
  assert params['head']['kernel'].shape == (192, 10)
  args = visualize.parse_args(['--checkpoint', files['ti'], '--model', 'S_16',
                               '--out', files['root']])
  with pytest.raises(ValueError, match='use --model ViT-Ti_16'):
    visualize.build_from_args(args)
