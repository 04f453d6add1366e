"""Two processes on localhost (4 CPU devices each) train like one process with 8.

Both processes run `python -m vit_jax.main` with `--coordinator_address`,
`--num_processes` and `--process_id`; each feeds its half of every global batch.
The losses they log and the params they end with must match the single-process
8-device run of the same config.
"""

import json
import os
import socket
import subprocess
import sys
import textwrap

import jax
import ml_collections
import numpy as np

from vit_jax import checkpoint
from vit_jax import train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CONFIG = dict(
    model_name='ViT-Test_4', model=dict(transformer=dict(num_layers=1)), dataset='synthetic', num_classes=4, image_size=8,
    synthetic_noise=0.3, num_eval_examples=64, batch_size=16, eval_batch_size=16, seed=1,
    optimizer='sgd', learning_rate=0.1, schedule='cosine', warmup_steps=2, total_steps=12,
    grad_clip_norm=1.0, loss='softmax_xent', log_every=4, eval_every=6,
    checkpoint_every=6, export_params=True)


def free_port():
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def train_losses(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    lines = [json.loads(line) for line in f]
  return {l['step']: l['train_loss'] for l in lines if 'train_loss' in l}


def test_two_processes_match_one_process(tmp_path):
  assert jax.device_count() == 8
  reference_dir = tmp_path / 'one_process'
  reference = train.train_and_evaluate(ml_collections.ConfigDict(CONFIG), str(reference_dir))

  config_path = tmp_path / 'config.py'
  config_path.write_text(textwrap.dedent(f'''
      import ml_collections
      def get_config():
        return ml_collections.ConfigDict({CONFIG!r})
      '''))
  workdir = tmp_path / 'two_processes'
  port = free_port()
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=4',
             JAX_PLATFORMS='cpu', PYTHONUNBUFFERED='1')
  procs = [
      subprocess.Popen(
          [sys.executable, '-m', 'vit_jax.main', f'--config={config_path}',
           f'--workdir={workdir}', f'--coordinator_address=127.0.0.1:{port}',
           '--num_processes=2', f'--process_id={i}', '--platform=cpu'],
          cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
      for i in range(2)
  ]
  errors = []
  try:
    for p in procs:
      _, err = p.communicate(timeout=480)
      errors.append(err)
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  for p, err in zip(procs, errors):
    assert p.returncode == 0, err[-4000:]
  assert 'process 1 of 2' in errors[1] or 'process 1 of 2' in errors[0]

  final = json.loads((workdir / 'final_metrics.json').read_text())
  assert final['num_processes'] == 2 and final['num_devices'] == 8
  assert final['eval_accuracy'] == reference['eval_accuracy']
  losses_two, losses_one = train_losses(workdir), train_losses(reference_dir)
  assert sorted(losses_two) == sorted(losses_one) == [4, 6, 8, 12]  # also at eval steps
  np.testing.assert_allclose([losses_two[s] for s in (4, 6, 8, 12)],
                             [losses_one[s] for s in (4, 6, 8, 12)], rtol=1e-5, atol=1e-6)
  params_two = checkpoint.load(workdir / 'params.npz')
  params_one = checkpoint.load(reference_dir / 'params.npz')
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
               params_two, params_one)
