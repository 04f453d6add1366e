"""The one config schema: every field a run reads, with its type and default.

`base_config()` is the only place defaults live. Optional values are typed
placeholders (`config_dict.placeholder(str)`), so every field, optional or
not, can be overridden on the command line on every config
(`--config.data_dir=DIR`, `--config.accumulator_dtype=bfloat16`,
`--config.model.transformer.dropout_rate=0.1`).

`config.model` holds typed placeholders for every field of a model preset
(`vit_jax.configs.models`); the ones that are set override the preset named by
`config.model_name`, the rest keep the preset's value.

`resolve(config)` is what each command calls once, at its edge: it lays a (possibly
partial, possibly plain-dict) config over `base_config()`, refusing unknown
fields and wrong types by name, and returns a complete, locked ConfigDict that
the trainer and the input pipeline read with plain attribute access.

`parse_arg(arg, **defaults)` reads the argument after ':' in
`--config=file.py:ARG` (`ViT-B_16`, `ViT-B_16,runlocal`, `model=ViT-L_16,lr=0.01`),
the way big_vision's configs do.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Any, Mapping, Optional

import ml_collections
from ml_collections import config_dict

from vit_jax.configs import models

_placeholder = config_dict.placeholder

# How `config.posemb_resize` resamples position embeddings (vit_jax.checkpoint).
POSEMB_METHODS = ('linear', 'bicubic')

def _placeholders_like(value: Any) -> Any:
  """A tree of typed placeholders shaped like a preset's fields."""
  if isinstance(value, (Mapping, ml_collections.ConfigDict)):
    items = value.items()
    return ml_collections.ConfigDict({k: _placeholders_like(v) for k, v in items})
  if isinstance(value, bool):
    return _placeholder(bool)
  if isinstance(value, int):
    return _placeholder(int)
  if isinstance(value, float):
    return _placeholder(float)
  if isinstance(value, (tuple, list)):
    return _placeholder(tuple)
  return _placeholder(str)


# Fields of a preset that are not the model's to override (identity, not shape).
_NOT_OVERRIDABLE = ('model_type', 'name')

# Preset fields whose value is None in every preset, with the type they take.
_OPTIONAL_FIELD_TYPES = {
    'representation_size': int,
    'attention_implementation': str,
    'resnet': None,  # a sub-tree, given below
}


# Module fields of every family that no preset sets: the sigmoid-loss head starts at
# this bias (ViT and ResNet alike).
_MODULE_ONLY_FIELDS = {'head_bias_init': float}
# Groups a preset may lack (None): an override that adds one must give these fields.
_GROUP_FIELDS = {'resnet': ('num_layers', 'width_factor')}



def model_overrides() -> ml_collections.ConfigDict:
  """`config.model`: a typed placeholder for every field of every model family."""
  vit = models.get_config('ViT-B_16').to_dict()
  hybrid = models.get_config('R50+ViT-B_16').to_dict()
  resnet = models.get_config('BiT-R50x1').to_dict()
  mixer = models.get_config('Mixer-B_16').to_dict()
  fields: dict[str, Any] = {}
  for preset in (vit, resnet, mixer):
    for key, value in preset.items():
      if key in _NOT_OVERRIDABLE or key in fields:
        continue
      if value is None:
        if key == 'resnet':
          fields[key] = _placeholders_like(hybrid['resnet'])
        elif key in _OPTIONAL_FIELD_TYPES:
          fields[key] = _placeholder(_OPTIONAL_FIELD_TYPES[key])
        else:
          raise TypeError(f'model preset field {key!r} is None: give its type in schema.py')
      else:
        fields[key] = _placeholders_like(value)
  for key, kind in _MODULE_ONLY_FIELDS.items():
    fields[key] = _placeholder(kind)
  return ml_collections.ConfigDict(fields)


