"""ViT against the BiT ResNet baseline and MLP-Mixer on equal terms: same data, steps and batch.

  python -m vit_jax.compare --out /tmp/compare                 # embedded digits
  python -m vit_jax.compare --dataset cifar10 --image-size 32 --steps 2000 --out ...
  python -m vit_jax.compare --steps 4 --batch-size 16 --out /tmp/tiny   # smoke test

Both runs go through `vit_jax.train.train_and_evaluate` with their own experiment
configs (`configs/default.py` for the ViT, `configs/resnet_baseline.py` for the
ResNet, `configs/default.py:Mixer-Digits_4` for the Mixer: each keeps its own
model, optimiser and learning rate), after the fields
that make the comparison fair are set to the same values in both: dataset,
splits, image size, batch size, number of steps, evaluation schedule and seed.
So both models see the same number of examples; what differs is the compute
they spend on them, which is what the plot shows.

Written to `--out`:

- `compare.md` and `compare.json`: one row per model with eval accuracy,
  parameters, forward GFLOPs per image (XLA's cost analysis of the compiled CPU
  forward pass for both models, and the analytic count of `vit_jax.flops` for
  the ViT), total training compute (3 x forward x examples seen), training
  images/s (compilation and evaluation excluded), inference images/s (measured
  here on the default device) and wall time;
- `accuracy_vs_compute.png`: eval accuracy at every evaluation against the
  training FLOPs spent so far, and against wall-clock time;
- `runs/<name>/`: each run's workdir (metrics, checkpoints); an existing one
  is deleted first unless `--resume`.

Slightly over 500 lines: the table, the plot and the CLI of one comparison; the
training, FLOPs and few-shot pieces it uses live in their own modules.
"""

from __future__ import annotations

import argparse
import json
import logging as logging_std
import math
import os
import shutil
import sys
import time
from typing import Any, Optional, Sequence

import numpy as np
import jax
import jax.numpy as jnp
from absl import logging

from vit_jax import cli
from vit_jax import fewshot

from vit_jax import flops as flops_lib
from vit_jax import parallel
from vit_jax import train
from vit_jax import train_checkpoints
from vit_jax import visualize
from vit_jax.configs import schema
from vit_jax.configs.image_size import image_hw

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_CONFIGS = {
    'ViT': os.path.join(REPO_ROOT, 'configs', 'default.py'),
    'ResNet': os.path.join(REPO_ROOT, 'configs', 'resnet_baseline.py'),
    'Mixer': os.path.join(REPO_ROOT, 'configs', 'default.py') + ':Mixer-Digits_4',
}


def load_config(spec: str):
  """The resolved config of a config file (`path` or `path:argument`)."""
  return schema.resolve(schema.load_file(spec))


def shared_settings(args: argparse.Namespace, base) -> dict[str, Any]:
  """The fields set to the same value in both configs (from flags, else the ViT config)."""
  steps = int(args.steps if args.steps is not None else base.total_steps)
  if steps < 1:
    raise ValueError(f'--steps must be positive, got {steps}')
  points = max(1, int(args.eval_points))
  settings = {
      'dataset': args.dataset or base.dataset,
      'data_dir': args.data_dir if args.data_dir is not None else base.get('data_dir'),
      'train_split': args.train_split or base.get('train_split', 'train'),
      'eval_split': args.eval_split or base.get('eval_split', 'test'),
      'image_size': image_hw(args.image_size or base.image_size),
      'batch_size': int(args.batch_size or base.batch_size),
      'eval_batch_size': int(args.eval_batch_size or args.batch_size
                             or base.get('eval_batch_size', base.batch_size)),
      'total_steps': steps,
      'eval_every': max(1, math.ceil(steps / points)),
      'checkpoint_every': 0,  # the end only
      'log_every': max(1, min(int(base.get('log_every', 50)), steps)),
      'seed': int(args.seed if args.seed is not None else base.get('seed', 0)),
  }
  return settings


def prepare_config(config, settings: dict[str, Any]):
  """`config` with the shared settings; warm-up shortened when it exceeds a short run."""
  config = config.copy_and_resolve_references() if hasattr(
      config, 'copy_and_resolve_references') else config
  with config.unlocked():
    for key, value in settings.items():
      config[key] = value
    steps = settings['total_steps']
    warmup = int(config.get('warmup_steps', 0) or 0)
    if warmup >= steps:
      config.warmup_steps = steps // 10
  return config


