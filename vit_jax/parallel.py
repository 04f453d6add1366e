"""Where arrays live: the device mesh, shardings, multi-host start-up, input prefetch.

The whole parallelism story of vit_jax is in this file:

- The mesh is configuration: `config.mesh` names axes and their sizes, e.g.
  `(('data', -1), ('fsdp', 16))` (-1: the rest of the devices). Two axes exist:
  `data` (copies of the model, each on its own share of the batch) and `fsdp`
  (parameters and optimizer state split into shards, ZeRO-3 / FSDP style).
  The default `(('data', -1),)` is plain data parallelism, parameters replicated;
  `config.fsdp=True` is the named case `(('fsdp', -1),)`: everything sharded over
  every device. `resolve_mesh` turns the field into sizes, `make_mesh` into a
  `Mesh`, always with both axes (a size-1 axis costs nothing).
- The batch is split over all axes (`data_sharding`): each device sees
  global_batch / num_devices examples; each process feeds only its own slice
  (`shard_batch` builds the global array from per-process pieces).
- Each large parameter (and its optimizer state) is split along its largest
  axis divisible by the `fsdp` size (`fsdp_sharding`); small arrays (biases,
  norms) are replicated. XLA inserts the all-gathers before use and the
  reduce-scatters of the gradients: one `jax.jit` train step with these
  shardings is the whole parallel program.
- Devices are laid out so that the inner (`fsdp`) axis stays inside a process /
  TPU slice: on TPUs `mesh_utils.create_device_mesh` follows the torus. With
  several TPU slices (devices carry `slice_index`), the `data` axis is split
  across slices over the data-centre network (`create_hybrid_device_mesh`), so
  only the gradient reduction crosses slices.
- Multi-host: `initialize_distributed` starts JAX's own runtime
  (`jax.distributed.initialize`) before anything touches a device;
  `check_shared_workdir` refuses a workdir that the processes do not all see.
"""

from __future__ import annotations

import collections
import itertools
import math
import os
import secrets
import time
from typing import Any, Iterable, Iterator, Mapping, Optional, Sequence

import jax
import numpy as np
from absl import logging
from jax.experimental import mesh_utils
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = 'data'
FSDP_AXIS = 'fsdp'
AXES = (DATA_AXIS, FSDP_AXIS)  # mesh axis order: fsdp innermost (fastest links)
DEFAULT_MESH = ((DATA_AXIS, -1),)
FSDP_MESH = ((FSDP_AXIS, -1),)  # what `config.fsdp=True` names
# Arrays smaller than this stay replicated: splitting them saves little and
# costs a collective each.
FSDP_MIN_SIZE = 2**14


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


SHARED_CHECK_PREFIX = '.shared-check-'


def check_shared_workdir(workdir: str, wait_s: float = 3.0) -> None:
  """Refuses (ValueError, on every process) a workdir the processes do not all share.

  Checkpoints are written by all processes into one directory and read back by
  all of them on resume, so every process must see the same `workdir`, e.g. on
  NFS or a Cloud Storage FUSE mount. Process 0 writes a file with a random name
  and content there and broadcasts the content; every other process must find
  that file with that content within `wait_s` seconds (a new name, so no cached
  "no such file" answer of a network filesystem hides it). The per-process
  results are gathered, so every process raises, and none waits in a collective
  for one that stopped. Collective: call it on every process. One process: no-op.
  """
  if jax.process_count() == 1:
    return
  token = secrets.token_hex(16) if jax.process_index() == 0 else '0' * 32
  written = True
  if jax.process_index() == 0:
    try:
      with open(os.path.join(workdir, SHARED_CHECK_PREFIX + token), 'w',
                encoding='ascii') as f:
        f.write(token)
    except OSError as e:
      logging.error('Cannot write into workdir %s: %s', workdir, e)
      written = False
  # The broadcast is also the barrier: process 0 wrote the file before joining it.
  token = bytes(np.asarray(multihost_utils.broadcast_one_to_all(
      np.frombuffer(token.encode('ascii'), np.uint8)))).decode('ascii')
  path = os.path.join(workdir, SHARED_CHECK_PREFIX + token)
  ok = written if jax.process_index() == 0 else _sees_token(path, token, wait_s)
  oks = np.asarray(multihost_utils.process_allgather(np.asarray([ok], np.int32))).reshape(-1)
  if jax.process_index() == 0:
    try:
      os.remove(path)
    except OSError:
      pass
  if not oks[0]:
    raise ValueError(f'--workdir {workdir!r}: process 0 cannot write into it, so it cannot '
                     'be checked to be shared by the processes of this run')
  missing = [i for i, ok in enumerate(oks) if not ok]
  if missing:
    raise ValueError(
        f'--workdir {workdir!r} is not shared by the processes of this run: '
        f'{_processes(missing)} not see the file {os.path.basename(path)} that process 0 '
        'wrote into its workdir. Every process must see one directory: put the '
        'workdir on a filesystem all hosts mount at the same path (NFS, Filestore, '
        'Cloud Storage FUSE).')


