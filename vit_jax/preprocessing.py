"""Image preprocessing in tf.data: decoding, the training crops and RandAugment, eval resizing, mixup.

Every random choice is a stateless function of a per-element seed (see
`vit_jax.input_pipeline`), so a resumed run preprocesses each image as the
first run did. An image's declared size is read from its header before it is
decoded, so an image too large to decode is refused without decoding it.
"""

from __future__ import annotations

from vit_jax import images as images_lib
from vit_jax import randaugment as randaugment_lib
from vit_jax.tf_imports import _tf

# Tag of RandAugment's stream within an example's augmentation seed.
_RANDAUG_TAG = 1


# ----------------------------------------------------------------------------
# Preprocessing.
# ----------------------------------------------------------------------------


def _resize_pad(image_size: tuple[int, int], crop_pad) -> tuple[int, int]:
  """(height, width) to resize to before cropping `image_size` out of it."""
  if crop_pad is None:  # 224 -> 256 -> 224, as ImageNet evaluation usually does
    return tuple(int(round(s / 0.875)) for s in image_size)
  return tuple(s + int(crop_pad) for s in image_size)


def _header_size(data):
  """(height, width) int64 that an encoded image's header declares, read without decoding.

  JPEG, PNG, GIF and BMP headers are read (JPEG tested first: photos); other
  formats (and headers too short to hold a size) give (0, 0), left to the decoder.
  """
  tf = _tf()

  def number(start, n, little=False, signed=False):
    def read(head):
      weights = [256 ** k for k in range(n)]
      value = tf.reduce_sum(head[start:start + n] * (weights if little else weights[::-1]))
      return tf.abs(tf.where(value >= 2 ** 31, value - 2 ** 32, value)) if signed else value
    return read

  def from_header(height, width):
    def parse():
      head = tf.io.decode_raw(tf.strings.substr(data, 0, 32), tf.uint8)
      head = tf.cast(tf.pad(head, [[0, 32 - tf.shape(head)[0]]]), tf.int64)
      return tf.stack([height(head), width(head)])
    return parse

  def other():
    magic = tf.strings.substr(data, 0, 8)
    png = from_header(number(20, 4), number(16, 4))
    gif = from_header(number(8, 2, little=True), number(6, 2, little=True))
    bmp = from_header(number(22, 4, little=True, signed=True),
                      number(18, 4, little=True, signed=True))
    unknown = lambda: tf.zeros([2], tf.int64)
    return tf.cond(
        tf.equal(magic, b'\x89PNG\r\n\x1a\n'), png, lambda: tf.cond(
            tf.equal(tf.strings.substr(magic, 0, 3), b'GIF'), gif, lambda: tf.cond(
                tf.equal(tf.strings.substr(magic, 0, 2), b'BM'), bmp, unknown)))

  return tf.cond(tf.io.is_jpeg(data),
                 lambda: tf.cast(tf.io.extract_jpeg_shape(data)[:2], tf.int64), other)


def _within_pixel_limit(data):
  """`data`, once its header is checked against `images.MAX_PIXELS` (before any decoding)."""
  tf = _tf()
  size = _header_size(data)
  check = tf.debugging.assert_less_equal(
      size[0] * size[1], tf.constant(images_lib.MAX_PIXELS, tf.int64),
      message='image larger than vit_jax.images.MAX_PIXELS')
  with tf.control_dependencies([check]):
    return tf.identity(data)


def _decode(data):
  """Encoded image (any format TF decodes) -> uint8 [h, w, 3]."""
  tf = _tf()
  data = _within_pixel_limit(data)
  image = tf.io.decode_image(data, channels=3, expand_animations=False)

  image.set_shape([None, None, 3])
  return image


def _decode_random_crop(data, seed, min_area, max_area):
  """Inception crop: random area / aspect ratio crop of the decoded image."""
  tf = _tf()
  data = _within_pixel_limit(data)


  def crop_window(shape):
    begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
        shape,
        bounding_boxes=tf.zeros([0, 0, 4], tf.float32),
        seed=seed,
        area_range=(min_area, max_area),
        aspect_ratio_range=(3 / 4, 4 / 3),
        min_object_covered=0.0,  # Any crop within the area range.
        max_attempts=100,  # tf.image.sample_distorted_bounding_box's default
        use_image_if_no_bounding_boxes=True)
    return begin, size

  def jpeg():  # Decodes only the crop window.
    begin, size = crop_window(tf.io.extract_jpeg_shape(data))
    window = tf.stack([begin[0], begin[1], size[0], size[1]])
    return tf.image.decode_and_crop_jpeg(data, window, channels=3)

  def other():
    image = _decode(data)
    begin, size = crop_window(tf.shape(image))
    return tf.slice(image, begin, size)

  image = tf.cond(tf.io.is_jpeg(data), jpeg, other)
  image.set_shape([None, None, 3])
  return image


