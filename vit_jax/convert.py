"""Converting ViT weights to and from PyTorch: timm and Hugging Face transformers.

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

Transformers 5 renamed the per-layer modules
(`vit.layers.i.attention.q_proj`); the Hub's files keep the classic names
(`vit.encoder.layer.i.attention.attention.query`). Both are read; exports use
the names of the installed transformers unless `layout` says otherwise.

MLP-Mixer presets convert to and from timm's `MlpMixer` (`mixer_b16_224` and
friends): `stem` <-> `stem.proj`, `MixerBlock_i/LayerNorm_{0,1}` <->
`blocks.i.norm{1,2}`, `token_mixing` / `channel_mixing` `Dense_{0,1}` <->
`blocks.i.mlp_tokens` / `mlp_channels` `fc{1,2}`, `pre_head_layer_norm` <->
`norm`, `head` <-> `head`; timm's Mixer computes exact GELU too. Hugging Face
has no Mixer.

What the PyTorch models cannot express is refused with a ValueError: the
representation layer (`pre_logits`; current timm and HF have none), the
R50 hybrid, and 'gap' pooling in HF (its classifier always reads token 0).
'gap' in timm is `class_token=False, global_pool='avg', fc_norm=False`.

State dicts may hold torch tensors or numpy arrays; exports return numpy
arrays (`torch_state_dict` turns them into tensors). torch, timm and
transformers are imported only inside the functions that need them.

CLI:
  python -m vit_jax.convert --from timm --to npz --model ViT-B_16 --input vit.pth --output vit.npz
  python -m vit_jax.convert --from npz --to hf --model ViT-B_16 --input ViT-B_16.npz --output hf_dir/

Why one module of this size: each direction (ours <-> timm, ours <-> HF, torch
files, safetensors, HF directories) is a table of renames and transposes plus the
verification that reads the written file back and compares logits; they share the
key tables above, which is what a reader checks them against.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import errno
import functools

import json
import os
import shutil
import sys
from typing import Any, Mapping, Optional, Sequence

from absl import logging
import numpy as np

from vit_jax import checkpoint
from vit_jax import cli


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


# ---------------------------------------------------------------------------
# timm
# ---------------------------------------------------------------------------

_MIXER_TIMM = (('LayerNorm_0/scale', 'norm1.weight'), ('LayerNorm_0/bias', 'norm1.bias'),
               ('LayerNorm_1/scale', 'norm2.weight'), ('LayerNorm_1/bias', 'norm2.bias'))
_MIXER_TIMM_MLPS = (('token_mixing', 'mlp_tokens'), ('channel_mixing', 'mlp_channels'))


def is_mixer_config(model_config: Any) -> bool:
  return _get(_resolve(model_config), 'model_type', 'vit') == 'mixer'


def _mixer_num_blocks(flat: Mapping[str, Any]) -> int:
  n = 0
  while f'MixerBlock_{n}/LayerNorm_0/scale' in flat:
    n += 1
  return n


def _mixer_to_timm(flat: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  sd = {'stem.proj.weight': _conv_to_torch(flat['stem/kernel']),
        'stem.proj.bias': flat['stem/bias']}
  for i in range(_mixer_num_blocks(flat)):
    p, t = f'MixerBlock_{i}/', f'blocks.{i}.'
    for ours, theirs in _MIXER_TIMM:
      sd[t + theirs] = flat[p + ours]
    for ours, theirs in _MIXER_TIMM_MLPS:
      for j in range(2):
        sd[f'{t}{theirs}.fc{j + 1}.weight'] = _dense_from_torch(
            flat[f'{p}{ours}/Dense_{j}/kernel'])
        sd[f'{t}{theirs}.fc{j + 1}.bias'] = flat[f'{p}{ours}/Dense_{j}/bias']
  sd['norm.weight'] = flat['pre_head_layer_norm/scale']
  sd['norm.bias'] = flat['pre_head_layer_norm/bias']
  if 'head/kernel' in flat:
    sd['head.weight'] = _dense_from_torch(flat['head/kernel'])
    sd['head.bias'] = flat['head/bias']
  return sd


def _mixer_from_timm(state_dict: Mapping[str, Any], config: Any) -> dict:
  take = _Taker(_numpy_dict(state_dict), 'timm')
  flat = {}
  stem = take('stem.proj.weight')
  if stem is None:
    take.finish()
  flat['stem/kernel'] = _conv_from_torch(stem)
  flat['stem/bias'] = take('stem.proj.bias')
  for i in range(_count_indices(take.sd, 'blocks.{i}')):
    p, t = f'MixerBlock_{i}/', f'blocks.{i}.'
    for ours, theirs in _MIXER_TIMM:
      flat[p + ours] = take(t + theirs)
    for ours, theirs in _MIXER_TIMM_MLPS:
      for j in range(2):
        w = take(f'{t}{theirs}.fc{j + 1}.weight')
        if w is not None:
          flat[f'{p}{ours}/Dense_{j}/kernel'] = _dense_from_torch(w)
        flat[f'{p}{ours}/Dense_{j}/bias'] = take(f'{t}{theirs}.fc{j + 1}.bias')
  flat['pre_head_layer_norm/scale'] = take('norm.weight')
  flat['pre_head_layer_norm/bias'] = take('norm.bias')
  head_w = take.optional('head.weight')
  if head_w is not None:
    flat['head/kernel'] = _dense_from_torch(head_w)
    flat['head/bias'] = take('head.bias')
  take.finish()
  return _finish_params(flat, config, 'timm')


def mixer_timm_kwargs(model_config: Any, num_classes: int,
                      image_size: Sequence[int]) -> dict[str, Any]:
  """Keyword arguments of timm's `MlpMixer` computing the same function as our Mixer."""
  import torch  # pylint: disable=g-import-not-at-top
  config = _resolve(model_config)
  hidden = int(_get(config, 'hidden_dim'))
  patch = tuple(int(s) for s in _get(_get(config, 'patches'), 'size'))
  height, width = (int(s) for s in image_size)
  if patch[0] != patch[1] or height != width:
    raise ValueError(f'timm MlpMixer takes square patches and images, got patch {patch} '
                     f'and image {height}x{width}')
  tanh = uses_tanh_gelu(config)
  return dict(
      num_classes=int(num_classes), img_size=height, patch_size=patch[0],
      num_blocks=int(_get(config, 'num_blocks')), embed_dim=hidden,
      mlp_ratio=(int(_get(config, 'tokens_mlp_dim')) / hidden,
                 int(_get(config, 'channels_mlp_dim')) / hidden),
      norm_layer=functools.partial(torch.nn.LayerNorm, eps=LAYER_NORM_EPSILON),
      # timm's Mixer default is the exact erf GELU.
      act_layer=(functools.partial(torch.nn.GELU, approximate='tanh') if tanh
                 else torch.nn.GELU))


