"""Checkpoint files: save/load round trips, the published layout, bad files, fine-tuning init."""

import logging
import os
import pickle

import jax
import jax.numpy as jnp
import chex
import numpy as np
import pytest
from scipy import ndimage

from vit_jax import checkpoint
from vit_jax.configs import models as model_configs


def init_params(name, num_classes, size, seed=0, **overrides):
  """(model, params): random numpy params of the model's shapes and dtypes.

  Shapes come from `jax.eval_shape` (nothing is compiled, which keeps these
  tests fast); every leaf is random, so no two keys are accidentally equal.
  `overrides` set config fields, or else module fields.
  """
  config = model_configs.get_config(name) if isinstance(name, str) else name
  module_overrides = {}
  for key, value in overrides.items():
    if key in config:
      config[key] = value
    else:
      module_overrides[key] = value
  model = model_configs.build_model(config, num_classes, **module_overrides)
  shapes = jax.eval_shape(
      lambda: model.init(jax.random.key(0), jnp.zeros((1, size, size, 3))))['params']
  leaves, treedef = jax.tree.flatten(shapes)
  rng = np.random.default_rng(seed)
  leaves = [(0.05 * rng.standard_normal(x.shape)).astype(x.dtype) for x in leaves]
  return model, jax.tree.unflatten(treedef, leaves)


@pytest.fixture(scope='module')
def vit_test():
  return init_params('ViT-Test_4', 10, 32)


# --- flatten / unflatten ---------------------------------------------------------

def test_flatten_unflatten_round_trip_and_conflicts():
  tree = {'a': {'b': np.ones(2), 'c': {'d': np.zeros(1)}}, 'e': np.arange(3)}
  flat = checkpoint.flatten(tree)
  assert sorted(flat) == ['a/b', 'a/c/d', 'e']
  chex.assert_trees_all_equal(checkpoint.unflatten(flat), tree, strict=True)
  with pytest.raises(ValueError, match='conflicts'):
    checkpoint.unflatten({'a': np.ones(1), 'a/b': np.ones(1)})
  with pytest.raises(ValueError, match='empty'):
    checkpoint.unflatten({'a//b': np.ones(1)})


# --- save / load round trips ------------------------------------------------------

def test_round_trip_vit(tmp_path, vit_test):
  _, params = vit_test
  path = tmp_path / 'vit.npz'
  checkpoint.save(params, path)
  chex.assert_trees_all_equal(checkpoint.load(path), params, strict=True)
  # The file is the flat published layout, and nothing else is left behind.
  with np.load(path, allow_pickle=False) as f:
    assert sorted(f.files) == sorted(checkpoint.flatten(params))
  assert os.listdir(tmp_path) == ['vit.npz']


def test_round_trip_hybrid(tmp_path):
  _, params = init_params('R-Test+ViT-Test_1', 10, 32)
  flat = checkpoint.flatten(params)
  assert 'conv_root/kernel' in flat and 'gn_root/scale' in flat
  assert any(k.startswith('block1/unit1/conv_proj/') for k in flat)
  path = tmp_path / 'hybrid.npz'
  checkpoint.save(params, str(path))
  loaded = checkpoint.load(str(path))
  chex.assert_trees_all_equal(loaded, params, strict=True)
  assert checkpoint.infer_image_size(loaded, model_configs.get_config('R-Test+ViT-Test_1')) == (32, 32)
  # Old hybrid files store GroupNorm scales and biases as (1, 1, 1, C).
  old_style = {k: v.reshape(1, 1, 1, -1) if '/gn' in '/' + k else v for k, v in flat.items()}
  assert old_style['block1/unit1/gn1/scale'].ndim == 4
  np.savez(tmp_path / 'old.npz', **old_style)
  chex.assert_trees_all_equal(checkpoint.load(tmp_path / 'old.npz'), params, strict=True)


def test_save_bfloat16_and_jax_arrays(tmp_path):
  params = {'a': jnp.arange(4, dtype=jnp.bfloat16), 'b': {'c': jnp.ones((2, 2))}}
  checkpoint.save(params, tmp_path / 'x.npz')
  loaded = checkpoint.load(tmp_path / 'x.npz')
  assert loaded['a'].dtype == np.float32
  np.testing.assert_array_equal(loaded['a'], [0, 1, 2, 3])
  assert loaded['b']['c'].dtype == np.float32


def test_save_is_atomic(tmp_path, monkeypatch, vit_test):
  _, params = vit_test
  path = tmp_path / 'ckpt.npz'
  checkpoint.save(params, path)
  before = path.read_bytes()

  def crash(f, **arrays):
    f.write(b'PK\x03\x04 half a file')
    raise KeyboardInterrupt('killed while writing')

  monkeypatch.setattr(np, 'savez', crash)
  with pytest.raises(KeyboardInterrupt):
    checkpoint.save(params, path)
  assert path.read_bytes() == before  # the old file is untouched ...
  assert os.listdir(tmp_path) == ['ckpt.npz']  # ... and no temp file is left


