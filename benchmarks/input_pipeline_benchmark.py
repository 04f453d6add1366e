"""Throughput of the tf.data input pipelines (images/s), offline.

Measures `vit_jax.input_pipeline` on this machine's CPU with two sources that
need no download:

* ``digits``: the embedded 32x32 dataset (tiny PNGs: mostly resize/augment
  cost), prepared in a temporary data_dir unless --data_dir is given;
* ``folder``: a temporary image folder of synthetic JPEGs of ImageNet-like
  size (default 500x375; decode cost dominates, as for real photos).

For each, it times the training pipeline with the pre-training recipe
(Inception crop, flip), the same with AugReg's augmentation (RandAugment
`--randaug`, (2, 15) by default, and big_vision's mixup with alpha 0.2: AugReg's
`medium1`) and, unless --quick, the fine-tuning recipe (`pp.train='resize_crop'`:
resize to image_size + crop_pad, random crop, flip) and the eval pipeline
(`resize_crop`), at --image_size (224 by default); with --split also RandAugment
alone and mixup alone. With --repeats N the training pipelines are timed N times,
interleaved, and the median is reported.

Usage:
  python benchmarks/input_pipeline_benchmark.py [--json] [--image_size 224]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..'))
from vit_jax import input_pipeline as ip  # pylint: disable=g-import-not-at-top,wrong-import-position
from vit_jax.configs import schema  # pylint: disable=g-import-not-at-top,wrong-import-position


def make_config(dataset, data_dir, image_size, batch_size, pp_train, pp_eval,
                randaug=None, mixup_alpha=0.0):
  return schema.resolve(dict(
      dataset=dataset,
      data_dir=data_dir,
      train_split='train',
      eval_split='test' if dataset == 'digits' else 'train',
      image_size=image_size,
      pp=dict(train=pp_train, eval=pp_eval, crop_pad=None, randaug=randaug),
      mixup_alpha=mixup_alpha,
      mixup_form='augreg',
      shuffle_buffer=10_000,
      cache=True,
      batch_size=batch_size,
      eval_batch_size=batch_size,
      seed=0,
  ))


def write_jpeg_folder(root, num_images, width, height, num_classes=10):
  """Synthetic photos: smooth colour gradients plus noise, saved as JPEG."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  rng = np.random.RandomState(0)
  yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
  for i in range(num_images):
    folder = os.path.join(root, f'class_{i % num_classes:02d}')
    os.makedirs(folder, exist_ok=True)
    a, b, c = rng.uniform(0.2, 1.0, 3)
    base = np.stack([xx / width * 255 * a, yy / height * 255 * b,
                     (xx + yy) / (width + height) * 255 * c], -1)
    noise = rng.normal(0, 20, (height, width, 3))
    pixels = np.clip(base + noise, 0, 255).astype(np.uint8)
    Image.fromarray(pixels).save(os.path.join(folder, f'{i:05d}.jpg'),
                                 quality=90)


class Timer:
  """Wall time and this process's CPU time (all threads)."""

  def __enter__(self):
    self.wall, self.cpu = time.perf_counter(), time.process_time()
    return self

  def __exit__(self, *exc):
    self.wall = time.perf_counter() - self.wall
    self.cpu = time.process_time() - self.cpu

  def result(self, n):
    # images/s of wall time, and images per CPU-second: the latter hardly
    # depends on other jobs sharing the machine; cores x that is what an idle
    # machine can reach at best.
    return dict(images_per_s=round(n / self.wall, 1),
                images_per_cpu_s=round(n / max(self.cpu, 1e-9), 1), images=n)


def time_dataset(ds, num_batches, warmup):
  """Throughput over num_batches batches after `warmup` batches."""
  it = ip.iterate_numpy(ds)
  for _ in range(warmup):
    next(it)
  n = 0
  with Timer() as timer:
    for _ in range(num_batches):
      try:
        batch = next(it)
      except StopIteration:
        break
      n += batch['image'].shape[0]
  return timer.result(n)


def eval_throughput(config, repeats):
  """Throughput of the eval pipeline, whole split, `repeats` passes."""
  ds = ip.get_eval_dataset(config, process_index=0, process_count=1)
  for _ in ip.iterate_numpy(ds):  # Warm-up pass fills the cache.
    pass
  n = 0
  with Timer() as timer:
    for _ in range(repeats):
      for batch in ip.iterate_numpy(ds):
        n += int(batch['mask'].sum())
  return timer.result(n)