def base_config() -> ml_collections.ConfigDict:
  """Every field with its default (docs/training.md explains each)."""
  c = ml_collections.ConfigDict()
  # Model.
  c.model_name = 'ViT-B_16'  # a preset of vit_jax.configs.models
  c.model = model_overrides()  # set fields override the preset's
  c.pretrained_path = _placeholder(str)  # .npz (published layout) to fine-tune from
  # An AugReg release folder (its index.csv and .npz files) and what to take from it:
  # a short model name (its best i21k file by final_val) or a file stem. Sets
  # pretrained_path when that is unset (vit_jax.augreg; configs/augreg.py).
  c.pretrained_dir = _placeholder(str)
  c.augreg_checkpoint = _placeholder(str)
  c.reset_head = True  # fine-tuning starts from a fresh, zero head
  c.posemb_resize = 'linear'  # 'linear' (the reference's zoom) or 'bicubic' (timm's)

  # Data (vit_jax.input_pipeline).
  c.dataset = 'digits'  # TFDS name, 'digits', 'image_folder:/path' or 'synthetic'
  c.data_dir = _placeholder(str)  # TFDS data dir; None: TFDS's default
  c.train_split = 'train'
  c.eval_split = 'test'
  c.image_size = (224, 224)  # (height, width); `--config.image_size=384` is square
  c.pp = ml_collections.ConfigDict(dict(
      # 'inception_crop': random area (min_area..max_area) / aspect crop, resized
      #   (the reference's fine-tuning and pre-training crop);
      # 'resize_crop': resize to image_size + crop_pad, random crop; 'plain': resize.
      train='inception_crop',
      eval='resize',  # 'resize' (the reference's) or 'resize_crop' (central crop)
      crop_pad=_placeholder(int),  # None: round(size / 0.875) - size (224 -> 256)
      flip=True,  # random left-right flips in training
      min_area=0.05,
      max_area=1.0,
      resize_method='bilinear',  # tf.image.resize method
      # RandAugment after the crop and flip (vit_jax.randaugment): (num_layers, magnitude),
      # e.g. (2, 15); None or (0, 0): off. randaug_ops: op names to draw from (None: all 16).
      randaug=_placeholder(tuple),
      randaug_ops=_placeholder(tuple),
  ))
  c.mixup_alpha = 0.0  # > 0: mixup, the weight ~ Beta(alpha, alpha) once per batch
  # 'reverse': each example mixed with the batch reversed, weight as drawn; 'augreg':
  # big_vision's (AugReg's): with its neighbour (the batch rolled by one), max(a, 1 - a).
  c.mixup_form = 'reverse'
  c.shuffle_buffer = 50_000
  c.cache = False
  c.bad_images = 'raise'  # or 'skip'
  c.batch_size = 512  # global, over all devices and processes
  c.eval_batch_size = 512
  c.seed = 0
  # dataset='synthetic' only (timing, machines without TensorFlow):
  c.num_classes = 10
  c.synthetic_noise = 0.5
  c.num_eval_examples = 512

  # Optimisation.
  c.optimizer = 'sgd'  # 'sgd' (momentum) or 'adamw' (Adam, decoupled weight decay)
  c.learning_rate = 0.03
  c.end_learning_rate = 0.0
  c.momentum = 0.9
  c.b1 = 0.9
  c.b2 = 0.999
  c.eps = 1e-8
  c.weight_decay = 0.0
  c.accumulator_dtype = _placeholder(str)  # 'bfloat16': momentum / first moment in bf16
  c.schedule = 'cosine'  # after warm-up: 'cosine', 'linear', 'step' or 'constant'
  c.decay_boundaries = (0.3, 0.6, 0.9)  # 'step': rate / 10 at these fractions of total_steps
  c.warmup_steps = 500
  c.total_steps = 10_000
  c.grad_clip_norm = 1.0  # global norm; 0 turns clipping off
  c.grad_accum_steps = 1  # micro-batches per step (same update, less memory)
  c.loss = 'softmax_xent'  # or 'sigmoid_xent'
  c.label_smoothing = 0.0

  # Compute.
  c.dtype = 'float32'  # or 'bfloat16' (params and optimizer state stay float32)
  # The device mesh (vit_jax.parallel): (axis, size) pairs over the axes 'data' (batch
  # split, model copied) and 'fsdp' (parameters and optimizer state split); -1: the
  # rest of the devices. E.g. (('data', -1), ('fsdp', 16)) on a 256-chip pod.
  c.mesh = (('data', -1),)
  c.fsdp = False  # shorthand for mesh=(('fsdp', -1),): everything sharded over every device

  # Bookkeeping.
  c.log_every = 50
  c.eval_every = 1000  # 0: at the end only
  c.fewshot_every = 0  # few-shot linear eval (vit_jax.fewshot) every N steps and at the end; 0: off
  c.fewshot_shots = (1, 5, 10, 25)  # k images per class
  c.checkpoint_every = 1000  # 0: at the end only
  c.keep_checkpoints = 3
  c.async_checkpoints = True
  c.export_params = False  # also write workdir/params.npz (published layout) at the end
  # A resume that changes a field the trained weights depend on (batch_size, total_steps,
  # the schedule, ...; vit_jax.run_history): 'refuse' it, or 'continue' with the new values.
  c.resume_changes = 'refuse'
  c.prefetch = 2
  return c


