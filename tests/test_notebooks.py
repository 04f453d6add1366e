"""Executes every notebook top to bottom (offline, tiny settings) with nbclient.

The kernel runs with `VIT_JAX_NOTEBOOK_SMOKE=1`, which each notebook's
`parameters` cell reads to shrink its steps and batch sizes, and with the
repository on PYTHONPATH so an uninstalled checkout works too.
"""

import os
import sys

import pytest

nbformat = pytest.importorskip('nbformat')
nbclient = pytest.importorskip('nbclient')
pytest.importorskip('ipykernel')

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK_DIR = os.path.join(REPO, 'notebooks')
NOTEBOOKS = ['vit_jax.ipynb', 'fine_tune.ipynb', 'vit_vs_resnet.ipynb']


def _kernel_env(tmp_path):
  env = dict(os.environ)
  env['VIT_JAX_NOTEBOOK_SMOKE'] = '1'
  env['MPLBACKEND'] = 'Agg'
  env['TF_CPP_MIN_LOG_LEVEL'] = '2'
  env['PYTHONPATH'] = os.pathsep.join(p for p in (REPO, env.get('PYTHONPATH')) if p)
  env['TMPDIR'] = str(tmp_path)  # notebooks' temporary workdirs go away with the test
  # One CPU device in the kernel, whatever the test process set up for itself.
  env.pop('XLA_FLAGS', None)
  return env


@pytest.mark.parametrize('name', NOTEBOOKS)
def test_notebook_structure(name):
  nb = nbformat.read(os.path.join(NOTEBOOK_DIR, name), as_version=4)
  nbformat.validate(nb)
  tagged = [c for c in nb.cells if 'parameters' in c.get('metadata', {}).get('tags', [])]
  assert len(tagged) == 1, 'exactly one cell tagged "parameters"'
  assert 'VIT_JAX_NOTEBOOK_SMOKE' in tagged[0].source
  assert all(not c.get('outputs') for c in nb.cells if c.cell_type == 'code'), \
      'notebooks are committed without outputs'


@pytest.mark.slow
@pytest.mark.parametrize('name', NOTEBOOKS)
def test_notebook_runs(name, tmp_path, monkeypatch):
  nb = nbformat.read(os.path.join(NOTEBOOK_DIR, name), as_version=4)
  # The kernel inherits this process's environment.
  env = _kernel_env(tmp_path)
  for key, value in env.items():
    monkeypatch.setenv(key, value)
  monkeypatch.delenv('XLA_FLAGS', raising=False)
  client = nbclient.NotebookClient(
      nb, kernel_name='python3', timeout=600, allow_errors=False,
      resources={'metadata': {'path': NOTEBOOK_DIR}})
  # The kernel must be this interpreter (the same venv), whatever kernelspec is installed.
  client.kernel_manager_class = _manager_class()
  client.execute()
  errors = [o for c in nb.cells if c.cell_type == 'code' for o in c.get('outputs', [])
            if o.get('output_type') == 'error']
  assert not errors
  images = [o for c in nb.cells if c.cell_type == 'code' for o in c.get('outputs', [])
            if 'image/png' in o.get('data', {})]
  assert images, 'the notebook shows figures'


def _manager_class():
  from jupyter_client.manager import AsyncKernelManager

  class ThisPythonKernelManager(AsyncKernelManager):
    """Starts `python -m ipykernel_launcher` with the interpreter running the tests."""

    def format_kernel_cmd(self, extra_arguments=None):
      return [sys.executable, '-m', 'ipykernel_launcher', '-f', self.connection_file]

  return ThisPythonKernelManager
