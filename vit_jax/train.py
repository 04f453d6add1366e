"""Training and fine-tuning: one jitted, sharded step; metrics; resumable runs.

`train_and_evaluate(config, workdir)` runs a whole experiment:

1. `validate_config` checks every field it uses before anything expensive
   happens (a bad value raises ValueError naming the field);
2. the model (any preset of `vit_jax.configs.models`, ViT or BiT ResNet) is
   built for the dataset's class count, from scratch or from
   `config.pretrained_path` (new head, position embeddings resized);
3. the latest run checkpoint in `workdir`, if any, is restored together with
   the input pipeline's position, so a restarted run continues exactly where
   the last checkpoint left it;
4. the loop feeds batches sharded over the 'data' axis of the device mesh to
   one `jax.jit`-compiled step, logs training metrics every `log_every` steps,
   evaluates top-1 every `eval_every` steps, saves every `checkpoint_every`
   steps (asynchronously) and at the end, and writes
   `workdir/final_metrics.json`.

The step (`make_train_step`) is a pure function `(state, batch) -> (state,
metrics)`: gradient accumulation over micro-batches is a `lax.scan` inside it,
gradients are averaged across devices by XLA, and nothing in it waits for the
host. Only the loop fetches numbers, every `log_every` steps.

`config.dataset = 'synthetic'` trains on generated class-template images
without TensorFlow (timing runs, machines without TF, tests); every other
dataset goes through `vit_jax.input_pipeline`, imported only then.
"""

from __future__ import annotations

import math
import os
import signal
import threading
import time
from typing import Any, Callable, Iterator, Optional

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from jax.sharding import NamedSharding, PartitionSpec as P

from vit_jax import metric_writers
from vit_jax import optimizers
from vit_jax import parallel
from vit_jax import train_checkpoints
from vit_jax.configs import models
from vit_jax.configs import schema
from vit_jax.configs.image_size import image_hw

DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}
SYNTHETIC = 'synthetic'

# ---------------------------------------------------------------------------
# State.
# ---------------------------------------------------------------------------


@flax.struct.dataclass
class TrainState:
  """Everything a step changes: step count (= batches consumed), params, optimizer state."""
  step: jax.Array
  params: Any
  opt_state: Any


# ---------------------------------------------------------------------------
# Config validation and the model.
# ---------------------------------------------------------------------------


def _is_int(value) -> bool:
  return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def model_config_from(config) -> ml_collections.ConfigDict:
  """The preset `config.model_name` with the set fields of `config.model` applied."""
  return schema.model_config(schema.resolve(config))


def build_model(config, num_classes: int):
  config = schema.resolve(config)
  model_config = schema.model_config(config)
  try:
    return models.build_model(model_config, num_classes, dtype=DTYPES[config.dtype])
  except TypeError as e:
    raise ValueError(f'config.model has a field the model does not take: {e}') from None