def _processes(indices: list[int]) -> str:
  if len(indices) == 1:
    return f'process {indices[0]} does'
  return f'processes {", ".join(map(str, indices))} do'


def _sees_token(path: str, token: str, wait_s: float) -> bool:
  deadline = time.monotonic() + wait_s
  while True:
    try:
      with open(path, encoding='ascii') as f:
        if f.read() == token:
          return True
    except OSError:
      pass
    if time.monotonic() >= deadline:
      return False
    time.sleep(0.2)


# ---------------------------------------------------------------------------
# The mesh.
# ---------------------------------------------------------------------------


def resolve_mesh(spec: Any, num_devices: int, *, fsdp: bool = False,
                 field: str = 'config.mesh') -> dict[str, int]:
  """`(('data', -1), ('fsdp', 4))` -> {'data': n/4, 'fsdp': 4} for `num_devices` = n.

  Refuses, naming `field`, unknown axis names, repeated names, sizes that are not
  positive (or one -1), and sizes whose product is not the number of devices.
  `fsdp=True` (the `config.fsdp` shorthand) stands for `(('fsdp', -1),)` and may
  not be combined with another mesh.
  """
  spec = tuple(tuple(axis) for axis in (spec or DEFAULT_MESH))
  if fsdp:
    if spec not in (DEFAULT_MESH, FSDP_MESH):
      raise ValueError(f'config.fsdp=True means {field}={FSDP_MESH!r}; it cannot be combined '
                       f'with {field}={spec!r}: set one of them')
    spec = FSDP_MESH
  sizes: dict[str, int] = {}
  for axis in spec:
    if len(axis) != 2 or not isinstance(axis[0], str):
      raise ValueError(f'{field} must be pairs (axis name, size), e.g. '
                       f"(('data', -1), ('fsdp', 8)); got {spec!r}")
    name, size = axis
    if name not in AXES:
      raise ValueError(f'{field}: unknown axis {name!r}; the axes are {AXES} (data '
                       'parallelism and parameter sharding)')
    if name in sizes:
      raise ValueError(f'{field}: axis {name!r} is given twice in {spec!r}')
    if not isinstance(size, (int, np.integer)) or isinstance(size, bool) or (
        size < 1 and size != -1):
      raise ValueError(f'{field}: the size of axis {name!r} must be a positive integer or '
                       f'-1 (the rest of the devices), got {size!r}')
    sizes[name] = int(size)
  free = [name for name, size in sizes.items() if size == -1]
  if len(free) > 1:
    raise ValueError(f'{field}: only one axis may have size -1, got {spec!r}')
  fixed = math.prod(size for size in sizes.values() if size != -1)
  if free:
    if num_devices % fixed:
      raise ValueError(f'{field}={spec!r}: {num_devices} devices cannot be split into '
                       f'axes of sizes {fixed} x -1 ({num_devices} is not divisible by {fixed})')
    sizes[free[0]] = num_devices // fixed
  elif fixed != num_devices:
    raise ValueError(f'{field}={spec!r} has {fixed} devices in all, but the run has '
                     f'{num_devices}: give an axis size -1 to take the rest')
  return {name: sizes.get(name, 1) for name in AXES}


