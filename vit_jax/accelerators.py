"""Accelerators a run can be planned for, and their compile-only devices.

`python -m vit_jax.plan` compiles the real train step for a machine that is
not here. This module knows the machines:

- `CHIPS`: per-chip dense bf16 peak and memory of Cloud TPU v4, v5e, v5p, v6e
  and NVIDIA A100, H100, H200 (vendor figures);
- `tpu_devices('v5p:4x4x4', num_slices=1)`: JAX's compile-only TPU devices for a
  Cloud TPU topology, from libtpu (`pip install -e ".[plan]"`), no TPU needed;
- `gpu_devices('h100', gpus_per_node=8, nodes=1)`: compile-only CUDA devices
  from a GPU target description (`gpu_target_config`, written from the
  `GPUS` facts below) and the CUDA plugin of jaxlib, no GPU needed.

Both need the process to keep its own backend on the CPU (`JAX_PLATFORMS=cpu`,
set by `vit_jax.plan` before JAX starts) so that nothing tries to open a real
accelerator.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re

GIB = 2**30


@dataclasses.dataclass(frozen=True)
class Chip:
  name: str  # what `plan` prints
  peak_bf16_flops: float  # dense, per chip, per second
  memory_bytes: int  # HBM per chip
  platform: str  # 'tpu' or 'cuda'


# Cloud TPU and NVIDIA data sheets (dense bf16; memory per chip).
CHIPS: dict[str, Chip] = {
    'v4': Chip('TPU v4', 275e12, 32 * GIB, 'tpu'),
    'v5e': Chip('TPU v5e', 197e12, 16 * GIB, 'tpu'),
    'v5p': Chip('TPU v5p', 459e12, 95 * GIB, 'tpu'),
    'v6e': Chip('TPU v6e (Trillium)', 918e12, 32 * GIB, 'tpu'),
    # GPUs: the memory the driver reports (GpuFacts below), a little under the label.
    'a100': Chip('NVIDIA A100 80GB SXM', 312e12, 85_899_345_920, 'cuda'),
    'h100': Chip('NVIDIA H100 80GB SXM', 989e12, 84_942_979_072, 'cuda'),
    'h200': Chip('NVIDIA H200 141GB SXM', 989e12, 150_754_820_096, 'cuda'),
}

# libtpu's name for each generation, and the chip configuration that gives one
# JAX device per chip (v4 and v5p fuse a chip's two TensorCores: 'megacore').
_TPU_LIBTPU = {'v4': ('v4', 'megacore'), 'v5e': ('v5e', 'default'),
               'v5p': ('v5p', 'default'), 'v6e': ('v6e', 'default')}
_TPU_DIMS = {'v4': 3, 'v5e': 2, 'v5p': 3, 'v6e': 2}
_ACCELERATOR_TYPE = {'v4': 'v4-{cores}', 'v5e': 'v5litepod-{chips}', 'v5p': 'v5p-{cores}',
                     'v6e': 'v6e-{chips}'}  # Cloud TPU's names of a slice
_TOPOLOGY = re.compile(r'^(v4|v5e|v5p|v6e):(\d+(?:x\d+){1,2})$')


@dataclasses.dataclass(frozen=True)
class Target:
  """A machine to compile for: the chip, how many, how they are grouped."""
  chip: Chip
  description: str  # 'v5e:4x4' or '8x h100 (1 node)'
  num_chips: int
  num_slices: int = 1
  hosts: int = 1  # processes a run there has (TPU hosts or GPU nodes)


def parse_tpu_topology(topology: str, num_slices: int = 1) -> tuple[str, tuple[int, ...]]:
  """'v5p:4x4x4' -> ('v5p', (4, 4, 4)); refuses unknown generations and shapes."""
  match = _TOPOLOGY.match(topology or '')
  if not match:
    raise ValueError(
        f'--topology={topology!r}: expected a Cloud TPU topology such as v4:2x2x2, '
        'v5e:4x4, v5p:4x4x4 or v6e:16x16 (generations: ' + ', '.join(_TPU_LIBTPU) + ')')
  generation, dims = match.group(1), tuple(int(d) for d in match.group(2).split('x'))
  if len(dims) != _TPU_DIMS[generation]:
    raise ValueError(f'--topology={topology!r}: {generation} topologies have '
                     f'{_TPU_DIMS[generation]} dimensions, e.g. '
                     f'{generation}:{"x".join(["2"] * _TPU_DIMS[generation])}')
  if any(d < 1 for d in dims):
    raise ValueError(f'--topology={topology!r}: every dimension must be >= 1')
  if num_slices < 1:
    raise ValueError(f'--num_slices must be >= 1, got {num_slices}')
  return generation, dims


def tpu_target(topology: str, num_slices: int = 1) -> Target:
  generation, dims = parse_tpu_topology(topology, num_slices)
  chips = math.prod(dims) * num_slices
  per_host = 4 if math.prod(dims) >= 4 else math.prod(dims)
  desc = topology + (f' x {num_slices} slices' if num_slices > 1 else '')
  return Target(CHIPS[generation], desc, chips, num_slices, max(1, chips // per_host))


def tpu_devices(topology: str, num_slices: int = 1) -> list:
  """Compile-only devices of a Cloud TPU topology (one per chip), from libtpu."""
  generation, dims = parse_tpu_topology(topology, num_slices)
  # libtpu reads these when it loads (once per process): with them it neither
  # looks for TPU hosts on the network nor fills the console with warnings.
  chips = math.prod(dims)
  os.environ.setdefault('TPU_ACCELERATOR_TYPE', _ACCELERATOR_TYPE[generation].format(
      chips=chips, cores=2 * chips))
  os.environ.setdefault('TPU_WORKER_HOSTNAMES', 'localhost')
  os.environ.setdefault('TPU_SKIP_MDS_QUERY', '1')
  os.environ.setdefault('TPU_STDERR_LOG_LEVEL', '3')
  os.environ.setdefault('TPU_MIN_LOG_LEVEL', '3')
  os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')  # beside other JAX processes
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  name, chip_config = _TPU_LIBTPU[generation]
  dims3 = dims + (1,) * (3 - len(dims))
  host_bounds = tuple(min(2, d) for d in dims3[:2]) + (1,)
  try:
    description = topologies.get_topology_desc(
        topology_name=f'{name}:{"x".join(map(str, dims3))}', platform='tpu',
        chip_config_name=chip_config, chips_per_host_bounds=host_bounds,
        num_slices=num_slices)
  except RuntimeError as e:
    if 'TPU support not installed' in str(e):
      raise ValueError('planning for TPUs needs libtpu: pip install -c constraints.txt '
                       '-e ".[plan]"') from None
    # libtpu refuses shapes that are no slice (e.g. 'not divisible by ... chips_per_host').
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise ValueError(f'--topology={topology!r} is not a {generation} slice libtpu knows: '
                     f'{first}') from None
  devices = list(description.devices)
  expected = math.prod(dims) * num_slices
  if len(devices) != expected:
    raise ValueError(f'--topology={topology!r}: libtpu gave {len(devices)} devices for '
                     f'{expected} chips')
  return devices


# ---------------------------------------------------------------------------
# GPUs.
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class GpuFacts:
  """What XLA's GPU compiler asks of a device (NVIDIA data sheets)."""
  name: str
  compute_capability: tuple[int, int]
  sm_count: int
  clock_ghz: float
  memory_bytes: int  # as the driver reports it
  memory_bandwidth: float  # bytes/s
  l2_bytes: int
  shared_memory_per_sm: int
  shared_memory_per_block_optin: int


