"""Our ViT tree and the PyTorch ViTs (timm, Hugging Face transformers): what they share.

Our tree (the published layout) and the two PyTorch models compute the same
function once the arrays are laid out their way:

| ours                                   | timm `VisionTransformer`   | HF `ViTForImageClassification`            |
|----------------------------------------|----------------------------|-------------------------------------------|
| cls (1,1,D)                            | cls_token                  | vit.embeddings.cls_token                  |
| embedding/kernel (P,P,3,D) HWIO        | patch_embed.proj (OIHW)    | vit.embeddings.patch_embeddings.projection |
| Transformer/posembed_input/pos_embedding | pos_embed                | vit.embeddings.position_embeddings        |
| encoderblock_i/LayerNorm_0             | blocks.i.norm1             | layernorm_before                          |
| .../{query,key,value} (D,H,d)          | blocks.i.attn.qkv (fused)  | q_proj/k_proj/v_proj (or attention.attention.query...) |
| .../out (H,d,D)                        | blocks.i.attn.proj         | o_proj (or attention.output.dense)        |
| encoderblock_i/LayerNorm_2             | blocks.i.norm2             | layernorm_after                           |
| MlpBlock_3/Dense_0, Dense_1 (in,out)   | blocks.i.mlp.fc1, fc2      | mlp.fc1/fc2 (or intermediate/output.dense) |
| Transformer/encoder_norm               | norm                       | vit.layernorm                             |
| head (D,C)                             | head (C,D)                 | classifier                                |

A torch Linear stores (out, in), so dense kernels are transposed. Both
libraries need LayerNorm eps 1e-6, which `build_timm_model` and `hf_config_dict`
set.

GELU: our models compute the tanh form by default (`approximate_gelu=True`,
what the published checkpoints were trained with); timm and HF ViTs compute the
exact erf form. The two differ by 3e-4 to 6.5e-4 in a ViT's logits, so:
- weights read from timm / HF compute their function in our model only with
  `approximate_gelu=False`: build it from `pytorch_model_config(config)`, as
  `convert_file` does (`from_timm` / `from_hf` warn about a tanh config);
- exports follow the config: `hf_config_dict` says
  `hidden_act='gelu_pytorch_tanh'` (HF's name for the tanh form) or `'gelu'`,
  and `timm_kwargs` / `build_timm_model` give `act_layer='gelu_tanh'` or
  `'gelu'`. A timm state dict cannot record its activation, so `to_timm` warns
  that a timm ViT built the usual way will compute exact GELU.

What the PyTorch models cannot express is refused with a ValueError: the
representation layer (`pre_logits`; current timm and HF have none), the
R50 hybrid, and 'gap' pooling in HF (its classifier always reads token 0).
'gap' in timm is `class_token=False, global_pool='avg', fc_norm=False`.

State dicts may hold torch tensors or numpy arrays; exports return numpy
arrays (`torch_state_dict` turns them into tensors). torch, timm and
transformers are imported only inside the functions that need them.
"""

from __future__ import annotations

import copy
import json
import os
from typing import Any, Mapping, Optional

from absl import logging
import numpy as np

from vit_jax import checkpoint


LAYER_NORM_EPSILON = 1e-6
HF_LAYOUTS = ('modern', 'classic')

