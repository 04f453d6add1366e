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

import math
from typing import Any, Callable, Sequence

from vit_jax.tf_imports import _tf

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


# ----------------------------------------------------------------------------
# Pixel ops: uint8 [H, W, 3] -> uint8 [H, W, 3].
#
# Written for tf.data's CPU threads: elementwise arithmetic on whole images or on
# single channels, with scalars. On the CPU, tf.where, gathers and broadcasting a
# [3] or [H, W, 1] operand over [H, W, 3] each cost several times a plain
# arithmetic pass (benchmarks/input_pipeline_benchmark.py measures the whole).
# ----------------------------------------------------------------------------


def _to_uint8(pixels):
  """float -> uint8, clipped to 0..255 and truncated (as Pillow's blend and tables)."""
  tf = _tf()
  return tf.cast(tf.clip_by_value(pixels, 0.0, 255.0), tf.uint8)


def _blend(degenerate, image, factor: float):
  """Pillow's Image.blend(degenerate, image, factor) on float pixels."""
  return _to_uint8(degenerate + factor * (image - degenerate))


def _channels(image, dtype=None):
  tf = _tf()
  return tf.unstack(tf.cast(image, dtype or tf.float32), axis=-1)


def _merge(channels):
  """float32 channels [H, W] -> uint8 [H, W, 3] (truncated). Stacked on a new first axis
  and transposed: stacking on the last axis costs ~1 ms more per 224x224 image."""
  tf = _tf()
  return _to_uint8(tf.transpose(tf.stack(channels, 0), [1, 2, 0]))


def _grey(image):
  """Pillow's 'L' conversion (ITU-R 601-2 luma, rounded), float32 [H, W]."""
  tf = _tf()
  red, green, blue = _channels(image)
  return tf.round(red * 0.299 + green * 0.587 + blue * 0.114)


def auto_contrast(image, arg=None, key=None):
  """ImageOps.autocontrast: each channel's [min, max] stretched to [0, 255]."""
  del arg, key
  tf = _tf()
  out = []
  for channel in _channels(image, tf.float64):  # Pillow's table, in double precision
    low, high = tf.reduce_min(channel), tf.reduce_max(channel)
    scale = 255.0 / tf.maximum(high - low, 1.0)
    # 0 everywhere when high == low; clipped as Pillow's table (rounding may leave 0..255)
    stretched = tf.clip_by_value(tf.floor(channel * scale - low * scale), 0.0, 255.0)
    flat = tf.cast(high <= low, tf.float64)  # then Pillow leaves the channel as it is
    out.append(tf.cast(stretched + flat * channel, tf.float32))
  return _merge(out)


