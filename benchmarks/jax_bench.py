"""The JAX side of the benchmark: one worker process per measured cell.

Synthetic data only; no TensorFlow. The model is a `vit_jax` preset built with
`build_model`; parameters stay float32 and `dtype='bfloat16'` sets the compute
type. Inference is `jax.jit(model.apply)`; training is one jitted AdamW step
(softmax cross-entropy) with the state donated, parameters replicated and the
batch split over a 1-D data mesh (`vit_jax.parallel`), so the same code measures
one device and data-parallel scaling. Nothing in a timed repeat waits for the
host except the final `block_until_ready`.
"""

from __future__ import annotations

import os
import time
from typing import Any

from benchmarks import measure
from vit_jax import flops as flops_lib

LEARNING_RATE = 1e-3
WEIGHT_DECAY = 0.1


def _memory_stats(device) -> dict[str, int]:
  try:
    stats = device.memory_stats() or {}
  except Exception:
    stats = {}
  keep = ('peak_bytes_in_use', 'bytes_in_use', 'bytes_limit')
  return {k: int(stats[k]) for k in keep if k in stats}


def _compiled_memory(compiled) -> dict[str, int]:
  """XLA's buffer assignment of the compiled step: temps are the activations."""
  try:
    analysis = compiled.memory_analysis()
  except Exception:
    return {}
  names = ('temp', 'argument', 'output', 'alias', 'generated_code')
  return {f'{n}_bytes': int(getattr(analysis, f'{n}_size_in_bytes'))
          for n in names if getattr(analysis, f'{n}_size_in_bytes', None) is not None}


def build(spec: dict[str, Any]):
  import jax.numpy as jnp
  from vit_jax.configs import models

  config = models.get_config(spec['model'])
  if spec.get('remat_policy') is not None:
    config.remat_policy = spec['remat_policy']
  if spec.get('attention') is not None:
    config.attention_implementation = spec['attention'] or None
  dtype = {'fp32': jnp.float32, 'bf16': jnp.bfloat16}[spec['dtype']]
  return config, models.build_model(config, spec['num_classes'], dtype=dtype)


def make_own_train_step(model, tx):
  """(params, opt_state), images, labels -> new state, loss. Plain AdamW + softmax CE."""
  import jax
  import optax

  def step(state, images, labels):
    params, opt_state = state

    def loss_fn(p):
      logits, _ = model.apply({'params': p}, images, train=True)
      return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return (optax.apply_updates(params, updates), opt_state), loss

  return step


def _project_train_step(model, params, labels, mesh, spec):
  """`vit_jax.train.make_train_step` with an AdamW config like the own step's.

  Differences from the own step: weight decay on kernels only, and the step
  also computes the gradient norm and the learning rate (its metrics).
  """
  import jax
  import jax.numpy as jnp
  from vit_jax import optimizers
  from vit_jax import parallel
  from vit_jax import train as train_lib
  from vit_jax.configs import schema

  config = schema.resolve(dict(
      optimizer='adamw', learning_rate=LEARNING_RATE, weight_decay=WEIGHT_DECAY,
      schedule='constant', warmup_steps=0, total_steps=10**9, grad_clip_norm=0.0,
      loss='softmax_xent', label_smoothing=0.0, grad_accum_steps=1, seed=0))
  tx = optimizers.make_optimizer(config)
  step_fn = train_lib.make_train_step(model, tx, config, mesh=mesh)
  replicated = parallel.replicated(mesh)
  state = jax.jit(lambda p: train_lib.TrainState(
      step=jnp.zeros([], jnp.int32), params=p, opt_state=tx.init(p)),
                  out_shardings=replicated)(params)
  one_hot = jax.jit(lambda y: jax.nn.one_hot(y, spec['num_classes']),
                    out_shardings=parallel.data_sharding(mesh))(labels)
  return step_fn, state, one_hot


