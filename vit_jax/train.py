"""Training and fine-tuning: state, one jitted and sharded step, the loop.

`train_and_evaluate(config, workdir)` runs a whole experiment:
1. `validate_config` (vit_jax.validation) refuses any bad value, naming the field;
2. `_set_up` builds the data source (vit_jax.data_sources), the model (any preset,
   ViT or BiT ResNet), the optimizer and the starting state: the run's latest
   checkpoint in `workdir` (with the input pipeline's position, so a restarted run
   continues exactly), else `config.pretrained_path` (new head, position embeddings
   resampled), else a fresh init;
3. `_loop` feeds batches sharded over the device mesh to the compiled step; what is
   due at a step (log, checkpoint, eval, few-shot) and the clock live in
   vit_jax.periodic, evaluation in vit_jax.evaluators and vit_jax.fewshot. The final
   checkpoint is written before the final evaluation.

The step (`make_train_step`) is pure, `(state, batch) -> (state, metrics)`: micro-batch
accumulation is a `lax.scan` inside it, XLA averages gradients across devices.
"""

from __future__ import annotations

import dataclasses
import os
import signal
from typing import Any, Callable, Optional

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from jax.sharding import Mesh, NamedSharding

from vit_jax import checkpoint
from vit_jax import data_sources
from vit_jax import evaluators
from vit_jax import fewshot
from vit_jax import input_pipeline
from vit_jax import metric_writers
from vit_jax import optimizers
from vit_jax import parallel
from vit_jax import periodic
from vit_jax import run_history
from vit_jax import storage
from vit_jax import train_checkpoints
from vit_jax import validation
from vit_jax import workdir_lock
from vit_jax.configs import schema
from vit_jax.configs.image_size import image_hw

DTYPES = validation.DTYPES
SYNTHETIC = data_sources.SYNTHETIC
build_model = validation.build_model
validate_config = validation.validate_config
NonFiniteLossError = periodic.NonFiniteLossError  # raised by the loop; importable from here

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
    x = jax.lax.with_sharding_constraint(x, parallel.micro_batch_sharding(mesh))
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
  norm before clipping), 'learning_rate' (used by this update). `config` is a
  resolved config (`schema.resolve`; `build_program` resolves it once).
  """
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


# ---------------------------------------------------------------------------
# The run.
# ---------------------------------------------------------------------------


def _flatten_config(config) -> dict:
  """{'pp.train': 'plain', ...}: scalars as they are, anything else as text."""
  flat = flax.traverse_util.flatten_dict(config.to_dict(), sep='.')
  return {k: v if isinstance(v, (int, float, str, bool)) or v is None else str(v)
          for k, v in flat.items()}


def _initial_state(config, checkpointer, abstract_state, state_sharding, model_config,
                   init_state: Callable, fingerprint: str) -> tuple[TrainState, int]:
  """The latest checkpoint of this run, else the pre-trained weights, else a fresh init."""
  abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          abstract_state, state_sharding)
  schedule = optimizers.make_schedule(config)

  def same_history(step: int, meta: dict) -> None:  # before any array is read
    run_history.check_resume(meta, config, step, checkpointer.directory,
                             learning_rate_now=float(schedule(step)))

  state, _ = checkpointer.restore_latest(abstract, expect={'fingerprint': fingerprint},
                                         check=same_history)
  if state is not None:
    start_step = int(jax.device_get(state.step))
    logging.info('Resuming from step %d (checkpoint in %s)', start_step, checkpointer.directory)
    return state, start_step
  if config.pretrained_path:
    return _pretrained_state(config, abstract_state, model_config, state_sharding,
                             init_state), 0
  return jax.jit(init_state, out_shardings=state_sharding)(None, np.int32(config.seed)), 0


def _pretrained_state(config, abstract_state, model_config, state_sharding, init_state):
  """Fine-tuning start: pre-trained weights adapted to this model, fresh optimizer."""
  path = os.path.expanduser(str(config.pretrained_path))
  source: Any = path
  if config.reset_head:  # the head is never read: it would only be discarded
    flat = checkpoint.load_flat(path, without_head=True)
    source = checkpoint.unflatten({k: v for k, v in flat.items() if not k.startswith('head/')})
  params = checkpoint.load_pretrained(source, abstract_state.params, model_config,
                                      image_size=image_hw(config.image_size),
                                      posemb_method=config.posemb_resize, source_name=path)
  logging.info('Fine-tuning from %s', path)
  params = parallel.place(params, state_sharding.params)
  return jax.jit(init_state, out_shardings=state_sharding)(params)


@dataclasses.dataclass(frozen=True)
class Program:
  """The train step exactly as `main` runs it and `plan` compiles it ahead of time.

  Built once by `build_program` from a resolved config, the class count and a
  mesh: the model, the optimizer, the abstract state (shapes and dtypes, nothing
  allocated), its shardings and the jitted step with those shardings.
  """
  config: ml_collections.ConfigDict  # resolved and validated
  mesh: Mesh
  num_classes: int
  model: Any
  tx: optax.GradientTransformation
  schedule: Callable
  init_state: Callable[..., TrainState]  # (params=None, seed) -> TrainState; jit it
  abstract_state: TrainState  # ShapeDtypeStructs
  state_sharding: TrainState  # NamedShardings
  batch_sharding: NamedSharding
  train_step: Callable  # jitted (state, batch) -> (state, metrics); donates the state

  @property
  def num_params(self) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(self.abstract_state.params))

  def sharded_abstract_state(self) -> TrainState:
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        self.abstract_state, self.state_sharding)

  def abstract_batch(self) -> dict:
    """A global training batch as the input pipeline delivers it (float32 images, one-hot)."""
    height, width = image_hw(self.config.image_size)
    batch = int(self.config.batch_size)
    return {
        'image': jax.ShapeDtypeStruct((batch, height, width, 3), jnp.float32,
                                      sharding=self.batch_sharding),
        'label': jax.ShapeDtypeStruct((batch, self.num_classes), jnp.float32,
                                      sharding=self.batch_sharding),
    }

  def lower(self):
    """The step lowered for this mesh's devices (real or compile-only), not run."""
    return self.train_step.lower(self.sharded_abstract_state(), self.abstract_batch())


