"""RandAugment as the AugReg checkpoints were trained with it, in TensorFlow for tf.data.

The 16 ops, their magnitude-to-argument map and the layer rule of the code AugReg
ran (big_vision's `pp/archive/autoaugment.py`, from the EfficientNet code): each
of `num_layers` layers picks one op uniformly and always applies it at the fixed
`magnitude` (MAX_LEVEL = 10; AugReg's 15 and 20 extrapolate linearly past it);
geometric ops take a random sign and fill what they uncover with 128. Pixel ops
follow Pillow's definitions (`PIL.ImageOps` / `PIL.ImageEnhance`); where AugReg's
code differs from them:

* Contrast blends towards the mean grey level, as Pillow. AugReg's TF code blends
  towards (pixel count / 256) instead, a grey that depends on the image size, not
  its content (196 at 224x224, 255 from 256x256 up); see docs/input_pipeline.md.
* Posterize at fewer than 1 bit (magnitude < 2.5) keeps 1 bit: AugReg shifts by 8,
  which TensorFlow clamps to 7 (Pillow refuses 0 bits).

Randomness is stateless (`seed`, shape [2]): the same image and seed give the same
result in every process. TensorFlow is imported lazily: the op names and the
argument map (`OPS`, `op_argument`, `check`) need none.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, Sequence

OPS = ('AutoContrast', 'Equalize', 'Invert', 'Rotate', 'Posterize', 'Solarize', 'Color',
       'Contrast', 'Brightness', 'Sharpness', 'ShearX', 'ShearY', 'TranslateX', 'TranslateY',
       'Cutout', 'SolarizeAdd')
# Ops whose argument takes a random sign.
GEOMETRIC = ('Rotate', 'ShearX', 'ShearY', 'TranslateX', 'TranslateY')
MAX_LEVEL = 10.0
FILL = 128  # what geometric ops uncover and Cutout paints


def op_argument(name: str, magnitude: float) -> float | int | None:
  """The argument op `name` takes at `magnitude` (unsigned; None: the op takes none)."""
  level = magnitude / MAX_LEVEL
  enhance = level * 1.8 + 0.1  # Color, Contrast, Brightness, Sharpness: the blend factor
  return {
      'Rotate': level * 30.0,  # degrees
      'Posterize': int(level * 4),  # bits kept
      'Solarize': int(level * 256),  # threshold
      'SolarizeAdd': int(level * 110),  # added below 128
      'Color': enhance, 'Contrast': enhance, 'Brightness': enhance, 'Sharpness': enhance,
      'ShearX': level * 0.3, 'ShearY': level * 0.3,
      'TranslateX': level * 100.0, 'TranslateY': level * 100.0,  # pixels
      'Cutout': int(level * 40),  # half the side of the square
  }.get(name)


def check(randaug: Any, ops: Any) -> tuple[int, float, tuple[str, ...]] | None:
  """`config.pp.randaug` / `config.pp.randaug_ops` checked: (layers, magnitude, ops), or
  None when RandAugment is off (None, or zero layers). ValueError names the field."""
  if ops is not None:
    if isinstance(ops, str) or not all(isinstance(o, str) for o in ops) or not ops:
      raise ValueError(f'config.pp.randaug_ops must be a non-empty tuple of op names, got '
                       f'{ops!r}; the ops: {", ".join(OPS)}')
    unknown = [o for o in ops if o not in OPS]
    if unknown:
      raise ValueError(f'Unknown op(s) {", ".join(map(repr, unknown))} in '
                       f'config.pp.randaug_ops; the ops: {", ".join(OPS)}')
    ops = tuple(dict.fromkeys(ops))
  if randaug is None:
    return None
  bad = ValueError('config.pp.randaug must be None or (num_layers, magnitude) with an '
                   f'integer num_layers >= 0 and a magnitude >= 0, got {randaug!r}')
  if isinstance(randaug, str) or len(randaug) != 2:
    raise bad
  layers, magnitude = randaug
  try:
    ok = (not isinstance(layers, bool) and float(layers).is_integer() and layers >= 0
          and not isinstance(magnitude, (bool, str)) and 0 <= float(magnitude) < math.inf)
  except (TypeError, ValueError):
    ok = False
  if not ok:
    raise bad
  if int(layers) == 0:
    return None
  return int(layers), float(magnitude), ops or OPS


@functools.cache
def _tf():
  from vit_jax import input_pipeline  # pylint: disable=g-import-not-at-top
  return input_pipeline._tf()  # pylint: disable=protected-access


# ----------------------------------------------------------------------------
# Pixel ops: uint8 [H, W, 3] -> uint8 [H, W, 3].
# ----------------------------------------------------------------------------


def _blend(degenerate, image, factor: float):
  """Pillow's Image.blend(degenerate, image, factor): truncated, clipped to 0..255."""
  tf = _tf()
  low = tf.cast(degenerate, tf.float32)
  out = low + factor * (tf.cast(image, tf.float32) - low)
  return tf.cast(tf.clip_by_value(out, 0.0, 255.0), tf.uint8)


