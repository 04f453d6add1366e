"""Fine-tuning from a checkpoint pre-trained on another task beats training from scratch.

Task A: digits 0-4 at 16x16. Task B: digits 5-9 at 24x24 (so the patch grid
grows from 4x4 to 6x6: the position embeddings are interpolated, and the head
is new). Both are image folders written from scikit-learn's digits, read by
the real input pipeline. A ViT-Test_4 pre-trained on A and fine-tuned on B for
a few steps must be more accurate on B than the same model trained on B from
scratch for the same steps with the same recipe.
"""

import os

import ml_collections
import numpy as np
import pytest

from vit_jax import checkpoint
from vit_jax import train

# Whole training runs (a minute or more on 2 CPU cores): the slow tier.
pytestmark = pytest.mark.slow

pytest.importorskip('sklearn')
pytest.importorskip('tensorflow')


def write_digit_folder(root, classes):
  from PIL import Image  # pylint: disable=g-import-not-at-top
  from sklearn.datasets import load_digits  # pylint: disable=g-import-not-at-top
  digits = load_digits()
  for i, (image, label) in enumerate(zip(digits.images, digits.target)):
    if label not in classes:
      continue
    folder = os.path.join(root, f'digit_{label}')
    os.makedirs(folder, exist_ok=True)
    pixels = (image * (255.0 / 16.0)).astype(np.uint8)
    img = Image.fromarray(pixels, mode='L').resize((32, 32), Image.BILINEAR).convert('RGB')
    img.save(os.path.join(folder, f'{i}.png'))
  return f'image_folder:{root}'


def config_for(dataset, image_size, **overrides):
  config = ml_collections.ConfigDict(dict(
      model_name='ViT-Test_4', dataset=dataset, train_split='train[:75%]',
      eval_split='train[75%:]', image_size=image_size,
      pp=dict(train='plain', eval='resize'), batch_size=64, eval_batch_size=64, seed=0,
      optimizer='adamw', learning_rate=3e-3, weight_decay=0.01, schedule='cosine',
      warmup_steps=10, total_steps=100, grad_clip_norm=1.0, loss='softmax_xent',
      log_every=50, eval_every=0, checkpoint_every=0, shuffle_buffer=1000))
  config.update(overrides)
  return config


def test_finetune_beats_scratch_at_new_resolution(tmp_path):
  task_a = write_digit_folder(str(tmp_path / 'digits_0_4'), range(0, 5))
  task_b = write_digit_folder(str(tmp_path / 'digits_5_9'), range(5, 10))

  pre = train.train_and_evaluate(config_for(task_a, 16, export_params=True),
                                 str(tmp_path / 'pretrain'))
  assert pre['eval_accuracy'] > 0.8, pre
  pretrained = str(tmp_path / 'pretrain' / 'params.npz')
  posemb = checkpoint.load(pretrained)['Transformer']['posembed_input']['pos_embedding']
  assert posemb.shape == (1, 1 + 4 * 4, 32)

  # The paper's fine-tuning recipe (SGD momentum, no weight decay), a few steps.
  finetune = dict(optimizer='sgd', learning_rate=0.03, momentum=0.9, warmup_steps=3,
                  total_steps=60, weight_decay=0.0, log_every=40)
  tuned = train.train_and_evaluate(
      config_for(task_b, 24, pretrained_path=pretrained, **finetune), str(tmp_path / 'tuned'))
  scratch = train.train_and_evaluate(
      config_for(task_b, 24, **finetune), str(tmp_path / 'scratch'))
  print('pre-trained on 0-4 at 16px:', pre['eval_accuracy'],
        '| 5-9 at 24px fine-tuned:', tuned['eval_accuracy'], 'scratch:', scratch['eval_accuracy'])
  assert tuned['eval_accuracy'] > scratch['eval_accuracy'] + 0.1

  # Non-square fine-tuning (as 224 -> 384x512): grid 4x4 -> 6x8, the reference's zoom.
  wide = train.train_and_evaluate(
      config_for(task_b, (24, 32), pretrained_path=pretrained, export_params=True, **finetune),
      str(tmp_path / 'wide'))
  posemb = checkpoint.load(str(tmp_path / 'wide' / 'params.npz'))
  assert posemb['Transformer']['posembed_input']['pos_embedding'].shape == (1, 1 + 6 * 8, 32)
  print('5-9 at 24x32 fine-tuned:', wide['eval_accuracy'])
  assert wide['eval_accuracy'] > scratch['eval_accuracy'] + 0.1
