"""Classify image files with an exported ONNX model: needs only onnxruntime, numpy and Pillow.

  python -m vit_jax.onnx_classify --onnx model.onnx --image photo.jpg --top_k 5

This file imports nothing else from vit_jax (nor JAX, TensorFlow or torch):
copy it beside `model.onnx`, `model.onnx.json` and `model.onnx.labels.txt`
(what `python -m vit_jax.export` writes) onto the serving machine and run it
there as `python onnx_classify.py ...`. The JSON says the input size and
whether the resize and scaling are in the graph (`--preprocess` at export);
otherwise they are done here as the eval pipeline does them: RGB, bilinear
resize to the model's size (no crop), x / 127.5 - 1.

The JSON and the labels are untrusted input, like a checkpoint: the JSON is
read only up to `MAX_METADATA_BYTES`, the labels file must be a regular file
in the model's own folder (named by a plain file name, no links out of it)
of at most `MAX_LABELS_BYTES`, and every value used is checked against the
ONNX graph (input and output names, the input's size and dtype, the class
count) before an image is read. Images go through PIL's decompression-bomb
guard (2 x PIL.Image.MAX_IMAGE_PIXELS), as `vit_jax.predict`'s do. A model
file ONNX Runtime cannot load (truncated, external data it refuses) and
every refusal above is one `error: ...` line and exit status 2, as in the
package's other commands (vit_jax.cli); this file keeps its own copy of that
small error path so that it runs without the package.
"""

from __future__ import annotations

import argparse
import json
import os
import stat
import sys
from typing import NoReturn, Optional, Sequence

import numpy as np

MAX_METADATA_BYTES = 1 << 20  # what export writes is a few KiB
MAX_LABELS_BYTES = 16 << 20  # 1000 ImageNet names are 20 KiB
_DTYPES = {'uint8': ('tensor(uint8)', np.uint8), 'float32': ('tensor(float)', np.float32)}


class _ArgumentParser(argparse.ArgumentParser):
  """Usage errors as one `error:` line and exit status 2 (as vit_jax.cli's parser)."""

  def error(self, message: str) -> NoReturn:
    print(f'error: {message} (see {self.prog} --help)', file=sys.stderr)
    sys.exit(2)


def _read_bounded(path: str, limit: int, what: str) -> bytes:
  """A regular file's bytes, refused beyond `limit` (a device or FIFO is refused too)."""
  with open(path, 'rb') as f:
    if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
      raise ValueError(f'{what} {path!r} is not a regular file')
    data = f.read(limit + 1)
  if len(data) > limit:
    raise ValueError(f'{what} {path!r} is larger than {limit:,} bytes: not what '
                     'vit_jax.export writes')
  return data


def metadata_path(onnx_path: str) -> str:
  """NAME.onnx.json beside the model; an export from before that naming wrote NAME.json."""
  path = f'{onnx_path}.json'
  legacy = os.path.splitext(onnx_path)[0] + '.json'
  return path if os.path.exists(path) or not os.path.exists(legacy) else legacy


def load_metadata(onnx_path: str) -> dict:
  """The JSON `vit_jax.export` wrote beside the model, read within MAX_METADATA_BYTES."""
  path = metadata_path(onnx_path)
  try:
    meta = json.loads(_read_bounded(path, MAX_METADATA_BYTES, 'metadata'))
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise ValueError(f'metadata {path!r} is not JSON: {e}') from None
  if not isinstance(meta, dict):
    raise ValueError(f'metadata {path!r} is not a JSON object')
  if meta.get('file', os.path.basename(onnx_path)) != os.path.basename(onnx_path):
    raise ValueError(f'metadata {path!r} describes {meta.get("file")!r}, not '
                     f'{os.path.basename(onnx_path)!r}')
  return meta


def _field(meta: dict, *keys: str):
  value = meta
  for key in keys:
    if not isinstance(value, dict) or key not in value:
      raise ValueError(f'metadata has no {".".join(keys)}')
    value = value[key]
  return value


def check_metadata(meta: dict, session) -> None:
  """The metadata's input, output and size against the graph ONNX Runtime loaded."""
  graph_in, graph_out = session.get_inputs()[0], session.get_outputs()[0]
  in_name, out_name = _field(meta, 'input', 'name'), _field(meta, 'output', 'name')
  if in_name != graph_in.name or out_name != graph_out.name:
    raise ValueError(f'metadata names input {in_name!r} / output {out_name!r}, the model has '
                     f'{graph_in.name!r} / {graph_out.name!r}')
  dtype = _field(meta, 'input', 'dtype')
  if dtype not in _DTYPES or _DTYPES[dtype][0] != graph_in.type:
    raise ValueError(f'metadata input dtype {dtype!r} does not match the model\'s '
                     f'{graph_in.type}')
  size = _field(meta, 'image_size')
  if (not isinstance(size, list) or len(size) != 2
      or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in size)):
    raise ValueError(f'metadata image_size must be [height, width] of positive ints, got '
                     f'{size!r}')
  if dtype == 'float32' and list(graph_in.shape[1:3]) != size:
    raise ValueError(f'metadata image_size {size} does not match the model\'s input '
                     f'{graph_in.shape}')
  classes, num_classes = graph_out.shape[-1], _field(meta, 'num_classes')
  if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1:
    raise ValueError(f'metadata num_classes must be a positive int, got {num_classes!r}')
  if isinstance(classes, int) and num_classes != classes:
    raise ValueError(f'metadata num_classes {meta["num_classes"]!r} does not match the '
                     f'model\'s {classes} logits')


