"""`config.mesh`: 2-D (data, fsdp) meshes train like one device; checkpoints move between meshes.

On the 8 fake CPU devices of tests/conftest.py with the tiny ViT-Test_4 preset.
The reference is the same step on one device (no collectives at all), so every
mesh is checked against plain single-device arithmetic, not against itself.
"""

import json

import jax
import ml_collections
import numpy as np
import pytest

from vit_jax import data_sources
from vit_jax import parallel
from vit_jax import train
from vit_jax import train_checkpoints
from vit_jax.configs import schema

CONFIG = dict(
    model_name='ViT-Test_4', model=dict(transformer=dict(num_layers=1)), dataset='synthetic',
    num_classes=4, image_size=8, synthetic_noise=0.3, num_eval_examples=32, batch_size=16,
    eval_batch_size=16, seed=0, optimizer='sgd', learning_rate=0.1, schedule='cosine',
    warmup_steps=1, total_steps=5, grad_clip_norm=1.0, log_every=1, eval_every=0,
    checkpoint_every=0, async_checkpoints=False)


@pytest.fixture(autouse=True)
def _shard_small_arrays(monkeypatch):
  # The tiny model's kernels are below the default threshold: shard them anyway.
  monkeypatch.setattr(parallel, 'FSDP_MIN_SIZE', 64)


def _losses(mesh, devices, steps=5):
  config = schema.resolve(dict(CONFIG, mesh=mesh))
  data = data_sources.SyntheticData(config)
  program = train.build_program(config, config.num_classes, train.run_mesh(config, devices))
  state = jax.jit(program.init_state, out_shardings=program.state_sharding)()
  batches = data.train_batches(0)
  losses = []
  for _ in range(steps):
    state, metrics = program.train_step(state, parallel.shard_batch(next(batches),
                                                                    program.batch_sharding))
    losses.append(float(metrics['loss']))
  return np.array(losses), state, program


def test_resolve_mesh_sizes():
  assert parallel.resolve_mesh((('data', -1),), 8) == {'data': 8, 'fsdp': 1}
  assert parallel.resolve_mesh((('data', -1), ('fsdp', 2)), 8) == {'data': 4, 'fsdp': 2}
  assert parallel.resolve_mesh((('fsdp', 8),), 8) == {'data': 1, 'fsdp': 8}
  assert parallel.resolve_mesh((('data', -1),), 8, fsdp=True) == {'data': 1, 'fsdp': 8}


@pytest.mark.parametrize('mesh, message', [
    ((('model', 2), ('data', -1)), "unknown axis 'model'"),
    ((('data', -1), ('fsdp', -1)), 'only one axis may have size -1'),
    ((('data', 2), ('fsdp', 2)), 'has 4 devices in all, but the run has 8'),
    ((('data', -1), ('fsdp', 3)), 'not divisible by 3'),
    ((('data', 0),), "size of axis 'data' must be a positive integer"),
    ((('data', -1), ('data', 2)), "axis 'data' is given twice"),
])
def test_resolve_mesh_refuses_bad_values(mesh, message):
  with pytest.raises(ValueError, match='config.mesh') as info:
    parallel.resolve_mesh(mesh, 8)
  assert message in str(info.value)


def test_fsdp_shorthand_conflicts_with_a_mesh():
  with pytest.raises(ValueError, match='config.fsdp=True'):
    parallel.resolve_mesh((('data', -1), ('fsdp', 2)), 8, fsdp=True)


def test_meshes_give_the_one_device_losses():
  reference, _, _ = _losses((('data', -1),), jax.devices()[:1])
  assert reference[-1] < reference[0]
  for data, fsdp in ((8, 1), (4, 2), (2, 4), (1, 8)):
    losses, state, program = _losses((('data', data), ('fsdp', fsdp)), jax.devices())
    assert dict(program.mesh.shape) == {'data': data, 'fsdp': fsdp}
    np.testing.assert_allclose(losses, reference, rtol=1e-5, atol=1e-5,
                               err_msg=f'mesh data={data} fsdp={fsdp}')
    kernel = state.params['Transformer']['encoderblock_0']['MlpBlock_3']['Dense_0']['kernel']
    if fsdp > 1:  # really split: each device holds 1/fsdp of it
      assert 'fsdp' in str(kernel.sharding.spec)
      assert kernel.addressable_shards[0].data.size == kernel.size // fsdp


def test_checkpoint_restores_bit_exactly_on_another_mesh(tmp_path):
  _, state, _ = _losses((('data', -1),), jax.devices(), steps=3)
  checkpointer = train_checkpoints.RunCheckpointer(str(tmp_path), async_save=False)
  checkpointer.save(3, state, {'step': 3}, wait=True)
  saved = jax.device_get(state)
  for mesh, devices in (((('data', 2), ('fsdp', 2)), jax.devices()[:4]),
                        ((('fsdp', -1),), jax.devices()[:4]),
                        ((('data', 4), ('fsdp', 2)), jax.devices())):
    config = schema.resolve(dict(CONFIG, mesh=mesh))
    program = train.build_program(config, config.num_classes, train.run_mesh(config, devices))
    restored, _ = checkpointer.restore(3, program.sharded_abstract_state())
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b),
                 jax.device_get(restored), saved)
    kernel = restored.params['Transformer']['encoderblock_0']['MlpBlock_3']['Dense_0']['kernel']
    assert kernel.sharding == program.state_sharding.params[
        'Transformer']['encoderblock_0']['MlpBlock_3']['Dense_0']['kernel']
    # ... and the restored state trains on the new mesh.
    data = data_sources.SyntheticData(config)
    batch = parallel.shard_batch(next(data.train_batches(3)), program.batch_sharding)
    _, metrics = program.train_step(restored, batch)
    assert np.isfinite(float(metrics['loss']))
  checkpointer.close()


@pytest.mark.slow
def test_a_run_resumes_on_another_mesh(tmp_path):
  """8 devices, 1-D mesh, then the same workdir on 4 devices with a 2-D mesh."""
  config = ml_collections.ConfigDict(dict(CONFIG, total_steps=4, checkpoint_every=2))
  train.train_and_evaluate(config, str(tmp_path))
  config = ml_collections.ConfigDict(dict(CONFIG, total_steps=4, checkpoint_every=2,
                                          mesh=(('data', 2), ('fsdp', 2))))
  with open(tmp_path / 'final_metrics.json') as f:
    first = json.load(f)
  result = train.train_and_evaluate(config, str(tmp_path), devices=jax.devices()[:4])
  assert result['step'] == 4 and result['num_devices'] == 4
  assert result['eval_accuracy'] == pytest.approx(first['eval_accuracy'], abs=1e-6)
