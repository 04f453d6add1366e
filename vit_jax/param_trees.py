"""Parameter trees <-> flat dicts keyed by '/'-joined paths, as checkpoints store them.

`flatten({'a': {'b': x}}) == {'a/b': x}`; `unflatten` is its inverse and refuses
a path that is both an array and a module.
"""

from __future__ import annotations

import os
from typing import Any, Mapping, Union

import numpy as np


PathLike = Union[str, os.PathLike]
Params = dict

SEP = '/'


# ---------------------------------------------------------------------------
# Trees <-> flat dicts
# ---------------------------------------------------------------------------

def _is_leaf(x: Any) -> bool:
  return not isinstance(x, Mapping)


def flatten(tree: Mapping, sep: str = SEP) -> dict[str, Any]:
  """{'a': {'b': x}} -> {'a/b': x}. Leaves are kept as they are."""
  flat = {}

  def visit(node, prefix):
    for key, value in node.items():
      if not isinstance(key, str) or not key or sep in key:
        raise ValueError(f'Invalid parameter name {key!r} under {prefix!r}')
      path = f'{prefix}{sep}{key}' if prefix else key
      if _is_leaf(value):
        flat[path] = value
      else:
        visit(value, path)

  if not isinstance(tree, Mapping):
    raise TypeError(f'Expected a nested dict of arrays, got {type(tree).__name__}')
  visit(tree, '')
  return flat


def unflatten(flat: Mapping[str, Any], sep: str = SEP) -> dict:
  """{'a/b': x} -> {'a': {'b': x}}; a key that is both a leaf and a prefix is an error."""
  tree: dict = {}
  for path, value in flat.items():
    parts = path.split(sep)
    if any(not p for p in parts):
      raise ValueError(f'Invalid parameter path {path!r} (empty component)')
    node = tree
    for depth, part in enumerate(parts[:-1]):
      child = node.setdefault(part, {})
      if not isinstance(child, dict):
        raise ValueError(
            f'Parameter path {path!r} conflicts with the array stored at '
            f'{sep.join(parts[:depth + 1])!r}')
      node = child
    if parts[-1] in node:
      raise ValueError(f'Parameter path {path!r} is both an array and a module')
    node[parts[-1]] = value
  return tree


def _to_numpy(x: Any) -> np.ndarray:
  """A host numpy array for anything array-like (jax, numpy, torch on CPU)."""
  if hasattr(x, 'detach'):  # a torch tensor, without importing torch
    x = x.detach().cpu()
    if str(x.dtype) == 'torch.bfloat16':
      x = x.float()
    return x.numpy()
  return np.asarray(x)


def _as_flat(params_or_flat: Mapping) -> Mapping:
  """A flat {'a/b': x} dict, whether given flat or nested."""
  if any(SEP in k for k in params_or_flat) or not any(
      isinstance(v, Mapping) for v in params_or_flat.values()):
    return params_or_flat
  return flatten(params_or_flat)


def _shape(x: Any) -> tuple:
  return tuple(x.shape)