def run_mesh(config: ml_collections.ConfigDict, devices: Optional[list] = None) -> Mesh:
  """The mesh `config.mesh` (or `config.fsdp`) names, over `devices` (default: all)."""
  devices = list(jax.devices() if devices is None else devices)
  shape = parallel.resolve_mesh(config.mesh, len(devices), fsdp=bool(config.fsdp))
  return parallel.make_mesh(devices, shape)


def build_program(config: ml_collections.ConfigDict, num_classes: int, mesh: Mesh) -> Program:
  """The one construction of the train step, for `main` (`_set_up`) and `plan`.

  `config` is resolved and validated here, once, against the mesh; what follows
  reads it as it is.
  """
  devices = list(mesh.devices.flat)
  config = validate_config(config, num_devices=len(devices),
                           num_processes=len({d.process_index for d in devices}),
                           platform=devices[0].platform)
  model = build_model(config, num_classes)
  schedule = optimizers.make_schedule(config)
  tx = optimizers.make_optimizer(config, schedule)
  height, width = image_hw(config.image_size)

  def init_state(params=None, seed=int(config.seed)) -> TrainState:
    # Jitted with the seed passed in: as a constant, each seed would be another
    # program to compile (vit_jax.compare trains several seeds in one process).
    if params is None:
      init_key = jax.random.fold_in(jax.random.key(seed), 0)
      images = jnp.zeros((1, height, width, 3), jnp.float32)
      params = model.init({'params': init_key}, images, train=False)['params']
    return TrainState(step=jnp.zeros([], jnp.int32), params=params, opt_state=tx.init(params))

  abstract_state = jax.eval_shape(init_state)
  state_sharding = parallel.fsdp_sharding(abstract_state, mesh)
  batch_sharding = parallel.data_sharding(mesh)
  train_step = jax.jit(make_train_step(model, tx, config, schedule=schedule, mesh=mesh),
                       in_shardings=(state_sharding, batch_sharding),
                       out_shardings=(state_sharding, parallel.replicated(mesh)),
                       donate_argnums=(0,))
  return Program(config, mesh, int(num_classes), model, tx, schedule, init_state,
                 abstract_state, state_sharding, batch_sharding, train_step)