def build_timm_mixer(model_config: Any, num_classes: int, image_size: Sequence[int]):
  """A randomly initialised timm `MlpMixer` (eval mode) matching our Mixer."""
  from timm.models import mlp_mixer  # pylint: disable=g-import-not-at-top
  config = _resolve(model_config)
  model = mlp_mixer.MlpMixer(**mixer_timm_kwargs(config, num_classes, image_size))
  block = model.blocks[0] if len(model.blocks) else None
  want = (int(_get(config, 'tokens_mlp_dim')), int(_get(config, 'channels_mlp_dim')))
  if block is not None and (block.mlp_tokens.fc1.out_features,
                            block.mlp_channels.fc1.out_features) != want:
    raise ValueError(f'timm rounded the Mixer MLP sizes to '
                     f'{(block.mlp_tokens.fc1.out_features, block.mlp_channels.fc1.out_features)}'
                     f', not {want}')
  return model.eval()


def to_timm(params: Mapping, approximate_gelu: bool = True) -> dict[str, np.ndarray]:
  """Our params -> a timm `VisionTransformer` (or, for a Mixer, `MlpMixer`) state dict.

  `approximate_gelu`: the GELU of the model these params belong to. The state
  dict cannot say which GELU to use; with True (tanh) the timm model must be
  built with `act_layer='gelu_tanh'` (`timm_kwargs` does) to give our logits,
  which is logged as a warning.
  """
  flat = {k: checkpoint._to_numpy(v) for k, v in checkpoint.flatten(params).items()}  # pylint: disable=protected-access
  if checkpoint.model_family(flat) == 'mixer':
    if approximate_gelu:
      logging.warning('to_timm: these Mixer params are for tanh GELU; timm\'s MlpMixer computes '
                      'exact GELU unless built with act_layer=GELU(approximate="tanh") '
                      '(convert.mixer_timm_kwargs)')
    return _mixer_to_timm(flat)
  _check_plain_vit(flat, 'timm')
  if approximate_gelu:
    logging.warning(
        "to_timm: these params are for tanh GELU, which a timm state dict cannot record; a "
        "timm ViT built the usual way computes exact GELU, differing by up to ~6e-4 in "
        "logits. Build it with act_layer='gelu_tanh' (convert.timm_kwargs) to match.")
  sd = {}
  if 'cls' in flat:
    sd['cls_token'] = flat['cls']
  sd['pos_embed'] = flat[checkpoint.POSEMB_KEY]
  sd['patch_embed.proj.weight'] = _conv_to_torch(flat['embedding/kernel'])
  sd['patch_embed.proj.bias'] = flat['embedding/bias']
  for i in range(_num_layers(flat)):
    p, t = _OURS_BLOCK.format(i=i), f'blocks.{i}.'
    sd[t + 'norm1.weight'] = flat[p + 'LayerNorm_0/scale']
    sd[t + 'norm1.bias'] = flat[p + 'LayerNorm_0/bias']
    qkv_w, qkv_b = [], []
    for name in ('query', 'key', 'value'):
      kernel = flat[f'{p}{_ATTN}{name}/kernel']
      qkv_w.append(kernel.reshape(kernel.shape[0], -1).T)
      qkv_b.append(flat[f'{p}{_ATTN}{name}/bias'].reshape(-1))
    sd[t + 'attn.qkv.weight'] = np.ascontiguousarray(np.concatenate(qkv_w, axis=0))
    sd[t + 'attn.qkv.bias'] = np.concatenate(qkv_b, axis=0)
    out = flat[f'{p}{_ATTN}out/kernel']
    sd[t + 'attn.proj.weight'] = np.ascontiguousarray(out.reshape(-1, out.shape[-1]).T)
    sd[t + 'attn.proj.bias'] = flat[f'{p}{_ATTN}out/bias']
    sd[t + 'norm2.weight'] = flat[p + 'LayerNorm_2/scale']
    sd[t + 'norm2.bias'] = flat[p + 'LayerNorm_2/bias']
    for j in range(2):
      sd[t + f'mlp.fc{j + 1}.weight'] = _dense_from_torch(flat[f'{p}MlpBlock_3/Dense_{j}/kernel'])
      sd[t + f'mlp.fc{j + 1}.bias'] = flat[f'{p}MlpBlock_3/Dense_{j}/bias']
  sd['norm.weight'] = flat['Transformer/encoder_norm/scale']
  sd['norm.bias'] = flat['Transformer/encoder_norm/bias']
  if 'head/kernel' in flat:  # else: a timm model with num_classes=0
    sd['head.weight'] = _dense_from_torch(flat['head/kernel'])
    sd['head.bias'] = flat['head/bias']
  return sd