# --- the published layout ------------------------------------------------------------

def published_vit_b16_shapes():
  """The key set and shapes of `ViT-B_16.npz` (1000 classes), as documented for the files."""
  d, heads, mlp = 768, 12, 3072
  shapes = {
      'cls': (1, 1, d),
      'embedding/kernel': (16, 16, 3, d),
      'embedding/bias': (d,),
      'Transformer/posembed_input/pos_embedding': (1, 197, d),
      'Transformer/encoder_norm/scale': (d,),
      'Transformer/encoder_norm/bias': (d,),
      'head/kernel': (d, 1000),
      'head/bias': (1000,),
  }
  for i in range(12):
    b = f'Transformer/encoderblock_{i}/'
    a = b + 'MultiHeadDotProductAttention_1/'
    for ln in ('LayerNorm_0', 'LayerNorm_2'):
      shapes[f'{b}{ln}/scale'] = shapes[f'{b}{ln}/bias'] = (d,)
    for name in ('query', 'key', 'value'):
      shapes[f'{a}{name}/kernel'] = (d, heads, d // heads)
      shapes[f'{a}{name}/bias'] = (heads, d // heads)
    shapes[a + 'out/kernel'] = (heads, d // heads, d)
    shapes[a + 'out/bias'] = (d,)
    shapes[b + 'MlpBlock_3/Dense_0/kernel'] = (d, mlp)
    shapes[b + 'MlpBlock_3/Dense_0/bias'] = (mlp,)
    shapes[b + 'MlpBlock_3/Dense_1/kernel'] = (mlp, d)
    shapes[b + 'MlpBlock_3/Dense_1/bias'] = (d,)
  return shapes


def test_published_vit_b16_key_set_loads_without_renaming(tmp_path):
  shapes = published_vit_b16_shapes()
  assert sum(np.prod(s) for s in shapes.values()) == 86_567_656  # 86.6M
  path = tmp_path / 'ViT-B_16.npz'
  # Zeros compress to almost nothing: a 346 MB checkpoint in a few hundred kB on disk.
  np.savez_compressed(path, **{k: np.zeros(s, np.float32) for k, s in shapes.items()})
  expected = checkpoint.abstract_params('ViT-B_16', 1000, (224, 224))
  loaded = checkpoint.load(path)
  checkpoint.check_params(loaded, expected)  # same keys, same shapes
  assert checkpoint.infer_image_size(loaded, model_configs.get_config('ViT-B_16')) == (224, 224)
  params = checkpoint.load_pretrained(loaded, expected, model_configs.get_config('ViT-B_16'))
  assert {k: v.shape for k, v in checkpoint.flatten(params).items()} == shapes
  del loaded, params


def test_opt_target_and_big_vision_layouts(tmp_path, vit_test):
  _, params = vit_test
  flat = checkpoint.flatten(params)
  np.savez(tmp_path / 'opt.npz', **{'opt/target/' + k: v for k, v in flat.items()},
           **{'opt/state/step': np.array(100), 'opt/state/param_states/cls/grad_ema': flat['cls']})
  chex.assert_trees_all_equal(checkpoint.load(tmp_path / 'opt.npz'), params, strict=True)

  # big_vision: `params/` prefix, its own module numbering, position embeddings
  # (patches only) at the top level, and optionally scanned (stacked) layers.
  renames = {'MultiHeadDotProductAttention_1': 'MultiHeadDotProductAttention_0',
             'LayerNorm_2': 'LayerNorm_1', 'MlpBlock_3': 'MlpBlock_0'}
  bv = {}
  for key, value in flat.items():
    if key == checkpoint.POSEMB_KEY:
      bv['params/pos_embedding'] = value[:, 1:]
      continue
    parts = key.split('/')
    if len(parts) > 2 and parts[1].startswith('encoderblock_'):
      parts[2] = renames.get(parts[2], parts[2])
    bv['params/' + '/'.join(parts)] = value
  np.savez(tmp_path / 'bv.npz', **bv)
  expected = dict(flat)
  expected[checkpoint.POSEMB_KEY] = np.concatenate(
      [np.zeros_like(flat[checkpoint.POSEMB_KEY][:, :1]), flat[checkpoint.POSEMB_KEY][:, 1:]], 1)
  chex.assert_trees_all_equal(checkpoint.load(tmp_path / 'bv.npz'),
                              checkpoint.unflatten(expected), strict=True)

  scanned = {k: v for k, v in bv.items() if '/encoderblock_' not in k}
  for key in [k for k in bv if '/encoderblock_0/' in k]:
    scanned[key.replace('encoderblock_0', 'encoderblock')] = np.stack(
        [bv[key], bv[key.replace('encoderblock_0', 'encoderblock_1')]])
  np.savez(tmp_path / 'bv_scan.npz', **scanned)
  chex.assert_trees_all_equal(checkpoint.load(tmp_path / 'bv_scan.npz'),
                              checkpoint.unflatten(expected), strict=True)


# --- bad files ----------------------------------------------------------------------

def test_bad_files_give_clear_errors(tmp_path, vit_test):
  _, params = vit_test
  good = tmp_path / 'good.npz'
  checkpoint.save(params, good)
  data = good.read_bytes()

  truncated = tmp_path / 'truncated.npz'
  truncated.write_bytes(data[:len(data) // 2])
  corrupt = tmp_path / 'corrupt.npz'  # right length, garbage in the middle
  corrupt.write_bytes(data[:200] + b'\0' * (len(data) - 400) + data[-200:])
  pickled = tmp_path / 'pickled.npz'
  with open(pickled, 'wb') as f:
    pickle.dump(checkpoint.flatten(params), f)
  objects = tmp_path / 'objects.npz'
  np.savez(objects, head=np.array([{'kernel': 1}], dtype=object))
  npy = tmp_path / 'single.npy'
  np.save(npy, np.zeros(3))
  text = tmp_path / 'text.npz'
  text.write_text('not a checkpoint')
  empty = tmp_path / 'empty.npz'
  np.savez(empty)

  for path in (truncated, corrupt, pickled, objects, npy, text, empty):
    with pytest.raises(ValueError) as e:
      checkpoint.load(path)
    assert str(path) in str(e.value), (path, e.value)
  with pytest.raises(ValueError, match='pickl'):
    checkpoint.load(pickled)
  with pytest.raises(ValueError, match='pickl'):
    checkpoint.load(objects)
  with pytest.raises(ValueError, match='truncated|not a valid'):
    checkpoint.load(truncated)
  with pytest.raises(FileNotFoundError):
    checkpoint.load(tmp_path / 'missing.npz')
  with pytest.raises(ValueError, match=str(truncated)):
    checkpoint.load_pretrained(truncated, params, model_configs.get_config('ViT-Test_4'))


# --- load_pretrained ----------------------------------------------------------------

def test_load_pretrained_new_resolution_and_classes(tmp_path, vit_test, caplog):
  """'224 -> 384' in miniature: 32 -> 48 pixels (8x8 -> 12x12 patches), 1000 -> 10 classes,
  and the pre-trained representation layer dropped, as in the paper's fine-tuning."""
  _, source = init_params('ViT-Test_4', 1000, 32, representation_size=16)
  path = tmp_path / 'pretrained.npz'
  checkpoint.save(source, path)

  config = model_configs.get_config('ViT-Test_4')
  model, init = init_params(config, 10, 48, seed=7)
  # A fresh head as the model initialises it: zero kernel, constant bias.
  init['head'] = {'kernel': np.zeros((32, 10), np.float32),
                  'bias': np.full((10,), -2.0, np.float32)}
  caplog.set_level(logging.INFO)
  caplog.set_level(logging.INFO, logger='absl')  # a command run in-process may have quieted absl
  params = checkpoint.load_pretrained(str(path), init, config)

  src, new, fresh = (checkpoint.flatten(t) for t in (source, params, init))
  assert sorted(new) == sorted(fresh)
  posemb = checkpoint.POSEMB_KEY
  for key in new:
    assert new[key].shape == fresh[key].shape and new[key].dtype == fresh[key].dtype, key
    if key.startswith('head/'):
      np.testing.assert_array_equal(new[key], fresh[key])  # the fresh head
    elif key != posemb:
      np.testing.assert_array_equal(new[key], src[key], err_msg=key)  # bit-identical
  assert new['head/bias'][0] == -2.0 and not np.any(new['head/kernel'])
  assert src[posemb].shape == (1, 65, 32) and new[posemb].shape == (1, 145, 32)
  np.testing.assert_array_equal(new[posemb][:, 0], src[posemb][:, 0])  # class token kept
  # The reference's resampling: corner-aligned linear zoom of the 8x8 grid.
  np.testing.assert_allclose(
      new[posemb][0, 1:].reshape(12, 12, 32),
      ndimage.zoom(src[posemb][0, 1:].reshape(8, 8, 32), (12 / 8, 12 / 8, 1), order=1),
      atol=1e-6)
  log = caplog.text
  assert 'head/kernel' in log and 'pre_logits/kernel' in log and 'resized' in log

  images = np.random.default_rng(0).uniform(-1, 1, (2, 48, 48, 3)).astype(np.float32)
  logits, _ = jax.jit(lambda p, x: model.apply({'params': p}, x, train=False))(params, images)
  assert logits.shape == (2, 10) and np.all(np.isfinite(logits))


def test_load_pretrained_same_task_is_identity_and_keeps_dtype(vit_test):
  model, params = vit_test
  config = model_configs.get_config('ViT-Test_4')
  same = checkpoint.load_pretrained(params, params, config)
  chex.assert_trees_all_equal(same, params, strict=True)  # same classes: the pre-trained head is kept
  bf16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
  cast = checkpoint.load_pretrained(params, bf16, config)
  assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(cast))


def test_resize_posemb_gap_model_and_properties():
  config = model_configs.get_config('ViT-Test_4')
  config.classifier = 'gap'
  _, source = init_params(config, 10, 32)
  _, init = init_params(config, 10, 16)
  assert 'cls' not in source and source['Transformer']['posembed_input']['pos_embedding'].shape[1] == 64
  params = checkpoint.load_pretrained(source, init, config)
  assert params['Transformer']['posembed_input']['pos_embedding'].shape == (1, 16, 32)
  # A constant grid stays constant, the same size is the identity, the prefix is kept.
  const = np.concatenate([np.full((1, 1, 3), 5.0), np.full((1, 16, 3), 2.0)], axis=1)
  np.testing.assert_allclose(checkpoint.resize_posemb(const, (6, 6), 1), np.concatenate(
      [np.full((1, 1, 3), 5.0), np.full((1, 36, 3), 2.0)], axis=1), atol=1e-6)
  x = np.random.default_rng(0).normal(size=(1, 17, 3)).astype(np.float32)
  np.testing.assert_allclose(checkpoint.resize_posemb(x, (4, 4), 1), x, atol=1e-6)
  assert checkpoint.infer_grid({checkpoint.POSEMB_KEY: x}, {'classifier': 'token'}) == (4, 4)


def test_load_pretrained_mismatches_are_listed(vit_test):
  _, params = vit_test
  config = model_configs.get_config('ViT-Test_4')
  flat = checkpoint.flatten(params)
  dense = 'Transformer/encoderblock_1/MlpBlock_3/Dense_0/kernel'

  missing = {k: v for k, v in flat.items() if k != dense}
  with pytest.raises(ValueError, match='missing keys') as e:
    checkpoint.load_pretrained(checkpoint.unflatten(missing), params, config)
  assert dense in str(e.value) and '(32, 64)' in str(e.value)

  wrong = dict(flat, **{dense: np.zeros((32, 48), np.float32)})
  with pytest.raises(ValueError, match='shape mismatches') as e:
    checkpoint.load_pretrained(checkpoint.unflatten(wrong), params, config)
  assert f'{dense}: checkpoint (32, 48) vs model (32, 64)' in str(e.value)

  extra = dict(flat, **{'Transformer/encoderblock_2/LayerNorm_0/scale': np.ones(32, np.float32)})
  with pytest.raises(ValueError, match='unexpected keys') as e:
    checkpoint.load_pretrained(checkpoint.unflatten(extra), params, config)
  assert 'encoderblock_2/LayerNorm_0/scale: checkpoint (32,)' in str(e.value)

  # A wider model: every block's kernels are listed with both shapes.
  _, wide = init_params('ViT-Digits_4', 10, 32)
  with pytest.raises(ValueError, match='shape mismatches') as e:
    checkpoint.load_pretrained(wide, params, config)
  assert 'embedding/kernel: checkpoint (4, 4, 3, 64) vs model (4, 4, 3, 32)' in str(e.value)


def test_load_pretrained_wrong_model_family(tmp_path, vit_test):
  _, vit = vit_test
  _, resnet = init_params('BiT-Test', 10, 32)
  checkpoint.save(resnet, tmp_path / 'bit.npz')
  with pytest.raises(ValueError, match="'resnet' model but the target model is 'vit'"):
    checkpoint.load_pretrained(tmp_path / 'bit.npz', vit,
                               model_configs.get_config('ViT-Test_4'))
  _, hybrid = init_params('R-Test+ViT-Test_1', 10, 32)
  with pytest.raises(ValueError, match="'vit' model but the target model is 'hybrid'"):
    checkpoint.load_pretrained(vit, hybrid, model_configs.get_config('R-Test+ViT-Test_1'))


def test_inspect_lists_keys(vit_test, tmp_path):
  _, params = vit_test
  checkpoint.save(params, tmp_path / 'p.npz')
  lines = []
  rows = checkpoint.inspect(tmp_path / 'p.npz', print_fn=lines.append)
  assert ('cls', (1, 1, 32), 'float32') in rows
  assert lines[-1].endswith('parameters') and len(lines) == len(rows) + 1