def setup(spec: dict[str, Any]):
  """Builds, compiles and warms up; returns what `measure.serve` needs."""
  import jax
  import numpy as np
  import optax
  from vit_jax import parallel

  base_rss = measure.rss_bytes()
  devices = jax.devices()
  num_devices = int(spec.get('devices', 1))
  if num_devices > len(devices):
    raise RuntimeError(f'{num_devices} devices requested, {len(devices)} present')
  devices = devices[:num_devices]
  mesh = parallel.make_mesh(devices)
  data = parallel.data_sharding(mesh)
  replicated = parallel.replicated(mesh)
  batch = int(spec['batch'])
  parallel.check_batch_divisible(batch, mesh)

  config, model = build(spec)
  size = int(spec['image_size'])
  rng = np.random.default_rng(0)
  images = jax.device_put(
      rng.uniform(-1, 1, (batch, size, size, 3)).astype(np.float32), data)
  labels = jax.device_put(rng.integers(0, spec['num_classes'], (batch,)).astype(np.int32), data)

  init = jax.jit(lambda x: model.init(jax.random.key(0), x, train=False)['params'],
                 out_shardings=replicated)
  params = init(np.zeros((1, size, size, 3), np.float32))
  num_params = int(sum(np.prod(p.shape) for p in jax.tree.leaves(params)))

  train = spec['mode'] == 'train'
  project_step = train and spec.get('train_step') == 'project'
  if project_step:
    step_fn, state, labels = _project_train_step(model, params, labels, mesh, spec)
    jitted = jax.jit(lambda state, images, labels: step_fn(
        state, {'image': images, 'label': labels}), donate_argnums=(0,),
                     in_shardings=(replicated, data, data),
                     out_shardings=(replicated, replicated))
    args = (state, images, labels)
  elif train:
    tx = optax.adamw(LEARNING_RATE, weight_decay=WEIGHT_DECAY)
    state = (params, jax.jit(tx.init, out_shardings=replicated)(params))
    step_fn = make_own_train_step(model, tx)
    jitted = jax.jit(step_fn, donate_argnums=(0,),
                     in_shardings=(replicated, data, data),
                     out_shardings=(replicated, replicated))
    args = (state, images, labels)
  else:
    jitted = jax.jit(lambda p, x: model.apply({'params': p}, x, train=False)[0],
                     in_shardings=(replicated, data), out_shardings=data)
    args = (params, images)

  start = time.perf_counter()
  compiled = jitted.lower(*args).compile()
  compile_s = time.perf_counter() - start
  flops = flops_lib.xla_flops(compiled)
  compiled_memory = _compiled_memory(compiled)
  per_device_batch = batch // num_devices

  holder = {'state': args[0], 'out': None}

  def run(steps: int) -> None:
    if train:
      state, loss = holder['state'], None
      for _ in range(steps):
        state, loss = compiled(state, images, labels)
      jax.block_until_ready((state, loss))
      holder['state'] = state
    else:
      out = None
      for _ in range(steps):
        out = compiled(params, images)
      jax.block_until_ready(out)

  start = time.perf_counter()
  run(1)  # first execution: allocations, thread pools (the memory peak)
  per_step = time.perf_counter() - start
  if spec.get('warmup_steps', 2) > 1:  # benchmarks/max_batch.py needs only the first
    start = time.perf_counter()
    run(1)
    per_step = time.perf_counter() - start
  steps = spec.get('steps') or measure.steps_for(per_step, spec['min_repeat_seconds'])

  ready = dict(compile_s=compile_s, steps=steps, warmup_step_s=per_step)

  def finish() -> dict:
    import vit_jax
    device = devices[0]
    return dict(
        framework='jax', platform=device.platform, device_kind=device.device_kind,
        num_devices=num_devices, params=num_params, compile_s=compile_s,
        train_step=(spec.get('train_step') or 'own') if train else None,
        vit_jax_path=os.path.dirname(os.path.abspath(vit_jax.__file__)),
        xla_flops_per_image=(flops / per_device_batch if flops else None),
        remat_policy=config.get('remat_policy'), compiled_memory=compiled_memory,
        rss_base_bytes=base_rss, device_memory=_memory_stats(device))

  return ready, run, finish
