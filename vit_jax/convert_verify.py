"""Verifying a conversion: the written model computes the input's function.

The converted file is read back by the library that will use it (timm, HF) and
its logits on fixed images are compared with ours (`VERIFY_TOLERANCE`).
"""

from __future__ import annotations

import os
from typing import Any, Mapping, Sequence

import numpy as np

from vit_jax import checkpoint
from vit_jax.convert_hf import (
    _detect_hf_layout, build_hf_model, from_hf, installed_hf_layout, to_hf,
    torch_state_dict)
from vit_jax.convert_timm import build_timm_mixer, build_timm_model
from vit_jax.torch_files import read_torch_file
from vit_jax.torch_layout import _resolve, is_mixer_config


# ---------------------------------------------------------------------------
# Verifying a conversion: the written model computes the input's function
# ---------------------------------------------------------------------------

VERIFY_TOLERANCE = 1e-4
VERIFY_BATCH = 2


def verification_images(image_size: Sequence[int], batch: int = VERIFY_BATCH) -> np.ndarray:
  """The fixed batch conversions are checked on: uniform noise in [-1, 1], seed 0."""
  height, width = (int(s) for s in image_size)
  rng = np.random.default_rng(0)
  return rng.uniform(-1.0, 1.0, (batch, height, width, 3)).astype(np.float32)


def _geometry(params: Mapping, config: Any) -> tuple[int, tuple[int, int]]:
  """(class count, 0 without a head; image size) of converted params."""
  flat = checkpoint.flatten(params)
  num_classes = int(flat['head/kernel'].shape[-1]) if 'head/kernel' in flat else 0
  return num_classes, checkpoint.infer_image_size(flat, config)


def our_outputs(params: Mapping, model_config: Any, images: np.ndarray) -> np.ndarray:
  """Our model's logits on `images` (float32); for weights without a head, the
  features a head would read (what a timm model with num_classes=0 returns)."""
  import jax  # pylint: disable=g-import-not-at-top
  from vit_jax.configs import models as models_config  # pylint: disable=g-import-not-at-top
  config = _resolve(model_config)
  params = dict(params)
  headless = 'head' not in params
  if headless:
    # A zero head of one class only makes the model callable; its features are returned.
    flat = checkpoint.flatten(params)
    feature = (flat['pre_logits/kernel'] if 'pre_logits/kernel' in flat else
               flat['stem/kernel'] if 'stem/kernel' in flat else flat['embedding/kernel'])
    width = int(feature.shape[-1])
    params['head'] = {'kernel': np.zeros((width, 1), np.float32),
                      'bias': np.zeros((1,), np.float32)}
  num_classes = int(params['head']['kernel'].shape[-1])
  model = models_config.build_model(config, num_classes)
  logits, out = jax.jit(lambda p, x: model.apply({'params': p}, x, train=False))(
      params, images)
  return np.asarray(out['pre_logits'] if headless else logits, np.float32)


def _nchw(images: np.ndarray):
  import torch  # pylint: disable=g-import-not-at-top
  return torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))


def _load_problems(missing: Sequence[str], unexpected: Sequence[str], path: str,
                   loader: str) -> None:
  if missing or unexpected:
    parts = [f'{loader} does not read {path!r} as the model it should be:']
    if missing:
      parts.append(f'missing keys ({len(missing)}):\n  ' + '\n  '.join(sorted(missing)))
    if unexpected:
      parts.append(f'unexpected keys ({len(unexpected)}):\n  ' + '\n  '.join(sorted(unexpected)))
    raise ValueError('\n'.join(parts))


def timm_outputs(path: str, model_config: Any, num_classes: int, image_size: Sequence[int],
                 images: np.ndarray) -> np.ndarray:
  """A timm file's logits on `images`, run by timm (a model built by `build_timm_model`)."""
  import torch  # pylint: disable=g-import-not-at-top
  build = build_timm_mixer if is_mixer_config(model_config) else build_timm_model
  model = build(model_config, num_classes, image_size)
  try:
    result = model.load_state_dict(torch_state_dict(read_torch_file(path)), strict=False)
  except RuntimeError as e:  # shape mismatches, even when not strict
    raise ValueError(f'timm cannot load {path!r}: {e}') from None
  _load_problems(result.missing_keys, result.unexpected_keys, path, 'timm')
  with torch.no_grad():
    return model(_nchw(images)).float().numpy()


def hf_outputs(path: str, model_config: Any, num_classes: int, image_size: Sequence[int],
               images: np.ndarray) -> np.ndarray:
  """A HF directory's or state dict's logits on `images`, run by transformers.

  A directory is read with `ViTForImageClassification.from_pretrained` (its own
  config.json); a bare state dict is loaded into `build_hf_model(model_config)`.
  """
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  if os.path.isdir(path):
    model, info = transformers.ViTForImageClassification.from_pretrained(
        path, output_loading_info=True)
    # from_pretrained initialises missing weights at random with only a warning.
    _load_problems(info.get('missing_keys', ()), info.get('unexpected_keys', ()), path,
                   'transformers.ViTForImageClassification.from_pretrained')
    mismatched = info.get('mismatched_keys', ())
    if mismatched:
      raise ValueError(f'from_pretrained found shape mismatches in {path!r}: {mismatched}')
  else:
    sd = read_torch_file(path)
    if _detect_hf_layout(sd.keys()) != installed_hf_layout():
      # The other naming scheme: laid out by the installed transformers' names.
      sd = to_hf(from_hf(sd, model_config))
    model = build_hf_model(model_config, num_classes, image_size)
    try:
      result = model.load_state_dict(torch_state_dict(sd), strict=False)
    except RuntimeError as e:
      raise ValueError(f'transformers cannot load {path!r}: {e}') from None
    _load_problems(result.missing_keys, result.unexpected_keys, path, 'transformers')
  model.eval().float()
  with torch.no_grad():
    return model(pixel_values=_nchw(images)).logits.float().numpy()


def compare_outputs(name: str, reference: np.ndarray, got: np.ndarray,
                    tolerance: float = VERIFY_TOLERANCE) -> float:
  """max |got - reference|; ValueError above `tolerance` x max(1, max |reference|).

  The scale keeps the test at float32 rounding for logits far from 1, where
  absolute errors grow with the values.
  """
  if got.shape != reference.shape:
    raise ValueError(f'{name}: outputs of shape {got.shape}, expected {reference.shape}')
  diff = float(np.max(np.abs(got.astype(np.float64) - reference)))
  scale = max(1.0, float(np.max(np.abs(reference))))
  if not np.isfinite(diff) or diff > tolerance * scale:
    raise ValueError(
        f'{name}: max |logit difference| {diff:.3g} on the check batch exceeds '
        f'{tolerance:g} x {scale:.3g}: the written model does not compute the input\'s '
        'function')
  return diff


def _outputs(fmt: str, path: str, config: Any, num_classes: int, image_size: Sequence[int],
             images: np.ndarray) -> np.ndarray:
  if fmt == 'npz':
    return our_outputs(checkpoint.load(path), config, images)
  try:
    if fmt == 'timm':
      return timm_outputs(path, config, num_classes, image_size, images)
    return hf_outputs(path, config, num_classes, image_size, images)
  except ImportError as e:
    raise ImportError(
        f'checking the {fmt} file with {fmt} needs torch and '
        f'{"timm" if fmt == "timm" else "transformers"} ({e}); install them, or pass '
        '--no_verify to keep the file unchecked') from None
