"""Named model presets (ViT-Ti ... ViT-g, R50+ViT hybrid, BiT ResNets, MLP-Mixer) and `build_model`.

A preset is a `ml_collections.ConfigDict` of pure data; `build_model` is the one
place that turns it into a Flax module. Names follow the published checkpoint
files (`ViT-B_16`); the paper's spelling `ViT-B/16` is accepted too.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import ml_collections

_PRESETS: dict[str, Callable[[], ml_collections.ConfigDict]] = {}


def _register(name: str):
  def decorator(fn):
    _PRESETS[name] = fn
    return fn
  return decorator


def vit_config(name: str, *, hidden_size: int, patch: int, mlp_dim: int,
               num_heads: int, num_layers: int,
               representation_size: Optional[int] = None,
               classifier: str = 'token') -> ml_collections.ConfigDict:
  """A ViT config; dropout rates default to the fine-tuning recipe's 0.0."""
  return ml_collections.ConfigDict(dict(
      model_type='vit',
      name=name,
      patches=ml_collections.ConfigDict(dict(size=(patch, patch))),
      hidden_size=hidden_size,
      transformer=ml_collections.ConfigDict(dict(
          mlp_dim=mlp_dim, num_heads=num_heads, num_layers=num_layers,
          attention_dropout_rate=0.0, dropout_rate=0.0, stochastic_depth=0.0)),
      classifier=classifier,
      representation_size=representation_size,
      resnet=None,
      # Which activations training keeps (vit_jax.remat.POLICIES; its DEFAULT).
      remat_policy='dots',
      attention_implementation=None,
      # The reference code's (and so the published checkpoints') tanh GELU;
      # weights converted from timm / Hugging Face need False (exact erf).
      approximate_gelu=True,
      posemb='learn',  # or 'sincos2d' (fixed, no parameter; models_vit.POSEMB_TYPES)
  ))


def hybrid_config(name: str, vit: ml_collections.ConfigDict, num_layers: tuple[int, ...],
                  width_factor: float = 1.0, patch: int = 1) -> ml_collections.ConfigDict:
  """ViT on a ResNet's feature map; `num_layers=()` keeps the root alone (4x, as R+ViT-Ti_16)."""
  config = vit
  config.name = name
  # With stages the stem already downsamples 16x or 32x: one "patch" is one stem
  # output. The root-only stem (4x) is cut into `patch`-sized patches.
  config.patches.size = (patch, patch)
  config.resnet = ml_collections.ConfigDict(dict(
      num_layers=num_layers, width_factor=width_factor))
  return config


def resnet_config(name: str, num_layers: tuple[int, ...], width_factor: int,
                  width: int = 64) -> ml_collections.ConfigDict:
  """A BiT ResNetV2 config with the BiT reference's numerics (the BiT-M files need them).

  The hybrid stem keeps its own (TF 'SAME' padding, / (std + 1e-5), GroupNorm
  epsilon 1e-6) inside `models_resnet.hybrid_stem`; these fields can select
  those for a ResNetV2 too.
  """
  return ml_collections.ConfigDict(dict(
      model_type='resnet', name=name, num_layers=num_layers,
      width_factor=width_factor, width=width,
      padding='explicit',  # symmetric (k - 1) // 2, zero pad 1 before the max-pool
      weight_std='var',  # (w - mean) / sqrt(var + weight_std_epsilon)
      weight_std_epsilon=1e-10,
      gn_epsilon=1e-5))


def mixer_config(name: str, *, patch: int, hidden_dim: int, num_blocks: int,
                 tokens_mlp_dim: int, channels_mlp_dim: int) -> ml_collections.ConfigDict:
  """An MLP-Mixer config (`vit_jax.models_mixer.MlpMixer`)."""
  return ml_collections.ConfigDict(dict(
      model_type='mixer', name=name,
      patches=ml_collections.ConfigDict(dict(size=(patch, patch))),
      hidden_dim=hidden_dim, num_blocks=num_blocks,
      tokens_mlp_dim=tokens_mlp_dim, channels_mlp_dim=channels_mlp_dim,
      # The released Mixer code's tanh GELU; False for timm's exact erf form.
      approximate_gelu=True,
      stochastic_depth=0.0))