@dataclasses.dataclass
class _Run:
  """What one run is made of, set up before the first step."""
  config: ml_collections.ConfigDict
  mesh: Any
  data: Any
  model: Any
  train_step: Callable
  evaluator: evaluators.ClassificationEvaluator
  fewshot: Optional[fewshot.FewShotEvaluator]  # every config.fewshot_every steps
  checkpointer: train_checkpoints.RunCheckpointer
  fingerprint: str
  state: TrainState
  start_step: int
  num_params: int


def _set_up(config: ml_collections.ConfigDict, workdir: str, mesh) -> _Run:
  """Data, model, optimizer, compiled steps and the starting state of a run."""
  data = data_sources.get_data(config)
  program = build_program(config, data.num_classes, mesh)
  model, init_state = program.model, program.init_state
  abstract_state, state_sharding = program.abstract_state, program.state_sharding
  checkpointer = train_checkpoints.RunCheckpointer(
      workdir, max_to_keep=int(config.keep_checkpoints), async_save=bool(config.async_checkpoints))
  fingerprint = train_checkpoints.fingerprint(abstract_state)
  state, start_step = _initial_state(config, checkpointer, abstract_state, state_sharding,
                                     schema.model_config(config), init_state, fingerprint)
  train_step = program.train_step
  evaluator = evaluators.ClassificationEvaluator(model, config, mesh, state_sharding.params)
  few = (fewshot.FewShotEvaluator(model, config, mesh, shots=tuple(config.fewshot_shots))
         if config.fewshot_every else None)
  num_params = program.num_params
  return _Run(config, mesh, data, model, train_step, evaluator, few, checkpointer, fingerprint,
              state, start_step, num_params)


def _loop(run: _Run, writer) -> tuple[dict, int, bool, periodic.Chrono, periodic.TrainMetrics]:
  """Steps from `run.start_step` to the end (or a stop request), with the periodic work."""
  config, data, checkpointer = run.config, run.data, run.checkpointer
  final, preempted, step = {}, False, run.start_step
  chrono = periodic.Chrono(run.start_step)
  history = _history(run)
  metrics = periodic.TrainMetrics(
      writer, chrono, config.batch_size, data.num_train_examples,
      lambda: (f'The last good checkpoint is step {checkpointer.latest_step()} in '
               f'{checkpointer.directory}.'), restored=(run.start_step, checkpointer.directory),
      examples_seen=history.examples_seen)
  due = periodic.Schedule(config.total_steps, config.log_every, config.eval_every,
                          config.checkpoint_every)
  batches = None
  try:
    batches = parallel.prefetch_to_device(data.train_batches(run.start_step),
                                          parallel.data_sharding(run.mesh),
                                          size=int(config.prefetch))
    with periodic.StopRequests() as stop:
      for step in range(run.start_step + 1, config.total_steps + 1):
        run.state, step_metrics = run.train_step(run.state, next(batches))
        metrics.add(step, step_metrics)
        checkpointer.check()  # a failed asynchronous save stops the run here
        if step == run.start_step + 1:
          jax.block_until_ready(step_metrics)  # the first step's time is compilation
          chrono.first_step_done(step)
          logging.info('First step (compilation included) took %.1f s.', chrono.compile_seconds)
        stopping = stop.should_stop(step)
        if due.log(step) or due.eval(step) or due.checkpoint(step) or stopping:
          metrics.flush()  # also the finiteness check: nothing non-finite is ever saved
        with chrono.paused():
          # Saved before evaluating: a failing evaluation never loses finished training.
          if due.checkpoint(step) or stopping:
            checkpointer.save(step, run.state, _checkpoint_meta(run, step, history, chrono,
                                                                metrics),
                              wait=stopping or step == config.total_steps)
            writer.flush(fsync=True)  # the metrics up to a checkpoint survive a kill
          results = {}  # written once per step, only what was measured at it
          if due.eval(step) and not stopping:
            results.update(run.evaluator.run(run.state.params, data.eval_batches()))
          if run.fewshot and (step % config.fewshot_every == 0 or step == config.total_steps):
            results.update(run.fewshot.run(run.state.params))  # as big_vision logs it
          final.update(results)
          if results:
            writer.write_scalars(step, results)
        if stopping:
          logging.warning('Stopped at step %d after saving a checkpoint; rerun to resume.', step)
          preempted = True
          final['stopped_by'] = (signal.Signals(stop.signal).name if stop.signal
                                 else 'preemption')
          final['checkpoint_dir'] = checkpointer.directory
          break
  finally:
    if batches is not None:
      batches.close()  # stops the input pipeline's threads now, not at exit
    checkpointer.close()  # waits for asynchronous saves: the last good one is complete
  return final, step, preempted, chrono, metrics


