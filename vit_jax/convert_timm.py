"""Our ViT and MLP-Mixer trees <-> timm's `VisionTransformer` and `MlpMixer` state dicts.

The key table and the GELU forms: `vit_jax.torch_layout`.

MLP-Mixer presets convert to and from timm's `MlpMixer` (`mixer_b16_224` and
friends): `stem` <-> `stem.proj`, `MixerBlock_i/LayerNorm_{0,1}` <->
`blocks.i.norm{1,2}`, `token_mixing` / `channel_mixing` `Dense_{0,1}` <->
`blocks.i.mlp_tokens` / `mlp_channels` `fc{1,2}`, `pre_head_layer_norm` <->
`norm`, `head` <-> `head`; timm's Mixer computes exact GELU too. Hugging Face
has no Mixer.
"""

from __future__ import annotations

import functools
from typing import Any, Mapping, Sequence

from absl import logging
import numpy as np

from vit_jax import checkpoint
from vit_jax.torch_layout import (
    LAYER_NORM_EPSILON, _ATTN, _OURS_BLOCK, _Taker, _check_dims, _check_plain_vit,
    _conv_from_torch, _conv_to_torch, _count_indices, _dense_from_torch, _finish_params,
    _get, _heads_from_config, _num_layers, _numpy_dict, _out_kernel, _qkv_kernel,
    _resolve, _warn_if_tanh, is_mixer_config, uses_tanh_gelu)


# ---------------------------------------------------------------------------
# timm
# ---------------------------------------------------------------------------

_MIXER_TIMM = (('LayerNorm_0/scale', 'norm1.weight'), ('LayerNorm_0/bias', 'norm1.bias'),
               ('LayerNorm_1/scale', 'norm2.weight'), ('LayerNorm_1/bias', 'norm2.bias'))
_MIXER_TIMM_MLPS = (('token_mixing', 'mlp_tokens'), ('channel_mixing', 'mlp_channels'))


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
