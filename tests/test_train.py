"""The training step, its multi-device equivalence and the training loop (synthetic data).

Everything here runs on the 8 fake CPU devices of tests/conftest.py with the
tiny ViT-Test_4 preset at 8x8 pixels, so each test takes seconds.
"""

import json
import os

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from vit_jax import data_sources
from vit_jax import optimizers
from vit_jax import parallel
from vit_jax import train
from vit_jax import train_checkpoints
from vit_jax.configs import models
from vit_jax.configs import schema
from vit_jax.configs.image_size import image_hw


def tiny_config(**overrides):
  config = ml_collections.ConfigDict(dict(
      model_name='ViT-Test_4', model=dict(transformer=dict(num_layers=1)), pretrained_path=None,
      dataset='synthetic', num_classes=4, image_size=8, synthetic_noise=0.3,
      num_eval_examples=64, batch_size=16, eval_batch_size=32, seed=0,
      optimizer='adamw', learning_rate=3e-3, weight_decay=0.01, schedule='cosine',
      warmup_steps=2, total_steps=10, grad_clip_norm=1.0, grad_accum_steps=1,
      loss='softmax_xent', label_smoothing=0.0, dtype='float32', fsdp=False,
      accumulator_dtype=None, log_every=5, eval_every=0, checkpoint_every=0,
      keep_checkpoints=3, async_checkpoints=True, export_params=False))
  config.update(overrides)
  return config


def synthetic_batches(config, num):
  data = data_sources.SyntheticData(schema.resolve(config))
  it = data.train_batches(0)
  return [next(it) for _ in range(num)]


def host_init(config):
  """Initial params as numpy (the same for every mesh: a function of the config only)."""
  model = train.build_model(schema.resolve(config), config.num_classes)
  height, width = image_hw(config.image_size)
  init = jax.jit(lambda k: model.init({'params': k}, jnp.zeros((1, height, width, 3)),
                                      train=False)['params'])
  return jax.device_get(init(jax.random.key(0)))


@pytest.fixture(scope='module')
def run_steps():
  """`run_steps(config, devices, batches, mesh=None) -> (losses, params)`.

  The same run asked for by two tests (e.g. the 8-device baseline) is trained
  once per module: compiling is most of the cost on CPU.
  """
  runs = {}

  def run(config, devices, batches, *, mesh=None):
    key = (json.dumps(config.to_dict(), sort_keys=True), len(devices), mesh, len(batches))
    if key not in runs:
      runs[key] = train_steps(config, devices, batches, mesh=mesh)
    return runs[key]

  return run


def train_steps(config, devices, batches, *, mesh=None):
  """Trains on `batches` over `devices` laid out as `mesh` (a config.mesh value).

  The step is the one `main` runs (`train.build_program`); returns (losses,
  params as numpy). Arrays of 64+ elements are FSDP-sharded, so the tiny model's
  kernels really are split when the mesh has an fsdp axis.
  """
  config = schema.resolve(dict(config.to_dict(), mesh=mesh or parallel.DEFAULT_MESH))
  program = train.build_program(config, config.num_classes, train.run_mesh(config, devices))
  params = host_init(config)
  host_state = train.TrainState(step=np.zeros([], np.int32), params=params,
                                opt_state=jax.device_get(program.tx.init(params)))
  state = parallel.place(host_state, program.state_sharding)
  losses = []
  for batch in batches:
    state, metrics = program.train_step(state, parallel.shard_batch(batch, program.batch_sharding))
    losses.append(float(metrics['loss']))
  return np.array(losses), jax.device_get(state.params)


@pytest.fixture(autouse=True)
def _shard_small_arrays(monkeypatch):
  monkeypatch.setattr(parallel, 'FSDP_MIN_SIZE', 64)


# SGD for the equivalence checks: Adam divides by sqrt(v), which turns the
# rounding noise of near-zero gradients into O(lr) differences.
def test_eight_devices_equal_one_device(run_steps):
  assert jax.device_count() == 8
  config = tiny_config(batch_size=16, optimizer='sgd', learning_rate=0.1)
  batches = synthetic_batches(config, 3)
  loss8, params8 = run_steps(config, jax.devices(), batches)
  loss1, params1 = run_steps(config, jax.devices()[:1], batches)
  np.testing.assert_allclose(loss8, loss1, atol=1e-4, rtol=1e-4)
  chex.assert_trees_all_close(params8, params1, atol=1e-4, rtol=1e-4)
  assert loss8[-1] < loss8[0]