def from_timm(state_dict: Mapping[str, Any], model_config: Any) -> dict:
  """A timm `VisionTransformer` state dict -> our params, checked against `model_config`.

  `model_config` (a config or preset name) supplies the head count, which a fused
  qkv matrix does not reveal; the result is checked against the model it builds.
  timm computes exact GELU: run the result in the model of
  `pytorch_model_config(model_config)` (a tanh config is warned about).
  """
  config = _resolve(model_config)
  _warn_if_tanh(config, 'timm')
  if is_mixer_config(config):
    return _mixer_from_timm(state_dict, config)
  take = _Taker(_numpy_dict(state_dict), 'timm')
  flat = {}
  cls = take.optional('cls_token')
  if cls is not None:
    flat['cls'] = cls
  if 'fc_norm.weight' in take.sd:
    raise ValueError('timm model has fc_norm (LayerNorm after average pooling), which this '
                     "ViT does not have; build it with global_pool='avg', fc_norm=False")
  for extra in ('reg_token', 'attn_pool.latent'):
    if extra in take.sd:
      raise ValueError(f'timm model has {extra!r}, which this ViT does not support')
  flat[checkpoint.POSEMB_KEY] = take('pos_embed')
  patch_w = take('patch_embed.proj.weight')
  if patch_w is None:
    take.finish()
  flat['embedding/kernel'] = _conv_from_torch(patch_w)
  flat['embedding/bias'] = take('patch_embed.proj.bias')
  hidden = flat['embedding/kernel'].shape[-1]
  heads = _heads_from_config(config, hidden)
  num_layers = _count_indices(take.sd, 'blocks.{i}')
  mlp_dim = None
  for i in range(num_layers):
    p, t = _OURS_BLOCK.format(i=i), f'blocks.{i}.'
    flat[p + 'LayerNorm_0/scale'] = take(t + 'norm1.weight')
    flat[p + 'LayerNorm_0/bias'] = take(t + 'norm1.bias')
    qkv_w, qkv_b = take(t + 'attn.qkv.weight'), take(t + 'attn.qkv.bias')
    if qkv_w is not None and qkv_b is not None:
      if qkv_w.shape[0] % 3:
        raise ValueError(f'{t}attn.qkv.weight has shape {qkv_w.shape}: not 3 stacked projections')
      for name, w, b in zip(('query', 'key', 'value'), np.split(qkv_w, 3, axis=0),
                            np.split(qkv_b, 3, axis=0)):
        kernel, bias = _qkv_kernel(w, b, heads)
        flat[f'{p}{_ATTN}{name}/kernel'] = kernel
        flat[f'{p}{_ATTN}{name}/bias'] = bias
    proj = take(t + 'attn.proj.weight')
    if proj is not None:
      flat[f'{p}{_ATTN}out/kernel'] = _out_kernel(proj, heads)
    flat[f'{p}{_ATTN}out/bias'] = take(t + 'attn.proj.bias')
    flat[p + 'LayerNorm_2/scale'] = take(t + 'norm2.weight')
    flat[p + 'LayerNorm_2/bias'] = take(t + 'norm2.bias')
    for j in range(2):
      w = take(t + f'mlp.fc{j + 1}.weight')
      if w is not None:
        flat[f'{p}MlpBlock_3/Dense_{j}/kernel'] = _dense_from_torch(w)
        mlp_dim = w.shape[0] if j == 0 else mlp_dim
      flat[f'{p}MlpBlock_3/Dense_{j}/bias'] = take(t + f'mlp.fc{j + 1}.bias')
  flat['Transformer/encoder_norm/scale'] = take('norm.weight')
  flat['Transformer/encoder_norm/bias'] = take('norm.bias')
  # Old timm versions had a representation layer.
  pre_w = take.optional('pre_logits.fc.weight')
  if pre_w is not None:
    flat['pre_logits/kernel'] = _dense_from_torch(pre_w)
    flat['pre_logits/bias'] = take('pre_logits.fc.bias')
  head_w = take.optional('head.weight')
  if head_w is not None:  # timm models built with num_classes=0 have none
    flat['head/kernel'] = _dense_from_torch(head_w)
    flat['head/bias'] = take('head.bias')
  take.finish()
  _check_dims(config, hidden, num_layers, mlp_dim, 'timm')
  return _finish_params(flat, config, 'timm')


def timm_kwargs(model_config: Any, num_classes: int,
                image_size: Sequence[int]) -> dict[str, Any]:
  """Keyword arguments of timm's `VisionTransformer` computing the same function as ours."""
  config = _resolve(model_config)
  if _get(config, 'resnet'):
    raise ValueError('timm conversion supports plain ViTs only, not the ResNet hybrid')
  if _get(config, 'representation_size'):
    raise ValueError('timm VisionTransformer has no representation (pre_logits) layer')
  hidden = int(_get(config, 'hidden_size'))
  transformer = _get(config, 'transformer')
  mlp_dim = int(_get(transformer, 'mlp_dim'))
  token = _get(config, 'classifier', 'token') == 'token'
  return dict(
      # timm's names of the two forms (its default is the exact one).
      act_layer='gelu_tanh' if uses_tanh_gelu(config) else 'gelu',
      img_size=tuple(int(s) for s in image_size),
      patch_size=tuple(int(s) for s in _get(_get(config, 'patches'), 'size')),
      embed_dim=hidden,
      depth=int(_get(transformer, 'num_layers')),
      num_heads=int(_get(transformer, 'num_heads')),
      mlp_ratio=mlp_dim / hidden,
      num_classes=int(num_classes),
      qkv_bias=True,
      class_token=token,
      global_pool='token' if token else 'avg',
      fc_norm=False,
  )