def equalize(image, arg=None, key=None):
  """ImageOps.equalize: per channel, the table Pillow builds from the histogram."""
  del arg, key
  tf = _tf()
  levels = tf.range(256)
  out = []
  for channel in tf.unstack(tf.cast(image, tf.int32), axis=-1):
    histogram = tf.math.bincount(channel, minlength=256, maxlength=256)
    last = tf.reduce_max(tf.where(histogram > 0, levels, -1))
    step = (tf.reduce_sum(histogram) - histogram[last]) // 255
    table = (step // 2 + tf.cumsum(histogram, exclusive=True)) // tf.maximum(step, 1)
    table = tf.cast(tf.where(step > 0, tf.minimum(table, 255), levels), tf.float32)
    out.append(tf.gather(table, channel))
  return _merge(out)


def invert(image, arg=None, key=None):
  del arg, key
  return 255 - image


def posterize(image, bits: int, key=None):
  """ImageOps.posterize: keep the top `bits` bits (at least 1, as AugReg's shift does)."""
  del key
  tf = _tf()
  shift = 8 - min(max(int(bits), 1), 8)
  return tf.bitwise.bitwise_and(image, tf.constant((0xFF << shift) & 0xFF, tf.uint8))


def solarize(image, threshold: int, key=None):
  """ImageOps.solarize: values >= threshold inverted."""
  del key
  tf = _tf()
  if threshold >= 256:
    return image
  pixels = tf.cast(image, tf.float32)
  above = tf.cast(pixels >= threshold, tf.float32)
  return tf.cast(pixels + above * (255.0 - 2.0 * pixels), tf.uint8)


def solarize_add(image, addition: int, key=None):
  """`addition` added to values below 128, clipped to 255."""
  del key
  tf = _tf()
  pixels = tf.cast(image, tf.float32)
  below = tf.cast(pixels < 128.0, tf.float32)
  return _to_uint8(pixels + below * float(addition))


def color(image, factor: float, key=None):
  """ImageEnhance.Color: blend with the grey image."""
  del key
  grey = _grey(image)
  return _merge([grey + factor * (c - grey) for c in _channels(image)])


def contrast(image, factor: float, key=None):
  """ImageEnhance.Contrast: blend with the mean grey (rounded), not AugReg's count / 256."""
  del key
  tf = _tf()
  mean = tf.floor(tf.reduce_mean(_grey(image)) + 0.5)
  return _blend(mean, tf.cast(image, tf.float32), factor)


def brightness(image, factor: float, key=None):
  """ImageEnhance.Brightness: blend with black."""
  del key
  tf = _tf()
  return _to_uint8(factor * tf.cast(image, tf.float32))


def sharpness(image, factor: float, key=None):
  """ImageEnhance.Sharpness: blend with ImageFilter.SMOOTH (3x3, centre 5, / 13), which
  keeps the border pixels (so they stay as they are)."""
  del key
  tf = _tf()
  pixels = tf.cast(image, tf.float32)
  rows = pixels[:-2] + pixels[1:-1] + pixels[2:]
  centre = pixels[1:-1, 1:-1]
  smooth = tf.round((rows[:, :-2] + rows[:, 1:-1] + rows[:, 2:] + 4.0 * centre) / 13.0)
  inner = _blend(smooth, centre, factor)
  middle = tf.concat([image[1:-1, :1], inner, image[1:-1, -1:]], 1)
  return tf.concat([image[:1], middle, image[-1:]], 0)


def cutout(image, half: int, key):
  """A square of side 2 * half centred at a uniform pixel (clipped at the borders) set
  to FILL."""
  tf = _tf()
  size = tf.shape(image)[:2]
  centre = tf.random.stateless_uniform([2], key, minval=0, maxval=tf.int32.max,
                                       dtype=tf.int32) % size
  (top, left), (bottom, right) = (tf.unstack(tf.maximum(centre - half, 0)),
                                  tf.unstack(tf.minimum(centre + half, size)))
  band = image[top:bottom]
  square = tf.fill([bottom - top, right - left, 3], tf.constant(FILL, tf.uint8))
  band = tf.concat([band[:, :left], square, band[:, right:]], 1)
  return tf.concat([image[:top], band, image[bottom:]], 0)


# ----------------------------------------------------------------------------
# Geometric ops: output pixel (x, y) (pixel centres) reads input pixel
# (a x + b y + c, d x + e y + f) rounded half up, as Pillow's NEAREST; what falls
# outside is FILL. (AugReg's TF transform rounds half away from zero: the two differ
# only for a source exactly half a pixel left of or above the image.)
# ----------------------------------------------------------------------------


def _affine(image, a, b, c, d, e, f):
  tf = _tf()
  height, width = tf.unstack(tf.shape(image)[:2])
  ys = tf.range(tf.cast(height, tf.float32))[:, None]
  xs = tf.range(tf.cast(width, tf.float32))[None, :]
  source_x = tf.floor(a * xs + (b * ys + (c + 0.5)))
  source_y = tf.floor(d * xs + (e * ys + (f + 0.5)))
  inside = ((source_x >= 0) & (source_x < tf.cast(width, tf.float32))
            & (source_y >= 0) & (source_y < tf.cast(height, tf.float32)))
  index = tf.cast(source_y, tf.int32) * width + tf.cast(source_x, tf.int32)
  index = tf.where(inside, index, height * width)  # the FILL row appended below
  rows = tf.concat([tf.reshape(image, [-1, 3]), tf.fill([1, 3], tf.constant(FILL, tf.uint8))],
                   0)
  out = tf.reshape(tf.gather(rows, index), tf.shape(image))
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


def _shift(image, pixels, axis: int):
  """`_affine`'s translation along `axis` (out[i] = image[i + round(pixels)]), by slicing
  and padding."""
  tf = _tf()
  size = tf.shape(image)[axis]
  shift = tf.clip_by_value(tf.cast(tf.floor(pixels + 0.5), tf.int32), -size, size)
  start, stop = tf.maximum(shift, 0), size + tf.minimum(shift, 0)
  kept = image[start:stop] if axis == 0 else image[:, start:stop]
  none = tf.zeros([2], tf.int32)
  padding = [none, none, none]
  padding[axis] = tf.stack([tf.maximum(-shift, 0), tf.maximum(shift, 0)])
  out = tf.pad(kept, tf.stack(padding), constant_values=FILL)
  out.set_shape(image.shape)
  return out


def translate_x(image, pixels: float, key=None):
  """The image moved left by `pixels` (right when negative)."""
  del key
  return _shift(image, pixels, 1)


def translate_y(image, pixels: float, key=None):
  del key
  return _shift(image, pixels, 0)


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
