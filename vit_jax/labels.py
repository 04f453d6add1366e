"""Class names: the ImageNet-1k list shipped with the package, or a user's file."""

from __future__ import annotations

import functools
import importlib.resources
import os
from typing import Union

IMAGENET1K_FILE = 'data/imagenet1k_labels.txt'


def _read_lines(text: str, source: str) -> list[str]:
  labels = [line.strip() for line in text.splitlines()]
  while labels and not labels[-1]:
    labels.pop()
  if not labels:
    raise ValueError(f'{source}: no labels')
  if any(not label for label in labels):
    raise ValueError(f'{source}: empty line inside the label list')
  return labels


@functools.lru_cache(maxsize=None)
def imagenet1k_labels() -> tuple[str, ...]:
  """The 1000 ImageNet-1k (ILSVRC-2012) class names in the standard class-index order.

  One WordNet synset per class, its lemmas joined by ', ' (e.g. 'tabby, tabby cat').
  """
  text = importlib.resources.files('vit_jax').joinpath(IMAGENET1K_FILE).read_text('utf-8')
  labels = _read_lines(text, IMAGENET1K_FILE)
  if len(labels) != 1000:
    raise ValueError(f'{IMAGENET1K_FILE} has {len(labels)} labels, expected 1000')
  return tuple(labels)


def load_labels(path: Union[str, os.PathLike]) -> list[str]:
  """A label file: one class name per line, line i naming class i."""
  with open(path, encoding='utf-8') as f:
    return _read_lines(f.read(), os.fspath(path))
