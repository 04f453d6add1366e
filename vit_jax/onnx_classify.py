"""Classify image files with an exported ONNX model: needs only onnxruntime, numpy and Pillow.

  python -m vit_jax.onnx_classify --onnx model.onnx --image photo.jpg --top_k 5

This file imports nothing else from vit_jax (nor JAX, TensorFlow or torch):
copy it beside `model.onnx`, `model.json` and `model.labels.txt` (what
`python -m vit_jax.export` writes) onto the serving machine and run it there
as `python onnx_classify.py ...`. The JSON says the input size and whether the
resize and scaling are in the graph (`--preprocess` at export); otherwise they
are done here as the eval pipeline does them: RGB, bilinear resize to the
model's size (no crop), x / 127.5 - 1.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Optional, Sequence

import numpy as np


def load_metadata(onnx_path: str) -> dict:
  """The JSON `vit_jax.export` wrote beside the model (NAME.json)."""
  path = os.path.splitext(onnx_path)[0] + '.json'
  with open(path, encoding='utf-8') as f:
    return json.load(f)


def load_labels(onnx_path: str, meta: dict) -> list[str]:
  path = os.path.join(os.path.dirname(onnx_path), meta['labels'])
  with open(path, encoding='utf-8') as f:
    return [line.rstrip('\n') for line in f]


def prepare(image_path: str, meta: dict) -> np.ndarray:
  """One image as the model's input: (1, H, W, 3), uint8 or float32 in [-1, 1]."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  with Image.open(image_path) as image:
    rgb = image.convert('RGB')
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


def main(argv: Optional[Sequence[str]] = None) -> int:
  parser = argparse.ArgumentParser(
      prog='python -m vit_jax.onnx_classify',
      description='Top-k classes of image files under an ONNX model from vit_jax.export.')
  parser.add_argument('--onnx', required=True, help='the .onnx file (its .json and '
                      '.labels.txt beside it)')
  parser.add_argument('--image', required=True, nargs='+', help='image file(s)')
  parser.add_argument('--top_k', type=int, default=5)
  parser.add_argument('--threads', type=int, default=0,
                      help='ONNX Runtime intra-op threads (0: its default, all cores)')
  args = parser.parse_args(argv)
  import onnxruntime as ort  # pylint: disable=g-import-not-at-top
  try:
    meta = load_metadata(args.onnx)
    labels = load_labels(args.onnx, meta)
    options = ort.SessionOptions()
    options.intra_op_num_threads = args.threads
    session = ort.InferenceSession(args.onnx, options, providers=['CPUExecutionProvider'])
    results = [(path, classify(session, meta, path)) for path in args.image]
  except (OSError, ValueError, KeyError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  for path, probs in results:
    k = max(1, min(args.top_k, probs.shape[0]))
    print(f'{path} ({meta["model"]}, ONNX Runtime {ort.__version__}): top-{k}')
    for rank, index in enumerate(np.argsort(-probs, kind='stable')[:k], 1):
      print(f'{rank:2d}. {probs[index] * 100:6.2f}%  [{index:4d}] {labels[index]}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