# ---------------------------------------------------------------------------
# Cost and speed of one model.
# ---------------------------------------------------------------------------

def model_costs(config: schema.Config, num_classes: int, params: Any = None,
                xla_count: bool = True) -> dict[str, Any]:
  """Parameters and forward FLOPs per image of the config's model.

  `params` (optional) saves building an abstract parameter tree. The XLA count
  compiles the forward pass of one image for the CPU, whose cost analysis sees
  every operation (on GPU, library calls such as cuBLAS are not counted).
  """

  model_config = schema.model_config(config)
  model = train.build_model(config, num_classes)
  height, width = image_hw(config.image_size)
  if params is None:
    params = jax.eval_shape(lambda: model.init(
        jax.random.PRNGKey(0), jnp.zeros((1, height, width, 3)), train=False))['params']
  num_params = int(sum(np.prod(p.shape) for p in jax.tree.leaves(params)))
  xla_flops = None
  if xla_count:
    sharding = jax.sharding.SingleDeviceSharding(jax.devices('cpu')[0])
    spec = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)
    p_spec = jax.tree.map(lambda a: spec(a.shape, a.dtype), params)
    forward = jax.jit(lambda p, im: model.apply({'params': p}, im, train=False)[0])
    try:
      xla_flops = flops_lib.xla_flops(
          forward.lower(p_spec, spec((1, height, width, 3), jnp.float32)).compile())
    except Exception:  # pylint: disable=broad-except
      xla_flops = None
  analytic = None
  family = model_config.get('model_type', 'vit')
  if (family == 'vit' and not model_config.get('resnet')) or family == 'mixer':
    analytic = float(flops_lib.vit_flops(model_config, (height, width), num_classes))
  return {
      'model_name': config.model_name,
      'model_type': model_config.get('model_type', 'vit'),
      'num_params': num_params,
      'forward_flops_xla': xla_flops,
      'forward_flops_analytic': analytic,
  }


def forward_benchmark(config, params, batch_size: int,
                      repeats: int = 5) -> tuple[float, Optional[float]]:
  """(forward images/s on the default device, XLA FLOPs per image or None).

  One compilation serves both: on a CPU backend the cost analysis of the
  batch's forward pass, divided by the batch size, is the per-image count.
  """

  num_classes = int(np.asarray(params['head']['kernel']).shape[-1])
  model = train.build_model(config, num_classes)
  height, width = image_hw(config.image_size)
  images = jnp.asarray(np.random.default_rng(0).uniform(
      -1, 1, (batch_size, height, width, 3)).astype(np.float32))
  params = jax.device_put(params)
  compiled = jax.jit(lambda p, im: model.apply({'params': p}, im, train=False)[0]).lower(
      params, images).compile()
  flops = None
  if jax.default_backend() == 'cpu':
    total = flops_lib.xla_flops(compiled)
    flops = total / batch_size if total else None
  jax.block_until_ready(compiled(params, images))  # warm-up
  times = []
  for _ in range(max(1, repeats)):
    start = time.perf_counter()
    jax.block_until_ready(compiled(params, images))
    times.append(time.perf_counter() - start)
  return batch_size / float(np.median(times)), flops


def eval_history(workdir: str) -> list[dict[str, float]]:
  """[{step, eval_accuracy, seconds}] from the run's `metrics.jsonl`, in step order."""
  path = os.path.join(workdir, 'metrics.jsonl')
  if not os.path.exists(path):
    return []
  records, first_time = [], None
  with open(path, encoding='utf-8') as f:
    for line in f:
      line = line.strip()
      if not line:
        continue
      record = json.loads(line)
      if 'step' not in record:
        continue
      if first_time is None and 'time' in record:
        first_time = record['time']
      if 'eval_accuracy' in record:
        records.append({'step': int(record['step']),
                        'eval_accuracy': float(record['eval_accuracy']),
                        'time': float(record.get('time', float('nan')))})
  return sorted(records, key=lambda r: r['step'])


# ---------------------------------------------------------------------------
# Running both.
# ---------------------------------------------------------------------------