# (hidden size, MLP size, heads, layers) from the paper's Table 1, plus Ti/S
# from DeiT/AugReg and g from Zhai et al. (2021).
_VIT_SIZES = {
    'Ti': (192, 768, 3, 12),
    'S': (384, 1536, 6, 12),
    'B': (768, 3072, 12, 12),
    'L': (1024, 4096, 16, 24),
    'H': (1280, 5120, 16, 32),
    'g': (1408, 6144, 16, 40),
}
_VIT_PRESETS = [('Ti', 16), ('S', 16), ('S', 32), ('B', 8), ('B', 16), ('B', 32),
                ('L', 16), ('L', 32), ('H', 14), ('g', 14)]


def _make_vit(size: str, patch: int) -> Callable[[], ml_collections.ConfigDict]:
  hidden, mlp, heads, layers = _VIT_SIZES[size]
  name = f'ViT-{size}_{patch}'
  return lambda: vit_config(name, hidden_size=hidden, patch=patch, mlp_dim=mlp,
                            num_heads=heads, num_layers=layers)


for _size, _patch in _VIT_PRESETS:
  _register(f'ViT-{_size}_{_patch}')(_make_vit(_size, _patch))


@_register('R50+ViT-B_16')
def _r50_vit_b16():
  return hybrid_config('R50+ViT-B_16', _PRESETS['ViT-B_16'](), num_layers=(3, 4, 9))


# The AugReg release's hybrids (Steiner et al. 2021): (ViT, ResNet units per
# stage, patch). Four stages make a /32 stem; R+ViT-Ti_16's root alone is /4.
_AUGREG_HYBRIDS = {
    'R+ViT-Ti_16': ('ViT-Ti_16', (), 8),
    'R26+ViT-S_32': ('ViT-S_32', (2, 2, 2, 2), 1),
    'R26+ViT-B_32': ('ViT-B_32', (2, 2, 2, 2), 1),
    'R50+ViT-L_32': ('ViT-L_32', (3, 4, 6, 3), 1),
}
for _name, (_vit, _layers, _patch) in _AUGREG_HYBRIDS.items():
  _register(_name)(lambda n=_name, v=_vit, l=_layers, p=_patch: hybrid_config(
      n, _PRESETS[v](), num_layers=l, patch=p))


def _make_gap_norep(size: str, patch: int) -> Callable[[], ml_collections.ConfigDict]:
  """AugReg's ViTs pooled by a global average over tokens, no class token, no pre-logits."""
  def make():
    config = _PRESETS[f'ViT-{size}_{patch}']()
    config.name = f'ViT-{size}_{patch}-gap-norep'
    config.classifier = 'gap'
    return config
  return make


for _size, _patch in [('S', 16), ('B', 16), ('S', 32), ('B', 32)]:
  _register(f'ViT-{_size}_{_patch}-gap-norep')(_make_gap_norep(_size, _patch))


_BIT_PRESETS = {
    'BiT-R50x1': ((3, 4, 6, 3), 1), 'BiT-R50x3': ((3, 4, 6, 3), 3),
    'BiT-R101x1': ((3, 4, 23, 3), 1), 'BiT-R101x3': ((3, 4, 23, 3), 3),
    'BiT-R152x2': ((3, 8, 36, 3), 2), 'BiT-R152x4': ((3, 8, 36, 3), 4),
}
for _name, (_layers, _wf) in _BIT_PRESETS.items():
  _register(_name)(lambda n=_name, l=_layers, w=_wf: resnet_config(n, l, w))


# Mixer paper (Tolstikhin et al. 2021) Table 1: (hidden C, blocks, token-MLP D_S,
# channel-MLP D_C) per size.
_MIXER_SIZES = {
    'S': (512, 8, 256, 2048),
    'B': (768, 12, 384, 3072),
    'L': (1024, 24, 512, 4096),
    'H': (1280, 32, 640, 5120),
}
_MIXER_PRESETS = [('S', 32), ('S', 16), ('B', 32), ('B', 16), ('L', 32), ('L', 16), ('H', 14)]


def _make_mixer(size: str, patch: int) -> Callable[[], ml_collections.ConfigDict]:
  hidden, blocks, tokens, channels = _MIXER_SIZES[size]
  name = f'Mixer-{size}_{patch}'
  return lambda: mixer_config(name, patch=patch, hidden_dim=hidden, num_blocks=blocks,
                              tokens_mlp_dim=tokens, channels_mlp_dim=channels)