_HF_COMMON = {
    'cls': 'vit.embeddings.cls_token',
    'posemb': 'vit.embeddings.position_embeddings',
    'embedding': 'vit.embeddings.patch_embeddings.projection',
    'encoder_norm': 'vit.layernorm',
    'head': 'classifier',
}
_HF_BLOCK = {
    'modern': {
        'ln1': 'vit.layers.{i}.layernorm_before',
        'query': 'vit.layers.{i}.attention.q_proj',
        'key': 'vit.layers.{i}.attention.k_proj',
        'value': 'vit.layers.{i}.attention.v_proj',
        'out': 'vit.layers.{i}.attention.o_proj',
        'ln2': 'vit.layers.{i}.layernorm_after',
        'fc1': 'vit.layers.{i}.mlp.fc1',
        'fc2': 'vit.layers.{i}.mlp.fc2',
    },
    'classic': {
        'ln1': 'vit.encoder.layer.{i}.layernorm_before',
        'query': 'vit.encoder.layer.{i}.attention.attention.query',
        'key': 'vit.encoder.layer.{i}.attention.attention.key',
        'value': 'vit.encoder.layer.{i}.attention.attention.value',
        'out': 'vit.encoder.layer.{i}.attention.output.dense',
        'ln2': 'vit.encoder.layer.{i}.layernorm_after',
        'fc1': 'vit.encoder.layer.{i}.intermediate.dense',
        'fc2': 'vit.encoder.layer.{i}.output.dense',
    },
}
_OURS_BLOCK = 'Transformer/encoderblock_{i}/'
_ATTN = 'MultiHeadDotProductAttention_1/'


# ---------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------

def _numpy_dict(state_dict: Mapping[str, Any]) -> dict[str, np.ndarray]:
  sd = {str(k): checkpoint._to_numpy(v) for k, v in state_dict.items()}  # pylint: disable=protected-access
  # Checkpoints saved from DistributedDataParallel / torch.compile wrappers.
  for prefix in ('module.', '_orig_mod.'):
    if sd and all(k.startswith(prefix) for k in sd):
      sd = {k[len(prefix):]: v for k, v in sd.items()}
  return sd


def _resolve(model_config: Any) -> Any:
  return checkpoint._resolve_config(model_config)  # pylint: disable=protected-access


def _get(config: Any, name: str, default: Any = None) -> Any:
  return checkpoint._config_get(config, name, default)  # pylint: disable=protected-access


def _check_plain_vit(flat: Mapping[str, Any], target: str) -> None:
  family = checkpoint.model_family(flat)
  if family != 'vit':
    raise ValueError(f'{target} conversion supports plain ViTs only; these params are a '
                     f'{family!r} model')
  if any(k.startswith('pre_logits/') for k in flat):
    raise ValueError(
        f'{target} has no representation layer (pre_logits {flat["pre_logits/kernel"].shape}); '
        'fine-tune without it (checkpoint.load_pretrained drops it) before exporting')


def _num_layers(flat: Mapping[str, Any]) -> int:
  n = 0
  while f'{_OURS_BLOCK.format(i=n)}LayerNorm_0/scale' in flat:
    n += 1
  return n


def _count_indices(keys, template: str) -> int:
  n = 0
  while any(k.startswith(template.format(i=n) + '.') for k in keys):
    n += 1
  return n


class _Taker:
  """Pops keys from a state dict; remembers what was missing."""

  def __init__(self, sd: dict[str, np.ndarray], source: str):
    self.sd = dict(sd)
    self.source = source
    self.missing: list[str] = []

  def __call__(self, key: str) -> Optional[np.ndarray]:
    if key not in self.sd:
      self.missing.append(key)
      return None
    return self.sd.pop(key)

  def optional(self, key: str) -> Optional[np.ndarray]:
    return self.sd.pop(key, None)

  def finish(self) -> None:
    if self.missing or self.sd:
      parts = [f'{self.source} state dict does not fit a ViT:']
      if self.missing:
        parts.append(f'missing keys ({len(self.missing)}):\n  ' + '\n  '.join(self.missing))
      if self.sd:
        parts.append(f'unexpected keys ({len(self.sd)}):\n  ' + '\n  '.join(
            f'{k} {tuple(v.shape)}' for k, v in sorted(self.sd.items())))
      raise ValueError('\n'.join(parts))


def _dense_from_torch(weight: np.ndarray) -> np.ndarray:
  return np.ascontiguousarray(weight.T)


def _conv_from_torch(weight: np.ndarray) -> np.ndarray:
  return np.ascontiguousarray(weight.transpose(2, 3, 1, 0))  # OIHW -> HWIO


