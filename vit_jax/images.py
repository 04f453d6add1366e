"""Reading images for the models: one loader for predict, visualize and evaluate.

`load_image(image, size)` gives what a model eats: float32 (H, W, 3) in [-1, 1],
resized (bilinear, no crop) from a file path, a PIL image or an array.
`read_uint8(image)` gives the same picture as uint8 RGB for display and crops;
`load_image_spec` adds `skimage:NAME` and `digits:SPLIT:INDEX` sources,
`prepare_image` the centred crop and display copy the visualisations draw on.
Both read files the same way: grey, RGBA and palette images become RGB;
16-bit greyscale files (PIL modes 'I;16', 'I') are scaled by their real range
(65535), not clipped to 8 bits; a file PIL cannot decode, or one larger than
its decompression-bomb guard, is a ValueError naming the file.

The input pipeline (vit_jax.input_pipeline) decodes with TensorFlow instead:
training data never passes through here.
"""

from __future__ import annotations

import os
from typing import Any, Optional, Sequence, Union

import numpy as np
from PIL import Image

ImageLike = Union[str, os.PathLike, np.ndarray, Any]  # path, array or PIL image

# The one pixel limit of every image reader (predict, visualize, evaluate, and the
# training and evaluation input pipeline, which follows config.bad_images): a larger
# image is refused from its header, before it is decoded. PIL's own
# decompression-bomb limit: 2 x PIL.Image.MAX_IMAGE_PIXELS = 178,956,970 pixels
# (about 13,377 x 13,377; 537 MB as RGB).
MAX_PIXELS = 2 * Image.MAX_IMAGE_PIXELS



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


def _pair(x: Sequence[int] | int) -> tuple[int, int]:
  return (int(x), int(x)) if isinstance(x, (int, np.integer)) else (int(x[0]), int(x[1]))


def to_model_input(image: np.ndarray) -> np.ndarray:
  """uint8 (H, W, 3) or (B, H, W, 3) in 0..255 -> float32 in [-1, 1] with a batch axis."""
  x = np.asarray(image, np.float32)
  if x.ndim == 3:
    x = x[None]
  return x / 127.5 - 1.0


def square_crop(image: np.ndarray) -> np.ndarray:
  """The largest centred square of an (H, W, C) image."""
  return center_crop(image, (1, 1))


def center_crop(image: np.ndarray, aspect: Sequence[int]) -> np.ndarray:
  """The largest centred crop of an (H, W, C) image with height:width = aspect."""
  h, w = image.shape[:2]
  ah, aw = _pair(aspect)
  if w * ah > h * aw:  # wider than the target: keep the full height
    ch, cw = h, max(1, int(round(h * aw / ah)))
  else:
    ch, cw = max(1, int(round(w * ah / aw))), w
  top, left = (h - ch) // 2, (w - cw) // 2
  return image[top:top + ch, left:left + cw]


def resize(image: np.ndarray, size: int | Sequence[int]) -> np.ndarray:
  """uint8 (H, W, 3) resized to (size, size) (or (h, w)) with bilinear filtering."""
  h, w = _pair(size)
  image = np.asarray(image)
  if image.shape[:2] == (h, w):
    return image.astype(np.uint8)
  return np.asarray(Image.fromarray(image.astype(np.uint8)).resize(
      (w, h), Image.BILINEAR))


def load_image_spec(spec: str) -> np.ndarray:
  """uint8 (H, W, 3) from a file path, `skimage:NAME` or `digits:SPLIT:INDEX`."""
  if spec.startswith('skimage:'):
    try:
      import skimage.data  # pylint: disable=g-import-not-at-top
    except ImportError:
      raise ValueError(f'Image {spec!r} needs scikit-image (a dependency of vit_jax: '
                       'pip install "scikit-image>=0.24,<0.27")') from None

    name = spec.split(':', 1)[1]
    loader = getattr(skimage.data, name, None)
    if loader is None:
      raise ValueError(f'skimage.data has no image {name!r}')
    image = np.asarray(loader())
  elif spec.startswith('digits:'):
    parts = spec.split(':')
    split = parts[1] if len(parts) > 1 and parts[1] else 'test'
    index = _digits_index(spec, parts[2]) if len(parts) > 2 and parts[2] else 0
    image = digits_images(split, [index])[0][0]

  else:
    return read_uint8(spec)
  return read_uint8(image)


