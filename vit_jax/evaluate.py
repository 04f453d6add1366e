"""Evaluate a checkpoint on a whole split: `python -m vit_jax.evaluate`.

  python -m vit_jax.evaluate --checkpoint /tmp/digits --config configs/default.py \
      --fewshot 1,5,10 --out /tmp/digits_eval

The checkpoint is a training run's workdir (its newest checkpoint) or an
`.npz` in the published layout. The config file gives the dataset, the
splits, the eval preprocessing (`pp.eval`), the batch size and the loss;
flags override the dataset, split, data dir, image size and batch size.

The model: `--model`, else (for a workdir) the run's own model as its
`metrics.jsonl` recorded it (preset, `config.model` overrides, image size,
dtype), so that the numbers are the run's final eval; else the config's. For
an `.npz`, the classifier token and representation layer follow the file, and
position embeddings are resampled to the image size.

Measured: top-1, top-5, mean loss (the config's, as the run's eval_loss), per-
class accuracy and the confusion matrix; with `--fewshot 1,5,10` also few-shot
linear accuracy on frozen features (vit_jax.fewshot). A checkpoint whose head
has another class count than the dataset (an ImageNet-21k `.npz` on digits)
gets few-shot accuracy only. `--out DIR` writes metrics.json and
confusion.png; progress with an ETA goes to stderr. A user error (missing
file, bad config, a checkpoint that does not fit) prints one line and exits 2.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import json
import math
import os
import sys
import time
from typing import Any, Optional, Sequence, TextIO

import numpy as np

from vit_jax import checkpoint
from vit_jax import cli
from vit_jax import release_names
from vit_jax.configs import schema


# Above this many classes the JSON leaves the confusion matrix out (its PNG stays).
JSON_CONFUSION_CLASSES = 100
# Class names on the confusion plot's axes up to this many classes, counts in cells to 20.
PLOT_TICK_CLASSES = 30
PLOT_COUNT_CLASSES = 20


class Progress:
  """`label: 3/12 batches, 0:02 elapsed, ETA 0:06` on a stream, at most once a second.

  On a terminal the line is rewritten in place; elsewhere (a log file) one
  line is written every `every_s` seconds, and always the last.
  """

  def __init__(self, stream: Optional[TextIO] = None, every_s: Optional[float] = None,
               clock=time.monotonic):
    self._stream = sys.stderr if stream is None else stream  # sys.stderr as it is now
    self._tty = bool(getattr(stream, 'isatty', lambda: False)())
    self._every = every_s if every_s is not None else (1.0 if self._tty else 10.0)
    self._clock = clock
    self._start: dict[str, float] = {}
    self._last = -math.inf

  def __call__(self, label: str, done: int, total: Optional[int]) -> None:
    from vit_jax.metric_writers import format_duration  # pylint: disable=g-import-not-at-top
    now = self._clock()
    start = self._start.setdefault(label, now)
    finished = total is not None and done >= total
    if now - self._last < self._every and not finished and done != 1:
      return
    self._last = now
    elapsed = now - start
    if total:
      eta = elapsed / max(done, 1) * max(total - done, 0)
      text = (f'{label}: {done}/{total} batches, {format_duration(elapsed)} elapsed, '
              f'ETA {format_duration(eta)}')
    else:
      text = f'{label}: {done} batches, {format_duration(elapsed)} elapsed'
    if self._tty:
      self._stream.write('\r' + text.ljust(78) + ('\n' if finished else ''))
    else:
      self._stream.write(text + '\n')
    self._stream.flush()


# ---------------------------------------------------------------------------
# The config and the checkpoint.
# ---------------------------------------------------------------------------

def load_config(spec: str):
  """The config file `spec` (`schema.load_file`), resolved; any failure of the file becomes
  a ValueError naming it."""
  try:
    return schema.resolve(schema.load_file(spec))
  except (FileNotFoundError, ValueError):
    raise
  except Exception as e:  # pylint: disable=broad-except
    # A config file is user code: whatever it raises is the user's error.
    raise ValueError(f'config {spec!r} failed: {type(e).__name__}: {e}') from None


def _literal(value: Any) -> Any:
  """A recorded hparam back to a value: '(16, 16)' -> (16, 16), else as recorded."""
  if isinstance(value, str) and value[:1] in '([':
    try:
      return ast.literal_eval(value)
    except (ValueError, SyntaxError):
      return value
  return value


def run_model_fields(workdir: str) -> Optional[dict]:
  """What decides a run's model, from its metrics.jsonl hparams record; None if absent.

  {'model_name', 'model' (the set overrides, nested), 'image_size', 'dtype'}.
  """
  from vit_jax import storage  # pylint: disable=g-import-not-at-top
  path = storage.join(workdir, 'metrics.jsonl')
  if not storage.isfile(path):
    return None
  with storage.open(path, encoding='utf-8') as f:
    for line in f:
      try:
        record = json.loads(line)
      except ValueError:
        continue  # a line cut by a kill
      hparams = record.get('hparams') if isinstance(record, dict) else None
      if not isinstance(hparams, dict) or 'model_name' not in hparams:
        continue
      model: dict = {}
      for key, value in hparams.items():
        if key.startswith('model.') and value is not None:
          node = model
          *parents, leaf = key.split('.')[1:]
          for part in parents:
            node = node.setdefault(part, {})
          node[leaf] = _literal(value)
      out = {'model_name': hparams['model_name'], 'model': model}
      for key in ('image_size', 'dtype'):
        if hparams.get(key) is not None:
          out[key] = _literal(hparams[key])
      return out
  return None


@dataclasses.dataclass
class Loaded:
  """A checkpoint ready to evaluate."""
  config: Any  # the resolved config the model and data follow
  params: Any  # numpy tree
  head_classes: Optional[int]  # classes of the checkpoint's head (None: no head)
  step: Optional[int]  # the run's step (workdirs)
  source: str  # 'workdir' or 'npz'


def _load_workdir(path: str, config, model_name: Optional[str],
                  image_size: Optional[tuple[int, int]]) -> Loaded:
  from vit_jax import train_checkpoints  # pylint: disable=g-import-not-at-top
  from vit_jax import validation  # pylint: disable=g-import-not-at-top
  from vit_jax.configs.image_size import image_hw  # pylint: disable=g-import-not-at-top
  from vit_jax import storage  # pylint: disable=g-import-not-at-top
  if not storage.isdir(storage.join(path, train_checkpoints.CHECKPOINT_DIR)):
    raise FileNotFoundError(
        f'{path!r} is a directory without {train_checkpoints.CHECKPOINT_DIR}/: not the '
        'workdir of a training run (or give an .npz file)')
  run = run_model_fields(path)
  if run is not None:
    # The run's model is what the checkpoint holds; the config file keeps the rest.
    before = config.image_size
    config = schema.replace(config, **run)
    if image_size is None and config.image_size != before:
      print(f"note: evaluating at the run's image size {config.image_size}, not the "
            f"config's {before} (override with --image_size)", file=sys.stderr)
  if model_name:
    config = schema.replace(config, model_name=model_name)
  if image_size is not None:
    config = schema.replace(config, image_size=tuple(image_size))
  step, state = train_checkpoints.load_latest(path)
  if state is None:
    raise FileNotFoundError(f'no checkpoint in {storage.join(path, "checkpoints")!r}')
  params = state['params'] if isinstance(state, dict) else state.params
  head = params.get('head', {}).get('kernel') if isinstance(params, dict) else None
  head_classes = None if head is None else int(np.shape(head)[-1])
  model = validation.build_model(config, head_classes or 1)
  # Checks every key and shape against the model (naming both), and resamples
  # the position embeddings when --image_size differs from the run's.
  params = checkpoint.load_pretrained(
      params, _abstract(model, config), schema.model_config(config),
      image_size=image_hw(config.image_size), posemb_method=config.posemb_resize,
      source_name=f'{path} (step {step})')
  return Loaded(config, params, head_classes, int(step), 'workdir')


def _abstract(model, config):
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from vit_jax.configs.image_size import image_hw  # pylint: disable=g-import-not-at-top
  h, w = image_hw(config.image_size)
  images = jax.ShapeDtypeStruct((1, h, w, 3), jnp.float32)
  return jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), images)['params']


def _load_npz(path: str, config, model_name: Optional[str],
              image_size: Optional[tuple[int, int]]) -> Loaded:
  from vit_jax import validation  # pylint: disable=g-import-not-at-top
  from vit_jax.configs.image_size import image_hw  # pylint: disable=g-import-not-at-top
  specs = checkpoint.read_npz_specs(path)
  # A release file names its model (a --model that does not fit is refused) and,
  # by its position embeddings, its resolution.
  named = release_names.preset_for(path, model_name, specs)
  if named and not model_name:
    model_name = named
    image_size = image_size or release_names.image_size(path, specs, named)
  if model_name:
    config = schema.replace(config, model_name=model_name)
  if image_size is not None:
    config = schema.replace(config, image_size=tuple(image_size))
  preset = schema.model_config(config)
  if preset.get('model_type', 'vit') == 'vit':
    # Features and logits are the file's: its class token and representation
    # layer, whatever the preset says (load_pretrained would drop the layer).
    overrides = {'classifier': 'token' if 'cls' in specs else 'gap'}
    if 'pre_logits/kernel' in specs:
      overrides['representation_size'] = int(specs['pre_logits/kernel'].shape[-1])
    model_fields = {k: v for k, v in config.model.to_dict().items()}
    model_fields.update(overrides)
    config = schema.replace(config, model=model_fields)
  head = specs.get('head/kernel')
  head_classes = None if head is None else int(head.shape[-1])
  model = validation.build_model(config, head_classes or 1)
  params = checkpoint.load_pretrained(path, _abstract(model, config), schema.model_config(config),
                                      image_size=image_hw(config.image_size),
                                      posemb_method=config.posemb_resize)
  return Loaded(config, params, head_classes, None, 'npz')


def load_checkpoint(path: str, config, model_name: Optional[str] = None,
                    image_size: Optional[tuple[int, int]] = None) -> Loaded:
  """A workdir or an `.npz` as params plus the config its model follows.

  `model_name` and `image_size` win over the run's record and the config.
  """
  from vit_jax import storage  # pylint: disable=g-import-not-at-top
  path = storage.resolve(path)  # a local path or a gs:// URL
  if storage.isdir(path):
    return _load_workdir(path, config, model_name, image_size)
  if not storage.exists(path):
    raise FileNotFoundError(f'no such checkpoint file or workdir: {path!r}')
  return _load_npz(path, config, model_name, image_size)


# ---------------------------------------------------------------------------
# Outputs.
# ---------------------------------------------------------------------------

def _none_if_nan(x: float) -> Optional[float]:
  return None if x is None or not math.isfinite(float(x)) else float(x)


def plot_confusion(confusion: np.ndarray, names: Sequence[str], path: str, title: str) -> None:
  """Row-normalised confusion matrix (true class down, predicted across) as a PNG."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  k = confusion.shape[0]
  rows = confusion.sum(axis=1, keepdims=True)
  norm = confusion / np.maximum(rows, 1)
  size = min(max(4.0, 0.45 * k + 2.0), 16.0)
  fig, ax = plt.subplots(figsize=(size + 1.2, size))
  image = ax.imshow(norm, cmap='Blues', vmin=0.0, vmax=1.0, interpolation='nearest')
  fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label='fraction of the true class')
  if k <= PLOT_TICK_CLASSES:
    ax.set_xticks(range(k), labels=list(names), rotation=90 if k > 10 else 0)
    ax.set_yticks(range(k), labels=list(names))
  if k <= PLOT_COUNT_CLASSES:
    for i in range(k):
      for j in range(k):
        if confusion[i, j]:
          ax.text(j, i, str(int(confusion[i, j])), ha='center', va='center', fontsize=7,
                  color='white' if norm[i, j] > 0.5 else 'black')
  ax.set_xlabel('predicted class')
  ax.set_ylabel('true class')
  ax.set_title(title, fontsize=10)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def _class_names(config, num_classes: int) -> list[str]:
  if config.dataset != 'synthetic':
    from vit_jax import input_pipeline  # pylint: disable=g-import-not-at-top
    names = getattr(input_pipeline.get_dataset_info(config), 'class_names', None)
    if names and len(names) == num_classes:
      return [str(n) for n in names]
  return [str(i) for i in range(num_classes)]