def _grey(image):
  """Pillow's 'L' conversion (ITU-R 601-2 luma, rounded), float32 [H, W, 1]."""
  tf = _tf()
  luma = tf.reduce_sum(tf.cast(image, tf.float32) * [0.299, 0.587, 0.114], -1, keepdims=True)
  return tf.round(luma)


def _lookup(image, table):
  """image[..., c] -> table[c, image[..., c]] for a [3, 256] table."""
  tf = _tf()
  index = tf.cast(image, tf.int32) + tf.constant([0, 256, 512], tf.int32)
  return tf.gather(tf.reshape(tf.cast(table, tf.uint8), [-1]), index)


def _histograms(image):
  """[3, 256] int32 per-channel histograms."""
  tf = _tf()
  index = tf.cast(image, tf.int32) + tf.constant([0, 256, 512], tf.int32)
  counts = tf.math.bincount(tf.reshape(index, [-1]), minlength=768, maxlength=768)
  return tf.reshape(counts, [3, 256])


def auto_contrast(image, arg=None, key=None):
  """ImageOps.autocontrast: each channel's [min, max] stretched to [0, 255]."""
  del arg, key
  tf = _tf()
  channels = tf.reshape(image, [-1, 3])
  low = tf.cast(tf.reduce_min(channels, 0), tf.float64)[:, None]
  high = tf.cast(tf.reduce_max(channels, 0), tf.float64)[:, None]
  scale = 255.0 / tf.maximum(high - low, 1.0)
  levels = tf.range(256, dtype=tf.float64)[None]
  # As Pillow's table: int(i * scale + offset) in double precision.
  stretched = tf.clip_by_value(tf.floor(levels * scale - low * scale), 0.0, 255.0)
  return _lookup(image, tf.where(high > low, stretched, levels))