def run(args, parser, tmp, results):
  """Prepares the sources in `tmp` and appends one dict per measurement."""
  data_dir = args.data_dir or os.path.join(tmp, 'tfds')
  os.makedirs(data_dir, exist_ok=True)
  datasets = {}
  for source in args.sources.split(','):
    if source == 'digits':
      datasets['digits (32x32 PNG)'] = 'digits'
    elif source == 'folder':
      root = os.path.join(tmp, 'images')
      write_jpeg_folder(root, args.num_images, *args.jpeg_size)
      w, h = args.jpeg_size
      datasets[f'folder ({w}x{h} JPEG)'] = f'image_folder:{root}'
    else:
      parser.error(f'unknown source {source!r}')
  pipelines = {'train/inception_crop': dict(pp_train='inception_crop')}
  if args.randaug:
    layers, magnitude = args.randaug
    randaug = f'+randaug({layers},{magnitude:g})'
    pipelines[f'train/{randaug}+mixup'] = dict(
        pp_train='inception_crop', randaug=(layers, magnitude), mixup_alpha=0.2)
    if args.split:  # what each costs on its own
      pipelines[f'train/{randaug}'] = dict(pp_train='inception_crop',
                                           randaug=(layers, magnitude))
      pipelines['train/+mixup'] = dict(pp_train='inception_crop', mixup_alpha=0.2)
  if not args.quick:
    pipelines['train/resize_crop'] = dict(pp_train='resize_crop')
  for label, dataset in datasets.items():
    timings = {name: [] for name in pipelines}
    for _ in range(args.repeats):  # interleaved: each pipeline sees the same load
      for name, settings in pipelines.items():
        config = make_config(dataset, data_dir, args.image_size, args.batch_size,
                             pp_eval='resize_crop', **settings)
        ds = ip.get_train_dataset(config, process_index=0, process_count=1)
        timings[name].append(time_dataset(ds, args.num_batches, args.warmup))
    for name, runs in timings.items():
      median = sorted(runs, key=lambda r: r['images_per_cpu_s'])[len(runs) // 2]
      results.append(dict(source=label, pipeline=name, **median,
                          images_per_cpu_s_runs=[r['images_per_cpu_s'] for r in runs]))
    if not args.quick:
      config = make_config(dataset, data_dir, args.image_size,
                           args.batch_size, 'inception_crop', 'resize_crop')
      results.append(dict(source=label, pipeline='eval/resize_crop',
                          **eval_throughput(config, args.eval_repeats)))


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--image_size', type=int, default=224)
  parser.add_argument('--batch_size', type=int, default=128)
  parser.add_argument('--num_batches', type=int, default=15)
  parser.add_argument('--warmup', type=int, default=3)
  parser.add_argument('--eval_repeats', type=int, default=3,
                      help='timed passes over the eval split')
  parser.add_argument('--num_images', type=int, default=512,
                      help='synthetic JPEGs in the image folder')
  parser.add_argument('--jpeg_size', type=int, nargs=2, default=(500, 375),
                      metavar=('W', 'H'))
  parser.add_argument('--data_dir', default=None,
                      help='TFDS data_dir for digits (default: a temp dir)')
  parser.add_argument('--sources', default='digits,folder')
  parser.add_argument('--quick', action='store_true',
                      help='the pre-training pipelines only (with and without augmentation)')
  parser.add_argument('--randaug', type=float, nargs=2, default=(2, 15),
                      metavar=('LAYERS', 'MAGNITUDE'),
                      help='RandAugment of the augmented pipeline; 0 0: leave it out')
  parser.add_argument('--split', action='store_true',
                      help='also time RandAugment alone and mixup alone')
  parser.add_argument('--repeats', type=int, default=1,
                      help='interleaved timings of each training pipeline (median)')
  parser.add_argument('--json', action='store_true',
                      help='print one JSON object instead of a table')
  args = parser.parse_args(argv)
  layers, magnitude = args.randaug
  args.randaug = (int(layers), magnitude) if layers else None

  tmp = tempfile.mkdtemp(prefix='vit_jax_pipeline_bench_')
  results = []
  # TFDS prints progress to stdout; keep stdout for the results (--json).
  with contextlib.redirect_stdout(sys.stderr):
    try:
      run(args, parser, tmp, results)
    finally:
      shutil.rmtree(tmp, ignore_errors=True)

  import tensorflow as tf  # pylint: disable=g-import-not-at-top  (imported by the pipeline)
  meta = dict(image_size=args.image_size, batch_size=args.batch_size,
              cpu_count=os.cpu_count(), machine=platform.machine(),
              python=platform.python_version(), tensorflow=tf.__version__,
              load_average_1min=round(os.getloadavg()[0], 2))
  for r in results:
    r['cpu_ms_per_image'] = round(1000 / r['images_per_cpu_s'], 2)
  ratios = augmentation_ratios(results)
  if args.json:
    print(json.dumps(dict(meta, results=results, augmented_over_plain=ratios), indent=2))
    return
  print(f"input pipeline throughput, {args.image_size}x{args.image_size}, "
        f"batch {args.batch_size}, {meta['cpu_count']} CPU cores, "
        f"load average {meta['load_average_1min']}")
  print(f"{'source':<26} {'pipeline':<32} {'images/s':>10} "
        f"{'images/CPU-s':>13} {'CPU ms/image':>13}")
  for r in results:
    print(f"{r['source']:<26} {r['pipeline']:<32} {r['images_per_s']:>10.1f} "
          f"{r['images_per_cpu_s']:>13.1f} {r['cpu_ms_per_image']:>13.2f}")
  for source, ratio in ratios.items():
    print(f'{source}: with the augmentation, {ratio:.2f}x the images per CPU-second '
          'of the pipeline without it')


def augmentation_ratios(results) -> dict[str, float]:
  """Per source: images/CPU-s of the augmented pre-training pipeline over the plain one."""
  rates = {(r['source'], r['pipeline']): r['images_per_cpu_s'] for r in results}
  return {source: round(rate / rates[(source, 'train/inception_crop')], 3)
          for (source, name), rate in rates.items() if name.endswith('+mixup') and
          '+randaug' in name}

if __name__ == '__main__':
  main()