def validate_config(config, num_devices: Optional[int] = None,
                    num_processes: Optional[int] = None) -> ml_collections.ConfigDict:
  """The resolved config (`schema.resolve`), checked: a bad value raises ValueError naming it.

  With `num_devices` / `num_processes`, batch sizes are checked against them.
  """
  config = schema.resolve(config)
  schema.model_config(config)
  optimizers.validate(config)
  dataset = config.dataset
  if not dataset or not isinstance(dataset, str):
    raise ValueError(f'config.dataset must be a non-empty string, got {dataset!r}')
  height, width = image_hw(config.image_size)
  if config.posemb_resize not in schema.POSEMB_METHODS:
    raise ValueError(f'Unknown config.posemb_resize={config.posemb_resize!r}; expected one '
                     f'of {schema.POSEMB_METHODS}')
  dtype = config.dtype
  if dtype not in DTYPES:
    raise ValueError(f'Unknown config.dtype={dtype!r}; expected one of {tuple(DTYPES)}')
  accum = config.grad_accum_steps
  if not _is_int(accum) or accum < 1:
    raise ValueError(f'config.grad_accum_steps must be a positive integer, got {accum!r}')
  for field in ('batch_size', 'eval_batch_size'):
    value = config[field]
    if not _is_int(value) or value < 1:
      raise ValueError(f'config.{field} must be a positive integer, got {value!r}')
  batch = config.batch_size
  if batch % accum:
    raise ValueError(f'config.batch_size={batch} must be divisible by '
                     f'config.grad_accum_steps={accum}')
  if num_devices:
    if (batch // accum) % num_devices:
      raise ValueError(
          f'config.batch_size={batch} must be divisible by the number of devices '
          f'({num_devices})' + (f' times config.grad_accum_steps={accum}' if accum > 1 else '')
          + f': each of the {accum} micro-batch(es) of {batch // accum} is split over the devices')
    if config.eval_batch_size % num_devices:
      raise ValueError(f'config.eval_batch_size={config.eval_batch_size} must be divisible '
                       f'by the number of devices ({num_devices})')
  if num_processes and num_processes > 1:
    for field in ('batch_size', 'eval_batch_size'):
      if config[field] % num_processes:
        raise ValueError(f'config.{field}={config[field]} must be divisible by the number '
                         f'of processes ({num_processes})')
  for field in ('log_every', 'eval_every', 'checkpoint_every'):
    value = config[field]
    if not _is_int(value) or value < 0:
      raise ValueError(f'config.{field} must be an integer >= 0, got {value!r}')
  if config.log_every < 1:
    raise ValueError(f'config.log_every must be >= 1, got {config.log_every}')
  keep = config.keep_checkpoints
  if not _is_int(keep) or keep < 1:
    raise ValueError(f'config.keep_checkpoints must be a positive integer, got {keep!r}')
  if dataset == SYNTHETIC:
    classes = config.num_classes
    if not _is_int(classes) or classes < 1:
      raise ValueError(f'config.num_classes must be a positive integer, got {classes!r}')
  path = config.pretrained_path
  if path and not os.path.exists(os.path.expanduser(str(path))):
    raise ValueError(f'config.pretrained_path={path!r} does not exist')
  # The model must accept the overrides, dtype and image size.
  model = build_model(config, 10 if dataset != SYNTHETIC else config.num_classes)
  try:
    jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, height, width, 3)),
                                      train=False))
  except ValueError as e:
    raise ValueError(f'config.image_size={tuple(config.image_size)} does not fit '
                     f'config.model_name={config.model_name!r}: {e}') from None
  return config


# ---------------------------------------------------------------------------
# Steps.
# ---------------------------------------------------------------------------


