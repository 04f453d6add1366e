"""`validate_config`: every value a run would trip over, refused before any work.

A bad value raises ValueError naming the field (`config.batch_size=...`), after
`schema.resolve` has refused unknown fields and wrong types. The checks that
need the model (does `image_size` fit the patch size?) build it abstractly with
`jax.eval_shape`: nothing is allocated or compiled.
"""

from __future__ import annotations

from typing import Optional

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from vit_jax import input_pipeline
from vit_jax import optimizers
from vit_jax import randaugment
from vit_jax import release_names
from vit_jax import remat
from vit_jax import run_history
from vit_jax.configs import models
from vit_jax.configs import schema
from vit_jax.configs.image_size import image_hw

DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}
SYNTHETIC = 'synthetic'


def _is_int(value) -> bool:
  return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def build_model(config: schema.Config, num_classes: int):
  """The Flax module of `config.model_name` with `config.model` overrides, in `config.dtype`."""
  try:
    return models.build_model(schema.model_config(config), num_classes,
                              dtype=DTYPES[config.dtype])
  except TypeError as e:
    raise ValueError(f'config.model has a field the model does not take: {e}') from None


def _model_overrides(config: schema.Config) -> str:
  """'transformer.num_heads=3, ...' of the config.model fields that are set."""
  def leaves(tree, prefix=''):
    for key, value in sorted(tree.items()):
      if hasattr(value, 'items'):
        yield from leaves(value, f'{prefix}{key}.')
      elif value is not None:
        yield f'{prefix}{key}={value!r}'
  rows = list(leaves(config.model)) if config.get('model') else []
  return ', '.join(rows) if rows else '(no overrides)'


def validate_config(config: schema.Config, num_devices: Optional[int] = None,
                    num_processes: Optional[int] = None,
                    platform: Optional[str] = None) -> schema.Config:
  """`config` (resolved: `schema.resolve`), checked: a bad value raises ValueError naming it.

  With `num_devices` / `num_processes`, batch sizes are checked against them;
  `platform` is the devices' (default: JAX's default backend).
  """
  optimizers.validate(config)
  dataset = config.dataset
  if not dataset or not isinstance(dataset, str):
    raise ValueError(f'config.dataset must be a non-empty string, got {dataset!r}')
  if config.get('resume_changes', 'refuse') not in run_history.RESUME_CHANGES:
    raise ValueError(f'Unknown config.resume_changes={config.resume_changes!r}; expected one '
                     f'of {run_history.RESUME_CHANGES}')
  if config.bad_images not in input_pipeline.BAD_IMAGE_POLICIES:  # importing it needs no TF
    raise ValueError(f'Unknown config.bad_images={config.bad_images!r}; expected one of '
                     f'{input_pipeline.BAD_IMAGE_POLICIES}')
  input_pipeline.check_mixup(config)
  randaugment.check(config.pp.randaug, config.pp.randaug_ops)
  height, width = image_hw(config.image_size)
  if config.posemb_resize not in schema.POSEMB_METHODS:
    raise ValueError(f'Unknown config.posemb_resize={config.posemb_resize!r}; expected one '
                     f'of {schema.POSEMB_METHODS}')
  model_config = schema.model_config(config)
  if model_config.get('attention_implementation') == 'cudnn' and config.dtype == 'float32':
    raise ValueError("config.model.attention_implementation='cudnn' needs "
                     "config.dtype='bfloat16': cuDNN's fused attention has no float32 kernel")
  policy = model_config.get('remat_policy')
  if policy is not None:
    try:
      remat.check_policy(policy)
    except ValueError as e:
      raise ValueError(f'Unknown config.model.remat_policy: {e}') from None
  dtype = config.dtype
  if dtype not in DTYPES:
    raise ValueError(f'Unknown config.dtype={dtype!r}; expected one of {tuple(DTYPES)}')
  accum = config.grad_accum_steps
  if not _is_int(accum) or accum < 1:
    raise ValueError(f'config.grad_accum_steps must be a positive integer, got {accum!r}')
  for field in ('batch_size', 'eval_batch_size'):
    value = config[field]
    if not _is_int(value) or value < 1:
      raise ValueError(f'config.{field} must be a positive integer, got {value!r}')
  batch = config.batch_size
  if batch % accum:
    raise ValueError(f'config.batch_size={batch} must be divisible by '
                     f'config.grad_accum_steps={accum}')
  if num_devices:
    if (batch // accum) % num_devices:
      raise ValueError(
          f'config.batch_size={batch} must be divisible by the number of devices '
          f'({num_devices})' + (f' times config.grad_accum_steps={accum}' if accum > 1 else '')
          + f': each of the {accum} micro-batch(es) of {batch // accum} is split over the devices')
    if config.eval_batch_size % num_devices:
      raise ValueError(f'config.eval_batch_size={config.eval_batch_size} must be divisible '
                       f'by the number of devices ({num_devices})')
  if num_processes and num_processes > 1:
    for field in ('batch_size', 'eval_batch_size'):
      if config[field] % num_processes:
        raise ValueError(f'config.{field}={config[field]} must be divisible by the number '
                         f'of processes ({num_processes})')
  for field in ('log_every', 'eval_every', 'checkpoint_every'):
    value = config[field]
    if not _is_int(value) or value < 0:
      raise ValueError(f'config.{field} must be an integer >= 0, got {value!r}')
  if config.log_every < 1:
    raise ValueError(f'config.log_every must be >= 1, got {config.log_every}')
  keep = config.keep_checkpoints
  if not _is_int(keep) or keep < 1:
    raise ValueError(f'config.keep_checkpoints must be a positive integer, got {keep!r}')
  if dataset == SYNTHETIC:
    classes = config.num_classes
    if not _is_int(classes) or classes < 1:
      raise ValueError(f'config.num_classes must be a positive integer, got {classes!r}')
  path = config.pretrained_path
  from vit_jax import storage  # pylint: disable=g-import-not-at-top
  if path and not storage.exists(str(path)):
    raise ValueError(f'config.pretrained_path={path!r} does not exist')
  if path:
    # A release file's name and arrays say which preset it is for: refused here, not
    # after the data pipeline and the model are built.
    release_names.check_pretrained(path, config.model_name)
  # The model must accept the overrides, dtype and image size.
  model = build_model(config, 10 if dataset != SYNTHETIC else config.num_classes)
  try:
    jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, height, width, 3)),
                                      train=False))
  except ValueError as e:
    if 'image size' in str(e):
      raise ValueError(f'config.image_size={tuple(config.image_size)} does not fit '
                       f'config.model_name={config.model_name!r}: {e}') from None
    # Not the image: the preset with its config.model overrides cannot be built.
    raise ValueError(f'config.model_name={config.model_name!r} with config.model '
                     f'{_model_overrides(config)}: {e}') from None

  if dtype == 'bfloat16' and (platform or jax.default_backend()) == 'cpu':
    logging.warning("config.dtype='bfloat16' on a CPU: XLA:CPU has no fast bf16 matmuls "
                    '(ViT-Ti/16 bf16 inference measured at 0.35x of PyTorch on an AMX CPU, and '
                    'no faster than float32); '
                    "use 'float32' here and bf16 on GPU/TPU.")
  return config