def build_timm_model(model_config: Any, num_classes: int, image_size: Sequence[int]):
  """A randomly initialised timm `VisionTransformer` (eval mode) matching our model."""
  import torch  # pylint: disable=g-import-not-at-top
  from timm.models import vision_transformer  # pylint: disable=g-import-not-at-top
  kwargs = timm_kwargs(model_config, num_classes, image_size)
  model = vision_transformer.VisionTransformer(
      norm_layer=functools.partial(torch.nn.LayerNorm, eps=LAYER_NORM_EPSILON), **kwargs)
  mlp_dim = int(_get(_get(_resolve(model_config), 'transformer'), 'mlp_dim'))
  if model.blocks and model.blocks[0].mlp.fc1.out_features != mlp_dim:
    raise ValueError(f'timm rounded the MLP size to {model.blocks[0].mlp.fc1.out_features}, '
                     f'not {mlp_dim}')
  return model.eval()


# ---------------------------------------------------------------------------
# Hugging Face transformers
# ---------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def installed_hf_layout() -> str:
  """'modern' (transformers >= 5 module names) or 'classic' (Hub file names).

  Read off a one-layer model of the installed transformers; 'classic' when it
  is not installed.
  """
  try:
    import transformers  # pylint: disable=g-import-not-at-top
  except ImportError:
    return 'classic'
  config = transformers.ViTConfig(hidden_size=4, num_hidden_layers=1, num_attention_heads=1,
                                  intermediate_size=4, image_size=4, patch_size=4, num_labels=1)
  keys = transformers.ViTForImageClassification(config).state_dict().keys()
  for layout, names in _HF_BLOCK.items():
    if f'{names["query"].format(i=0)}.weight' in keys:
      return layout
  raise ValueError(f'Unrecognised transformers ViT layout: {sorted(keys)}')


def _detect_hf_layout(keys) -> str:
  return 'modern' if any(k.startswith('vit.layers.') for k in keys) else 'classic'


def to_hf(params: Mapping, layout: str = 'auto') -> dict[str, np.ndarray]:
  """Our params -> a HF `ViTForImageClassification` state dict (numpy arrays).

  `layout`: 'modern' (transformers >= 5 module names), 'classic' (the Hub's file
  names, which every version's `from_pretrained` reads) or 'auto' (what the
  installed transformers' `load_state_dict` expects).
  """
  if layout == 'auto':
    layout = installed_hf_layout()
  if layout not in HF_LAYOUTS:
    raise ValueError(f'layout must be one of {HF_LAYOUTS} or "auto", got {layout!r}')
  flat = {k: checkpoint._to_numpy(v) for k, v in checkpoint.flatten(params).items()}  # pylint: disable=protected-access
  _check_plain_vit(flat, 'Hugging Face ViT')
  if 'head/kernel' not in flat:
    raise ValueError('These params have no classification head, which '
                     'ViTForImageClassification needs')
  if 'cls' not in flat:
    raise ValueError("Hugging Face ViTForImageClassification classifies the class token; "
                     "a 'gap' model (no cls) cannot be exported to it")
  names = _HF_BLOCK[layout]
  sd = {
      _HF_COMMON['cls']: flat['cls'],
      _HF_COMMON['posemb']: flat[checkpoint.POSEMB_KEY],
      _HF_COMMON['embedding'] + '.weight': _conv_to_torch(flat['embedding/kernel']),
      _HF_COMMON['embedding'] + '.bias': flat['embedding/bias'],
  }
  for i in range(_num_layers(flat)):
    p = _OURS_BLOCK.format(i=i)
    n = {k: v.format(i=i) for k, v in names.items()}
    sd[n['ln1'] + '.weight'] = flat[p + 'LayerNorm_0/scale']
    sd[n['ln1'] + '.bias'] = flat[p + 'LayerNorm_0/bias']
    for name in ('query', 'key', 'value'):
      kernel = flat[f'{p}{_ATTN}{name}/kernel']
      sd[n[name] + '.weight'] = np.ascontiguousarray(kernel.reshape(kernel.shape[0], -1).T)
      sd[n[name] + '.bias'] = flat[f'{p}{_ATTN}{name}/bias'].reshape(-1)
    out = flat[f'{p}{_ATTN}out/kernel']
    sd[n['out'] + '.weight'] = np.ascontiguousarray(out.reshape(-1, out.shape[-1]).T)
    sd[n['out'] + '.bias'] = flat[f'{p}{_ATTN}out/bias']
    sd[n['ln2'] + '.weight'] = flat[p + 'LayerNorm_2/scale']
    sd[n['ln2'] + '.bias'] = flat[p + 'LayerNorm_2/bias']
    for j, fc in enumerate(('fc1', 'fc2')):
      sd[n[fc] + '.weight'] = _dense_from_torch(flat[f'{p}MlpBlock_3/Dense_{j}/kernel'])
      sd[n[fc] + '.bias'] = flat[f'{p}MlpBlock_3/Dense_{j}/bias']
  sd[_HF_COMMON['encoder_norm'] + '.weight'] = flat['Transformer/encoder_norm/scale']
  sd[_HF_COMMON['encoder_norm'] + '.bias'] = flat['Transformer/encoder_norm/bias']
  sd[_HF_COMMON['head'] + '.weight'] = _dense_from_torch(flat['head/kernel'])
  sd[_HF_COMMON['head'] + '.bias'] = flat['head/bias']
  return sd