for _size, _patch in _MIXER_PRESETS:
  _register(f'Mixer-{_size}_{_patch}')(_make_mixer(_size, _patch))


# Tiny sizes for tests, CI and the embedded digits dataset.
@_register('ViT-Test_4')
def _vit_test():
  return vit_config('ViT-Test_4', hidden_size=32, patch=4, mlp_dim=64,
                    num_heads=2, num_layers=2)


@_register('ViT-Digits_4')
def _vit_digits():
  """The default run's model: about 0.2M parameters, 64 tokens at 32x32."""
  return vit_config('ViT-Digits_4', hidden_size=64, patch=4, mlp_dim=128,
                    num_heads=4, num_layers=4)


@_register('R-Test+ViT-Test_1')
def _hybrid_test():
  config = hybrid_config('R-Test+ViT-Test_1', _vit_test(), num_layers=(1, 1),
                         width_factor=0.5)
  return config


@_register('BiT-Test')
def _bit_test():
  return resnet_config('BiT-Test', (1, 1, 1, 1), 1, width=32)


@_register('Mixer-Test_4')
def _mixer_test():
  return mixer_config('Mixer-Test_4', patch=4, hidden_dim=32, num_blocks=2,
                      tokens_mlp_dim=16, channels_mlp_dim=64)


@_register('Mixer-Digits_4')
def _mixer_digits():
  """The digits-sized Mixer: 16 patches at 16x16."""
  return mixer_config('Mixer-Digits_4', patch=4, hidden_dim=64, num_blocks=4,
                      tokens_mlp_dim=32, channels_mlp_dim=128)


def names() -> list[str]:
  return sorted(_PRESETS)


def short_name(preset: str) -> str:
  """The AugReg release's spelling of a preset: 'ViT-' dropped, '+' made '_'.

  'R26+ViT-S_32' -> 'R26_S_32', 'ViT-B_16' -> 'B_16' (the start of its file names).
  """
  return preset.replace('ViT-', '').replace('+', '_')


def _short_names() -> dict[str, str]:
  return {short_name(n): n for n in _PRESETS if 'ViT-' in n}


def canonical_name(name: str) -> str:
  """The preset a name means: 'ViT-B/16', 'ViT-B_16' and the release's 'B_16' are one."""
  name = name.replace('/', '_')
  if name in _PRESETS:
    return name
  return _short_names().get(name, name)


def get_config(name: str) -> ml_collections.ConfigDict:
  """The preset called `name`; an unknown name lists the valid ones."""
  key = canonical_name(name)
  if key not in _PRESETS:
    raise ValueError(f'Unknown model {name!r}. Valid model names: {", ".join(names())}')
  return _PRESETS[key]()


def build_model(config: ml_collections.ConfigDict | str, num_classes: int,
                **overrides: Any):
  """A Flax module for a preset name or config; `overrides` set module fields (dtype, ...)."""
  # Imported here so configs stay importable as plain data.
  import flax
  from vit_jax import models_mixer, models_resnet, models_vit

  if isinstance(config, str):
    config = get_config(config)
  if not isinstance(num_classes, int) or num_classes < 1:
    raise ValueError(f'num_classes must be a positive integer, got {num_classes!r}')
  fields = config.to_dict() if hasattr(config, 'to_dict') else dict(config)
  model_type = fields.pop('model_type', 'vit')
  fields.pop('name', None)
  fields.update(overrides)
  if model_type == 'vit':
    fields['patches'] = tuple(fields['patches']['size'])
    # Frozen so the module is hashable (usable as a static jit argument).
    fields['transformer'] = flax.core.FrozenDict(fields['transformer'])
    if fields.get('resnet'):
      resnet = dict(fields['resnet'])
      resnet['num_layers'] = tuple(resnet['num_layers'])
      fields['resnet'] = flax.core.FrozenDict(resnet)
    return models_vit.VisionTransformer(num_classes=num_classes, **fields)
  if model_type == 'resnet':
    fields['num_layers'] = tuple(fields['num_layers'])
    return models_resnet.ResNetV2(num_classes=num_classes, **fields)
  if model_type == 'mixer':
    fields['patches'] = tuple(fields['patches']['size'])
    return models_mixer.MlpMixer(num_classes=num_classes, **fields)
  raise ValueError(f"model_type must be 'vit', 'resnet' or 'mixer', got {model_type!r}")