def test_fsdp_equals_replicated(run_steps):
  config = tiny_config(batch_size=16, optimizer='sgd', learning_rate=0.1)
  batches = synthetic_batches(config, 3)  # the replicated run is shared with the test above
  loss_r, params_r = run_steps(config, jax.devices(), batches)
  loss_f, params_f = run_steps(config, jax.devices(), batches, mesh=parallel.FSDP_MESH)
  np.testing.assert_allclose(loss_f, loss_r, atol=1e-5, rtol=1e-5)
  chex.assert_trees_all_close(params_f, params_r, atol=1e-5, rtol=1e-5)


def test_grad_accumulation_equals_big_batch(run_steps):
  devices = jax.devices()[:2]  # each micro-batch of 2 is split over 2 devices
  big = tiny_config(batch_size=8, grad_accum_steps=1, optimizer='sgd', learning_rate=0.1)
  accum = tiny_config(batch_size=8, grad_accum_steps=4, optimizer='sgd', learning_rate=0.1)  # 4 micro-batches of 2
  batches = synthetic_batches(big, 2)
  loss_big, params_big = run_steps(big, devices, batches)
  loss_acc, params_acc = run_steps(accum, devices, batches)
  np.testing.assert_allclose(loss_acc, loss_big, atol=1e-6, rtol=1e-5)
  chex.assert_trees_all_close(params_acc, params_big, atol=1e-6, rtol=1e-5)


def test_bf16_compute_step_is_finite(run_steps):
  config = tiny_config(dtype='bfloat16', accumulator_dtype='bfloat16', optimizer='sgd',
                       learning_rate=0.05)
  losses, params = run_steps(config, jax.devices()[:1], synthetic_batches(config, 2))
  assert np.all(np.isfinite(losses))
  assert all(x.dtype == np.float32 for x in jax.tree.leaves(params))


def test_train_and_evaluate_writes_metrics(tmp_path):
  config = tiny_config(total_steps=40, log_every=10, eval_every=20, checkpoint_every=20)
  result = train.train_and_evaluate(config, str(tmp_path))
  assert result['step'] == 40 and not result['preempted']
  assert result['eval_accuracy'] >= 0.9, result
  saved = json.loads((tmp_path / 'final_metrics.json').read_text())
  assert saved['eval_accuracy'] == pytest.approx(result['eval_accuracy'])
  lines = [json.loads(l) for l in (tmp_path / 'metrics.jsonl').read_text().splitlines()]
  train_lines = [l for l in lines if 'train_loss' in l]
  assert [l['step'] for l in train_lines] == [10, 20, 30, 40]
  for key in ('learning_rate', 'grad_norm', 'steps_per_sec', 'images_per_sec', 'examples_seen'):
    assert key in train_lines[0]
  assert [l['step'] for l in lines if 'eval_accuracy' in l] == [20, 40]
  events = [f for f in os.listdir(tmp_path) if f.startswith('events.out.tfevents')]
  assert len(events) == 1
  from tensorboard.backend.event_processing import event_file_loader  # pylint: disable=g-import-not-at-top
  tags = {v.tag for e in event_file_loader.EventFileLoader(str(tmp_path / events[0])).Load()
          for v in e.summary.value}
  assert {'train_loss', 'learning_rate', 'grad_norm', 'eval_accuracy', 'images_per_sec'} <= tags
  assert sorted(train_checkpoints.RunCheckpointer(str(tmp_path)).all_steps()) == [20, 40]
  # Running again finds the run finished and only re-evaluates.
  again = train.train_and_evaluate(config, str(tmp_path))
  assert again['eval_accuracy'] == pytest.approx(result['eval_accuracy'])
  # Another model in the same workdir is refused, and the checkpoints are left alone.
  with pytest.raises(ValueError, match='belongs to a different run'):
    train.train_and_evaluate(tiny_config(model=dict(transformer=dict(num_layers=2)),
                                         total_steps=40), str(tmp_path))
  assert not (tmp_path / 'checkpoints_corrupt').exists()