def from_hf(state_dict: Mapping[str, Any], model_config: Any) -> dict:
  """A HF ViT state dict (either layout) -> our params, checked against `model_config`.

  Reads `ViTForImageClassification` and also the bare `ViTModel` (keys without
  `vit.`, no classifier), whose pooler (Dense + tanh on the class token) is the
  representation layer `pre_logits` of the ImageNet-21k checkpoints.
  `model_config` supplies the head count. HF computes exact GELU (for
  `hidden_act='gelu'`): run the result in the model of
  `pytorch_model_config(model_config)` (a tanh config is warned about).
  """
  config = _resolve(model_config)
  _warn_if_tanh(config, 'Hugging Face')
  sd = _numpy_dict(state_dict)
  if not any(k.startswith('vit.') for k in sd) and any(k.startswith('embeddings.') for k in sd):
    logging.info('from_hf: a bare ViTModel state dict (no classifier)')
    sd = {f'vit.{k}': v for k, v in sd.items()}
  if 'vit.embeddings.mask_token' in sd:
    logging.info('from_hf: dropping vit.embeddings.mask_token (unused by classification)')
    del sd['vit.embeddings.mask_token']
  layout = _detect_hf_layout(sd.keys())
  names = _HF_BLOCK[layout]
  take = _Taker(sd, f'Hugging Face ({layout} layout)')
  flat = {
      'cls': take(_HF_COMMON['cls']),
      checkpoint.POSEMB_KEY: take(_HF_COMMON['posemb']),
  }
  patch_w = take(_HF_COMMON['embedding'] + '.weight')
  if patch_w is None:
    take.finish()
  flat['embedding/kernel'] = _conv_from_torch(patch_w)
  flat['embedding/bias'] = take(_HF_COMMON['embedding'] + '.bias')
  hidden = flat['embedding/kernel'].shape[-1]
  heads = _heads_from_config(config, hidden)
  num_layers = _count_indices(take.sd, names['ln1'].rsplit('.', 1)[0])
  mlp_dim = None
  for i in range(num_layers):
    p = _OURS_BLOCK.format(i=i)
    n = {k: v.format(i=i) for k, v in names.items()}
    flat[p + 'LayerNorm_0/scale'] = take(n['ln1'] + '.weight')
    flat[p + 'LayerNorm_0/bias'] = take(n['ln1'] + '.bias')
    for name in ('query', 'key', 'value'):
      w, b = take(n[name] + '.weight'), take(n[name] + '.bias')
      if w is not None and b is not None:
        kernel, bias = _qkv_kernel(w, b, heads)
        flat[f'{p}{_ATTN}{name}/kernel'] = kernel
        flat[f'{p}{_ATTN}{name}/bias'] = bias
    w = take(n['out'] + '.weight')
    if w is not None:
      flat[f'{p}{_ATTN}out/kernel'] = _out_kernel(w, heads)
    flat[f'{p}{_ATTN}out/bias'] = take(n['out'] + '.bias')
    flat[p + 'LayerNorm_2/scale'] = take(n['ln2'] + '.weight')
    flat[p + 'LayerNorm_2/bias'] = take(n['ln2'] + '.bias')
    for j, fc in enumerate(('fc1', 'fc2')):
      w = take(n[fc] + '.weight')
      if w is not None:
        flat[f'{p}MlpBlock_3/Dense_{j}/kernel'] = _dense_from_torch(w)
        mlp_dim = w.shape[0] if j == 0 else mlp_dim
      flat[f'{p}MlpBlock_3/Dense_{j}/bias'] = take(n[fc] + '.bias')
  flat['Transformer/encoder_norm/scale'] = take(_HF_COMMON['encoder_norm'] + '.weight')
  flat['Transformer/encoder_norm/bias'] = take(_HF_COMMON['encoder_norm'] + '.bias')
  # The pooler is the representation layer only where nothing else reads the
  # class token; ViTForImageClassification's classifier bypasses it.
  pooler_w = None
  if _HF_COMMON['head'] + '.weight' not in take.sd:
    pooler_w = take.optional('vit.pooler.dense.weight')
  if pooler_w is not None:
    flat['pre_logits/kernel'] = _dense_from_torch(pooler_w)
    flat['pre_logits/bias'] = take('vit.pooler.dense.bias')
  head_w = take.optional(_HF_COMMON['head'] + '.weight')
  if head_w is not None:
    flat['head/kernel'] = _dense_from_torch(head_w)
    flat['head/bias'] = take(_HF_COMMON['head'] + '.bias')
  take.finish()
  if _get(config, 'classifier', 'token') != 'token':
    raise ValueError("Hugging Face ViT classifies the class token; the model config says "
                     f"classifier={_get(config, 'classifier')!r}")
  _check_dims(config, hidden, num_layers, mlp_dim, 'Hugging Face')
  return _finish_params(flat, config, 'Hugging Face')


