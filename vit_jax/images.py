"""Reading images for the models: one loader for predict, visualize and evaluate.

`load_image(image, size)` gives what a model eats: float32 (H, W, 3) in [-1, 1],
resized (bilinear, no crop) from a file path, a PIL image or an array.
`read_uint8(image)` gives the same picture as uint8 RGB for display and crops.
Both read files the same way: grey, RGBA and palette images become RGB;
16-bit greyscale files (PIL modes 'I;16', 'I') are scaled by their real range
(65535), not clipped to 8 bits; a file PIL cannot decode, or one larger than
its decompression-bomb guard, is a ValueError naming the file.

The input pipeline (vit_jax.input_pipeline) decodes with TensorFlow instead:
training data never passes through here.
"""

from __future__ import annotations

import os
from typing import Any, Sequence, Union

import numpy as np
from PIL import Image

ImageLike = Union[str, os.PathLike, np.ndarray, Any]  # path, array or PIL image


# PIL modes of 16-bit (and 32-bit integer) greyscale images: `convert('RGB')`
# clips them to 0..255, which saturates almost every pixel of a 16-bit image.
_WIDE_GREY_MODES = ('I;16', 'I;16L', 'I;16B', 'I;16N', 'I')
_UINT16_MAX = 65535.0


def _resize_unit_float(array: np.ndarray, height: int, width: int) -> np.ndarray:
  """(H, W) or (H, W, C) floats in [0, 1] -> (height, width, 3) in [-1, 1], kept in float.

  PIL resizes single-channel float ('F') images with the same bilinear filter
  it uses for 8-bit RGB, so 16-bit images lose no precision to an 8-bit step.
  """
  array = np.clip(np.asarray(array, np.float32), 0.0, 1.0)
  channels = [array] if array.ndim == 2 else [array[..., c] for c in range(min(array.shape[-1], 3))]
  resized = [np.asarray(Image.fromarray(np.ascontiguousarray(c), mode='F').resize(
      (width, height), Image.BILINEAR), np.float32) for c in channels]
  out = np.stack(resized * 3 if len(resized) == 1 else resized, axis=-1)
  return out * 2.0 - 1.0


def _open_image(path: str, height: int, width: int) -> np.ndarray:
  try:
    with Image.open(path) as f:
      if f.mode in _WIDE_GREY_MODES:
        # Scaled by the format's real range (16 bits), not clipped to 8.
        return _resize_unit_float(np.asarray(f).astype(np.float32) / _UINT16_MAX, height, width)
      pil = f.convert('RGB')
  except Image.DecompressionBombError as e:
    raise ValueError(
        f'Cannot read image {path!r}: {e} Refused (PIL\'s limit is '
        f'2 x PIL.Image.MAX_IMAGE_PIXELS); shrink the image first') from None
  except (OSError, Image.UnidentifiedImageError, SyntaxError) as e:
    raise ValueError(f'Cannot read image {path!r}: {e}') from None
  pil = pil.resize((width, height), Image.BILINEAR)
  return np.asarray(pil, dtype=np.float32) / 127.5 - 1.0


def load_image(image: ImageLike, image_size: Union[int, Sequence[int]]) -> np.ndarray:
  """An RGB image resized to `image_size` and scaled to [-1, 1]: float32 (H, W, 3).

  `image` is a file path, a PIL image, or an (H, W[, C]) array: uint8 in
  [0, 255], uint16 in [0, 65535] or float in [0, 1]. Grey and RGBA images
  become RGB; 16-bit greyscale files (PIL modes 'I;16', 'I') are scaled by
  65535, not clipped to 8 bits. An image too large for PIL's decompression-bomb
  guard, or one that cannot be decoded, is a ValueError naming the file.
  """
  if isinstance(image_size, int):
    image_size = (image_size, image_size)
  height, width = int(image_size[0]), int(image_size[1])
  if isinstance(image, (str, os.PathLike)):
    return _open_image(os.fspath(image), height, width)
  if isinstance(image, np.ndarray):
    array = image
    if array.ndim == 3 and array.shape[-1] == 1:
      array = array[..., 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (3, 4)):
      raise ValueError(f'image array must be (H, W), (H, W, 3) or (H, W, 4), got {image.shape}')
    if array.dtype == np.uint16:
      return _resize_unit_float(array.astype(np.float32) / _UINT16_MAX, height, width)
    if array.dtype.kind == 'f':
      array = np.clip(np.rint(array * 255.0), 0, 255)
    array = array.astype(np.uint8)
    pil = Image.fromarray(array).convert('RGB')
  elif getattr(image, 'mode', None) in _WIDE_GREY_MODES:
    return _resize_unit_float(np.asarray(image).astype(np.float32) / _UINT16_MAX, height, width)
  else:
    pil = image.convert('RGB')
  pil = pil.resize((width, height), Image.BILINEAR)
  return np.asarray(pil, dtype=np.float32) / 127.5 - 1.0


def read_uint8(image: ImageLike) -> np.ndarray:
  """uint8 (H, W, 3) RGB from a file path, a PIL image or an array (see module doc)."""
  if isinstance(image, (str, os.PathLike)):
    path = os.fspath(image)
    try:
      with Image.open(path) as f:
        if f.mode in _WIDE_GREY_MODES:
          array = np.asarray(f).astype(np.float32) / _UINT16_MAX
        else:
          return np.asarray(f.convert('RGB'))
    except Image.DecompressionBombError as e:
      raise ValueError(f'Cannot read image {path!r}: {e} Refused (PIL\'s limit is '
                       f'2 x PIL.Image.MAX_IMAGE_PIXELS); shrink the image first') from None
    except (OSError, Image.UnidentifiedImageError, SyntaxError) as e:
      raise ValueError(f'Cannot read image {path!r}: {e}') from None
  elif isinstance(image, np.ndarray):
    array = image
  elif getattr(image, 'mode', None) in _WIDE_GREY_MODES:
    array = np.asarray(image).astype(np.float32) / _UINT16_MAX
  else:
    return np.asarray(image.convert('RGB'))
  if array.ndim == 3 and array.shape[-1] == 1:
    array = array[..., 0]
  if array.ndim == 2:
    array = np.repeat(array[..., None], 3, axis=-1)
  array = array[..., :3]
  if array.dtype == np.uint8:
    return array
  if array.dtype == np.uint16:
    array = array.astype(np.float32) / _UINT16_MAX
  elif array.dtype.kind != 'f':
    array = array.astype(np.float32) / 255.0
  return np.clip(np.rint(np.asarray(array, np.float32) * 255.0), 0, 255).astype(np.uint8)
