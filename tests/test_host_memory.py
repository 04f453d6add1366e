"""vit_jax.host_memory: XLA:CPU's large temporary buffers stop faulting in fresh pages."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A jitted function whose 256 MiB intermediate (a @ b) lives in XLA's temporary
# buffer; prints the minor page faults of its third call and the result.
_CHILD = textwrap.dedent('''
    import json, resource, sys
    if sys.argv[1] == 'retain':
      from vit_jax import host_memory
      assert host_memory.retain_freed_memory()
    import jax, jax.numpy as jnp, numpy as np

    @jax.jit
    def f(a, b, v):
      return (a @ b) @ v

    rng = np.random.default_rng(0)
    a = jnp.asarray(rng.normal(size=(8192, 16)), jnp.float32)
    b = jnp.asarray(rng.normal(size=(16, 8192)), jnp.float32)
    v = jnp.asarray(rng.normal(size=(8192, 1)), jnp.float32)
    for _ in range(2):
      f(a, b, v).block_until_ready()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    out = f(a, b, v).block_until_ready()
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    print(json.dumps({'faults': faults, 'out': np.asarray(out)[:4, 0].tolist(),
                      'async': jax.config.values['jax_cpu_enable_async_dispatch']}))
''')

_PAGES_256_MIB = 256 * 2**20 // 4096


def _run(mode: str) -> dict:
  env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS='cpu')
  env.pop('GLIBC_TUNABLES', None)
  proc = subprocess.run([sys.executable, '-c', _CHILD, mode], capture_output=True,
                        text=True, env=env, timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith('linux'), reason='glibc malloc settings')
def test_retained_memory_spares_page_faults_same_result():
  default, retained = _run('default'), _run('retain')
  # Without the setting each call maps (and the kernel zeroes) the 256 MiB anew.
  assert default['faults'] > _PAGES_256_MIB // 2, default
  # With it the pages of the previous call are reused.
  assert retained['faults'] < _PAGES_256_MIB // 20, retained
  assert retained['out'] == pytest.approx(default['out'], rel=1e-5)
  # One CPU step at a time, so steps' buffers do not interleave in the heap.
  assert default['async'] and not retained['async']


def test_returns_bool_and_is_idempotent_in_a_child():
  code = ('from vit_jax import host_memory as h; '
          'print(h.retain_freed_memory(), h.retain_freed_memory())')
  proc = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True,
                        env=dict(os.environ, PYTHONPATH=REPO), timeout=60)
  assert proc.returncode == 0, proc.stderr
  expected = 'True True' if sys.platform.startswith('linux') else 'False False'
  assert proc.stdout.split()[-2:] == expected.split()


def test_warns_when_called_after_the_backend_started():
  # In a child: the setting is per process and this one should keep glibc's own.
  code = textwrap.dedent('''
      import warnings, jax
      from vit_jax import host_memory
      jax.devices()
      with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        host_memory.retain_freed_memory()
      print([str(w.message) for w in caught])
  ''')
  proc = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True,
                        env=dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS='cpu'), timeout=120)
  assert proc.returncode == 0, proc.stderr[-2000:]
  if sys.platform.startswith('linux'):
    assert 'after JAX started its backend' in proc.stdout