def hf_config_dict(model_config: Any, num_classes: int, image_size: Sequence[int],
                   labels: Optional[Sequence[str]] = None) -> dict[str, Any]:
  """`transformers.ViTConfig` fields of a HF ViT computing the same function as ours."""
  config = _resolve(model_config)
  if _get(config, 'resnet'):
    raise ValueError('Hugging Face conversion supports plain ViTs only, not the ResNet hybrid')
  if _get(config, 'representation_size'):
    raise ValueError('Hugging Face ViTForImageClassification has no representation layer')
  if _get(config, 'classifier', 'token') != 'token':
    raise ValueError("Hugging Face ViTForImageClassification supports classifier='token' only")
  transformer = _get(config, 'transformer')
  patch = tuple(int(s) for s in _get(_get(config, 'patches'), 'size'))
  image = tuple(int(s) for s in image_size)
  fields = dict(
      model_type='vit',
      architectures=['ViTForImageClassification'],
      hidden_size=int(_get(config, 'hidden_size')),
      num_hidden_layers=int(_get(transformer, 'num_layers')),
      num_attention_heads=int(_get(transformer, 'num_heads')),
      intermediate_size=int(_get(transformer, 'mlp_dim')),
      # HF's names: 'gelu' is the exact (erf) form, 'gelu_pytorch_tanh' the tanh one.
      hidden_act='gelu_pytorch_tanh' if uses_tanh_gelu(config) else 'gelu',
      layer_norm_eps=LAYER_NORM_EPSILON,
      hidden_dropout_prob=0.0,
      attention_probs_dropout_prob=0.0,
      qkv_bias=True,
      num_channels=3,
      image_size=image[0] if image[0] == image[1] else list(image),
      patch_size=patch[0] if patch[0] == patch[1] else list(patch),
      num_labels=int(num_classes),
  )
  if labels is not None:
    if len(labels) != num_classes:
      raise ValueError(f'{len(labels)} labels for {num_classes} classes')
    fields['id2label'] = {str(i): name for i, name in enumerate(labels)}
    fields['label2id'] = {name: i for i, name in enumerate(labels)}
  return fields


def build_hf_model(model_config: Any, num_classes: int, image_size: Sequence[int]):
  """A randomly initialised HF `ViTForImageClassification` (eval mode) matching our model."""
  import transformers  # pylint: disable=g-import-not-at-top
  fields = hf_config_dict(model_config, num_classes, image_size)
  fields.pop('model_type')
  config = transformers.ViTConfig(**fields)
  return transformers.ViTForImageClassification(config).eval()


def torch_state_dict(state_dict: Mapping[str, np.ndarray]):
  """numpy state dict -> torch tensors (for `load_state_dict` / `torch.save`)."""
  import torch  # pylint: disable=g-import-not-at-top
  # A copy: arrays from jax are read-only, which torch tensors must not alias.
  return {k: torch.from_numpy(np.array(v, copy=True)) for k, v in state_dict.items()}


# ---------------------------------------------------------------------------
# Files and CLI
# ---------------------------------------------------------------------------

def _unwrap(obj: Any, path: str) -> Mapping[str, Any]:
  if isinstance(obj, Mapping):
    for key in ('state_dict', 'model', 'module'):
      if key in obj and isinstance(obj[key], Mapping):
        return obj[key]
    return obj
  raise ValueError(f'{path!r} does not hold a state dict (got {type(obj).__name__})')


def read_torch_file(path: str) -> dict[str, np.ndarray]:
  """A state dict from a .safetensors file, a torch.save file, or a HF model directory."""
  if os.path.isdir(path):
    for name in ('model.safetensors', 'pytorch_model.bin'):
      candidate = os.path.join(path, name)
      if os.path.exists(candidate):
        return read_torch_file(candidate)
    raise ValueError(f'{path!r} holds neither model.safetensors nor pytorch_model.bin')
  if not os.path.exists(path):
    raise FileNotFoundError(f'No such file: {path!r}')
  if path.endswith('.safetensors'):
    return _read_safetensors(path)
  _check_zip_size(path)
  import torch  # pylint: disable=g-import-not-at-top
  try:
    obj = torch.load(path, map_location='cpu', weights_only=True)
  except Exception as e:  # pylint: disable=broad-except
    raise ValueError(f'Cannot read torch file {path!r}: {type(e).__name__}: {e}') from None
  return _numpy_dict(_unwrap(obj, path))


def _read_safetensors(path: str) -> dict[str, np.ndarray]:
  """A .safetensors state dict; a bad file is a ValueError naming it.

  The format has no compression and its header's offsets must lie inside the
  file (safetensors checks), so the file's size bounds what a load allocates.
  """
  from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
  try:
    try:
      return load_file(path)
    except (TypeError, ValueError):  # bfloat16 & co. have no numpy dtype
      from safetensors.torch import load_file as load_torch  # pylint: disable=g-import-not-at-top
      return _numpy_dict(load_torch(path))
  except (OSError, ImportError):
    raise
  except Exception as e:  # pylint: disable=broad-except
    # SafetensorError derives from Exception only.
    raise ValueError(f'Cannot read safetensors file {path!r}: not a valid .safetensors '
                     f'file ({type(e).__name__}: {e})') from None


def _check_zip_size(path: str) -> None:
  """torch.save files are zips: their declared size must be under the load limit."""
  import zipfile  # pylint: disable=g-import-not-at-top
  if not zipfile.is_zipfile(path):
    return
  try:
    with zipfile.ZipFile(path) as zf:
      total = sum(info.file_size for info in zf.infolist())
  except zipfile.BadZipFile as e:
    raise ValueError(f'Cannot read torch file {path!r}: {e}') from None
  limit = checkpoint.max_npz_bytes()
  if total > limit:
    raise ValueError(
        f'Torch file {path!r} declares {checkpoint.format_bytes(total)} of data, more than '
        f'the {checkpoint.format_bytes(limit)} limit for loading (raise it with '
        f'${checkpoint.MAX_NPZ_BYTES_ENV})')


def write_torch_file(state_dict: Mapping[str, np.ndarray], path: str) -> None:
  """.safetensors when the name says so, else torch.save of tensors."""
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  if path.endswith('.safetensors'):
    from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
    save_file({k: np.ascontiguousarray(v) for k, v in state_dict.items()}, path)
    return
  import torch  # pylint: disable=g-import-not-at-top
  # Through a file object: torch names the zip's inner folder 'archive', not
  # after the (temporary) file name.
  with open(path, 'wb') as f:
    torch.save(torch_state_dict(state_dict), f)