def load_labels(onnx_path: str, meta: dict) -> list[str]:
  """Class names from the labels file the metadata names, inside the model's folder."""
  name = _field(meta, 'labels')
  folder = os.path.dirname(os.path.abspath(onnx_path))
  if not isinstance(name, str) or not name or name != os.path.basename(name) or name in (
      '.', '..'):
    raise ValueError(f'metadata labels must be a file name beside the model, got {name!r}')
  path = os.path.join(folder, name)
  if os.path.dirname(os.path.realpath(path)) != os.path.realpath(folder):
    raise ValueError(f'labels {path!r} links out of the model\'s folder {folder!r}')
  try:
    text = _read_bounded(path, MAX_LABELS_BYTES, 'labels').decode('utf-8')
  except UnicodeDecodeError as e:
    raise ValueError(f'labels {path!r} is not UTF-8 text: {e}') from None
  labels = text.splitlines()
  if len(labels) != meta['num_classes']:
    raise ValueError(f'labels {path!r} has {len(labels)} lines for {meta["num_classes"]} '
                     'classes')
  return labels


def prepare(image_path: str, meta: dict) -> np.ndarray:
  """One image as the model's input: (1, H, W, 3), uint8 or float32 in [-1, 1]."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  try:
    with Image.open(image_path) as image:
      rgb = image.convert('RGB')
  except Image.DecompressionBombError as e:
    raise ValueError(f'Cannot read image {image_path!r}: {e} Refused (PIL\'s limit is '
                     '2 x PIL.Image.MAX_IMAGE_PIXELS); shrink the image first') from None
  except (OSError, Image.UnidentifiedImageError, SyntaxError) as e:
    raise ValueError(f'Cannot read image {image_path!r}: {e}') from None
  if meta['input']['dtype'] == 'uint8':  # resize and scaling are in the graph
    return np.asarray(rgb, np.uint8)[None]
  height, width = meta['image_size']
  rgb = rgb.resize((width, height), Image.BILINEAR)
  return (np.asarray(rgb, np.float32) / 127.5 - 1.0)[None]


def softmax(logits: np.ndarray) -> np.ndarray:
  z = np.exp(logits - logits.max(axis=-1, keepdims=True))
  return z / z.sum(axis=-1, keepdims=True)


def classify(session, meta: dict, image_path: str) -> np.ndarray:
  """Class probabilities of one image file."""
  images = prepare(image_path, meta)
  logits = session.run([meta['output']['name']], {meta['input']['name']: images})[0]
  return softmax(logits.astype(np.float64))[0]


def load_session(onnx_path: str, threads: int):
  """An ONNX Runtime CPU session; a file it cannot load is a ValueError naming it."""
  import onnxruntime as ort  # pylint: disable=g-import-not-at-top
  options = ort.SessionOptions()
  options.intra_op_num_threads = threads
  if not os.path.isfile(onnx_path):
    raise FileNotFoundError(2, 'No such model file', onnx_path)
  try:
    return ort.InferenceSession(onnx_path, options, providers=['CPUExecutionProvider'])
  except Exception as e:  # pylint: disable=broad-except
    # onnxruntime's own exception types (InvalidProtobuf, Fail, ...) for what it refuses.
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise ValueError(f'ONNX Runtime cannot load {onnx_path!r}: {first}') from None


def _classify_all(args) -> tuple[list, dict, list[str]]:
  meta = load_metadata(args.onnx)
  session = load_session(args.onnx, args.threads)
  check_metadata(meta, session)
  labels = load_labels(args.onnx, meta)
  return [(path, classify(session, meta, path)) for path in args.image], meta, labels


def main(argv: Optional[Sequence[str]] = None) -> int:
  parser = _ArgumentParser(
      prog='python -m vit_jax.onnx_classify',
      description='Top-k classes of image files under an ONNX model from vit_jax.export.')
  parser.add_argument('--onnx', required=True, help='the .onnx file (its .onnx.json and '
                      '.onnx.labels.txt beside it)')
  parser.add_argument('--image', required=True, nargs='+', help='image file(s)')
  parser.add_argument('--top_k', type=int, default=5)
  parser.add_argument('--threads', type=int, default=0,
                      help='ONNX Runtime intra-op threads (0: its default, all cores)')
  args = parser.parse_args(argv)
  if args.top_k < 1 or args.threads < 0:
    parser.error('--top_k must be at least 1 and --threads at least 0')
  try:
    results, meta, labels = _classify_all(args)
  except (OSError, ValueError, KeyError, TypeError, MemoryError, ImportError) as e:
    where = f': {e.filename!r}' if isinstance(e, OSError) and e.filename else ''
    message = f'{e.strerror}{where}' if isinstance(e, OSError) and e.strerror else str(e)
    print(f'error: {" ".join(message.split())}', file=sys.stderr)
    return 2
  import onnxruntime as ort  # pylint: disable=g-import-not-at-top
  for path, probs in results:
    k = min(args.top_k, probs.shape[0])
    print(f'{path} ({meta.get("model", "?")}, ONNX Runtime {ort.__version__}): top-{k}')
    for rank, index in enumerate(np.argsort(-probs, kind='stable')[:k], 1):
      print(f'{rank:2d}. {probs[index] * 100:6.2f}%  [{index:4d}] {labels[index]}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