def run_one(name: str, config, workdir: str, *, resume: bool = False,
            inference_batch: Optional[int] = None,
            shots: Sequence[int] = ()) -> dict[str, Any]:
  """Trains one config into `workdir`; returns its row of the table.

  With `shots`, the trained model's frozen features are also scored by the
  paper's few-shot linear evaluation (vit_jax.fewshot) on the same dataset.
  """

  if os.path.exists(workdir) and not resume:
    shutil.rmtree(workdir)
  os.makedirs(workdir, exist_ok=True)
  start = time.time()
  final = train.train_and_evaluate(config, workdir)
  wall = time.time() - start
  history = eval_history(workdir)
  params = _trained_params(workdir)
  num_classes = int(np.asarray(params['head']['kernel']).shape[-1])
  batch = int(config.batch_size)
  infer_speed, bench_flops = forward_benchmark(
      config, params, inference_batch or int(config.get('eval_batch_size', batch)))
  costs = model_costs(config, num_classes, params, xla_count=bench_flops is None)
  if bench_flops is not None:
    costs['forward_flops_xla'] = bench_flops
  flops = costs['forward_flops_xla'] or costs['forward_flops_analytic']
  per_step = flops_lib.TRAIN_FLOPS_FACTOR * flops * batch if flops else None
  for point in history:
    point['train_flops'] = per_step * point['step'] if per_step else None
    point['seconds'] = point['time'] - start if math.isfinite(point['time']) else None
  few = {}
  if shots:
    model = train.build_model(config, num_classes)
    few = fewshot.FewShotEvaluator(model, config, parallel.make_mesh(), shots=shots).run(params)
  row = {
      'name': name,
      **costs,
      **few,
      'seed': int(config.seed),
      'pretrained_path': config.pretrained_path,
      'dataset': config.dataset,
      'image_size': list(image_hw(config.image_size)),
      'batch_size': batch,
      'steps': int(final.get('step', config.total_steps)),
      'examples_seen': float(final.get('examples_seen', batch * config.total_steps)),
      'eval_accuracy': float(final.get('eval_accuracy', float('nan'))),
      'eval_loss': float(final.get('eval_loss', float('nan'))),
      'train_flops': per_step * int(final.get('step', config.total_steps)) if per_step else None,
      'train_images_per_sec': float(final.get('images_per_sec', float('nan'))),
      'inference_images_per_sec': infer_speed,
      'wall_seconds': wall,
      'num_classes': num_classes,
      'history': history,
      'workdir': workdir,
  }
  return row


def _trained_params(workdir: str):
  """The parameters of the run's newest checkpoint (numpy arrays)."""
  _, state = train_checkpoints.load_latest(workdir)
  if state is None:
    raise RuntimeError(f'no checkpoint in {workdir} after training')
  return state['params'] if isinstance(state, dict) else state.params


# Columns averaged over seeds (mean, std); the others are the same in every seed.
_AVERAGED = ('eval_accuracy', 'eval_loss', 'train_images_per_sec', 'inference_images_per_sec',
             'wall_seconds')


