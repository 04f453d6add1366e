"""Where arrays live: the device mesh, shardings, multi-host start-up, input prefetch.

The whole parallelism story of vit_jax is in this file:

- One 1-D `Mesh` over every device of every process, axis `'data'`.
- Batches are split along that axis (`data_sharding`): each device sees
  global_batch / num_devices examples; each process feeds only its own slice
  (`shard_batch` builds the global array from per-process pieces).
- Parameters and optimiser state are replicated (`replicated`) or, for models
  that do not fit one device, sharded FSDP-style over the same axis
  (`fsdp_sharding`): XLA inserts the all-gathers and reduce-scatters.
- One `jax.jit` train step with these shardings is the data-parallel program;
  gradients are averaged across devices by the compiler, not by hand.
- Multi-host: `initialize_distributed` starts JAX's own runtime
  (`jax.distributed.initialize`) before anything touches a device.
"""

from __future__ import annotations

import collections
import itertools
from typing import Any, Iterable, Iterator, Optional

import jax
import numpy as np
from absl import logging
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = 'data'


def initialize_distributed(coordinator_address: Optional[str] = None,
                           num_processes: Optional[int] = None,
                           process_id: Optional[int] = None,
                           local_device_ids: Optional[list[int]] = None) -> None:
  """Joins a multi-process run; with no arguments, reads the cluster environment.

  Arguments left None are detected by JAX (SLURM, Open MPI, TPU pods, ...).
  A single-process run with nothing to detect needs no call at all.
  """
  kwargs = dict(coordinator_address=coordinator_address, num_processes=num_processes,
                process_id=process_id, local_device_ids=local_device_ids)
  jax.distributed.initialize(**{k: v for k, v in kwargs.items() if v is not None})
  logging.info('process %d of %d, %d local / %d global devices', jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count())


def make_mesh(devices: Optional[list] = None) -> Mesh:
  """A 1-D data mesh over `devices` (default: all devices of all processes)."""
  devices = jax.devices() if devices is None else devices
  return Mesh(np.asarray(devices), (DATA_AXIS,))


def data_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over the mesh."""
  return NamedSharding(mesh, P(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def fsdp_sharding(tree: Any, mesh: Mesh, min_size: int = 2**14) -> Any:
  """Shards each large array along its largest axis divisible by the mesh size.

  Small arrays (biases, norms) and arrays with no divisible axis stay replicated:
  splitting them saves nothing and costs a collective each.
  """
  size = mesh.shape[DATA_AXIS]

  def spec(x):
    shape = getattr(x, 'shape', ())
    if size == 1 or int(np.prod(shape)) < min_size:
      return replicated(mesh)
    for axis in sorted(range(len(shape)), key=lambda a: -shape[a]):
      if shape[axis] % size == 0:
        parts = [None] * len(shape)
        parts[axis] = DATA_AXIS
        return NamedSharding(mesh, P(*parts))
    return replicated(mesh)

  return jax.tree.map(spec, tree)


def place(tree: Any, shardings: Any) -> Any:
  """Host arrays -> global arrays with `shardings` (every process holds the whole tree)."""
  def put(x, sharding):
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])
  return jax.tree.map(put, tree, shardings)


def gather(tree: Any, mesh) -> Any:
  """Global arrays -> numpy on every process (replicates FSDP shards first)."""
  replicate = jax.jit(lambda t: t, out_shardings=replicated(mesh))
  return jax.device_get(replicate(tree))


def check_batch_divisible(batch_size: int, mesh: Mesh, field: str = 'batch_size') -> None:
  devices = mesh.devices.size
  if batch_size % devices:
    raise ValueError(
        f'{field}={batch_size} must be divisible by the number of devices ({devices})')


def shard_batch(batch: Any, sharding: NamedSharding) -> Any:
  """Turns this process's numpy batch into global arrays sharded on the data axis."""
  return jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), batch)


def prefetch_to_device(iterator: Iterable[Any], sharding: NamedSharding,
                       size: int = 2) -> Iterator[Any]:
  """Yields batches already placed on the devices, `size` ahead of use.

  Transfers are asynchronous, so with size >= 2 the next batch is copied while
  the current step runs and input never stalls the step.
  """
  queue = collections.deque()
  iterator = iter(iterator)

  def enqueue(n):
    for batch in itertools.islice(iterator, n):
      queue.append(shard_batch(batch, sharding))

  enqueue(size)
  while queue:
    yield queue.popleft()
    enqueue(1)