def _history(run: _Run) -> run_history.History:
  """The figures carried over from the checkpoint the run resumed from (if any)."""
  return run_history.History(run.checkpointer.restored_meta if run.start_step else None,
                             run.start_step, run.config)


def _checkpoint_meta(run: _Run, step: int, history: run_history.History,
                     chrono: periodic.Chrono, metrics: periodic.TrainMetrics) -> dict:
  meta = {'step': step, 'data_start_step': step, 'model_name': run.config.model_name,
          'dataset': run.config.dataset, 'fingerprint': run.fingerprint}
  schedule = optimizers.make_schedule(run.config)
  meta.update(history.meta(step, chrono, metrics.last.get('train_loss'), run.config,
                           learning_rate_next=float(schedule(step))))
  return meta


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       devices: Optional[list] = None,
                       on_start: Optional[Callable[[ml_collections.ConfigDict], None]] = None
                       ) -> dict:
  """Trains (or resumes) the run in `workdir`; returns the final metrics.

  The final metrics are also written to `workdir/final_metrics.json`. A run
  stopped by SIGTERM saves a checkpoint and returns with `preempted=True`.
  `devices` (default: every device of every process) are laid out as
  `config.mesh` says. `on_start(config)` runs on process 0 once the run is set
  up (config validated, data found, the resume or the pre-trained weights
  accepted) and before its first step: `main` records the config there, so a
  refused run never rewrites a run's record.
  """
  config = schema.resolve(config)
  mesh = run_mesh(config, devices)
  config = validate_config(config, num_devices=mesh.devices.size,
                           num_processes=jax.process_count())
  is_main = jax.process_index() == 0
  workdir = storage.resolve(workdir)
  storage.makedirs(workdir)
  # Checkpoints are written and read by all processes: a local workdir must be one
  # that every host mounts (a bucket is seen by all of them).
  if jax.process_count() > 1 and not storage.is_remote(workdir):
    parallel.check_shared_workdir(workdir)
  with workdir_lock.hold(workdir, enabled=is_main):  # one run per workdir
    run = _set_up(config, workdir, mesh)
    if is_main and on_start is not None:
      on_start(config)
    writer = metric_writers.create_default_writer(
        workdir if is_main else None, config.total_steps, run.start_step, just_logging=not is_main)
    if is_main and run.start_step == 0:
      writer.write_hparams(_flatten_config(config))
    accum = config.grad_accum_steps
    logging.info('Model %s: %d parameters, %d classes; %d devices in %d process(es); '
                 'global batch %d (%d per device%s).', config.model_name, run.num_params,
                 run.data.num_classes, mesh.devices.size, jax.process_count(), config.batch_size,
                 config.batch_size // mesh.devices.size,
                 f', {accum} micro-batches' if accum > 1 else '')
    try:
      final, step, preempted, chrono, metrics = _loop(run, writer)
      writer.flush()
    finally:
      writer.close()

    if run.start_step >= config.total_steps:
      final.update(run.evaluator.run(run.state.params, run.data.eval_batches()))
    input_pipeline.write_bad_images(config, workdir)  # images left out by bad_images='skip'
    if config.export_params and not preempted:
      params = parallel.gather(run.state.params, mesh)
      if is_main:
        checkpoint.save(params, storage.join(workdir, 'params.npz'))
    final.update({
        'step': int(step), 'preempted': preempted,
        # Over the run's whole history: a rerun that only evaluates or exports keeps them.
        **_history(run).figures(step, chrono, metrics.last.get('train_loss')),
        'num_params': run.num_params, 'num_devices': int(mesh.devices.size),
        'num_processes': int(jax.process_count()),
    })
    if is_main and not preempted:
      metric_writers.write_json(storage.join(workdir, 'final_metrics.json'), final)
    logging.info('Final metrics: %s', final)
    return final
