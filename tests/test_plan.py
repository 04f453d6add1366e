"""`python -m vit_jax.plan`: the real train step compiled for a TPU topology and GPU nodes.

The compile-only devices come from libtpu and jaxlib's CUDA plugin (the [plan]
extra, installed with [test]); nothing runs on an accelerator. Figures are
checked against what does not come from the planner: XLA's own argument bytes
against the parameter, optimizer and batch bytes, XLA's FLOP count against the
paper's analytic count (written out here), collectives against what the mesh
implies.
"""

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from vit_jax import accelerators
from vit_jax import plan as plan_lib
from vit_jax.configs import models

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# ViT-Test_4 widened so that its kernels (128 x 256) are above the FSDP threshold.
WIDTH, MLP = 128, 256
TINY = ['--config=configs/default.py:ViT-Test_4', '--config.batch_size=64',
        '--config.image_size=16', f'--config.model.hidden_size={WIDTH}',
        f'--config.model.transformer.mlp_dim={MLP}']


def run_plan(tmp_path, *args, name='plan.json'):
  out = tmp_path / name
  proc = subprocess.run(
      [sys.executable, '-m', 'vit_jax.plan', *TINY, *args, f'--json={out}'],
      cwd=REPO, capture_output=True, text=True, timeout=600,
      env=dict(os.environ, XLA_FLAGS=''))
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
  return json.loads(out.read_text()), proc.stdout


