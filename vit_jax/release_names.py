"""What a published checkpoint's file name says: its model, data, recipe and resolution.

Two families of names are read:

- The AugReg release (Steiner et al. 2021), a pre-training stem

      {short}-{ds}-{epochs}ep-lr_{lr}-aug_{aug}-wd_{wd}-do_{do}-sd_{sd}
      B_16-i21k-300ep-lr_0.001-aug_medium1-wd_0.1-do_0.0-sd_0.0.npz

  and a fine-tuned file, that stem + `--{adapt_ds}-steps_{k}k-lr_{lr}-res_{res}`.
  `short` is the preset with 'ViT-' dropped and '+' made '_' (`R26_S_32`).
- The ViT paper's files: `ViT-B_16.npz`, `R50+ViT-B_16.npz`, and fine-tuned ones
  such as `imagenet21k+imagenet2012_ViT-B_16-224.npz` (upstream+downstream, preset,
  resolution).

`preset_for` gives the commands (`predict`, `evaluate`, `convert`, `export`,
`visualize`) a model when no `--model` was given and refuses one that does not fit;
`check_pretrained` does the same for `config.pretrained_path` before training.
The arrays are the ground truth: where a name and the arrays' shapes
(`checkpoint.guess_presets`, read from the .npy headers) disagree, the arrays win
and the note says so. A file whose name says nothing is left alone (None).
This module reads no array data and imports no JAX.
"""

from __future__ import annotations

import dataclasses
import os
import re
import sys
from typing import Any, Mapping, Optional

_NUMBER = r'[0-9]+(?:\.[0-9]+)?(?:e-?[0-9]+)?'
# The released ViT sizes; this project's own tiny presets (ViT-Test_4) are no release names.
_SIZE = '(?:Ti|S|B|L|H|g)'
_AUGREG = re.compile(
    rf'(?P<short>(?:R[0-9]*_)?{_SIZE}_[0-9]+(?:-gap-norep)?)-(?P<ds>i1k|i21k|i21k_30)'
    r'-(?P<epochs>[0-9]+)ep'
    rf'-lr_(?P<lr>{_NUMBER})-aug_(?P<aug>[a-z]+[0-9]*)-wd_(?P<wd>{_NUMBER})'
    rf'-do_(?P<do>{_NUMBER})-sd_(?P<sd>{_NUMBER})'
    rf'(?:--(?P<adapt_ds>[a-z0-9_.]+)-steps_(?P<steps>[0-9]+)k-lr_(?P<adapt_lr>{_NUMBER})'
    r'-res_(?P<res>[0-9]+))?')
_PAPER = re.compile(
    r'(?:(?P<upstream>[a-z0-9]+)\+(?P<adapt_ds>[a-z0-9_]+)_)?'
    rf'(?P<preset>(?:R[0-9]*\+)?ViT-{_SIZE}_[0-9]+)(?:-(?P<res>[0-9]+))?')


@dataclasses.dataclass(frozen=True)
class ReleaseName:
  """The fields of a release file name (strings as written; None where absent)."""
  preset: str  # a `vit_jax.configs.models` name
  family: str  # 'augreg' or 'vit'
  stem: str  # the name without folder or `.npz`
  upstream: Optional[str] = None  # pre-training data: 'i21k', 'imagenet21k', ...
  adapt_ds: Optional[str] = None  # fine-tuning data of a fine-tuned file
  resolution: Optional[int] = None  # its fine-tuning resolution (res_N / -N)
  recipe: Optional[dict[str, str]] = None  # AugReg: epochs, lr, aug, wd, do, sd


def stem(path: str | os.PathLike) -> str:
  name = os.path.basename(os.fspath(path))
  return name[:-4] if name.endswith('.npz') else name


def parse(path: str | os.PathLike) -> Optional[ReleaseName]:
  """The release name `path` carries; None when its name is not one of the release's."""
  from vit_jax.configs import models  # pylint: disable=g-import-not-at-top
  name = stem(path)
  match = _AUGREG.fullmatch(name)
  if match:
    preset = models.canonical_name(match['short'])
    if preset not in models.names():
      return None
    res = match['res']
    return ReleaseName(
        preset, 'augreg', name, upstream=match['ds'], adapt_ds=match['adapt_ds'],
        resolution=int(res) if res else None,
        recipe={k: match[k] for k in ('epochs', 'lr', 'aug', 'wd', 'do', 'sd')})
  match = _PAPER.fullmatch(name)
  if match and match['preset'] in models.names():
    res = match['res']
    return ReleaseName(match['preset'], 'vit', name, upstream=match['upstream'] or None,
                       adapt_ds=match['adapt_ds'], resolution=int(res) if res else None)
  return None