GPUS: dict[str, GpuFacts] = {
    'a100': GpuFacts('NVIDIA A100-SXM4-80GB', (8, 0), 108, 1.41, 85_899_345_920,
                     2.039e12, 40 * 2**20, 167_936, 166_912),
    'h100': GpuFacts('NVIDIA H100 80GB HBM3', (9, 0), 132, 1.98, 84_942_979_072,
                     3.35e12, 50 * 2**20, 233_472, 232_448),
    'h200': GpuFacts('NVIDIA H200', (9, 0), 132, 1.98, 150_754_820_096,
                     4.8e12, 50 * 2**20, 233_472, 232_448),
}


def gpu_target_config(gpu: str) -> str:
  """A `GpuTargetConfigProto` in text form for `gpu`: what XLA compiles against."""
  facts = _gpu_facts(gpu)
  major, minor = facts.compute_capability
  fields = {
      'threads_per_block_limit': 1024, 'threads_per_warp': 32,
      'shared_memory_per_block': 49152, 'shared_memory_per_core': facts.shared_memory_per_sm,
      'threads_per_core_limit': 2048, 'core_count': facts.sm_count, 'fpus_per_core': 128
      if major >= 9 else 64, 'block_dim_limit_x': 2**31 - 1, 'block_dim_limit_y': 65535,
      'block_dim_limit_z': 65535, 'memory_bandwidth': int(facts.memory_bandwidth),
      'l2_cache_size': facts.l2_bytes, 'clock_rate_ghz': facts.clock_ghz,
      'device_memory_size': facts.memory_bytes,
      'shared_memory_per_block_optin': facts.shared_memory_per_block_optin,
      'registers_per_core_limit': 65536, 'registers_per_block_limit': 65536,
  }
  lines = ['gpu_device_info {']
  lines += [f'  {key}: {value}' for key, value in fields.items()]
  lines += [f'  cuda_compute_capability {{ major: {major} minor: {minor} }}', '}',
            'platform_name: "CUDA"', 'dnn_version_info { major: 9 minor: 8 }',
            f'device_description_str: "{facts.name}"']
  return '\n'.join(lines) + '\n'


def _gpu_facts(gpu: str) -> GpuFacts:
  if gpu not in GPUS:
    raise ValueError(f'--gpu={gpu!r}: known GPUs are {", ".join(GPUS)}')
  return GPUS[gpu]


def gpu_target(gpu: str, gpus_per_node: int = 8, nodes: int = 1) -> Target:
  _gpu_facts(gpu)
  if gpus_per_node < 1 or nodes < 1:
    raise ValueError(f'--gpus_per_node and --nodes must be >= 1, got {gpus_per_node}, {nodes}')
  desc = f'{nodes}x{gpus_per_node} {gpu}' if nodes > 1 else f'{gpus_per_node}x {gpu}'
  return Target(CHIPS[gpu], desc, gpus_per_node * nodes, 1, nodes)


def gpu_devices(gpu: str, gpus_per_node: int = 8, nodes: int = 1) -> list:
  """Compile-only CUDA devices: `nodes` hosts of `gpus_per_node` GPUs each."""
  gpu_target(gpu, gpus_per_node, nodes)
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  try:
    description = topologies.get_topology_desc(
        platform='cuda', topology=f'1x{nodes}x{gpus_per_node}',
        target_config=gpu_target_config(gpu))
  except (NotImplementedError, RuntimeError, KeyError) as e:
    if 'topology not implemented' in str(e) or 'Unknown backend' in str(e):
      raise ValueError('planning for GPUs needs the CUDA plugin of jaxlib: pip install -c '
                       'constraints.txt -e ".[plan]"') from None
    raise
  return list(description.devices)