def _conv_to_torch(kernel: np.ndarray) -> np.ndarray:
  return np.ascontiguousarray(kernel.transpose(3, 2, 0, 1))  # HWIO -> OIHW


def uses_tanh_gelu(model_config: Any) -> bool:
  """Whether the model config computes the tanh GELU (the default, as in the presets)."""
  return bool(_get(_resolve(model_config), 'approximate_gelu', True))


def pytorch_model_config(model_config: Any) -> Any:
  """A copy of `model_config` (a config, dict or preset name) with `approximate_gelu=False`.

  The model that computes what timm and Hugging Face ViTs compute (exact erf
  GELU): build it for weights read with `from_timm` / `from_hf`.
  """
  config = _resolve(model_config)
  if isinstance(config, Mapping):
    return dict(config, approximate_gelu=False)
  if not hasattr(config, 'unlocked'):
    raise TypeError(f'model config must be a ConfigDict, a dict or a preset name, '
                    f'got {type(config).__name__}')
  config = copy.deepcopy(config)
  with config.unlocked():  # a locked config refuses a field its preset lacked
    config.approximate_gelu = False
  return config


def _with_approximate_gelu(config: Any, approximate: bool) -> Any:
  if approximate:
    config = copy.deepcopy(_resolve(config))
    with config.unlocked():
      config.approximate_gelu = True
    return config
  return pytorch_model_config(config)


# transformers' names of the tanh approximation, and of the exact form.
_HF_TANH_ACTS = ('gelu_pytorch_tanh', 'gelu_new', 'gelu_fast')
_HF_EXACT_ACTS = ('gelu',)


def hf_directory_uses_tanh_gelu(path: str) -> bool:
  """Whether a HF model directory's config.json says tanh GELU; False for a bare file.

  ValueError for an activation this ViT cannot compute.
  """
  config_path = os.path.join(path, 'config.json')
  if not os.path.isdir(path) or not os.path.exists(config_path):
    return False
  try:
    with open(config_path, encoding='utf-8') as f:
      fields = json.load(f)
  except (OSError, ValueError) as e:
    raise ValueError(f'Cannot read {config_path!r}: {e}') from None
  act = fields.get('hidden_act', 'gelu') if isinstance(fields, dict) else None
  if act in _HF_TANH_ACTS:
    return True
  if act in _HF_EXACT_ACTS:
    return False
  raise ValueError(f'{config_path!r} says hidden_act={act!r}; this ViT computes '
                   f'{_HF_EXACT_ACTS + _HF_TANH_ACTS} only')


def _warn_if_tanh(config: Any, source: str) -> None:
  if config is not None and uses_tanh_gelu(config):
    logging.warning(
        '%s computes exact (erf) GELU, but this model config says approximate_gelu=True '
        '(tanh): its logits will differ from %s by up to ~6e-4. Build the model from '
        'convert.pytorch_model_config(config) to reproduce them.', source, source)


def _heads_from_config(config: Any, hidden: int) -> int:
  transformer = _get(config, 'transformer')
  heads = _get(transformer, 'num_heads')
  if not heads:
    raise ValueError('model config has no transformer.num_heads (needed to split attention heads)')
  if hidden % heads:
    raise ValueError(f'hidden size {hidden} is not divisible by num_heads {heads}')
  return int(heads)