def aggregate(runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
  """One table row from the runs of one model over several seeds: mean and std."""
  row = dict(runs[0])
  keys = list(_AVERAGED) + [k for k in runs[0] if k.startswith('fewshot/')]
  for key in keys:
    values = np.asarray([float(r.get(key, float('nan'))) for r in runs])
    row[key] = float(np.mean(values))
    row[f'{key}_std'] = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
  row['seeds'] = [int(r['seed']) for r in runs]
  row['histories'] = [r.get('history', []) for r in runs]
  row['runs'] = [{k: v for k, v in r.items() if k != 'history'} for r in runs]
  return row


_FORMATS = {'pct': lambda v: f'{100 * v:.1f}%', 'params': lambda v: f'{v / 1e6:.3f}M',
            'gflops': lambda v: f'{v / 1e9:.4g}', 'tflops': lambda v: f'{v / 1e12:.4g}',
            'rate': lambda v: f'{v:,.0f}', 'sec': lambda v: f'{v:.1f}'}


def _fmt(value: Any, kind: str) -> str:
  if value is None or (isinstance(value, float) and not math.isfinite(value)):
    return '-'
  return _FORMATS[kind](value) if kind in _FORMATS else str(value)


TABLE_COLUMNS = [
    ('model', 'model_name', 'str'),
    ('seeds', 'seeds', 'count'),
    ('eval accuracy', 'eval_accuracy', 'pct'),
    ('params', 'num_params', 'params'),
    ('GFLOPs/image fwd (XLA)', 'forward_flops_xla', 'gflops'),
    ('GFLOPs/image fwd (analytic)', 'forward_flops_analytic', 'gflops'),
    ('train TFLOPs', 'train_flops', 'tflops'),
    ('train img/s', 'train_images_per_sec', 'rate'),
    ('infer img/s', 'inference_images_per_sec', 'rate'),
    ('wall time (s)', 'wall_seconds', 'sec'),
]


def _columns(rows: Sequence[dict[str, Any]]) -> list[tuple[str, str, str]]:
  """TABLE_COLUMNS with a few-shot column per k after the eval accuracy."""
  shots = sorted({k for row in rows for k in row
                  if k.startswith('fewshot/') and not k.endswith('_std')},
                 key=lambda k: int(''.join(c for c in k.split('/')[1] if c.isdigit())))
  few = [(f"{k.split('/')[1].split('shot')[0]}-shot linear", k, 'pct') for k in shots]
  return TABLE_COLUMNS[:3] + few + TABLE_COLUMNS[3:]


def _cell(row: dict[str, Any], key: str, kind: str) -> str:
  if kind == 'count':
    return str(len(row.get(key) or [row.get('seed')]))
  text = _fmt(row.get(key), kind)
  std = row.get(f'{key}_std')
  if std and kind == 'pct' and len(row.get('seeds', [])) > 1:
    text += f' ± {100 * std:.1f}'
  return text


def markdown_table(rows: Sequence[dict[str, Any]]) -> str:
  columns = _columns(rows)
  header = '| ' + ' | '.join(c[0] for c in columns) + ' |'
  rule = '|' + '|'.join('---' for _ in columns) + '|'
  lines = [header, rule]
  for row in rows:
    lines.append('| ' + ' | '.join(_cell(row, key, kind) for _, key, kind in columns) + ' |')
  return '\n'.join(lines)


def markdown_report(rows: Sequence[dict[str, Any]], settings: dict[str, Any]) -> str:
  first = rows[0] if rows else {}
  lines = [
      '# ' + ' vs '.join(row['name'] for row in rows) if rows else '# Comparison',
      '',
      f"Dataset `{settings['dataset']}` ({settings['train_split']} -> "
      f"{settings['eval_split']}), {settings['image_size'][0]}x{settings['image_size'][1]}, "
      f"{settings['total_steps']} steps of batch {settings['batch_size']} "
      f"({first.get('examples_seen', 0):,.0f} examples) for each model, seeds "
      f"{', '.join(str(x) for x in first.get('seeds', [settings['seed']]))} "
      '(accuracies: mean ± sample std over the seeds).',
      '',
      markdown_table(rows),
      '',
      'Training compute = 3 x forward FLOPs (XLA cost analysis of the CPU-compiled '
      'forward pass) x examples seen. Training img/s excludes compilation and '
      'evaluation; inference img/s is a separate forward-only measurement. Each model '
      'keeps its own optimiser settings from its config. k-shot linear: the paper\'s '
      'few-shot evaluation of the trained model\'s frozen pre-logits (closed-form ridge '
      'regression on k training images per class; vit_jax.fewshot).',
      '',
  ]
  return '\n'.join(lines)


def plot_accuracy_vs_compute(rows: Sequence[dict[str, Any]]):
  """Eval accuracy against training FLOPs and wall-clock seconds (one line per seed),
  and the few-shot linear accuracies (mean and std over seeds) when measured."""
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top
  from matplotlib import ticker  # pylint: disable=g-import-not-at-top
  few_keys = [c[1] for c in _columns(rows) if c[1].startswith('fewshot/')]
  fig = Figure(figsize=(14 if few_keys else 10, 4), dpi=100, layout='constrained')
  axes = fig.subplots(1, 3 if few_keys else 2)
  by_flops, by_time = axes[0], axes[1]
  markers = ['o', 's', '^', 'D', 'v']
  for i, row in enumerate(rows):
    label = f"{row['name']} ({row['model_name']}, {_fmt(row['num_params'], 'params')})"
    color = f'C{i}'
    for j, history in enumerate(row.get('histories') or [row.get('history', [])]):
      kw = dict(marker=markers[i % len(markers)], color=color, alpha=1.0 if j == 0 else 0.5,
                label=label if j == 0 else None)
      points = [p for p in history if p.get('train_flops')]
      if points:
        by_flops.plot([p['train_flops'] for p in points],
                      [100 * p['eval_accuracy'] for p in points], **kw)
      timed = [p for p in history if p.get('seconds') is not None]
      if timed:
        by_time.plot([p['seconds'] for p in timed],
                     [100 * p['eval_accuracy'] for p in timed], **kw)
  by_flops.set_xscale('log')
  # Ticks at 1, 2 and 5 per decade: readable labels however few decades the runs span.
  by_flops.xaxis.set_major_locator(ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
  by_flops.xaxis.set_major_formatter(ticker.EngFormatter())
  by_flops.xaxis.set_minor_formatter(ticker.NullFormatter())
  by_flops.set_xlabel('training compute (FLOPs)')
  by_time.set_xlabel('wall-clock time (s, evaluation and compilation included)')
  for ax in (by_flops, by_time):
    ax.set_ylabel('eval accuracy (%)')
    ax.grid(alpha=0.3, which='both')
    if ax.lines:
      ax.legend(fontsize=8, loc='lower right')
  if few_keys:
    ax, width = axes[2], 0.8 / max(len(rows), 1)
    for i, row in enumerate(rows):
      x = np.arange(len(few_keys)) + i * width
      ax.bar(x, [100 * row.get(k, np.nan) for k in few_keys], width,
             yerr=[100 * row.get(f'{k}_std', 0.0) for k in few_keys], color=f'C{i}',
             label=row['name'], capsize=3)
    ax.set_xticks(np.arange(len(few_keys)) + 0.4 - width / 2,
                  [k.split('/')[1].split('_')[0] for k in few_keys])
    ax.set_ylabel('few-shot linear accuracy (%)')
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, axis='y')
  fig.suptitle('Accuracy against compute, same data and steps', fontsize=11)
  return fig


def write_outputs(rows: Sequence[dict[str, Any]], settings: dict[str, Any],
                  out_dir: str) -> dict[str, str]:
  os.makedirs(out_dir, exist_ok=True)
  paths = {
      'markdown': os.path.join(out_dir, 'compare.md'),
      'json': os.path.join(out_dir, 'compare.json'),
      'plot': os.path.join(out_dir, 'accuracy_vs_compute.png'),
  }
  with open(paths['markdown'], 'w', encoding='utf-8') as f:
    f.write(markdown_report(rows, settings))
  with open(paths['json'], 'w', encoding='utf-8') as f:
    json.dump({'settings': settings, 'results': list(rows)}, f, indent=2, default=str)
  visualize.save_figure(plot_accuracy_vs_compute(rows), paths['plot'])
  return paths


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
  p = cli.ArgumentParser(
      prog='python -m vit_jax.compare',

      description='Train ViT, the BiT ResNet baseline and MLP-Mixer with the same data, '
                  'steps and batch; write a table (markdown, JSON) and an accuracy-vs-compute '
                  'plot.')
  p.add_argument('--out', required=True, help='output directory')
  p.add_argument('--vit-config', default=DEFAULT_CONFIGS['ViT'])
  p.add_argument('--resnet-config', default=DEFAULT_CONFIGS['ResNet'])
  p.add_argument('--vit-model', help='override the ViT config\'s model_name')
  p.add_argument('--resnet-model', help='override the ResNet config\'s model_name')
  p.add_argument('--mixer-config', default=DEFAULT_CONFIGS['Mixer'])
  p.add_argument('--mixer-model', help='override the Mixer config\'s model_name')
  p.add_argument('--dataset', help="'digits' (default, embedded), a TFDS name or "
                 "'synthetic'")
  p.add_argument('--data-dir', help='TFDS data directory')
  p.add_argument('--train-split')
  p.add_argument('--eval-split')
  p.add_argument('--image-size', type=int)
  p.add_argument('--batch-size', type=int)
  p.add_argument('--eval-batch-size', type=int)
  p.add_argument('--steps', type=int, help='training steps for each model')
  p.add_argument('--eval-points', type=int, default=6,
                 help='evaluations per run (points of the accuracy curve)')
  p.add_argument('--seed', type=int, help='first seed (default: the ViT config\'s)')
  p.add_argument('--seeds', type=int, default=3,
                 help='runs per model, seeds SEED .. SEED+N-1; the table gives mean ± std')
  p.add_argument('--vit-checkpoint', help='fine-tune the ViT from this .npz instead of '
                 'training it from scratch')
  p.add_argument('--resnet-checkpoint', help='fine-tune the ResNet from this .npz '
                 '(BiT-M layout or ours)')
  p.add_argument('--mixer-checkpoint', help='fine-tune the Mixer from this .npz '
                 '(published Mixer layout)')
  p.add_argument('--fewshot', default='10',
                 help="comma list of k for few-shot linear accuracy of each trained model "
                 "('' for none)")
  p.add_argument('--only', choices=sorted(DEFAULT_CONFIGS), action='append',
                 help='run only this model (repeatable)')
  p.add_argument('--quiet', action='store_true', help='no training progress lines')
  p.add_argument('--resume', action='store_true',
                 help='continue runs found in OUT/runs instead of starting afresh')
  p.add_argument('--verbose', action='store_true',
                 help=f'print the traceback of an error too (or set {cli.TRACEBACK_ENV}=1)')
  return p.parse_args(argv)



class VitJaxRecords(logging_std.Filter):
  """Passes vit_jax's own INFO lines (training progress) and every warning."""

  def filter(self, record: logging_std.LogRecord) -> bool:
    return (record.levelno >= logging_std.WARNING
            or f'{os.sep}vit_jax{os.sep}' in record.pathname)


def show_training_progress() -> None:
  """Logs vit_jax's progress lines at INFO without Orbax's and TensorFlow's chatter."""
  logging.set_verbosity(logging.INFO)
  absl_logger = logging_std.getLogger('absl')
  if not any(isinstance(f, VitJaxRecords) for f in absl_logger.filters):
    absl_logger.addFilter(VitJaxRecords())


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
  args = parse_args(argv)
  if args.seeds < 1:
    raise cli.UserError(f'--seeds must be >= 1, got {args.seeds}')
  cli.check_writable_dir(args.out, '--out')

  if not args.quiet:
    show_training_progress()
  settings = shared_settings(args, load_config(args.vit_config))
  overrides = {'ViT': (args.vit_config, args.vit_model, args.vit_checkpoint),
               'ResNet': (args.resnet_config, args.resnet_model, args.resnet_checkpoint),
               'Mixer': (args.mixer_config, args.mixer_model, args.mixer_checkpoint)}
  shots = fewshot.parse_shots(args.fewshot) if args.fewshot else ()
  rows = []
  for name, (path, model_name, checkpoint_path) in overrides.items():
    if args.only and name not in args.only:
      continue
    runs = []
    for seed in range(settings['seed'], settings['seed'] + args.seeds):
      config = prepare_config(load_config(path), {**settings, 'seed': seed})
      with config.unlocked():
        config.model_name = model_name or config.model_name
        config.pretrained_path = checkpoint_path or config.pretrained_path
      start = 'from ' + checkpoint_path if checkpoint_path else 'from scratch'
      print(f'== {name}: {config.model_name} {start}, seed {seed}, {settings["total_steps"]} '
            f'steps of {settings["batch_size"]} on {settings["dataset"]}', flush=True)
      runs.append(run_one(name, config, os.path.join(args.out, 'runs', name.lower(),
                                                     f'seed{seed}'),
                          resume=args.resume, shots=shots))
    rows.append(aggregate(runs))
  paths = write_outputs(rows, settings, args.out)
  print(markdown_table(rows))
  for kind, path in paths.items():
    print(f'{kind}: {path}')
  return {'rows': rows, 'paths': paths, 'settings': settings}


if __name__ == '__main__':
  cli.quiet_console()  # before TensorFlow and JAX's backends load
  sys.exit(cli.run(main))


