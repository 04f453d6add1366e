"""`image_size` values: an int (square) or (height, width)."""

from __future__ import annotations

from typing import Any

import numpy as np


def image_hw(value: Any, field: str = 'image_size') -> tuple[int, int]:
  """(height, width) from an int, a 1-tuple (square) or a 2-sequence.

  The command line gives tuples: `--config.image_size=384` arrives as (384,)
  and `--config.image_size='(384,512)'` as (384, 512). Anything else raises
  ValueError naming `field`.
  """
  if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
    sizes = (int(value),) * 2
  elif isinstance(value, (tuple, list)) and len(value) in (1, 2) and all(
      isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in value):
    sizes = tuple(int(v) for v in value) * (2 if len(value) == 1 else 1)
  else:
    raise ValueError(f'config.{field} must be a positive int or (height, width), got {value!r}')
  if min(sizes) < 1:
    raise ValueError(f'config.{field} must be positive, got {value!r}')
  return sizes