def num_slices(devices: Sequence[Any]) -> int:
  """How many TPU slices `devices` span (1 off TPU: no `slice_index`)."""
  return len({getattr(d, 'slice_index', 0) or 0 for d in devices})


def make_mesh(devices: Optional[Sequence[Any]] = None,
              shape: Optional[Mapping[str, int]] = None) -> Mesh:
  """A (data, fsdp) mesh over `devices` (default: all devices of all processes).

  `shape` is `resolve_mesh`'s result; default: every device on the data axis.
  """
  devices = list(jax.devices() if devices is None else devices)
  shape = dict(shape or {DATA_AXIS: len(devices), FSDP_AXIS: 1})
  dims = tuple(shape.get(name, 1) for name in AXES)
  if math.prod(dims) != len(devices):
    raise ValueError(f'mesh {dict(zip(AXES, dims))} needs {math.prod(dims)} devices, '
                     f'got {len(devices)}')
  return Mesh(_device_grid(dims, devices), AXES)


def _device_grid(dims: tuple[int, int], devices: list) -> np.ndarray:
  slices = num_slices(devices)
  if slices > 1:
    data, fsdp = dims
    if data % slices:
      raise ValueError(f'config.mesh: the data axis ({data}) must be divisible by the number '
                       f'of TPU slices ({slices}): only the data axis crosses slices')
    return mesh_utils.create_hybrid_device_mesh(
        (data // slices, fsdp), (slices, 1), devices, allow_split_physical_axes=True)
  if devices[0].platform == 'tpu':
    return mesh_utils.create_device_mesh(dims, devices, allow_split_physical_axes=True)
  # Elsewhere: each process's devices contiguous, so the fsdp axis stays within a
  # host (NVLink) whenever it is no larger than the devices of one process.
  ordered = sorted(devices, key=lambda d: (d.process_index, d.id))
  return np.asarray(ordered, dtype=object).reshape(dims)


def mesh_shape(mesh: Mesh) -> dict[str, int]:
  return {name: int(size) for name, size in mesh.shape.items()}


# ---------------------------------------------------------------------------
# Shardings.
# ---------------------------------------------------------------------------


def data_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over every axis of the mesh."""
  return NamedSharding(mesh, P(tuple(mesh.axis_names)))


def micro_batch_sharding(mesh: Mesh) -> NamedSharding:
  """[micro-batches, batch, ...]: each micro-batch split like a batch."""
  return NamedSharding(mesh, P(None, tuple(mesh.axis_names)))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def fsdp_sharding(tree: Any, mesh: Mesh, min_size: Optional[int] = None) -> Any:
  """Shards each large array along its largest axis divisible by the `fsdp` size.

  Arrays of fewer than `min_size` (default `FSDP_MIN_SIZE`) elements and arrays
  with no divisible axis stay replicated. A mesh without an `fsdp` axis (or of
  size 1) replicates everything.
  """
  size = dict(mesh.shape).get(FSDP_AXIS, 1)
  min_size = FSDP_MIN_SIZE if min_size is None else min_size

  def spec(x):
    shape = getattr(x, 'shape', ())
    if size == 1 or int(np.prod(shape)) < min_size:
      return replicated(mesh)
    for axis in sorted(range(len(shape)), key=lambda a: -shape[a]):
      if shape[axis] % size == 0:
        parts = [None] * len(shape)
        parts[axis] = FSDP_AXIS
        return NamedSharding(mesh, P(*parts))
    return replicated(mesh)

  return jax.tree.map(spec, tree)


def per_device_bytes(tree: Any, shardings: Any) -> int:
  """Bytes of `tree` (arrays or ShapeDtypeStructs) that one device holds."""
  def nbytes(x, sharding):
    shard = sharding.shard_shape(x.shape)
    return int(np.prod(shard)) * np.dtype(x.dtype).itemsize
  return sum(jax.tree.leaves(jax.tree.map(nbytes, tree, shardings)))


# ---------------------------------------------------------------------------
# Moving data.
# ---------------------------------------------------------------------------


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
  """Turns this process's numpy batch into global arrays sharded on the batch axis."""
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