def _split_micro_batches(x: jax.Array, num: int, mesh) -> jax.Array:
  """[B, ...] -> [num, B/num, ...]; micro-batch i takes rows i, i+num, i+2num, ...

  Interleaving keeps every micro-batch spread evenly over all devices (each
  device's contiguous slice of the batch gives each micro-batch B/num/devices
  rows), so no data moves between devices.
  """
  x = x.reshape((x.shape[0] // num, num) + x.shape[1:])
  x = jnp.swapaxes(x, 0, 1)
  if mesh is not None:
    x = jax.lax.with_sharding_constraint(
        x, NamedSharding(mesh, P(None, parallel.DATA_AXIS)))
  return x


def make_train_step(model, tx: optax.GradientTransformation, config, *,
                    schedule: Optional[Callable] = None, mesh=None
                    ) -> Callable[[TrainState, dict], tuple[TrainState, dict]]:
  """`(state, batch) -> (state, metrics)`: one optimizer update.

  `batch` holds 'image' [B, H, W, 3] and (soft) one-hot 'label' [B, C]. With
  `config.grad_accum_steps = A > 1` the batch is split into A micro-batches
  whose gradients are averaged inside the step (a `lax.scan`), which computes
  the same update as the whole batch at once with 1/A of the activation memory.
  Dropout randomness is a function of `config.seed` and `state.step` only.
  Metrics: 'loss' (mean over the batch, before the update), 'grad_norm' (global
  norm before clipping), 'learning_rate' (used by this update).
  """
  config = schema.resolve(config)
  accum = int(config.grad_accum_steps)
  loss_fn = optimizers.make_loss(config)
  schedule = schedule or optimizers.make_schedule(config)
  dropout_key = jax.random.fold_in(jax.random.key(int(config.seed)), 1)

  def mean_loss(params, images, labels, rng):
    logits, _ = model.apply({'params': params}, images, train=True,
                            rngs={'dropout': rng})
    return jnp.mean(loss_fn(logits, labels))

  grad_fn = jax.value_and_grad(mean_loss)

  def train_step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
    rng = jax.random.fold_in(dropout_key, state.step)
    if accum == 1:
      loss, grads = grad_fn(state.params, batch['image'], batch['label'], rng)
    else:
      images = _split_micro_batches(batch['image'], accum, mesh)
      labels = _split_micro_batches(batch['label'], accum, mesh)

      def body(carry, xs):
        index, image, label = xs
        loss, grads = grad_fn(state.params, image, label, jax.random.fold_in(rng, index))
        loss_sum, grad_sum = carry
        return (loss_sum + loss, jax.tree.map(jnp.add, grad_sum, grads)), None

      zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), state.params)
      (loss, grads), _ = jax.lax.scan(
          body, (jnp.zeros([], jnp.float32), zeros), (jnp.arange(accum), images, labels))
      loss = loss / accum
      grads = jax.tree.map(lambda g, p: (g / accum).astype(p.dtype), grads, state.params)
    grad_norm = optax.global_norm(grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
    metrics = {'loss': loss, 'grad_norm': grad_norm,
               'learning_rate': jnp.asarray(schedule(state.step), jnp.float32)}
    return new_state, metrics

  return train_step


def make_eval_step(model, config) -> Callable[[Any, dict], dict]:
  """`(params, batch) -> sums`: 'correct' top-1, 'loss' and 'count' over unmasked examples.

  Top-1 counts an example as right when its highest logit is one of its labels.
  """
  loss_fn = optimizers.make_loss(schema.resolve(config))

  def eval_step(params, batch: dict) -> dict:
    logits, _ = model.apply({'params': params}, batch['image'], train=False)
    labels = batch['label']
    mask = batch.get('mask', jnp.ones(labels.shape[:1], jnp.float32))
    top1 = jnp.argmax(logits, axis=-1)
    hit = jnp.take_along_axis(labels, top1[:, None], axis=-1)[:, 0] > 0
    return {'correct': jnp.sum(hit * mask),
            'loss': jnp.sum(loss_fn(logits, labels) * mask),
            'count': jnp.sum(mask)}

  return eval_step


# ---------------------------------------------------------------------------
# Data sources.
# ---------------------------------------------------------------------------


class SyntheticData:
  """Noisy class templates made on the host: learnable, resumable, no TensorFlow.

  Class c's template is a random 4x4 colour pattern (from `config.seed`)
  upsampled to the image size; an example is its template plus Gaussian noise
  (`config.synthetic_noise`) drawn from a fixed pool, clipped to [-1, 1].
  The batch at step s is a pure function of (seed, s), and each process
  materialises only its slice of the global batch.
  """
  POOL = 128

  def __init__(self, config, process_index: int = 0, process_count: int = 1):
    config = self.config = schema.resolve(config)
    self.num_classes = int(config.num_classes)
    self.num_train_examples = 1 << 20  # nominal: batches never repeat
    self.num_eval_examples = int(config.num_eval_examples)
    self.seed = int(config.seed)
    self.process_index, self.process_count = process_index, process_count
    height, width = image_hw(config.image_size)
    rng = np.random.default_rng([self.seed, 7919])
    low = rng.uniform(-1, 1, (self.num_classes, 4, 4, 3)).astype(np.float32)
    rows, cols = (np.arange(height) * 4) // height, (np.arange(width) * 4) // width
    self.templates = low[:, rows][:, :, cols]
    noise = float(config.synthetic_noise)
    self.noise = (rng.standard_normal((self.POOL, height, width, 3)) * noise).astype(np.float32)

  def _examples(self, rng: np.random.Generator, n: int, start: int, stop: int) -> dict:
    labels = rng.integers(self.num_classes, size=n)[start:stop]
    noise = rng.integers(self.POOL, size=n)[start:stop]
    images = np.clip(self.templates[labels] + self.noise[noise], -1.0, 1.0)
    onehot = np.eye(self.num_classes, dtype=np.float32)[labels]
    return {'image': images, 'label': onehot}

  def _local(self, batch: int) -> tuple[int, int]:
    local = batch // self.process_count
    return self.process_index * local, (self.process_index + 1) * local

  def train_batches(self, start_step: int = 0) -> Iterator[dict]:
    batch = int(self.config.batch_size)
    start, stop = self._local(batch)
    step = start_step
    while True:
      yield self._examples(np.random.default_rng([self.seed, 1, step]), batch, start, stop)
      step += 1

  def eval_batches(self) -> Iterator[dict]:
    batch = int(self.config.eval_batch_size)
    start, stop = self._local(batch)
    for i in range(math.ceil(self.num_eval_examples / batch)):
      out = self._examples(np.random.default_rng([self.seed, 2, i]), batch, start, stop)
      position = i * batch + np.arange(start, stop)
      out['mask'] = (position < self.num_eval_examples).astype(np.float32)
      yield out


class PipelineData:
  """`vit_jax.input_pipeline` (tf.data): TFDS datasets, image folders, digits."""

  def __init__(self, config):
    from vit_jax import input_pipeline  # pylint: disable=g-import-not-at-top
    self._ip = input_pipeline
    self.config = config = schema.resolve(config)
    info = input_pipeline.get_dataset_info(config)
    self.num_classes = info.num_classes
    self.num_train_examples = info.num_train_examples
    self.num_eval_examples = info.num_eval_examples
    self._eval_ds = None

  def train_batches(self, start_step: int = 0) -> Iterator[dict]:
    ds = self._ip.get_train_dataset(self.config, start_step=start_step)
    return self._ip.iterate_numpy(ds)

  def eval_batches(self) -> Iterator[dict]:
    if self._eval_ds is None:
      self._eval_ds = self._ip.get_eval_dataset(self.config)
    return self._ip.iterate_numpy(self._eval_ds)


def get_data(config):
  if config.dataset == SYNTHETIC:
    return SyntheticData(config, jax.process_index(), jax.process_count())
  return PipelineData(config)


# ---------------------------------------------------------------------------
# Preemption.
# ---------------------------------------------------------------------------


class _StopRequests:
  """SIGTERM (one process) or the JAX preemption sync point (multi-process)."""

  def __init__(self):
    self.requested = False
    self._previous = None

  def __enter__(self):
    if threading.current_thread() is threading.main_thread() and jax.process_count() == 1:
      self._previous = signal.signal(signal.SIGTERM, self._handler)
    return self

  def _handler(self, signum, frame):
    del frame
    logging.warning('Received signal %d: saving a checkpoint and stopping.', signum)
    self.requested = True

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)

  def should_stop(self, step: int) -> bool:
    if jax.process_count() > 1:
      try:
        from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
        return bool(multihost_utils.reached_preemption_sync_point(step))
      except Exception:  # pylint: disable=broad-except
        return False  # No preemption service (not started via jax.distributed).
    return self.requested