@dataclasses.dataclass(frozen=True)
class Identified:
  """The preset a release-named file holds, and why."""
  preset: str
  name: ReleaseName
  note: Optional[str]  # set when the arrays overrule the name
  fits: tuple[str, ...]  # the presets the arrays' shapes fit (none: a file of no preset)


def identify(path: str | os.PathLike, specs: Optional[Mapping[str, Any]] = None
             ) -> Optional[Identified]:
  """The preset of a release-named .npz: the name's, unless its arrays show another."""
  name = parse(path)
  if name is None:
    return None
  from vit_jax import checkpoint  # pylint: disable=g-import-not-at-top
  if specs is None:
    specs = checkpoint.read_npz_specs(os.fspath(path))
  fits = tuple(checkpoint.guess_presets(specs))
  if not fits or name.preset in fits:
    return Identified(name.preset, name, None, fits)
  note = (f'{os.fspath(path)!r} is named as a {name.preset} checkpoint but its arrays are '
          f'{fits[0]}\'s; the arrays win: using {fits[0]}')
  return Identified(fits[0], name, note, fits)


def _refuses(found: Optional[Identified], model: str) -> bool:
  """Whether `model` is not what the file holds. Arrays that fit no preset refuse
  nothing here: loading names their mismatched shapes."""
  from vit_jax.configs import models  # pylint: disable=g-import-not-at-top
  return found is not None and bool(found.fits) and models.canonical_name(model) not in found.fits


def preset_for(path: str | os.PathLike, model: Optional[str],
               specs: Optional[Mapping[str, Any]] = None, flag: str = '--model',
               required: bool = False) -> Optional[str]:
  """The model to build for `path`: `model` if given and it fits, else the file's own.

  None for a file whose name is not a release name and no `model` (as before),
  or with `required` a ValueError asking for `flag`. A `model` that does not fit
  a release-named file is refused in one line naming the preset that does.
  """
  found = None
  if str(path).endswith('.npz') and os.path.isfile(path):
    found = identify(path, specs)
  if found is None:
    if model is None and required:
      raise ValueError(f'{os.fspath(path)!r} is not named like a released checkpoint: name '
                       f'its model with {flag} PRESET')
    return model
  if model is None:
    if found.note:
      print(f'note: {found.note}', file=sys.stderr)
    return found.preset
  if _refuses(found, model):
    why = found.note or f'{os.path.basename(os.fspath(path))!r} is a {found.preset} checkpoint'
    raise ValueError(f'{flag} {model} does not fit {os.fspath(path)!r}: {why}; use '
                     f'{flag} {found.preset} (or leave {flag} out)')
  return model


def image_size(path: str | os.PathLike, specs: Mapping[str, Any], preset: str
               ) -> Optional[tuple[int, int]]:
  """A file's resolution: its position embeddings' (the arrays win), else `res_N`."""
  from vit_jax import checkpoint  # pylint: disable=g-import-not-at-top
  name = parse(path)
  try:
    size = checkpoint.infer_image_size(specs, preset)
  except ValueError:
    size = None
  if name is not None and name.resolution and size and size != (name.resolution,) * 2:
    print(f'note: {os.fspath(path)!r} is named for {name.resolution} px but its position '
          f'embeddings are for {size[0]}x{size[1]}; the arrays win', file=sys.stderr)
  if size is None and name is not None and name.resolution:
    size = (name.resolution, name.resolution)
  return size


def check_pretrained(path: str, model_name: str) -> None:
  """Refuses, before training, a release-named `config.pretrained_path` of another model."""
  path = os.path.expanduser(str(path))
  if not path.endswith('.npz') or not os.path.isfile(path):
    return
  found = identify(path)
  if not _refuses(found, model_name):
    return
  why = found.note or f'it is a {found.preset} checkpoint'
  raise ValueError(f'config.pretrained_path={path!r} does not fit config.model_name='
                   f'{model_name!r}: {why}; set --config.model_name={found.preset}')