def equalize(image, arg=None, key=None):
  """ImageOps.equalize: per channel, the table Pillow builds from the histogram."""
  del arg, key
  tf = _tf()
  histograms = _histograms(image)
  levels = tf.range(256)
  last = tf.reduce_max(tf.where(histograms > 0, levels, -1), axis=1, keepdims=True)
  last_count = tf.reduce_sum(tf.where(levels == last, histograms, 0), axis=1, keepdims=True)
  step = (tf.reduce_sum(histograms, axis=1, keepdims=True) - last_count) // 255
  table = (step // 2 + tf.cumsum(histograms, axis=1, exclusive=True)) // tf.maximum(step, 1)
  table = tf.where(step > 0, tf.minimum(table, 255), levels)
  return _lookup(image, table)


def invert(image, arg=None, key=None):
  del arg, key
  return 255 - image


def posterize(image, bits: int, key=None):
  """ImageOps.posterize: keep the top `bits` bits (at least 1, as AugReg's shift does)."""
  del key
  tf = _tf()
  shift = 8 - min(max(int(bits), 1), 8)
  mask = tf.constant((0xFF << shift) & 0xFF, tf.uint8)
  return tf.bitwise.bitwise_and(image, mask)


def solarize(image, threshold: int, key=None):
  """ImageOps.solarize: values >= threshold inverted."""
  del key
  tf = _tf()
  return tf.where(tf.cast(image, tf.int32) < threshold, image, 255 - image)


def solarize_add(image, addition: int, key=None):
  """`addition` added to values below 128, clipped to 255."""
  del key
  tf = _tf()
  added = tf.clip_by_value(tf.cast(image, tf.int32) + addition, 0, 255)
  return tf.where(image < 128, tf.cast(added, tf.uint8), image)


def color(image, factor: float, key=None):
  """ImageEnhance.Color: blend with the grey image."""
  del key
  tf = _tf()
  return _blend(tf.repeat(_grey(image), 3, axis=-1), image, factor)


def contrast(image, factor: float, key=None):
  """ImageEnhance.Contrast: blend with the mean grey (rounded), not AugReg's count / 256."""
  del key
  tf = _tf()
  mean = tf.floor(tf.reduce_mean(_grey(image)) + 0.5)
  return _blend(tf.fill(tf.shape(image), mean), image, factor)


def brightness(image, factor: float, key=None):
  """ImageEnhance.Brightness: blend with black."""
  del key
  tf = _tf()
  return _blend(tf.zeros_like(image), image, factor)


def sharpness(image, factor: float, key=None):
  """ImageEnhance.Sharpness: blend with ImageFilter.SMOOTH (3x3, centre 5, /13; the
  border pixels kept)."""
  del key
  tf = _tf()
  kernel = tf.constant([[1., 1., 1.], [1., 5., 1.], [1., 1., 1.]]) / 13.0
  kernel = tf.tile(kernel[:, :, None, None], [1, 1, 3, 1])
  pixels = tf.cast(image, tf.float32)[None]
  smooth = tf.nn.depthwise_conv2d(pixels, kernel, [1, 1, 1, 1], 'VALID')[0]
  smooth = tf.clip_by_value(tf.round(smooth), 0.0, 255.0)
  inner = tf.pad(tf.ones_like(smooth, tf.bool), [[1, 1], [1, 1], [0, 0]])
  smooth = tf.where(inner, tf.pad(smooth, [[1, 1], [1, 1], [0, 0]]), pixels[0])
  return _blend(smooth, image, factor)


def cutout(image, half: int, key):
  """A square of side 2 * half centred at a uniform pixel (clipped at the borders) set
  to FILL."""
  tf = _tf()
  shape = tf.shape(image)
  centre = tf.random.stateless_uniform([2], key, minval=0, maxval=tf.int32.max,
                                       dtype=tf.int32) % shape[:2]

  def inside(axis):
    index = tf.range(shape[axis])
    return (index >= centre[axis] - half) & (index < centre[axis] + half)

  square = inside(0)[:, None, None] & inside(1)[None, :, None]
  return tf.where(square, tf.constant(FILL, tf.uint8), image)


# ----------------------------------------------------------------------------
# Geometric ops: output pixel (x, y) (pixel centres) reads input pixel
# round(a x + b y + c, d x + e y + f); what falls outside is FILL.
# ----------------------------------------------------------------------------


def _affine(image, a, b, c, d, e, f):
  tf = _tf()
  transform = tf.cast(tf.stack([a, b, c, d, e, f, 0.0, 0.0]), tf.float32)[None]
  out = tf.raw_ops.ImageProjectiveTransformV3(
      images=image[None], transforms=transform, output_shape=tf.shape(image)[:2],
      fill_value=float(FILL), interpolation='NEAREST', fill_mode='CONSTANT')[0]
  out.set_shape(image.shape)
  return out


def rotate(image, degrees: float, key=None):
  """Image.rotate(degrees) (counter-clockwise about the centre), nearest pixel."""
  del key
  tf = _tf()
  angle = tf.cast(degrees, tf.float32) * (math.pi / 180.0)
  cos, sin = tf.cos(angle), tf.sin(angle)
  height, width = (tf.cast(s - 1, tf.float32) for s in tf.unstack(tf.shape(image)[:2]))
  return _affine(image, cos, -sin, (width - cos * width + sin * height) / 2,
                 sin, cos, (height - sin * width - cos * height) / 2)


def shear_x(image, level: float, key=None):
  del key
  return _affine(image, 1.0, level, 0.0, 0.0, 1.0, 0.0)


def shear_y(image, level: float, key=None):
  del key
  return _affine(image, 1.0, 0.0, 0.0, level, 1.0, 0.0)


def translate_x(image, pixels: float, key=None):
  """The image moved left by `pixels` (right when negative)."""
  del key
  return _affine(image, 1.0, 0.0, pixels, 0.0, 1.0, 0.0)


def translate_y(image, pixels: float, key=None):
  del key
  return _affine(image, 1.0, 0.0, 0.0, 0.0, 1.0, pixels)


_FUNCTIONS: dict[str, Callable] = {
    'AutoContrast': auto_contrast, 'Equalize': equalize, 'Invert': invert,
    'Rotate': rotate, 'Posterize': posterize, 'Solarize': solarize, 'Color': color,
    'Contrast': contrast, 'Brightness': brightness, 'Sharpness': sharpness,
    'ShearX': shear_x, 'ShearY': shear_y, 'TranslateX': translate_x,
    'TranslateY': translate_y, 'Cutout': cutout, 'SolarizeAdd': solarize_add,
}


def apply_op(image, name: str, arg=None, key=None):
  """Op `name` with argument `arg` (signed for geometric ops; `key`: Cutout's seed)."""
  return _FUNCTIONS[name](image, arg, key)


def _layer(image, ops: Sequence[str], magnitude: float, seed):
  """One layer: an op drawn uniformly from `ops`, always applied."""
  tf = _tf()
  choose, sign_seed, key = tf.unstack(tf.random.experimental.stateless_split(seed, num=3))
  index = tf.random.stateless_uniform([], choose, maxval=len(ops), dtype=tf.int32)
  negate = tf.random.stateless_uniform([], sign_seed) < 0.5

  def branch(name):
    def run():
      arg = op_argument(name, magnitude)
      if name in GEOMETRIC:
        arg = tf.where(negate, -arg, arg)
      return apply_op(image, name, arg, key)
    return run

  out = tf.switch_case(index, [branch(name) for name in ops])
  out.set_shape(image.shape)
  return out


def randaugment(image, num_layers: int, magnitude: float, seed,
                ops: Sequence[str] | None = None):
  """RandAugment of one uint8 [H, W, 3] image with the stateless `seed` (shape [2]).

  Args:
    image: uint8 tensor [H, W, 3].
    num_layers: ops applied one after another (0: the image unchanged).
    magnitude: the ops' strength, 0..10 and beyond (AugReg: 0, 10, 15, 20).
    seed: stateless seed, int32/int64 [2]; the same seed gives the same result.
    ops: op names to draw from (default: all of `OPS`).

  Returns:
    uint8 tensor [H, W, 3].
  """
  tf = _tf()
  settings = check((num_layers, magnitude), None if ops is None else tuple(ops))
  image = tf.convert_to_tensor(image)
  if image.dtype != tf.uint8 or image.shape.rank != 3:
    raise ValueError(f'randaugment takes a uint8 [H, W, 3] image, got {image.dtype.name} '
                     f'of shape {image.shape}')
  if settings is None:
    return image
  layers, magnitude, ops = settings
  seeds = tf.random.experimental.stateless_split(seed, num=layers)
  for layer in range(layers):
    image = _layer(image, ops, magnitude, seeds[layer])
  return image