def load_images(spec: str, image_size: Optional[int | Sequence[int]] = None
                ) -> list[np.ndarray]:
  """Like `load_image_spec`, and `digits:SPLIT:A-B` gives images A..B (inclusive).

  Digits are resized to `image_size` the way the input pipeline does it, so
  the model sees what it saw in evaluation; other images are left as they are.
  """
  parts = spec.split(':')
  if parts[0] == 'digits':
    split = parts[1] if len(parts) > 1 and parts[1] else 'test'
    index = parts[2] if len(parts) > 2 and parts[2] else '0'
    first, _, last = index.partition('-')
    first = _digits_index(spec, first)
    last = _digits_index(spec, last) if last else first
    if last < first:
      raise ValueError(f'Image {spec!r}: the range {first}-{last} is reversed; give A-B with '
                       f'A <= B, e.g. digits:{split}:{last}-{first}')
    return list(digits_images(split, range(first, last + 1), image_size)[0])
  return [load_image_spec(spec)]


def _digits_index(spec: str, text: str) -> int:
  try:
    index = int(text)
  except ValueError:
    index = -1
  if index < 0:
    raise ValueError(f'Image {spec!r}: {text!r} is not an image index (0, 1, ...); give '
                     'digits:SPLIT:INDEX or digits:SPLIT:A-B')
  return index



def digits_images(split: str = 'test', indices: Optional[Sequence[int]] = None,
                  image_size: Optional[int | Sequence[int]] = None
                  ) -> tuple[np.ndarray, np.ndarray]:
  """(uint8 images (N, 32, 32, 3), labels) of the embedded digits dataset.

  With `image_size` (an int or (height, width)), the images are resized to it
  exactly as the input pipeline's eval 'resize' does (`tf.image.resize`,
  bilinear, no antialiasing).
  """
  from vit_jax.datasets import digits  # pylint: disable=g-import-not-at-top
  images, labels = digits.load_arrays(split)
  if indices is not None:
    indices = list(indices)
    outside = [i for i in indices if not 0 <= i < len(images)]
    if outside:
      raise ValueError(f'digits {split!r} has {len(images)} images (0-{len(images) - 1}); '
                       f'no image {outside[0]}')

    images, labels = images[indices], labels[indices]
  if image_size is not None and images.shape[1:3] != _pair(image_size):
    height, width = _pair(image_size)
    rows = digits.interpolation_matrix(height, images.shape[1])
    cols = digits.interpolation_matrix(width, images.shape[2])
    resized = np.einsum('ij,njkc,lk->nilc', rows, images.astype(np.float64), cols)
    images = np.clip(np.round(resized), 0, 255).astype(np.uint8)
  return images, labels


def prepare_image(image: np.ndarray, size: int | Sequence[int],
                  display_size: int = 224) -> tuple[np.ndarray, np.ndarray]:
  """(model input, display image): a centred crop, resized both ways.

  `size` is an int (square) or (height, width); the crop is the largest centred
  one with that aspect ratio. The display image is the same crop with its
  shorter side `display_size` (never smaller than the model input), so
  overlays computed at the model's resolution are drawn on a sharper picture.
  """
  height, width = _pair(size)
  crop = center_crop(np.asarray(image), (height, width))
  model_input = resize(crop, (height, width))
  scale = max(display_size, min(height, width)) / min(height, width)
  display = (int(round(height * scale)), int(round(width * scale)))
  if crop.shape[0] < display[0] or crop.shape[1] < display[1]:
    # Small source: enlarge by repeating pixels, so no blur is invented.
    factor = int(np.ceil(max(display[0] / crop.shape[0], display[1] / crop.shape[1])))
    shown = np.kron(crop, np.ones((factor, factor, 1), crop.dtype))
  else:
    shown = resize(crop, display)
  return model_input, shown
