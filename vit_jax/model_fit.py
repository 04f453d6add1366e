"""Which model a parameter tree holds, and whether it fits another model.

Architectures are read off keys and shapes alone (an .npz's headers are enough):
ResNet depth and width (`resnet_architecture`, `bit_preset_name`), ViT and Mixer
sizes (`guess_presets`), the model family (`model_family`). `check_params` and
`ModelMismatchError` list every missing / unexpected key and shape mismatch and
name the preset the tree does fit.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Mapping, Optional

from vit_jax.checkpoint_layouts import bit_to_params, is_bit_layout
from vit_jax.param_trees import Params, _as_flat, _shape, flatten


@dataclasses.dataclass(frozen=True)
class ResNetArchitecture:
  """Depth and width of a ResNetV2 tree, read off its keys and shapes."""
  num_layers: tuple[int, ...]  # units per block
  root_kernel: tuple[int, ...]  # conv_root/kernel's shape: (7, 7, 3, 64 * width_factor)

  @property
  def depth(self) -> int:
    # Three convs per bottleneck unit, plus the root conv and the head.
    return 3 * sum(self.num_layers) + 2

  @property
  def root_width(self) -> int:
    return self.root_kernel[-1]

  @property
  def name(self) -> str:
    """'R50x1', 'R152x4'; a root width that is no multiple of 64 is spelt out."""
    if self.root_width % 64 == 0:
      return f'R{self.depth}x{self.root_width // 64}'
    return f'R{self.depth} (root width {self.root_width})'

  def describe(self) -> str:
    return (f'{self.name} (units per block {self.num_layers}, conv_root/kernel '
            f'{self.root_kernel})')


def resnet_architecture(params_or_flat: Mapping) -> Optional[ResNetArchitecture]:
  """The ResNetV2 depth and width a tree (ours or BiT layout) holds; None if not one."""
  flat = _as_flat(params_or_flat)
  if is_bit_layout(flat):
    flat = bit_to_params(flat)
  root = flat.get('conv_root/kernel')
  if root is None or len(root.shape) != 4:
    return None
  units: dict[int, set[int]] = {}
  for key in flat:
    match = re.fullmatch(r'block(\d+)/unit(\d+)/.+', key)
    if match:
      units.setdefault(int(match.group(1)), set()).add(int(match.group(2)))
  # No units: a root alone (R+ViT-Ti_16's stem), num_layers ().
  num_layers = []
  for block in range(1, max(units, default=0) + 1):
    # A hole in the numbering (unit3 without unit2) is not a depth; report the count
    # of units numbered 1..n and let the key check name the strays.
    present = units.get(block, set())
    count = 0
    while count + 1 in present:
      count += 1
    num_layers.append(count)
  return ResNetArchitecture(tuple(num_layers), tuple(int(d) for d in root.shape))


def bit_preset_name(params_or_flat: Mapping) -> Optional[str]:
  """The BiT preset ('BiT-R50x3') whose depth and width a tree has; None if none."""
  from vit_jax.configs import models as models_config  # pylint: disable=g-import-not-at-top
  arch = resnet_architecture(params_or_flat)
  if arch is None:
    return None
  for name in models_config.names():
    config = models_config.get_config(name)
    if config.get('model_type') != 'resnet':
      continue
    width = int(config.width * config.width_factor)
    if tuple(config.num_layers) == arch.num_layers and width == arch.root_width:
      return name
  return None


def _check_resnet_fit(restored: Mapping[str, Any], init: Mapping[str, Any],
                      source: str) -> None:
  """One clear error when a ResNet checkpoint has another depth or width than the model."""
  ckpt, model = resnet_architecture(restored), resnet_architecture(init)
  if ckpt is None or model is None or ckpt == model:
    return
  preset = bit_preset_name(restored)
  hint = f'; the preset for this file is {preset!r}' if preset else ''
  raise ValueError(f'Checkpoint {source!r} is a ResNet {ckpt.describe()} but the model is '
                   f'{model.describe()}{hint}')


class ModelMismatchError(ValueError):
  """A tree (checkpoint) whose keys or shapes do not fit the model.

  `str()` lists every missing / unexpected key and shape mismatch;
  `one_line()` is the command-line summary: how many differ, the first of each,
  and which preset the file's shapes fit (`guess_presets`).
  """

  def __init__(self, title: str, missing: list[str], unexpected: list[str],
               mismatched: list[str], shapes: Optional[Mapping[str, Any]] = None):
    parts = [title]
    for name, rows in (('missing keys', missing), ('unexpected keys', unexpected),
                       ('shape mismatches', mismatched)):
      if rows:
        parts.append(_format_problems(name, rows))
    super().__init__('\n'.join(parts))
    self.title, self.missing, self.unexpected, self.mismatched = (
        title, missing, unexpected, mismatched)
    self.presets = guess_presets(shapes) if shapes else []
    self.notes: list[str] = []  # hints on what to change, shown after the rows

  def __str__(self) -> str:
    return super().__str__() + ''.join(f'\n({note})' for note in self.notes)

  def one_line(self) -> str:

    counts = []
    for rows, what in ((self.mismatched, 'shape mismatch'), (self.missing, 'missing key'),
                       (self.unexpected, 'unexpected key')):
      if rows:
        counts.append(f'{len(rows)} {what}{"es" if what.endswith("h") else "s"}, e.g. '
                      f'{rows[0]}' if len(rows) > 1 else f'1 {what}: {rows[0]}')
    fits = (f'; the file fits preset {" / ".join(self.presets)}' if self.presets else
            '; no preset fits the file')
    notes = ''.join(f' ({note})' for note in self.notes)
    return f'{self.title} {"; ".join(counts)}{fits}{notes} (--verbose lists all)'


def vit_architecture(params_or_flat: Mapping) -> Optional[dict[str, Any]]:
  """hidden_size, patch, num_layers, mlp_dim, num_heads of a ViT (or hybrid) tree; None if not one."""
  flat = _as_flat(params_or_flat)
  embedding = flat.get('embedding/kernel')
  block = 'Transformer/encoderblock_0/'
  query = flat.get(block + 'MultiHeadDotProductAttention_1/query/kernel')
  mlp = flat.get(block + 'MlpBlock_3/Dense_0/kernel')
  if embedding is None or query is None or mlp is None or len(_shape(embedding)) != 4:
    return None
  layers = {int(m.group(1)) for m in
            (re.match(r'Transformer/encoderblock_(\d+)/', k) for k in flat) if m}
  return dict(hidden_size=_shape(embedding)[-1], patch=_shape(embedding)[:2],
              num_layers=len(layers), mlp_dim=_shape(mlp)[-1], num_heads=_shape(query)[1])


def _mixer_architecture(flat: Mapping) -> Optional[dict[str, Any]]:
  stem = flat.get('stem/kernel')
  tokens = flat.get('MixerBlock_0/token_mixing/Dense_0/kernel')
  channels = flat.get('MixerBlock_0/channel_mixing/Dense_0/kernel')
  if stem is None or tokens is None or channels is None:
    return None
  blocks = {int(m.group(1)) for m in (re.match(r'MixerBlock_(\d+)/', k) for k in flat) if m}
  return dict(hidden_dim=_shape(stem)[-1], patch=_shape(stem)[:2], num_blocks=len(blocks),
              tokens_mlp_dim=_shape(tokens)[-1], channels_mlp_dim=_shape(channels)[-1])


def guess_presets(params_or_flat: Mapping) -> list[str]:
  """The presets (`vit_jax.configs.models` names) whose architecture a tree's shapes show.

  Read off the shapes alone (an .npz's headers are enough: `read_npz_specs`),
  ignoring what fine-tuning adapts (head, representation layer, position-embedding
  grid): ['ViT-B_16'] for a ViT-B/16 file, ['BiT-R50x1'] for BiT-M R50x1; ViT,
  R+ViT hybrids, BiT ResNets and MLP-Mixers. [] when no preset fits.
  """
  from vit_jax.configs import models as models_config  # pylint: disable=g-import-not-at-top
  flat = _as_flat(params_or_flat)
  if is_bit_layout(flat) or ('conv_root/kernel' in flat and not any(
      k.startswith('Transformer/') for k in flat)):
    name = bit_preset_name(flat)
    return [name] if name else []
  vit, mixer = vit_architecture(flat), _mixer_architecture(flat)
  resnet = resnet_architecture(flat) if vit is not None and 'conv_root/kernel' in flat else None
  found = []
  for name in models_config.names():
    config = models_config.get_config(name)
    kind = config.get('model_type', 'vit')
    if kind == 'vit' and vit is not None:
      fits = (config.hidden_size == vit['hidden_size']
              and tuple(config.patches.size) == tuple(vit['patch'])
              and config.transformer.num_layers == vit['num_layers']
              and config.transformer.mlp_dim == vit['mlp_dim']
              and config.transformer.num_heads == vit['num_heads']
              # A class token means classifier 'token' (the gap-norep presets have none).
              and (config.classifier == 'token') == ('cls' in flat))
      if config.get('resnet') is None:
        fits = fits and resnet is None
      else:
        fits = fits and resnet is not None and (
            tuple(config.resnet.num_layers) == resnet.num_layers
            and int(64 * config.resnet.width_factor) == resnet.root_width)
    elif kind == 'mixer' and mixer is not None:
      fits = all(config.get(k) == v for k, v in mixer.items() if k != 'patch') and tuple(
          config.patches.size) == tuple(mixer['patch'])
    else:
      fits = False
    if fits:
      found.append(name)
  return found


# ---------------------------------------------------------------------------
# Geometry read off the parameters
# ---------------------------------------------------------------------------

def _config_get(config: Any, name: str, default: Any = None) -> Any:
  if config is None:
    return default
  if isinstance(config, Mapping):
    return config.get(name, default)
  return getattr(config, name, default)


def _resolve_config(model_config: Any) -> Any:
  if isinstance(model_config, str):
    from vit_jax.configs import models as models_config
    return models_config.get_config(model_config)
  return model_config


# ---------------------------------------------------------------------------
# Fine-tuning initialisation
# ---------------------------------------------------------------------------

def model_family(flat: Mapping[str, Any]) -> str:
  """'vit', 'hybrid' (R50+ViT), 'resnet' (BiT), 'mixer' or 'unknown', from the key set.

  Our ResNetV2 tree and the BiT-M release layout (`resnet/...`) are both 'resnet'.
  """
  if is_bit_layout(flat):
    return 'resnet'
  if any(_MIXER_TOKEN_RE.match(k) for k in flat):
    return 'mixer'
  has_transformer = any(k.startswith('Transformer/') for k in flat)
  has_stem = any(k.startswith('conv_root/') for k in flat)
  if has_transformer and has_stem:
    return 'hybrid'
  if has_transformer:
    return 'vit'
  if has_stem:
    return 'resnet'
  return 'unknown'


def _format_problems(title: str, rows: list[str]) -> str:
  return f'{title} ({len(rows)}):\n  ' + '\n  '.join(rows)


def _raise_if_problems(title: str, missing: list[str], unexpected: list[str],
                       mismatched: list[str], shapes: Optional[Mapping] = None) -> None:
  """ModelMismatchError listing every missing / unexpected key and shape mismatch, if any.

  `shapes`, the checked tree's flat {key: array or spec}, lets the error name the
  preset that fits it.
  """
  if not (missing or unexpected or mismatched):
    return
  raise ModelMismatchError(title, missing, unexpected, mismatched, shapes)


# ---------------------------------------------------------------------------
# MLP-Mixer: the token-mixing MLP is tied to the patch grid
# ---------------------------------------------------------------------------

# `MixerBlock_3/token_mixing/Dense_0/kernel`: (num_patches, D_S); Dense_1 (D_S, num_patches).
_MIXER_TOKEN_RE = re.compile(r'MixerBlock_(\d+)/token_mixing/Dense_([01])/(kernel|bias)$')


# ---------------------------------------------------------------------------
# Checking a tree against a model
# ---------------------------------------------------------------------------

def abstract_params(model_config: Any, num_classes: int,
                    image_size: tuple[int, int]) -> Params:
  """The model's params as `jax.ShapeDtypeStruct`s (no memory, no compute)."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from vit_jax.configs import models as models_config  # pylint: disable=g-import-not-at-top
  model = models_config.build_model(_resolve_config(model_config), num_classes)
  images = jax.ShapeDtypeStruct((1, image_size[0], image_size[1], 3), jnp.float32)
  variables = jax.eval_shape(
      lambda rng, x: model.init(rng, x, train=False), jax.random.key(0), images)
  return dict(variables['params'])


def check_params(params: Mapping, expected: Mapping, source: str = 'params',
                 title: Optional[str] = None) -> None:
  """ValueError listing every missing/unexpected key and shape mismatch (both shapes).

  Each row calls the checked tree `source`; the message starts with `title`
  (default: '<source> does not fit the model:').
  """
  have, want = flatten(params), flatten(expected)
  missing = [f'{k}: model {_shape(v)}, not in {source}' for k, v in sorted(want.items())
             if k not in have]
  unexpected = [f'{k}: {source} {_shape(v)}, not in model' for k, v in sorted(have.items())
                if k not in want]
  mismatched = [f'{k}: {source} {_shape(have[k])} vs model {_shape(v)}'
                for k, v in sorted(want.items()) if k in have and _shape(have[k]) != _shape(v)]
  _raise_if_problems(title or f'{source} does not fit the model:', missing, unexpected,
                     mismatched, have)