def _to_float(image):
  """[0, 255] -> float32 [-1, 1]."""
  tf = _tf()
  image = tf.cast(image, tf.float32) / 127.5 - 1.0
  return tf.clip_by_value(image, -1.0, 1.0)


def _train_preprocess(data, seed, pp, image_size):
  """Encoded image + [2] seed -> float32 [H, W, 3] in [-1, 1]."""
  tf = _tf()
  seed_crop, seed_flip = tf.unstack(
      tf.random.experimental.stateless_split(seed, num=2))
  method = pp['resize_method']
  if pp['train'] == 'inception_crop':
    image = _decode_random_crop(data, seed_crop, pp['min_area'],
                                pp['max_area'])
    image = tf.image.resize(image, image_size, method=method)
  elif pp['train'] == 'resize_crop':
    size = _resize_pad(image_size, pp['crop_pad'])
    image = tf.image.resize(_decode(data), size, method=method)
    image = tf.image.stateless_random_crop(
        image, [*image_size, 3], seed=seed_crop)
  else:  # 'plain'
    image = tf.image.resize(_decode(data), image_size, method=method)
  if pp['flip'] and pp['train'] != 'plain':
    image = tf.image.stateless_random_flip_left_right(image, seed=seed_flip)
  if pp['randaug']:  # on uint8, as AugReg
    layers, magnitude, ops = pp['randaug']
    image = tf.cast(tf.clip_by_value(tf.round(image), 0.0, 255.0), tf.uint8)
    image.set_shape([*image_size, 3])
    image = randaugment_lib.randaugment(
        image, layers, magnitude,
        tf.random.experimental.stateless_fold_in(seed, _RANDAUG_TAG), ops)
  return _to_float(image)


def _eval_preprocess(data, pp, image_size):
  tf = _tf()
  method = pp['resize_method']
  image = _decode(data)
  if pp['eval'] == 'resize_crop':
    size = _resize_pad(image_size, pp['crop_pad'])
    image = tf.image.resize(image, size, method=method)
    top, left = (size[0] - image_size[0]) // 2, (size[1] - image_size[1]) // 2
    image = image[top:top + image_size[0], left:left + image_size[1]]
  else:  # 'resize': the reference's evaluation
    image = tf.image.resize(image, image_size, method=method)
  image.set_shape([*image_size, 3])
  return _to_float(image)


def _mixup(batch, seed, alpha: float, form: str = 'reverse'):
  """One weight lam ~ Beta(alpha, alpha) per batch. 'reverse': example i mixed with
  example B-1-i; 'augreg' (big_vision): lam = max(lam, 1 - lam), example i mixed with
  example i-1 (the batch rolled by one)."""
  tf = _tf()
  s1, s2 = tf.unstack(tf.random.experimental.stateless_split(seed, num=2))
  g1 = tf.random.stateless_gamma([], seed=s1, alpha=alpha)
  g2 = tf.random.stateless_gamma([], seed=s2, alpha=alpha)
  total = g1 + g2
  lam = tf.where(total > 0, g1 / tf.maximum(total, 1e-30), 1.0)
  if form == 'augreg':
    lam = tf.maximum(lam, 1.0 - lam)

  def mix(x):
    other = tf.roll(x, 1, axis=0) if form == 'augreg' else tf.reverse(x, axis=[0])
    return lam * x + (1.0 - lam) * other

  return {'image': mix(batch['image']), 'label': mix(batch['label'])}


def _base_key(seed: int, process_index: int, tag: int):
  """Stateless [2] seed for one random stream of one process."""
  tf = _tf()
  key = tf.constant([int(seed), int(process_index)], tf.int64)
  return tf.random.experimental.stateless_fold_in(key, tag)


def _options(ds):
  tf = _tf()
  options = tf.data.Options()
  options.deterministic = True
  options.experimental_optimization.map_parallelization = True
  # No autotuning model. Its optimisation thread sleeps for a period that doubles up
  # to a minute, and destroying an iterator could wait out that sleep (0 to 32 s
  # measured at the end of a run, CPU idle). Without it, AUTOTUNE map parallelism
  # is the size of tf.data's thread pool (the cores) and AUTOTUNE prefetch buffers
  # grow whenever the consumer waits: the same input speed here
  # (benchmarks/input_pipeline_benchmark.py, docs/input_pipeline.md).
  options.autotune.enabled = False
  return ds.with_options(options)