# ---------------------------------------------------------------------------
# The evaluation.
# ---------------------------------------------------------------------------

def evaluate(checkpoint_path: str, config: schema.Config, *, model_name: Optional[str] = None,
             image_size: Optional[tuple[int, int]] = None, fewshot_shots: Sequence[int] = (), fewshot_seed: Optional[int] = None,
             out_dir: Optional[str] = None, progress: Optional[Progress] = None) -> dict:
  """Metrics of a checkpoint on `config.eval_split` (see the module docstring).

  `config`'s `eval_split`, `eval_batch_size`, `dataset` and `data_dir` are used
  as given; the model and image size are the checkpoint's (`load_checkpoint`).
  Returns what metrics.json holds.
  """
  import jax  # pylint: disable=g-import-not-at-top
  from vit_jax import data_sources  # pylint: disable=g-import-not-at-top
  from vit_jax import evaluators  # pylint: disable=g-import-not-at-top
  from vit_jax import fewshot  # pylint: disable=g-import-not-at-top
  from vit_jax import parallel  # pylint: disable=g-import-not-at-top
  from vit_jax import validation  # pylint: disable=g-import-not-at-top
  from vit_jax.configs.image_size import image_hw  # pylint: disable=g-import-not-at-top

  start = time.monotonic()
  mesh = parallel.make_mesh()
  devices = int(mesh.devices.size)
  if config.eval_batch_size % devices:
    # Padding examples are masked, so a larger batch changes no number.
    batch = -(-config.eval_batch_size // devices) * devices
    print(f'note: eval batch {config.eval_batch_size} -> {batch}, a multiple of the '
          f'{devices} devices', file=sys.stderr)
    config = schema.replace(config, eval_batch_size=batch)
  validation.validate_config(config)
  if model_name:
    schema.model_config(schema.replace(config, model_name=model_name))  # an unknown preset, now
  loaded = load_checkpoint(checkpoint_path, config, model_name, image_size)
  config = loaded.config
  data = data_sources.get_data(config)
  num_classes = int(data.num_classes)
  classify = loaded.head_classes == num_classes
  if not classify and not fewshot_shots:
    raise ValueError(
        f"The checkpoint's head has {loaded.head_classes} classes but {config.dataset} has "
        f'{num_classes}: only few-shot evaluation applies (e.g. --fewshot 1,5,10,25)')
  if not classify:
    print(f"note: the checkpoint's head has {loaded.head_classes} classes, "
          f'{config.dataset} {num_classes}: few-shot evaluation only', file=sys.stderr)
  model = validation.build_model(config, loaded.head_classes or num_classes)
  params = parallel.place(loaded.params,
                          jax.tree.map(lambda _: parallel.replicated(mesh), loaded.params))
  height, width = image_hw(config.image_size)
  result: dict[str, Any] = {
      'checkpoint': os.path.abspath(checkpoint_path), 'checkpoint_kind': loaded.source,
      'step': loaded.step, 'model_name': config.model_name, 'dataset': config.dataset,
      'split': config.eval_split, 'image_size': [height, width], 'dtype': config.dtype,
      'num_classes': num_classes, 'num_devices': devices,
  }
  metrics = None
  if classify:
    total = math.ceil(int(data.num_eval_examples) / int(config.eval_batch_size))
    evaluator = evaluators.SplitEvaluator(model, config, mesh, num_classes)
    report = (lambda done: progress(f'eval {config.eval_split}', done, total)) if progress \
        else None
    metrics = evaluator.run(params, data.eval_batches(), progress=report)
    names = _class_names(config, num_classes)
    result.update({
        'num_examples': metrics.num_examples, 'top1_accuracy': metrics.top1,
        f'top{metrics.top_k}_accuracy': metrics.topk, 'loss': metrics.loss,
        'class_names': names,
        'per_class_accuracy': [_none_if_nan(a) for a in metrics.per_class_accuracy],
        'per_class_count': [int(c) for c in metrics.per_class_count],
    })
    if metrics.confusion is not None and num_classes <= JSON_CONFUSION_CLASSES:
      result['confusion'] = metrics.confusion.tolist()
  if fewshot_shots:
    shots_progress = (lambda phase, done, total: progress(f'few-shot {phase}', done, total)) \
        if progress else None
    evaluator = fewshot.FewShotEvaluator(model, config, mesh, shots=fewshot_shots,
                                         seed=fewshot_seed, progress=shots_progress)
    details = evaluator.evaluate(params)
    result.update({fewshot.metric_name(k): r.accuracy for k, r in details.items()})
    result['fewshot'] = {
        'train_split': config.train_split, 'test_split': config.eval_split,
        'seed': evaluator.seed, 'holdout_per_class': evaluator.holdout_per_class,
        'shots': {str(k): dataclasses.asdict(r) for k, r in details.items()}}
  result['seconds'] = time.monotonic() - start
  if out_dir:
    os.makedirs(out_dir, exist_ok=True)
    if metrics is not None and metrics.confusion is not None:
      path = os.path.join(out_dir, 'confusion.png')
      plot_confusion(metrics.confusion, result['class_names'], path,
                     f'{config.model_name} on {config.dataset}:{config.eval_split}, '
                     f'top-1 {100 * metrics.top1:.2f}%')
      result['confusion_png'] = path
    with open(os.path.join(out_dir, 'metrics.json.tmp'), 'w', encoding='utf-8') as f:
      json.dump(result, f, indent=1, allow_nan=False)
      f.write('\n')
    os.replace(os.path.join(out_dir, 'metrics.json.tmp'), os.path.join(out_dir, 'metrics.json'))
  return result


def summary(result: dict) -> list[str]:
  """The lines printed on stdout."""
  lines = [f"{result['model_name']} ({result['checkpoint_kind']}"
           f"{', step %d' % result['step'] if result.get('step') is not None else ''}) on "
           f"{result['dataset']}:{result['split']} at {result['image_size'][0]}x"
           f"{result['image_size'][1]}"]
  if 'top1_accuracy' in result:
    topk = next(k for k in result if k.startswith('top') and k != 'top1_accuracy'
                and k.endswith('_accuracy'))
    lines.append(f"  {result['num_examples']} images: top-1 {100 * result['top1_accuracy']:.2f}%"
                 f"  top-{topk[3:-9]} {100 * result[topk]:.2f}%  loss {result['loss']:.4f}")
    if len(result['class_names']) <= PLOT_TICK_CLASSES:
      cells = [f'{n} {"-" if a is None else f"{100 * a:.1f}%"}'
               for n, a in zip(result['class_names'], result['per_class_accuracy'])]
      lines.append('  per class: ' + ', '.join(cells))
  if 'fewshot' in result:
    shots = result['fewshot']['shots']
    lines.append(f"  few-shot linear ({result['fewshot']['train_split']} -> "
                 f"{result['fewshot']['test_split']}, seed {result['fewshot']['seed']}): " +
                 ', '.join(f"{k}-shot {100 * r['accuracy']:.2f}%" for k, r in shots.items()))
  return lines


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
  from vit_jax import predict  # pylint: disable=g-import-not-at-top
  parser = cli.ArgumentParser(
      prog='python -m vit_jax.evaluate',

      description='Evaluate a checkpoint (a run\'s workdir or an .npz) on a split: top-1, '
      'top-5, loss, per-class accuracy, confusion matrix, optional few-shot accuracy.')
  parser.add_argument('--checkpoint', required=True,
                      help="a training run's workdir (its newest checkpoint) or an .npz")
  parser.add_argument('--config', required=True,
                      help='config file, e.g. configs/default.py or configs/default.py:ViT-Test_4')
  parser.add_argument('--model', default=None, help='model preset (default: the run\'s, a '
                      "release file name's, or the config's)")
  parser.add_argument('--dataset', default=None, help="override config.dataset")
  parser.add_argument('--split', default=None, help='split to evaluate (default: '
                      'config.eval_split)')
  parser.add_argument('--train_split', default=None, help='few-shot images come from here '
                      '(default: config.train_split)')
  parser.add_argument('--data_dir', default=None, help='override config.data_dir')
  parser.add_argument('--image_size', type=predict._argparse_image_size, default=None,  # pylint: disable=protected-access
                      help='H or HxW (default: the run\'s or the config\'s)')
  parser.add_argument('--batch_size', type=predict._positive_int, default=None,  # pylint: disable=protected-access
                      help='override config.eval_batch_size')
  parser.add_argument('--fewshot', default='', help='few-shot k values, e.g. 1,5,10,25 '
                      '(default: none)')
  parser.add_argument('--fewshot_seed', type=int, default=None,
                      help='which few-shot images are picked (default: config.seed)')
  parser.add_argument('--out', default=None, help='directory for metrics.json and confusion.png')
  parser.add_argument('--quiet', action='store_true', help='no progress on stderr')
  parser.add_argument('--verbose', action='store_true',
                      help=f'print the traceback of an error too (or set {cli.TRACEBACK_ENV}=1)')
  return parser.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
  args = parse_args(argv)
  try:
    from vit_jax import fewshot  # pylint: disable=g-import-not-at-top
    shots = fewshot.parse_shots(args.fewshot) if args.fewshot else ()
    config = load_config(args.config)
    fields = {k: v for k, v in (('dataset', args.dataset), ('eval_split', args.split),
                                ('train_split', args.train_split), ('data_dir', args.data_dir),
                                ('eval_batch_size', args.batch_size)) if v is not None}
    config = schema.replace(config, **fields)
    result = evaluate(args.checkpoint, config, model_name=args.model,
                      image_size=args.image_size, fewshot_shots=shots,
                      fewshot_seed=args.fewshot_seed, out_dir=args.out,
                      progress=None if args.quiet else Progress())
  except (ValueError, OSError, MemoryError) as e:
    return cli.report_user_error(e, args.verbose)
  for line in summary(result):
    print(line)
  if args.out:
    print(f"  wrote {os.path.join(args.out, 'metrics.json')}"
          f"{' and confusion.png' if 'confusion_png' in result else ''}")
  return 0


if __name__ == '__main__':
  cli.quiet_console()  # before TensorFlow and JAX's backends load
  sys.exit(cli.run(main))