def _merge(target: ml_collections.ConfigDict, given: Mapping, path: str) -> None:
  for key, value in given.items():
    name = f'{path}.{key}'
    if key not in target:
      raise ValueError(f'Unknown field {name}; known fields of {path}: '
                       f'{", ".join(sorted(target.keys()))}')
    current = target[key]
    if isinstance(current, ml_collections.ConfigDict):
      if value is None:
        continue  # `model=None`: no overrides
      if not isinstance(value, (Mapping, ml_collections.ConfigDict)):
        raise ValueError(f'{name} must be a mapping of fields, got {value!r}')
      _merge(current, value, name)
      continue
    if key == 'image_size' and path == 'config' and value is not None:
      value = _as_tuple(value)
    if key == 'mesh' and path == 'config' and isinstance(value, (list, tuple)):
      value = tuple(tuple(a) if isinstance(a, (list, tuple)) else a for a in value)
    try:
      target[key] = value
    except TypeError as e:
      raise ValueError(f'{name}={value!r} has the wrong type: {e}') from None


def _as_tuple(value: Any) -> Any:
  if isinstance(value, list):
    return tuple(value)
  if isinstance(value, int) and not isinstance(value, bool):
    return (value, value)
  return value


# A config `resolve` returned: complete (every field of `base_config`), type-checked,
# locked (no field can be added, every value keeps its type). Each command resolves
# its config once, at its edge; the helpers it calls take this and read it as it is.
Config = ml_collections.ConfigDict


def resolve(config: Any) -> Config:
  """`config` laid over `base_config()`: complete, type-checked, locked.

  Accepts a ConfigDict (e.g. from `--config`) or a plain dict with any subset
  of the fields. An unknown field or a value of the wrong type raises
  ValueError naming the field.
  """
  if isinstance(config, ml_collections.ConfigDict):
    given = config.to_dict()
  elif isinstance(config, Mapping):
    given = dict(config)
  else:
    raise ValueError(f'A config must be a ConfigDict or a dict, got {type(config).__name__}')
  out = base_config()
  _merge(out, given, 'config')
  if isinstance(out.image_size, tuple) and len(out.image_size) == 1:
    out.image_size = out.image_size * 2  # `--config.image_size=384` arrives as (384,)
  if out.augreg_checkpoint and not out.pretrained_path:
    from vit_jax import augreg  # pylint: disable=g-import-not-at-top
    if not out.pretrained_dir:
      raise ValueError(f'config.augreg_checkpoint={out.augreg_checkpoint!r} needs '
                       'config.pretrained_dir: the folder of the release\'s index.csv')
    out.pretrained_path = augreg.pretrained_file(out.pretrained_dir, out.augreg_checkpoint)
  out.lock()
  return out


def replace(config: Config, **fields: Any) -> Config:
  """`config` with `fields` replaced, resolved (configs are locked); a dotted name
  ('model.transformer.num_layers') replaces a nested field."""
  values = config.to_dict()
  for name, value in fields.items():
    node = values
    *parents, leaf = name.split('.')
    for parent in parents:
      node = node[parent]
    node[leaf] = value
  return resolve(values)