def write_hf_directory(params: Mapping, model_config: Any, path: str,
                       labels: Optional[Sequence[str]] = None) -> None:
  """A directory `ViTForImageClassification.from_pretrained` reads: config.json + model.safetensors."""
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  config = _resolve(model_config)
  flat = checkpoint.flatten(params)
  num_classes = int(flat['head/kernel'].shape[-1])
  image_size = checkpoint.infer_image_size(flat, config)
  fields = hf_config_dict(config, num_classes, image_size, labels)
  os.makedirs(path, exist_ok=True)
  with open(os.path.join(path, 'config.json'), 'w', encoding='utf-8') as f:
    json.dump(fields, f, indent=2)
  sd = to_hf(params, layout='classic')
  save_file({k: np.ascontiguousarray(v) for k, v in sd.items()},
            os.path.join(path, 'model.safetensors'), metadata={'format': 'pt'})


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


# ---------------------------------------------------------------------------
# Files and CLI, continued
# ---------------------------------------------------------------------------

@dataclasses.dataclass
class Conversion:
  """What `convert_file` did: our params, and each check's max |logit difference|."""
  params: dict
  checks: dict[str, float]


def _staging_path(output_path: str) -> str:
  """A sibling of `output_path` ending in the same name (the format goes by suffix)."""
  directory, base = os.path.split(os.path.abspath(output_path))
  return os.path.join(directory, f'.partial-{os.getpid()}-{base}')


def _write_error(error: BaseException, output_path: str) -> BaseException:
  """An OSError naming the user's `output_path` (not the staging file) for a failed write.

  torch.save reports a full or read-only disk as a RuntimeError of its zip
  writer ('unexpected pos ...', 'open file failed with strerror: ...').
  """
  if isinstance(error, OSError):
    number = error.errno
  else:
    text = str(error)
    free = shutil.disk_usage(os.path.dirname(os.path.abspath(output_path))).free
    if 'Read-only file system' in text:
      number = errno.EROFS
    elif 'Permission denied' in text:
      number = errno.EACCES
    elif 'No space left' in text or 'unexpected pos' in text or free < (1 << 20):
      number = errno.ENOSPC
    else:
      return error
  if number is None:
    return error
  return OSError(number, os.strerror(number), output_path)


def _remove(path: str) -> None:

  if os.path.isdir(path):
    shutil.rmtree(path, ignore_errors=True)
  elif os.path.lexists(path):
    os.remove(path)


def _install(staging: str, output_path: str) -> None:
  """Moves the checked output into place; an existing directory keeps other files."""
  if os.path.isdir(staging) and os.path.isdir(output_path):
    for name in os.listdir(staging):
      os.replace(os.path.join(staging, name), os.path.join(output_path, name))
    os.rmdir(staging)
  else:
    os.replace(staging, output_path)


def _read_input(source: str, input_path: str, config: Any) -> dict:
  """Our params from the input, checked against `config` before its data is read where possible."""
  if source == 'npz':
    # Every key and shape is checked from the .npy headers first.
    specs = checkpoint.read_npz_specs(input_path)
    check_against_config(specs, config, 'npz', input_path)
    params = checkpoint.load(input_path)
  elif source == 'timm':
    params = from_timm(read_torch_file(input_path), config)
  elif source == 'hf':
    params = from_hf(read_torch_file(input_path), config)
  else:
    raise ValueError(f'Unknown source format {source!r}')
  # A torch file may hold int / NaN weights that the layout mapping carries over.
  checkpoint.check_weights(params, f'{source} weights {input_path!r}')
  return params


def _write_output(target: str, params: Mapping, config: Any, output_path: str,
                  as_file: bool) -> None:
  if target == 'npz':
    checkpoint.save(params, output_path)
  elif target == 'timm':
    write_torch_file(to_timm(params, uses_tanh_gelu(config)), output_path)
  elif target == 'hf':
    if as_file:
      if uses_tanh_gelu(config):
        # A bare state dict has no config.json to carry hidden_act.
        logging.warning("%s holds no config: build its ViTConfig with "
                        "hidden_act='gelu_pytorch_tanh' (HF's default 'gelu' is exact GELU, "
                        'up to ~6e-4 off in logits)', output_path)
      write_torch_file(to_hf(params), output_path)
    else:
      labels = None
      if int(checkpoint.flatten(params)['head/kernel'].shape[-1]) == 1000:
        from vit_jax import labels as labels_lib  # pylint: disable=g-import-not-at-top
        labels = labels_lib.imagenet1k_labels()
      write_hf_directory(params, config, output_path, labels)
  else:
    raise ValueError(f'Unknown target format {target!r}')