def _qkv_kernel(weight: np.ndarray, bias: np.ndarray, heads: int) -> tuple[np.ndarray, np.ndarray]:
  """torch Linear (H*d, D) -> our DenseGeneral (D, H, d) kernel and (H, d) bias."""
  inner, hidden = weight.shape
  if inner % heads:
    raise ValueError(f'projection of {inner} features cannot be split into {heads} heads')
  kernel = weight.T.reshape(hidden, heads, inner // heads)
  return np.ascontiguousarray(kernel), bias.reshape(heads, inner // heads)


def _out_kernel(weight: np.ndarray, heads: int) -> np.ndarray:
  """torch Linear (D, H*d) -> our (H, d, D)."""
  hidden, inner = weight.shape
  return np.ascontiguousarray(weight.T.reshape(heads, inner // heads, hidden))


def _expected_params(flat: Mapping[str, Any], config: Any, source: str) -> dict:
  """The tree of shapes the `config` model has for weights `flat` (arrays or ArraySpecs).

  The class count is read off the head and the resolution off the position
  embeddings; weights without a head (a timm model with num_classes=0, a HF
  `ViTModel`) are expected without one: `checkpoint.load_pretrained` adds a fresh one.
  """
  if checkpoint.POSEMB_KEY not in flat and not (
      is_mixer_config(config) and checkpoint.MIXER_GRID_KEY in flat):
    raise ValueError(f'{source} weights have no position embeddings '
                     f'({checkpoint.POSEMB_KEY}): not a ViT of this layout')
  has_head = 'head/kernel' in flat
  num_classes = int(flat['head/kernel'].shape[-1]) if has_head else 1
  try:
    image_size = checkpoint.infer_image_size(flat, config)
  except ValueError as e:
    raise ValueError(f'{source} weights: {e}') from None
  expected = checkpoint.abstract_params(config, num_classes, image_size)
  if not has_head:
    logging.info('%s weights have no classification head', source)
    expected.pop('head', None)
  return expected


def check_against_config(flat: Mapping[str, Any], config: Any, source: str,
                         path: Optional[str] = None) -> None:
  """ValueError naming every key and shape where weights `flat` differ from the `config` model.

  `flat` is a flat dict of arrays or of `checkpoint.ArraySpec`s (headers), so
  a file can be checked before its data is read. `source` ('npz', 'converted
  timm') labels the weights in the message, `path` the file they came from.
  """
  config = _resolve(config)
  label = f'{source} weights'
  expected = _expected_params(flat, config, f'{label} {path!r}' if path else label)
  hints = []
  if 'pre_logits/kernel' in flat and not _get(config, 'representation_size'):
    hints.append(f'the weights have a representation layer of size '
                 f'{flat["pre_logits/kernel"].shape[-1]}: set representation_size, '
                 '--representation_size on the command line')
  if ('cls' not in flat and not is_mixer_config(config)
      and _get(config, 'classifier', 'token') == 'token'):
    hints.append("the weights have no class token: set classifier='gap', --classifier gap "
                 'on the command line')
  name = _get(config, 'name', '')
  title = (f'{label}{f" {path!r}" if path else ""} do not fit the '
           f'{f"{name} " if name else ""}model:')
  try:
    checkpoint.check_params(checkpoint.unflatten(dict(flat)), expected, source=label,
                            title=title)
  except checkpoint.ModelMismatchError as e:
    e.notes.extend(hints)
    raise
  except ValueError as e:
    hint = ''.join(f'\n({h})' for h in hints)
    raise ValueError(f'{e}{hint}') from None


def _finish_params(flat: dict[str, np.ndarray], config: Any, source: str) -> dict:
  """Checks converted params against the model built from `config`; returns the tree."""
  params = checkpoint.unflatten(flat)
  if config is not None:
    check_against_config(flat, config, f'converted {source}')
  return params


def _check_dims(config: Any, hidden: int, num_layers: int, mlp_dim: int, source: str) -> None:
  if config is None:
    return
  want = (_get(config, 'hidden_size'), _get(_get(config, 'transformer'), 'num_layers'),
          _get(_get(config, 'transformer'), 'mlp_dim'))
  have = (hidden, num_layers, mlp_dim)
  if tuple(want) != have:
    raise ValueError(
        f'{source} weights have (hidden_size, num_layers, mlp_dim) = {have}, but the model '
        f'config {_get(config, "name", "")!r} has {tuple(want)}')
  if _get(config, 'resnet'):
    raise ValueError(f'{source} conversion supports plain ViTs only, not the ResNet hybrid')


def is_mixer_config(model_config: Any) -> bool:
  return _get(_resolve(model_config), 'model_type', 'vit') == 'mixer'
