"""Our ViT tree <-> Hugging Face transformers' `ViTForImageClassification`.

The key table and the GELU forms: `vit_jax.torch_layout`.

Transformers 5 renamed the per-layer modules
(`vit.layers.i.attention.q_proj`); the Hub's files keep the classic names
(`vit.encoder.layer.i.attention.attention.query`). Both are read; exports use
the names of the installed transformers unless `layout` says otherwise.
"""

from __future__ import annotations

import functools
from typing import Any, Mapping, Optional, Sequence

from absl import logging
import numpy as np

from vit_jax import checkpoint
from vit_jax.torch_layout import (
    HF_LAYOUTS, LAYER_NORM_EPSILON, _ATTN, _HF_BLOCK, _HF_COMMON, _OURS_BLOCK, _Taker,
    _check_dims, _check_plain_vit, _conv_from_torch, _conv_to_torch, _count_indices,
    _dense_from_torch, _finish_params, _get, _heads_from_config, _num_layers, _numpy_dict,
    _out_kernel, _qkv_kernel, _resolve, _warn_if_tanh, uses_tanh_gelu)


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