# ---------------------------------------------------------------------------
# The run.
# ---------------------------------------------------------------------------


def _place(tree: Any, shardings: Any) -> Any:
  """Host arrays -> global arrays with `shardings` (every process holds the whole tree)."""
  def put(x, sharding):
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])
  return jax.tree.map(put, tree, shardings)


def _gather(tree: Any, mesh) -> Any:
  """Global arrays -> numpy on every process (replicates FSDP shards first)."""
  replicate = jax.jit(lambda t: t, out_shardings=parallel.replicated(mesh))
  return jax.device_get(replicate(tree))


def _flatten_config(config) -> dict:
  out = {}

  def visit(node, prefix):
    for key, value in node.items():
      if isinstance(value, dict):
        visit(value, f'{prefix}{key}.')
      else:
        out[f'{prefix}{key}'] = value if isinstance(value, (int, float, str, bool)) or (
            value is None) else str(value)

  visit(config.to_dict() if hasattr(config, 'to_dict') else dict(config), '')
  return out


class NonFiniteLossError(FloatingPointError):
  """The training loss or gradient became NaN/inf; nothing was saved after it."""


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains (or resumes) the run in `workdir`; returns the final metrics.

  The final metrics are also written to `workdir/final_metrics.json`. A run
  stopped by SIGTERM saves a checkpoint and returns with `preempted=True`.
  """
  mesh = parallel.make_mesh()
  config = validate_config(config, num_devices=mesh.devices.size,
                           num_processes=jax.process_count())
  is_main = jax.process_index() == 0
  workdir = os.path.abspath(os.path.expanduser(workdir))
  os.makedirs(workdir, exist_ok=True)

  data = get_data(config)
  model_config = model_config_from(config)
  model = build_model(config, data.num_classes)
  opt_view = config
  schedule = optimizers.make_schedule(opt_view)
  tx = optimizers.make_optimizer(opt_view, schedule)
  total_steps = int(config.total_steps)
  batch_size = int(config.batch_size)
  height, width = image_hw(config.image_size)

  def init_params(rng):
    return model.init({'params': rng}, jnp.zeros((1, height, width, 3), jnp.float32),
                      train=False)['params']

  def state_from_params(params):
    return TrainState(step=jnp.zeros([], jnp.int32), params=params, opt_state=tx.init(params))

  init_key = jax.random.fold_in(jax.random.key(int(config.seed)), 0)
  abstract_state = jax.eval_shape(lambda: state_from_params(init_params(init_key)))
  if config.fsdp:
    state_sharding = parallel.fsdp_sharding(abstract_state, mesh)
  else:
    state_sharding = jax.tree.map(lambda _: parallel.replicated(mesh), abstract_state)
  batch_sharding = parallel.data_sharding(mesh)
  repl = parallel.replicated(mesh)
  num_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(abstract_state.params))

  checkpointer = train_checkpoints.RunCheckpointer(
      workdir, max_to_keep=int(config.keep_checkpoints),
      async_save=bool(config.async_checkpoints))
  abstract_with_shardings = jax.tree.map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
      abstract_state, state_sharding)
  state_fingerprint = train_checkpoints.fingerprint(abstract_state)
  state, meta = checkpointer.restore_latest(abstract_with_shardings,
                                            expect={'fingerprint': state_fingerprint})
  if state is not None:
    start_step = int(jax.device_get(state.step))
    logging.info('Resuming from step %d (checkpoint in %s)', start_step, checkpointer.directory)
  else:
    start_step = 0
    path = config.pretrained_path
    if path:
      state = _pretrained_state(config, path, abstract_state, model_config,
                                state_sharding, state_from_params)
    else:
      state = jax.jit(lambda k: state_from_params(init_params(k)),
                      out_shardings=state_sharding)(init_key)

  train_step = jax.jit(
      make_train_step(model, tx, config, schedule=schedule, mesh=mesh),
      in_shardings=(state_sharding, batch_sharding),
      out_shardings=(state_sharding, repl), donate_argnums=(0,))
  eval_step = jax.jit(make_eval_step(model, config),
                      in_shardings=(state_sharding.params, batch_sharding), out_shardings=repl)

  writer = metric_writers.create_default_writer(
      workdir if is_main else None, total_steps, start_step, just_logging=not is_main)
  if is_main and start_step == 0:
    writer.write_hparams(_flatten_config(config))
  logging.info('Model %s: %d parameters, %d classes; %d devices in %d process(es); '
               'global batch %d (%d per device%s).', config.model_name, num_params,
               data.num_classes, mesh.devices.size, jax.process_count(), batch_size,
               batch_size // mesh.devices.size,
               f', {config.grad_accum_steps} micro-batches'
               if config.grad_accum_steps > 1 else '')

  def evaluate(params) -> dict:
    totals = None
    for batch in data.eval_batches():
      out = eval_step(params, parallel.shard_batch(batch, batch_sharding))
      totals = out if totals is None else jax.tree.map(jnp.add, totals, out)
    totals = jax.device_get(totals)
    count = max(float(totals['count']), 1.0)
    return {'eval_accuracy': float(totals['correct']) / count,
            'eval_loss': float(totals['loss']) / count,
            'eval_examples': float(totals['count'])}

  def checkpoint_meta(step):
    return {'step': step, 'data_start_step': step, 'examples_seen': step * batch_size,
            'model_name': config.model_name, 'dataset': config.dataset,
            'fingerprint': state_fingerprint}

  final: dict[str, Any] = {}
  last_train: dict[str, float] = {}
  preempted = False
  train_seconds = 0.0
  timed_steps = 0
  log_every = int(config.log_every)
  eval_every = int(config.eval_every)
  ckpt_every = int(config.checkpoint_every)
  step = start_step
  batches = None

  try:
    with _StopRequests() as stop:
      batches = parallel.prefetch_to_device(
          data.train_batches(start_step), batch_sharding, size=int(config.prefetch))
      pending: list[tuple[int, dict]] = []
      interval_start, interval_step = time.monotonic(), start_step

      def flush() -> None:
        """Fetches pending step metrics; raises on a non-finite loss; writes averages."""
        nonlocal pending, interval_start, interval_step, train_seconds, timed_steps
        if not pending:
          return
        fetched = jax.device_get([m for _, m in pending])
        steps = [s for s, _ in pending]
        now = time.monotonic()
        pending = []
        for s, m in zip(steps, fetched):
          if not (np.isfinite(m['loss']) and np.isfinite(m['grad_norm'])):
            raise NonFiniteLossError(
                f'Non-finite training loss {float(m["loss"])} (grad norm '
                f'{float(m["grad_norm"])}) at step {s}; stopping without saving. The last '
                f'good checkpoint is step {checkpointer.latest_step()} in '
                f'{checkpointer.directory}. Lower config.learning_rate, keep '
                f'config.grad_clip_norm > 0, or use config.dtype="float32".')
        elapsed = now - interval_start
        done = steps[-1] - interval_step
        speed = done / elapsed if elapsed > 0 and done > 0 else float('nan')
        train_seconds += elapsed
        timed_steps += done
        scalars = {
            'train_loss': float(np.mean([m['loss'] for m in fetched])),
            'grad_norm': float(np.mean([m['grad_norm'] for m in fetched])),
            'learning_rate': float(fetched[-1]['learning_rate']),
            'steps_per_sec': speed,
            'images_per_sec': speed * batch_size,
            'examples_seen': float(steps[-1] * batch_size),
            'epoch': steps[-1] * batch_size / max(data.num_train_examples, 1),
        }
        last_train.clear()
        last_train.update(scalars)
        writer.write_scalars(steps[-1], scalars)
        interval_start, interval_step = time.monotonic(), steps[-1]

      for step in range(start_step + 1, total_steps + 1):
        batch = next(batches)
        state, metrics = train_step(state, batch)
        pending.append((step, metrics))
        if step == start_step + 1:
          # Compilation happens in the first call: time it, then measure speed without it.
          jax.block_until_ready(metrics)
          logging.info('First step (compilation included) took %.1f s.',
                       time.monotonic() - interval_start)
          interval_start, interval_step = time.monotonic(), step
        is_last = step == total_steps
        do_eval = bool(eval_every and step % eval_every == 0) or is_last
        do_save = bool(ckpt_every and step % ckpt_every == 0) or is_last
        stopping = stop.should_stop(step)
        if step % log_every == 0 or is_last or do_eval or do_save or stopping:
          flush()  # Also the finiteness check: nothing non-finite is ever saved.
        paused = time.monotonic()
        if do_eval:
          results = evaluate(state.params)
          writer.write_scalars(step, results)
          final.update(results)
        if do_save or stopping:
          checkpointer.save(step, state, checkpoint_meta(step), wait=stopping)
        if stopping:
          logging.warning('Stopped at step %d after saving a checkpoint; rerun with the '
                          'same workdir to resume.', step)
          preempted = True
          break
        # Evaluation and checkpointing do not count as training time.
        interval_start += time.monotonic() - paused
      writer.flush()
  finally:
    if batches is not None:
      batches.close()  # Stops the input pipeline's threads now, not at exit.
    checkpointer.close()  # Waits for asynchronous saves: the last good one is complete.
    writer.close()

  if start_step >= total_steps:
    final.update(evaluate(state.params))
  if config.export_params and not preempted:
    params = _gather(state.params, mesh)
    if is_main:
      from vit_jax import checkpoint  # pylint: disable=g-import-not-at-top
      checkpoint.save(params, os.path.join(workdir, 'params.npz'))

  final.update({
      'step': int(step),
      'preempted': preempted,
      'train_loss': last_train.get('train_loss', float('nan')),
      'examples_seen': float(step * batch_size),
      'train_seconds': train_seconds,
      'steps_per_sec': timed_steps / train_seconds if train_seconds > 0 else float('nan'),
      'images_per_sec': (timed_steps * batch_size / train_seconds
                         if train_seconds > 0 else float('nan')),
      'num_params': num_params,
      'num_devices': int(mesh.devices.size),
      'num_processes': int(jax.process_count()),
  })
  if is_main and not preempted:
    metric_writers.write_json(os.path.join(workdir, 'final_metrics.json'), final)
  logging.info('Final metrics: %s', final)
  return final


def _pretrained_state(config, path, abstract_state, model_config, state_sharding,
                      state_from_params):
  """Fine-tuning start: pre-trained weights adapted to this model, fresh optimizer."""
  from vit_jax import checkpoint  # pylint: disable=g-import-not-at-top
  path = os.path.expanduser(str(path))
  source: Any = path
  if config.reset_head:
    flat = checkpoint.load_flat(path)
    flat = {k: v for k, v in flat.items() if not k.startswith('head/')}
    source = checkpoint.unflatten(flat)
  params = checkpoint.load_pretrained(source, abstract_state.params, model_config,
                                      image_size=image_hw(config.image_size),
                                      posemb_method=config.posemb_resize)
  logging.info('Fine-tuning from %s', path)
  params = _place(params, state_sharding.params)
  return jax.jit(state_from_params, out_shardings=state_sharding)(params)
