"""Host allocator settings that keep XLA:CPU's step buffers resident.

XLA:CPU allocates the temporary buffer of every execution with `malloc` (about
1 GB for a ViT-S/16 training step at batch 8). glibc serves a request that large
with a fresh `mmap` and unmaps it again on `free`, so every step faults in and
zeroes ~250k new pages: measured here, ~0.45 s of kernel time per step, and
retaining the memory makes a ViT-S/16 training step 1.2x faster on 2 cores.
PyTorch's per-tensor allocations mostly stay under glibc's mmap threshold, so
timm pays much less of this (it gains a little from the setting too).

`retain_freed_memory` tells glibc to serve every thread from the main heap, never
to use `mmap` for a block and not to give freed memory back, so the next step
reuses the pages of the last. It also turns off JAX's asynchronous dispatch on
CPU: with several steps in flight their buffers interleave in the heap, which
then keeps growing (a ViT-S/16 batch-32 training run reached 12.8 GB resident and
still faulted ~0.5M pages per step; with one step at a time: 4.8 GB and ~10
faults). The cost: the process keeps its peak heap (the resident set no longer
shrinks between steps), which is what a device allocator does anyway, and the
Python loop waits for each CPU step. It is a per-process setting, so it is
applied at the edge (`main.py`, benchmark workers), before JAX starts its
thread pool.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

# mallopt(3) parameter numbers, from glibc's <malloc.h>.
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
M_ARENA_MAX = -8
# mallopt(3): "Setting M_TRIM_THRESHOLD to -1 disables trimming completely."
_NO_TRIMMING = -1


def _jax_backends_started() -> bool:
  xla_bridge = sys.modules.get('jax._src.xla_bridge')
  return bool(getattr(xla_bridge, '_backends', None))


def _synchronous_cpu_dispatch() -> None:
  import jax  # importing does not start a backend
  try:
    jax.config.update('jax_cpu_enable_async_dispatch', False)
  except (AttributeError, KeyError, ValueError):  # option renamed or gone
    pass


def retain_freed_memory(synchronous_dispatch: bool = True) -> bool:
  """Keeps freed heap memory in the process (glibc only); True if applied.

  Call before the first JAX computation: threads that have already allocated
  keep their own glibc arena, which still unmaps large blocks, and the CPU
  client reads the dispatch setting when it starts. A no-op returning False
  where the C library is not glibc (macOS, musl) or refuses a setting.
  `synchronous_dispatch=False` keeps JAX's asynchronous CPU dispatch.
  """
  if not sys.platform.startswith('linux'):
    return False
  name = ctypes.util.find_library('c') or 'libc.so.6'
  try:
    libc = ctypes.CDLL(name)
    mallopt = libc.mallopt
  except (OSError, AttributeError):
    return False
  mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
  mallopt.restype = ctypes.c_int
  if _jax_backends_started():
    import warnings
    warnings.warn('retain_freed_memory() called after JAX started its backend: threads '
                  'that already allocated keep unmapping their large blocks.', stacklevel=2)
  # One arena: blocks larger than a per-thread arena's 64 MiB heap would otherwise
  # be mmap'ed whatever M_MMAP_MAX says.
  ok = mallopt(M_ARENA_MAX, 1) == 1
  ok = mallopt(M_MMAP_MAX, 0) == 1 and ok
  ok = mallopt(M_TRIM_THRESHOLD, _NO_TRIMMING) == 1 and ok
  if ok and synchronous_dispatch:
    _synchronous_cpu_dispatch()
  return ok