def _corrupt(step_dir):
  for root, _, files in os.walk(step_dir):
    for name in files:
      with open(os.path.join(root, name), 'wb') as f:
        f.write(b'not a checkpoint')


def test_corrupt_latest_checkpoint_falls_back(tmp_path):
  config = tiny_config(total_steps=8, checkpoint_every=4)
  train.train_and_evaluate(config, str(tmp_path))
  step, first = train_checkpoints.load_latest(str(tmp_path))
  assert step == 8
  _corrupt(tmp_path / 'checkpoints' / '8')
  with pytest.warns(train_checkpoints.CorruptCheckpointWarning, match='step 8'):
    result = train.train_and_evaluate(config, str(tmp_path))
  assert result['step'] == 8
  assert os.listdir(tmp_path / 'checkpoints_corrupt')
  _, again = train_checkpoints.load_latest(str(tmp_path))
  # Resumed from step 4 and retrained 5..8: the same params as the first time.
  chex.assert_trees_all_equal(again['params'], first['params'])


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
  config = tiny_config(total_steps=40, checkpoint_every=1, log_every=1, grad_clip_norm=0.0,
                       optimizer='sgd', momentum=0.0, learning_rate=1e30, warmup_steps=0,
                       schedule='constant')
  with pytest.raises(train.NonFiniteLossError, match='Non-finite training loss'):
    train.train_and_evaluate(config, str(tmp_path))
  step, state = train_checkpoints.load_latest(str(tmp_path))
  assert step is not None and step < 40
  for leaf in jax.tree.leaves(state['params']):
    assert np.all(np.isfinite(leaf))
  assert not (tmp_path / 'final_metrics.json').exists()


@pytest.mark.parametrize('field,value,message', [
    ('learning_rate', 0.0, 'learning_rate'),
    ('learning_rate', -0.1, 'learning_rate'),
    ('optimizer', 'rmsprop', 'optimizer'),
    ('schedule', 'exponential', 'schedule'),
    ('loss', 'l2', 'loss'),
    ('model_name', 'ViT-Z_99', 'model_name'),
    ('batch_size', 12, 'batch_size'),  # 8 devices
    ('eval_batch_size', 20, 'eval_batch_size'),
    ('dtype', 'float16', 'dtype'),
    ('grad_accum_steps', 0, 'grad_accum_steps'),
    ('image_size', 10, 'image_size'),  # not a multiple of the patch size 4
    ('pretrained_path', '/nonexistent/ViT-B_16.npz', 'pretrained_path'),
    ('total_steps', 0, 'total_steps'),
])
def test_invalid_config_fails_before_training(tmp_path, field, value, message):
  config = tiny_config(**{field: value})
  with pytest.raises(ValueError, match=message):
    train.train_and_evaluate(config, str(tmp_path))
  assert not (tmp_path / 'checkpoints').exists()


def test_batch_must_split_into_micro_batches_over_devices(tmp_path):
  with pytest.raises(ValueError, match='grad_accum_steps'):
    train.train_and_evaluate(tiny_config(batch_size=16, grad_accum_steps=3), str(tmp_path))
  with pytest.raises(ValueError, match='batch_size=16 must be divisible by the number of devices'):
    train.train_and_evaluate(tiny_config(batch_size=16, grad_accum_steps=4), str(tmp_path))


def test_train_module_imports_without_tensorflow():
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  code = ('import sys; import vit_jax.train, vit_jax.main; '
          'assert "tensorflow" not in sys.modules, "train imported TensorFlow"')
  subprocess.run([sys.executable, '-c', code], check=True, timeout=120)


def test_model_overrides_apply():
  config = tiny_config(model=dict(transformer=dict(num_layers=1)))
  assert schema.model_config(schema.resolve(config)).transformer.num_layers == 1
  assert models.get_config('ViT-Test_4').transformer.num_layers == 2
  with pytest.raises(ValueError, match='config.model'):
    train.validate_config(schema.resolve(tiny_config(model=dict(no_such_field=1))))