def convert_file(source: str, target: str, model: str, input_path: str, output_path: str,
                 classifier: Optional[str] = None,
                 representation_size: Optional[int] = None, *,
                 verify: bool = True, tolerance: float = VERIFY_TOLERANCE) -> Conversion:
  """Reads `input_path` in format `source`, writes `output_path` in `target`.

  The input is checked against the `model` preset (every key and shape; for an
  .npz from its headers, before any data is read) and must hold finite float
  weights. The output is written under a temporary sibling name, read back
  with the target's own loader (timm, transformers, or `checkpoint.load`), and
  its logits compared with our model's on the input, on a fixed batch
  (`verification_images`), within `tolerance` x max(1, max |logit|); for timm /
  HF input, the input run by its own library is compared too. Only then is it
  renamed to `output_path`: a conversion that fails any check leaves nothing
  there. Both sides use the same GELU (the input's), so the comparison is of
  like with like.

  Raises:
    ValueError: the input does not fit the preset, or a check failed; the
      message names the keys, shapes or the difference.
    ImportError: the target's library, needed for the check, is missing.
  """
  from vit_jax.configs import models as models_config  # pylint: disable=g-import-not-at-top
  if source not in ('npz', 'timm', 'hf'):
    raise ValueError(f'Unknown source format {source!r}')
  if target not in ('npz', 'timm', 'hf'):
    raise ValueError(f'Unknown target format {target!r}')
  config = models_config.get_config(model)
  if is_mixer_config(config) and 'hf' in (source, target):
    raise ValueError(f'{model} is an MLP-Mixer: Hugging Face transformers has no Mixer; '
                     'convert it to or from timm or npz')
  if classifier:
    config.classifier = classifier
  if representation_size:
    config.representation_size = representation_size
  if source == 'hf' and hf_directory_uses_tanh_gelu(input_path):
    # A directory's config.json says which GELU its model computes (our own
    # exports of tanh models say 'gelu_pytorch_tanh').
    logging.info('%s: config.json says tanh GELU; keeping approximate_gelu=True', input_path)
    config = _with_approximate_gelu(config, True)
  elif source in ('timm', 'hf'):
    # Those weights were computed with exact GELU; exports keep saying so.
    config = pytorch_model_config(config)
    logging.info('%s weights compute exact GELU: our model needs approximate_gelu=False '
                 '(convert.pytorch_model_config) to reproduce them', source)
  params = _read_input(source, input_path, config)

  output_path = os.path.normpath(output_path)
  as_file = output_path.endswith(('.safetensors', '.bin', '.pt', '.pth'))
  os.makedirs(os.path.dirname(os.path.abspath(output_path)), exist_ok=True)
  staging = _staging_path(output_path)
  _remove(staging)
  checks: dict[str, float] = {}
  try:
    try:
      _write_output(target, params, config, staging, as_file)
    except (OSError, RuntimeError) as e:
      raise _write_error(e, output_path) from e
    if verify:

      num_classes, image_size = _geometry(params, config)
      images = verification_images(image_size)
      reference = our_outputs(params, config, images)
      checks['output'] = compare_outputs(
          f'{output_path} read back by {target}', reference,
          _outputs(target, staging, config, num_classes, image_size, images), tolerance)
      # The input run by its own library, so that our reading of it is checked
      # too -- where the library can build the model (no representation layer;
      # HF's classifier model needs its head).
      if (source != 'npz' and not _get(config, 'representation_size')
          and (source == 'timm' or num_classes)):
        checks['input'] = compare_outputs(
            f'{input_path} run by {source}', reference,
            _outputs(source, input_path, config, num_classes, image_size, images), tolerance)
      logging.info('Checked %s: max |logit difference| %s (tolerance %g)', output_path,
                   ', '.join(f'{k} {v:.2g}' for k, v in checks.items()), tolerance)
    _install(staging, output_path)
  except BaseException:
    _remove(staging)
    raise
  return Conversion(params, checks)


def main(argv: Optional[Sequence[str]] = None) -> int:
  parser = cli.ArgumentParser(
      prog='python -m vit_jax.convert',

      description='Convert ViT weights between our .npz layout, timm and Hugging Face. '
                  'The input is checked against --model and the output against the input '
                  '(same logits on a fixed batch) before it is written.')
  parser.add_argument('--from', dest='source', required=True, choices=('timm', 'hf', 'npz'))
  parser.add_argument('--to', dest='target', required=True, choices=('npz', 'timm', 'hf'))
  parser.add_argument('--model', required=True, help='preset name, e.g. ViT-B_16')
  parser.add_argument('--input', required=True,
                      help='.npz, torch file (.pth/.bin), .safetensors, or a HF model directory')
  parser.add_argument('--output', required=True,
                      help='.npz; timm: .pth or .safetensors; hf: a directory (config.json + '
                           'model.safetensors) or a .safetensors/.bin file')
  parser.add_argument('--classifier', choices=('token', 'gap'), default=None,
                      help="override the preset's classifier (timm 'gap' models)")
  parser.add_argument('--representation_size', type=int, default=None,
                      help='size of the pre-logits layer, for weights that have one '
                           '(e.g. HF ViTModel poolers of ImageNet-21k checkpoints)')
  parser.add_argument('--tolerance', type=float, default=VERIFY_TOLERANCE,
                      help='largest max |logit difference| accepted, times max(1, max |logit|)')
  parser.add_argument('--no_verify', action='store_true',
                      help='write without reading the output back (e.g. without torch)')
  parser.add_argument('--verbose', action='store_true',
                      help=f'print the traceback of an error too (or set {cli.TRACEBACK_ENV}=1)')
  args = parser.parse_args(argv)
  logging.set_verbosity(logging.INFO)
  try:
    # Before the input is read and checked: an output that cannot be written.
    cli.check_writable_dir(os.path.dirname(os.path.abspath(args.output)),
                           f'--output {args.output!r}: its directory')
    result = convert_file(args.source, args.target, args.model, args.input, args.output,

                          args.classifier, args.representation_size,
                          verify=not args.no_verify, tolerance=args.tolerance)
  except (ValueError, OSError, ImportError, MemoryError) as e:
    # Bad input, a failed check, a missing library, a full disk: one line, exit 2.
    return cli.report_user_error(e, args.verbose)
  n = sum(int(np.prod(v.shape)) for v in checkpoint.flatten(result.params).values())
  checked = ('unchecked' if not result.checks else 'checked: max |logit difference| ' +
             ', '.join(f'{k} {v:.2g}' for k, v in result.checks.items()))
  print(f'Wrote {args.output} ({args.target}, {n:,} parameters; {checked})')
  return 0


if __name__ == '__main__':
  cli.quiet_console()  # before TensorFlow and JAX's backends load
  sys.exit(cli.run(main))