def model_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The preset `config.model_name` with the set fields of `config.model` applied."""
  name = config.model_name
  if not name or not isinstance(name, str):
    raise ValueError(f'config.model_name must name a model preset, got {name!r}; '
                     f'valid names: {", ".join(models.names())}')
  try:
    preset = models.get_config(name)
  except ValueError as e:
    raise ValueError(f'config.model_name: {e}') from None
  overrides = _set_fields(config.model.to_dict() if config.model is not None else {})
  with preset.unlocked():
    _apply(preset, overrides, 'config.model', name)
  return preset


def _set_fields(tree: Mapping) -> dict:
  """The non-None leaves of a placeholder tree, as a nested dict."""
  out = {}
  for key, value in tree.items():
    if isinstance(value, Mapping):
      sub = _set_fields(value)
      if sub:
        out[key] = sub
    elif value is not None:
      out[key] = value
  return out


def _apply(preset: ml_collections.ConfigDict, overrides: Mapping, path: str,
           name: str) -> None:
  for key, value in overrides.items():
    field = f'{path}.{key}'
    if key not in preset and path == 'config.model' and key in _MODULE_ONLY_FIELDS:
      preset[key] = value
      continue
    if key not in preset:
      raise ValueError(f'{field} does not apply to model {name!r} (a '
                       f'{preset.get("model_type", "vit")} preset; its fields: '
                       f'{", ".join(sorted(preset.keys()))})')
    current = preset[key]
    if isinstance(value, Mapping):
      if current is None:
        needed = [f for f in _GROUP_FIELDS.get(key, ()) if f not in value]
        if needed:
          raise ValueError(
              f'{field}.{next(iter(value))} does not apply to model {name!r}: it has no '
              f'{key} ({field} is None); a new {field} needs {", ".join(_GROUP_FIELDS[key])} '
              f'(missing: {", ".join(needed)}), or choose a preset that has one')
        preset[key] = ml_collections.ConfigDict(value)

      elif isinstance(current, ml_collections.ConfigDict):
        _apply(current, value, field, name)
      else:
        raise ValueError(f'{field} is not a group of fields in model {name!r}')
    else:
      preset[key] = tuple(value) if isinstance(value, list) else value


# ---------------------------------------------------------------------------
# Config-file arguments.
# ---------------------------------------------------------------------------


def parse_arg(arg: Optional[str], **defaults: Any) -> ml_collections.ConfigDict:
  """`'ViT-L_16,runlocal,steps=100'` -> ConfigDict(model='ViT-L_16', runlocal=True, steps=100).

  A bare first word that is not a flag names the model preset (`model`);
  `key=value` sets a value of the type of its default; a bare known flag sets a
  boolean default to True. Unknown keys raise ValueError listing the known ones.
  """
  result = ml_collections.ConfigDict(dict(defaults))
  if not arg:
    return result
  for index, token in enumerate(t.strip() for t in arg.split(',')):
    if not token:
      continue
    if '=' in token:
      key, text = (s.strip() for s in token.split('=', 1))
    elif isinstance(defaults.get(token), bool):
      key, text = token, 'True'
    elif index == 0 and 'model' in defaults:
      key, text = 'model', token
    else:
      key, text = token, None
    if key not in defaults:
      raise ValueError(f'Unknown config argument {key!r} in {arg!r}; known: '
                       f'{", ".join(sorted(defaults))}')
    default = defaults[key]
    if isinstance(default, bool):
      value = text.lower() in ('1', 'true', 'yes', '')
    elif isinstance(default, int):
      value = int(text)
    elif isinstance(default, float):
      value = float(text)
    else:
      value = text
    result[key] = value
  if 'model' in result and isinstance(result.model, str):
    result.model = models.canonical_name(result.model)
    models.get_config(result.model)  # ValueError listing the valid names
  return result


def load_file(spec: str) -> ml_collections.ConfigDict:
  """`get_config(arg)` of a config file given as `path` or `path:arg`, as the file gives it
  (the command that reads it resolves it, at its edge).

  The same `path:arg` form as `--config=` on the command line (absl's
  config_flags), for tools that take a config file as a plain argument.
  """
  path, arg = spec, None
  if not os.path.exists(spec) and ':' in spec:
    path, _, arg = spec.rpartition(':')
  if not os.path.isfile(path):
    raise FileNotFoundError(f'config file {path!r} does not exist')
  module_spec = importlib.util.spec_from_file_location(
      f'_vit_jax_config_{abs(hash(os.path.abspath(path)))}', path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg) if arg else module.get_config()
