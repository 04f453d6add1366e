"""Classify images with a checkpoint: `python -m vit_jax.predict`.

  python -m vit_jax.predict --model ViT-B_16 \
      --checkpoint imagenet21k+imagenet2012_ViT-B_16.npz --image photo.jpg --top_k 5

The input resolution is the checkpoint's own (position-embedding grid times the
patch size) unless `--image_size H` or `--image_size HxW` asks for another; then
the position embeddings are resampled to the new patch grid the way fine-tuning
does it (`checkpoint.resize_posemb`, linear). The image is resized to the
resolution (no crop) and scaled to [-1, 1], as in the published fine-tuning.
1000-class checkpoints get the ImageNet-1k class names; other class counts
print indices unless `--labels FILE` is given.

The functions here (`load_model`, `predict`, `top_k`, and `load_image` from
vit_jax.images) are the building blocks other modules (the visualisations) reuse.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any, Optional, Sequence, Union

from absl import logging
import numpy as np

from vit_jax import checkpoint
from vit_jax import cli
from vit_jax import labels as labels_lib
from vit_jax import release_names

from vit_jax.images import load_image

def _config_for_checkpoint(model_name: str, flat: dict) -> Any:
  """The preset, with classifier and representation size read off the checkpoint."""
  from vit_jax.configs import models as models_config  # pylint: disable=g-import-not-at-top
  config = models_config.get_config(model_name)
  if config.get('model_type', 'vit') != 'vit':
    return config
  classifier = 'token' if 'cls' in flat else 'gap'
  if config.classifier != classifier:
    logging.info('Checkpoint has %s class token: classifier=%r', 'a' if 'cls' in flat else 'no',
                 classifier)
    config.classifier = classifier
  representation = (int(flat['pre_logits/kernel'].shape[-1])
                    if 'pre_logits/kernel' in flat else None)
  if config.representation_size != representation:
    logging.info('Checkpoint representation layer: %s', representation)
    config.representation_size = representation
  return config


def parse_image_size(text: str) -> tuple[int, int]:
  """'384' -> (384, 384); '384x512' (or '384,512') -> (height, width) = (384, 512)."""
  from vit_jax.configs.image_size import image_hw  # pylint: disable=g-import-not-at-top
  parts = text.lower().replace(',', 'x').split('x')
  try:
    return image_hw(tuple(int(p) for p in parts))
  except ValueError:
    raise ValueError(f'image size must be H or HxW (positive ints), got {text!r}') from None


def _argparse_image_size(text: str) -> tuple[int, int]:
  try:
    return parse_image_size(text)
  except ValueError as e:
    raise argparse.ArgumentTypeError(str(e)) from None


def _positive_int(text: str) -> int:
  try:
    value = int(text)
  except ValueError:
    value = 0
  if value < 1:
    raise argparse.ArgumentTypeError(f'must be a positive integer, got {text!r}')
  return value


# Classes a checkpoint's head may declare: 2^20, 35x the largest published label space.
MAX_CLASSES = 1 << 20


def load_model(model_name: str, checkpoint_path: Union[str, os.PathLike],
               image_size: Union[None, int, Sequence[int]] = None,
               source_grid: Optional[Sequence[int]] = None):
  """(model, params, image_size) for a checkpoint, its shapes checked against the model.

  The class count comes from the head, the resolution from the position
  embeddings, or from `image_size` (an int or (height, width)): when that gives
  another patch grid, the position embeddings are resampled to it
  (`checkpoint.resize_posemb`, the reference's linear method). `source_grid`
  (rows, cols) is the checkpoint's grid when it is not square. An MLP-Mixer runs
  at the grid of its token-mixing MLP only; models without either (the BiT
  ResNets) default to 224x224.
  """
  from vit_jax.configs import models as models_config  # pylint: disable=g-import-not-at-top
  from vit_jax.configs.image_size import image_hw  # pylint: disable=g-import-not-at-top
  path = os.fspath(checkpoint_path)
  # Geometry and the model's expected shapes come from the .npy headers: a file
  # that does not fit is refused before any of its data is read.
  specs = checkpoint.read_npz_specs(path)
  source = f'checkpoint {path!r}'
  if 'head/kernel' not in specs:
    raise ValueError(f'Checkpoint {path!r} has no classification head')
  config = _config_for_checkpoint(model_name, specs)
  num_classes = int(specs['head/kernel'].shape[-1])
  if num_classes > MAX_CLASSES:  # refused from the header, before its data is read
    raise ValueError(f'{source}: its head declares {num_classes:,} classes; a classifier '
                     f'head has at most {MAX_CLASSES:,} (the largest published label '
                     'spaces, JFT\'s, have ~30k)')
  has_posemb = checkpoint.POSEMB_KEY in specs
  if has_posemb:
    prefix = checkpoint.num_prefix_tokens(specs, config)
    if source_grid is not None:
      old_grid = tuple(int(g) for g in source_grid)
      tokens = specs[checkpoint.POSEMB_KEY].shape[1] - prefix
      if len(old_grid) != 2 or old_grid[0] * old_grid[1] != tokens:
        raise ValueError(f'{source}: source_grid {tuple(source_grid)} does not match its '
                         f'{tokens} position embeddings')
    else:
      try:
        old_grid = checkpoint.infer_grid(specs, config)
      except ValueError as e:
        raise ValueError(f'{source}: {e}; pass source_grid=(rows, cols)') from None
    stride = checkpoint.patch_stride(config)
    own_size = (old_grid[0] * stride[0], old_grid[1] * stride[1])
  elif checkpoint.MIXER_GRID_KEY in specs:
    # An MLP-Mixer's token-mixing MLP fixes its patch grid: no other input size.
    try:
      old_grid = (tuple(int(g) for g in source_grid) if source_grid is not None
                  else checkpoint.mixer_grid(specs))
    except ValueError as e:
      raise ValueError(f'{source}: {e}') from None
    stride = checkpoint.patch_stride(config)
    own_size = (old_grid[0] * stride[0], old_grid[1] * stride[1])
    if image_size is not None and image_hw(image_size) != own_size:
      size = image_hw(image_size)
      raise ValueError(
          f'{source} is an MLP-Mixer whose token-mixing MLP is tied to its '
          f'{old_grid[0]}x{old_grid[1]} patch grid ({own_size[0]}x{own_size[1]} px); '
          f'{size[0]}x{size[1]} px would be a {size[0] // stride[0]}x{size[1] // stride[1]} '
          'grid: predict at the checkpoint\'s own size')
  else:
    own_size = (224, 224)
  image_size = own_size if image_size is None else image_hw(image_size)
  check_input_size(config, image_size)
  expected = checkpoint.abstract_params(config, num_classes, image_size)

  stored = checkpoint.flatten(expected)
  if has_posemb:
    # The file holds the embeddings of its own grid; they are resampled once read.
    stored[checkpoint.POSEMB_KEY] = specs[checkpoint.POSEMB_KEY]
  flat = checkpoint.load_flat(path, expected=checkpoint.unflatten(stored))
  if has_posemb:
    new_grid = (image_size[0] // stride[0], image_size[1] // stride[1])
    if new_grid != old_grid:
      logging.info('Resizing the position embeddings from grid %dx%d to %dx%d for %dx%d input',
                   *old_grid, *new_grid, *image_size)
      flat = dict(flat)
      flat[checkpoint.POSEMB_KEY] = checkpoint.resize_posemb(
          flat[checkpoint.POSEMB_KEY], new_grid, prefix, old_grid=old_grid, method='linear')
  params = checkpoint.unflatten(flat)
  checkpoint.check_params(params, expected, source=source)
  model = models_config.build_model(config, num_classes)
  return model, params, image_size


def attention_bytes(config: Any, image_size: Sequence[int], batch: int = 1) -> int:
  """Bytes of one layer's attention logits and weights (float32, every head) for `batch` images.

  The largest buffer of a ViT's forward pass at a high resolution: it grows with
  the square of the token count, the fourth power of the image side. 0 for
  models without attention (BiT ResNets, MLP-Mixers).
  """
  if config.get('model_type', 'vit') != 'vit':
    return 0
  stride = checkpoint.patch_stride(config)
  tokens = ((image_size[0] // stride[0]) * (image_size[1] // stride[1])
            + (1 if config.classifier == 'token' else 0))
  return 2 * batch * int(config.transformer.num_heads) * tokens * tokens * 4


def memory_limit_bytes() -> int:
  """Half of this machine's physical memory: the most one attention layer may take."""
  return checkpoint.machine_memory_limit()


def check_input_size(config: Any, image_size: Sequence[int], batch: int = 1,
                     limit: Optional[int] = None) -> None:
  """Refuses, before anything is allocated, an input size whose attention needs too much memory.

  The limit is `memory_limit_bytes()` (half the physical memory) for
  `attention_bytes`; the message names the size, the memory it needs and the
  largest square size that fits.
  """
  limit = memory_limit_bytes() if limit is None else limit
  need = attention_bytes(config, image_size, batch)
  if need <= limit:
    return
  stride = checkpoint.patch_stride(config)
  heads = int(config.transformer.num_heads)
  prefix = 1 if config.classifier == 'token' else 0
  grid = int(((limit / (8 * batch * heads)) ** 0.5 - prefix) ** 0.5)
  raise cli.UserError(
      f'image size {image_size[0]}x{image_size[1]} is too large for {config.name}: '
      f'one attention layer needs {checkpoint.format_bytes(need)} at that size ({heads} heads of '
      f'{(image_size[0] // stride[0]) * (image_size[1] // stride[1]) + prefix:,}^2 float32 '
      f'logits and weights), more than the {checkpoint.format_bytes(limit)} allowed (half '
      f'this machine\'s memory); at most about {grid * stride[0]}x{grid * stride[1]} fits')


_JITTED: dict[int, tuple[Any, Any]] = {}



def _jitted_probs(model):
  """One compiled softmax(logits) function per model object (Flax modules are unhashable)."""
  import jax  # pylint: disable=g-import-not-at-top
  entry = _JITTED.get(id(model))
  if entry is None or entry[0] is not model:
    if len(_JITTED) >= 8:
      _JITTED.clear()

    def probs_fn(params, images):
      logits, _ = model.apply({'params': params}, images, train=False)
      return jax.nn.softmax(logits.astype(np.float32), axis=-1)

    entry = _JITTED[id(model)] = (model, jax.jit(probs_fn))
  return entry[1]


def predict(model, params, images: np.ndarray) -> np.ndarray:
  """Class probabilities (softmax of the logits) for one (H, W, 3) image or a batch."""
  images = np.asarray(images, np.float32)
  single = images.ndim == 3
  if single:
    images = images[None]
  probs = np.asarray(_jitted_probs(model)(params, images))
  return probs[0] if single else probs


def class_names(num_classes: int, labels_path: Optional[str] = None) -> list[str]:
  """Names for class indices: a label file, ImageNet-1k for 1000 classes, else 'class i'."""
  if labels_path:
    names = labels_lib.load_labels(labels_path)
    if len(names) != num_classes:
      raise ValueError(f'{labels_path} has {len(names)} labels but the model has '
                       f'{num_classes} classes')
    return list(names)
  if num_classes == 1000:
    return list(labels_lib.imagenet1k_labels())
  return [f'class {i}' for i in range(num_classes)]


def top_k(probs: np.ndarray, k: int = 5,
          labels: Optional[Sequence[str]] = None) -> list[tuple[int, str, float]]:
  """The k most probable classes of one probability vector: (index, label, prob), best first.

  k larger than the class count gives every class; k < 1 is a ValueError.
  """
  probs = np.asarray(probs)
  if probs.ndim != 1:
    raise ValueError(f'top_k takes one probability vector, got shape {probs.shape}')
  if int(k) < 1:
    raise ValueError(f'k must be a positive number of classes, got {k}')
  k = min(int(k), probs.shape[0])
  order = np.argsort(-probs, kind='stable')[:k]
  return [(int(i), labels[i] if labels is not None else str(int(i)), float(probs[i]))
          for i in order]


def format_top_k(rows: Sequence[tuple[int, str, float]]) -> list[str]:
  return [f'{rank:2d}. {prob * 100:6.2f}%  [{index:4d}] {label}'
          for rank, (index, label, prob) in enumerate(rows, 1)]


def main(argv: Optional[Sequence[str]] = None) -> int:
  parser = cli.ArgumentParser(
      prog='python -m vit_jax.predict',

      description='Print the top-k classes of images under a checkpoint.')
  parser.add_argument('--model', default=None,
                      help='preset name, e.g. ViT-B_16 (default: from a release file name, '
                      'e.g. B_16-i21k-300ep-...npz or ViT-B_16.npz)')
  parser.add_argument('--checkpoint', required=True, help='.npz checkpoint')
  parser.add_argument('--image', required=True, nargs='+', help='image file(s)')
  parser.add_argument('--top_k', type=_positive_int, default=5,
                      help='classes to print per image (at most the class count)')
  parser.add_argument('--labels', default=None,
                      help='class names, one per line (default: ImageNet-1k for 1000 classes)')
  parser.add_argument('--image_size', type=_argparse_image_size, default=None,
                      help='input resolution, H (square) or HxW, e.g. 384x512; default: '
                      "the checkpoint's. Another patch grid resamples the position embeddings; "
                      "a size whose attention needs more than half the machine's memory is "
                      'refused (check_input_size)')

  parser.add_argument('--verbose', action='store_true',
                      help=f'print the traceback of an error too (or set {cli.TRACEBACK_ENV}=1)')
  args = parser.parse_args(argv)
  try:
    model_name = release_names.preset_for(args.checkpoint, args.model, required=True)
    model, params, image_size = load_model(model_name, args.checkpoint, args.image_size)
    num_classes = int(params['head']['kernel'].shape[-1])
    names = class_names(num_classes, args.labels)
    images = np.stack([load_image(path, image_size) for path in args.image])
  except (ValueError, OSError, MemoryError) as e:
    # A bad file, image or argument: one line, exit status 2.
    return cli.report_user_error(e, args.verbose)
  probs = predict(model, params, images)
  for path, p in zip(args.image, probs):
    rows = top_k(p, args.top_k, names)
    print(f'{path} ({image_size[0]}x{image_size[1]}, {model_name}): top-{len(rows)}')
    for line in format_top_k(rows):
      print(line)
  return 0


if __name__ == '__main__':
  cli.quiet_console()  # before TensorFlow and JAX's backends load
  sys.exit(cli.run(main))

