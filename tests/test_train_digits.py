"""The documented digits runs reach >= 95%: configs/default.py (ViT, and MLP-Mixer with
`:Mixer-Digits_4`) and resnet_baseline.py.

`python -m vit_jax.main --config=configs/<file> --workdir=DIR` in a subprocess
(one CPU device, as on a laptop), then final_metrics.json is read. About a
minute each on 2 CPU cores.
"""

import json
import os
import subprocess
import sys
import time

import pytest

pytest.importorskip('tensorflow')
pytest.importorskip('sklearn')

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_config(config, workdir, *overrides):
  env = dict(os.environ, PYTHONUNBUFFERED='1')
  env.pop('XLA_FLAGS', None)  # one device, like the documented command
  start = time.monotonic()
  proc = subprocess.run(
      [sys.executable, '-m', 'vit_jax.main', f'--config={config}', f'--workdir={workdir}',
       *overrides],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=1200)
  elapsed = time.monotonic() - start
  assert proc.returncode == 0, proc.stderr[-4000:]
  with open(os.path.join(workdir, 'final_metrics.json')) as f:
    return json.load(f), elapsed


@pytest.mark.slow
@pytest.mark.parametrize('name,model,steps', [('default.py', 'ViT-Digits_4', 600),
                                              ('resnet_baseline.py', 'BiT-Test', 200),
                                              ('default.py:Mixer-Digits_4', 'Mixer-Digits_4',
                                               600)])
def test_documented_digits_run_reaches_95_percent(tmp_path, name, model, steps):
  metrics, elapsed = run_config(os.path.join(REPO, 'configs', name), str(tmp_path))
  print(f'{name} ({model}): top-1 {metrics["eval_accuracy"]:.4f} after '
        f'{metrics["step"]} steps, {elapsed:.0f} s wall, {metrics["steps_per_sec"]:.1f} steps/s')
  assert metrics['step'] == steps
  assert metrics['eval_accuracy'] >= 0.95, metrics