def tiny_forward_flops(image=16, classes=10):
  """Eq. (1)-(4) of the paper as matmuls, counted by hand for ViT-Test_4 (2 MACs = ...)."""
  preset = models.get_config('ViT-Test_4')
  d, mlp = WIDTH, MLP
  layers = preset.transformer.num_layers
  patch = preset.patches.size[0]
  patches = (image // patch) ** 2
  tokens = patches + 1
  attention = tokens * 3 * d * d + 2 * tokens * tokens * d + tokens * d * d
  block = attention + tokens * 2 * d * mlp
  embed = patches * patch * patch * 3 * d
  return 2 * (layers * block + embed + d * classes)


def test_tpu_plan_of_a_tiny_model(tmp_path):
  plan, stdout = run_plan(tmp_path, '--topology=v5e:2x2',
                          "--config.mesh=(('data',2),('fsdp',2))")
  assert plan['fits'] is True and plan['num_chips'] == 4
  assert plan['mesh'] == {'data': 2, 'fsdp': 2}
  assert plan['hbm_bytes'] == 16 * 2**30
  chip = plan['per_chip_bytes']
  # XLA's argument bytes: the state shards, the step counter and this chip's batch,
  # here padded to the TPU's (8, 128) tiles (exact on GPU below; a few % at ViT sizes).
  batch = 64 // 4 * (16 * 16 * 3 + 10) * 4
  assert chip['arguments'] >= chip['params'] + chip['optimizer'] + 4 + batch
  assert chip['total'] >= chip['arguments']
  analytic = 3 * tiny_forward_flops() * 64 / 4
  assert plan['analytic_flops_per_step'] == pytest.approx(analytic, rel=1e-6)
  assert 0.9 < plan['flops_per_step'] / analytic < 1.6  # remat recomputes a little
  # fsdp=2: the MLP kernels are split in two and gathered before use.
  assert chip['params'] < plan['num_params'] * 4 * 0.75
  assert 'all-gather' in plan['collectives']
  assert plan['step_seconds_at_mfu'] == pytest.approx(
      plan['analytic_flops_per_step'] / (197e12 * 0.5))
  assert 'fits' in stdout and 'collectives per step per chip' in stdout


# Four H100s at batch 2048: the activations dominate, as in a real pre-training step.
GPU = ['--gpu=h100', '--gpus_per_node=4', '--config.batch_size=2048']


@pytest.fixture(scope='module')
def gpu_plan(tmp_path_factory):
  return run_plan(tmp_path_factory.mktemp('gpu'), *GPU)[0]


def test_gpu_plan_of_a_tiny_model(gpu_plan):
  plan = gpu_plan
  assert plan['fits'] is True and plan['num_chips'] == 4
  assert plan['mesh'] == {'data': 4, 'fsdp': 1}
  chip = plan['per_chip_bytes']
  batch = 2048 // 4 * (16 * 16 * 3 + 10) * 4
  assert chip['arguments'] == chip['params'] + chip['optimizer'] + 4 + batch
  assert plan['peak_flops_per_chip'] == 989e12
  assert set(plan['collectives']) == {'all-reduce'}  # replicated: gradients only


@pytest.mark.slow
def test_search_finds_overrides_that_fit_when_planned_again(tmp_path, gpu_plan):
  """A GPU memory share too small for the step: the suggested overrides fit."""
  big, base = GPU, gpu_plan
  needed = base['per_chip_bytes']['total']
  fraction = 0.6 * needed / base['hbm_bytes']
  plan, stdout = run_plan(tmp_path, *big, f'--gpu_memory_fraction={fraction}',
                          name='tight.json')
  assert plan['fits'] is False and 'DOES NOT FIT' in stdout
  assert plan['suggested_overrides'], stdout
  again, _ = run_plan(tmp_path, *big, f'--gpu_memory_fraction={fraction}',
                      *[f'--config.{o}' for o in plan['suggested_overrides']], name='again.json')
  assert again['fits'] is True
  assert again['per_chip_bytes']['total'] == plan['suggested_plan']['per_chip_bytes']['total']


def test_collectives_are_read_from_hlo_text():
  hlo = '\n'.join([
      'HloModule m',
      '%body (p: (s32[], f32[8])) -> (s32[], f32[8]) {',
      '  %ar = f32[8]{0} all-reduce(f32[8]{0} %x), replica_groups={}',
      '}',
      'ENTRY %main (a: f32[4,256]) -> f32[16,256] {',
      '  %w = (s32[], f32[8]) while(%t), condition=%cond, body=%body, '
      'backend_config={"known_trip_count":{"n":"4"}}',
      '  %ag = bf16[16,256]{1,0} all-gather(bf16[4,256]{1,0} %a), dimensions={0}',
      '  %rs-start = ((f32[64]), f32[16]) reduce-scatter-start(f32[64] %g)',
      '  %rs-done = f32[16]{0} reduce-scatter-done(%rs-start)',
      '}'])
  out = plan_lib.collectives(hlo)
  assert out['all-reduce'] == {'count': 4, 'bytes': 4 * 8 * 4}
  assert out['all-gather'] == {'count': 1, 'bytes': 16 * 256 * 2}
  assert out['reduce-scatter']['count'] == 1


@pytest.mark.parametrize('topology, message', [
    ('v9:2x2', "--topology='v9:2x2': expected a Cloud TPU topology"),
    ('v5e:2x2x2', 'v5e topologies have 2 dimensions'),
    ('v5p:4x4', 'v5p topologies have 3 dimensions'),
])
def test_bad_topologies_are_refused_by_name(topology, message):
  with pytest.raises(ValueError, match=re.escape(message)):
    accelerators.tpu_target(topology)


def test_a_missing_target_is_a_one_line_error():
  proc = subprocess.run([sys.executable, '-m', 'vit_jax.plan', *TINY, '--topology=v5e:2x2',
                         '--gpu=h100'], cwd=REPO, capture_output=True, text=True, timeout=300,
                        env=dict(os.environ, XLA_FLAGS=''))
  assert proc.returncode == 2, proc.stderr[-3000:]
  errors = [l for l in proc.stderr.splitlines() if l.startswith('error:')]
  assert len(errors) == 1 and 'give one target' in errors[0], proc.stderr[-3000:]
  assert 'Traceback' not in proc.stderr


def test_targets_know_their_chips():
  target = accelerators.tpu_target('v5p:4x4x4', num_slices=2)
  assert target.num_chips == 128 and target.chip.memory_bytes == 95 * 2**30
  assert accelerators.gpu_target('h200', 8, 4).num_chips == 32
  text = accelerators.gpu_target_config('h100')
  assert 'core_count: 132' in text and 'major: 9' in text
  assert np.isclose(accelerators.CHIPS['v6e'].peak_bf16_flops, 918e12)


def test_report_says_when_no_search_ran():
  """Issue 31 (6): `--nosearch` on a step that does not fit says so, not 'no override
  searched fits'."""
  plan = {'model_name': 'ViT-Test_4', 'num_params': 2e4, 'num_classes': 10,
          'image_size': [16, 16], 'dtype': 'float32', 'target': 'v5e:2x2', 'num_chips': 4,
          'chip': 'TPU v5e', 'mesh': {'data': 4}, 'batch_size': 8, 'grad_accum_steps': 1,
          'remat_policy': 'none', 'hbm_bytes': 1, 'usable_bytes': 1, 'fits': False,
          'per_chip_bytes': {'params': 1, 'optimizer': 1, 'temp': 1, 'total': 3},
          'flops_per_step': None, 'analytic_flops_per_step': None,
          'suggested_overrides': [], 'suggested_plan': None}
  assert plan_lib.report(dict(plan, searched=False)).endswith('no override searched (--nosearch)')
  assert plan_lib.report(dict(plan, searched=True)).endswith('no override searched fits')
