"""Fault injection: each bad input of issue 15 that loading, convert, predict and the
metric writers meet, built here, with the outcome asserted.

Tests are named after the issue's numbered cases (case 3: convert, 5: unbounded
loading, 6: weights that cannot be right, 7: SIGKILL, 8: disk full, 9: the
smaller items), and `test_user_errors_*` for "user errors are one clear message".
"""

import errno
import glob
import io
import json
import os
import signal
import stat
import struct
import subprocess
import sys
import textwrap
import zipfile
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vit_jax import checkpoint
from vit_jax import predict
from vit_jax.configs import models as model_configs

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def random_params(name='ViT-Test_4', num_classes=10, size=32, seed=0):
  model = model_configs.build_model(name, num_classes)
  shapes = jax.eval_shape(
      lambda: model.init(jax.random.key(0), jnp.zeros((1, size, size, 3))))['params']
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda s: (0.1 * rng.standard_normal(s.shape)).astype(s.dtype), shapes)


def write_npz_member(zf, key, shape, dtype=np.float32, data=None, fill_bytes=None):
  """One .npy member whose header says `shape`/`dtype`; data as given (may disagree)."""
  with zf.open(f'{key}.npy', 'w', force_zip64=True) as f:
    np.lib.format.write_array_header_1_0(f, {
        'descr': np.lib.format.dtype_to_descr(np.dtype(dtype)),
        'fortran_order': False, 'shape': tuple(shape)})
    if data is not None:
      f.write(data)
    elif fill_bytes is not None:
      chunk = bytes(1 << 24)
      left = fill_bytes
      while left:
        n = min(left, len(chunk))
        f.write(chunk[:n])
        left -= n


def bomb_checkpoint(path, params, junk_bytes):
  """A valid checkpoint plus one deflated all-zero array of `junk_bytes`."""
  with zipfile.ZipFile(path, 'w', zipfile.ZIP_DEFLATED, compresslevel=1) as zf:
    for key, value in checkpoint.flatten(params).items():
      value = np.asarray(value)
      buffer = io.BytesIO()
      np.lib.format.write_array(buffer, value)
      zf.writestr(f'{key}.npy', buffer.getvalue())
    write_npz_member(zf, 'junk/kernel', (junk_bytes // 4,), fill_bytes=junk_bytes)


def run_python(code, env=None, timeout=240):
  return subprocess.run([sys.executable, '-c', textwrap.dedent(code)], cwd=REPO,
                        capture_output=True, text=True, timeout=timeout,
                        env=dict(os.environ, **(env or {})))


@pytest.fixture(scope='module')
def params():
  return random_params()


@pytest.fixture(scope='module')
def good_npz(tmp_path_factory, params):
  path = tmp_path_factory.mktemp('ckpt') / 'vit.npz'
  checkpoint.save(params, path)
  return path


@pytest.fixture(scope='module')
def png(tmp_path_factory):
  from PIL import Image  # pylint: disable=g-import-not-at-top
  path = tmp_path_factory.mktemp('img') / 'rgb.png'
  Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 40, 3), np.uint8)).save(path)
  return str(path)


# --- case 3: convert refuses partial or mismatched trees ----------------------------

def test_case3_convert_refuses_partial_tree(tmp_path, params, capsys):
  pytest.importorskip('torch')
  from vit_jax import convert  # pylint: disable=g-import-not-at-top
  flat = checkpoint.flatten(params)
  missing = 'Transformer/encoderblock_1/MlpBlock_3/Dense_0/kernel'
  np.savez(tmp_path / 'partial.npz', **{k: v for k, v in flat.items() if k != missing})
  out = tmp_path / 'timm.safetensors'
  assert convert.main(['--from', 'npz', '--to', 'timm', '--model', 'ViT-Test_4',
                       '--input', str(tmp_path / 'partial.npz'), '--output', str(out)]) == 2
  err = capsys.readouterr().err
  assert f'missing keys (1):\n  {missing}: model (32, 64)' in err
  assert not out.exists() and os.listdir(tmp_path) == ['partial.npz']


def test_case3_convert_refuses_mismatched_preset(tmp_path, good_npz, capsys):
  """ViT-Test_4 weights (32 wide, 2 layers) named ViT-Digits_4 (64 wide, 4 layers)."""
  pytest.importorskip('torch')
  from vit_jax import convert  # pylint: disable=g-import-not-at-top
  assert convert.main(['--from', 'npz', '--to', 'hf', '--model', 'ViT-Digits_4',
                       '--input', str(good_npz), '--output', str(tmp_path / 'hf')]) == 2
  err = capsys.readouterr().err
  assert err.startswith(f"error: npz weights '{good_npz}' do not fit the ViT-Digits_4 model:")
  assert '  Transformer/encoderblock_3/LayerNorm_0/scale: model (64,), not in npz weights' in err
  assert '  embedding/kernel: npz weights (4, 4, 3, 32) vs model (4, 4, 3, 64)' in err
  assert not os.listdir(tmp_path)


def test_case3_convert_exits_0_only_if_the_output_computes_the_same(tmp_path, good_npz,
                                                                    monkeypatch, capsys):
  pytest.importorskip('torch')
  pytest.importorskip('timm')
  from vit_jax import convert  # pylint: disable=g-import-not-at-top
  out = tmp_path / 'vit.pth'
  args = ['--from', 'npz', '--to', 'timm', '--model', 'ViT-Test_4',
          '--input', str(good_npz), '--output', str(out)]
  assert convert.main(args) == 0
  assert 'checked: max |logit difference| output' in capsys.readouterr().out

  # A mapping that loses a sign writes a loadable file of another function.
  real_to_timm = convert.to_timm

  def broken_to_timm(params, approximate_gelu=True):
    sd = real_to_timm(params, approximate_gelu)
    sd['blocks.1.mlp.fc2.weight'] = -sd['blocks.1.mlp.fc2.weight']
    return sd

  monkeypatch.setattr(convert, 'to_timm', broken_to_timm)
  before = out.read_bytes()
  assert convert.main(args) == 2
  err = capsys.readouterr().err
  assert 'does not compute the input' in err and err.count('\n') == 1, err
  assert out.read_bytes() == before  # the earlier good file is untouched
  assert sorted(os.listdir(tmp_path)) == ['vit.pth']  # and no partial file is left


# --- case 5: loading memory is bounded ---------------------------------------------

def test_case5_zip_bomb_refused_before_its_data_is_read(tmp_path, params):
  """A valid ViT-Test_4 checkpoint plus 1 GiB of deflated zeros (a ~1 MB file): predict
  and convert refuse it from the headers; peak RSS stays far below the inflated size."""
  bomb = tmp_path / 'bomb.npz'
  bomb_checkpoint(bomb, params, junk_bytes=1 << 30)
  assert os.path.getsize(bomb) < 8 << 20
  image = tmp_path / 'x.png'
  from PIL import Image  # pylint: disable=g-import-not-at-top
  Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(image)
  result = run_python(f'''
      from vit_jax import predict
      rc = predict.main(['--model', 'ViT-Test_4', '--checkpoint', {str(bomb)!r},
                         '--image', {str(image)!r}])
      # VmHWM is this process's own peak (ru_maxrss counts the forking parent's too).
      with open('/proc/self/status') as f:
        hwm = [line.split()[1] for line in f if line.startswith('VmHWM:')][0]
      print('rc', rc, 'maxrss_kb', hwm)
  ''')
  rc, rss_kb = result.stdout.split()[1], int(result.stdout.split()[3])
  print(f'\npredict on a 1 GiB zip bomb: exit {rc}, peak RSS {rss_kb / 1024:.0f} MiB')
  assert rc == '2', result.stderr[-2000:]
  assert (f"error: Checkpoint '{bomb}' does not fit the model:\nunexpected keys (1):\n"
          '  junk/kernel: checkpoint (268435456,), not in model\n') in result.stderr
  assert rss_kb < 600 * 1024  # the bomb alone would be 1024 MiB

  from vit_jax import convert  # pylint: disable=g-import-not-at-top
  with pytest.raises(ValueError, match=r'unexpected keys \(1\):\n  junk/kernel'):
    convert.convert_file('npz', 'npz', 'ViT-Test_4', str(bomb), str(tmp_path / 'copy.npz'))
  assert not (tmp_path / 'copy.npz').exists()


def test_case5_total_size_limit(tmp_path, params, monkeypatch):
  bomb = tmp_path / 'bomb.npz'
  bomb_checkpoint(bomb, params, junk_bytes=64 << 20)
  monkeypatch.setenv(checkpoint.MAX_NPZ_BYTES_ENV, '32M')
  with pytest.raises(ValueError, match=r"'junk/kernel' declares shape \(16777216,\) float32, "
                     r'64.0 MiB, more than the 32.0 MiB limit'):
    checkpoint.load(bomb)
  with pytest.raises(ValueError, match=r'arrays declare 64.1 MiB, more than the 64.0 MiB limit'):
    checkpoint.load(bomb, max_bytes=(64 << 20) + 1000)
  monkeypatch.setenv(checkpoint.MAX_NPZ_BYTES_ENV, 'lots')
  with pytest.raises(ValueError, match='VIT_JAX_MAX_NPZ_BYTES'):
    checkpoint.load(bomb)


def test_case5_40gb_declared_array_refused_before_allocation(tmp_path, monkeypatch):
  path = tmp_path / 'huge.npz'
  with zipfile.ZipFile(path, 'w') as zf:
    write_npz_member(zf, 'head/kernel', (10_000_000_000,), data=b'\0' * 16)
  with pytest.raises(ValueError, match=r"'head/kernel' declares shape \(10000000000,\) float32, "
                     r'37.3 GiB, more than the 8.0 GiB limit'):
    checkpoint.load(path)
  # With the limit raised, the header still disagrees with what the zip holds.
  with pytest.raises(ValueError, match=r'\(40,000,000,000 bytes\) but its zip member holds '
                     r'16 bytes of data'):
    checkpoint.load(path, max_bytes=1 << 40)
  with pytest.raises(ValueError, match='37.3 GiB'):
    checkpoint.inspect(path, print_fn=lambda _: None)


# --- case 6: weights that cannot be right ------------------------------------------

@pytest.mark.parametrize('bad', ['nan', 'inf'])
def test_case6_non_finite_weights_refused(tmp_path, params, png, capsys, bad):
  flat = {k: np.array(v) for k, v in checkpoint.flatten(params).items()}
  flat['Transformer/encoderblock_0/MlpBlock_3/Dense_0/kernel'][3, 5] = float(bad)
  path = tmp_path / f'{bad}.npz'
  np.savez(path, **flat)
  with pytest.raises(ValueError, match=r"'Transformer/encoderblock_0/MlpBlock_3/Dense_0/kernel' "
                     rf'\(32, 64\) has 1 non-finite value\(s\) \(first: {bad} at index \(3, 5\)\)'):
    checkpoint.load(path)
  assert predict.main(['--model', 'ViT-Test_4', '--checkpoint', str(path), '--image', png]) == 2
  assert 'non-finite' in capsys.readouterr().err
  with pytest.raises(ValueError, match='non-finite'):
    checkpoint.load_pretrained(checkpoint.unflatten(flat), params, 'ViT-Test_4')


def test_case6_non_finite_found_in_any_chunk(tmp_path):
  """The finite check reads 16 MiB pieces: a NaN in the last piece of a 24 MiB array."""
  values = np.zeros(6 << 20, np.float32)
  values[-1] = np.nan
  path = tmp_path / 'late_nan.npz'
  np.savez(path, **{'head/kernel': values.reshape(-1, 1024)})
  with pytest.raises(ValueError, match=r'first: nan at index \(6143, 1023\)'):
    checkpoint.load(path)
  fortran = np.asfortranarray(np.ones((8, 4), np.float32))
  fortran[6, 1] = np.inf
  np.savez(path, **{'head/kernel': fortran})
  with pytest.raises(ValueError, match=r'first: inf at index \(6, 1\)'):
    checkpoint.load(path)
  fortran[6, 1] = 2.0
  np.savez(path, **{'head/kernel': fortran})
  np.testing.assert_array_equal(checkpoint.load(path)['head']['kernel'], fortran)


@pytest.mark.parametrize('dtype', [np.int8, np.bool_, np.int64, np.uint8])
def test_case6_int_and_bool_weights_refused(tmp_path, params, dtype):
  flat = {k: np.asarray(v) for k, v in checkpoint.flatten(params).items()}
  flat['head/kernel'] = np.ones(flat['head/kernel'].shape, dtype)
  path = tmp_path / 'ints.npz'
  np.savez(path, **flat)
  with pytest.raises(ValueError, match=rf"'head/kernel' has .*dtype {np.dtype(dtype)}; "
                     'parameters must be floating point'):
    checkpoint.load(path)
  with pytest.raises(ValueError, match='floating point'):
    checkpoint.load_pretrained(path, params, 'ViT-Test_4')
  # The integer step of an optimizer-state dump is not a parameter: still read.
  np.savez(path, **{f'opt/target/{k}': np.asarray(v) for k, v in checkpoint.flatten(params).items()},
           **{'opt/state/step': np.array(7, dtype)})
  assert sorted(checkpoint.load_flat(path)) == sorted(checkpoint.flatten(params))


# --- case 7: metrics survive SIGKILL ---------------------------------------------------

def _read_event_steps(path):
  """Steps of the scalar events in a TFRecord event file, parsed without TensorFlow."""
  from tensorboard.compat.proto import event_pb2  # pylint: disable=g-import-not-at-top
  steps = []
  with open(path, 'rb') as f:
    data = f.read()
  pos = 0
  while pos + 12 <= len(data):
    (length,) = struct.unpack('<Q', data[pos:pos + 8])
    record = data[pos + 12:pos + 12 + length]
    if len(record) < length:
      break
    event = event_pb2.Event.FromString(record)
    if event.summary.value:
      steps.append(event.step)
    pos += 12 + length + 4
  return steps


def test_case7_metrics_survive_sigkill(tmp_path):
  pytest.importorskip('tensorboard')
  workdir = tmp_path / 'run'
  # TensorFlow is hidden so tensorboard uses its own file writer, as on a
  # machine without TensorFlow (and the subprocess starts in a second).
  code = textwrap.dedent(f'''
      import sys, time
      sys.modules['tensorflow'] = None
      from vit_jax import metric_writers
      writer = metric_writers.create_default_writer({str(workdir)!r}, 250)
      for step in range(1, 251):
        writer.write_scalars(step, {{'train_loss': 1.0 / step}})
        if step == 200:
          writer.flush(fsync=True)  # what the trainer does when it saves a checkpoint
      print('written', flush=True)
      time.sleep(600)
  ''')
  proc = subprocess.Popen([sys.executable, '-c', code], cwd=REPO, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
  try:
    assert proc.stdout.readline().strip() == 'written', proc.stderr.read()
  finally:
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
  assert proc.returncode == -signal.SIGKILL
  lines = (workdir / 'metrics.jsonl').read_text().splitlines()
  assert [json.loads(line)['step'] for line in lines] == list(range(1, 251))
  (events,) = glob.glob(str(workdir / 'events.out.tfevents.*'))
  assert _read_event_steps(events) == list(range(1, 251))


# --- case 8: a full disk names the path and the free space ---------------------------

def test_case8_disk_full_names_path_and_free_space(tmp_path, params, monkeypatch, capsys):
  def no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

  monkeypatch.setattr(np, 'savez', no_space)
  target = tmp_path / 'params.npz'
  with pytest.raises(OSError) as e:
    checkpoint.save(params, target)
  assert e.value.errno == errno.ENOSPC and e.value.filename == str(target)
  assert os.listdir(tmp_path) == []  # no temporary file left behind
  message = checkpoint.user_error_message(e.value)
  assert message.startswith(f"No space left on device writing '{target}' (")
  assert message.endswith(' free there)')
  assert checkpoint.report_user_error(e.value) == 2
  assert capsys.readouterr().err == f'error: {message}\n'


# --- case 9: the smaller items ---------------------------------------------------------

def test_case9_16bit_greyscale_png_not_saturated(tmp_path):
  from PIL import Image  # pylint: disable=g-import-not-at-top
  ramp = np.tile(np.linspace(0, 65535, 64).astype(np.uint16), (64, 1))
  path = tmp_path / 'grey16.png'
  Image.fromarray(ramp).save(path)
  assert Image.open(path).mode == 'I;16'
  image = predict.load_image(str(path), 64)
  assert image.shape == (64, 64, 3) and image.dtype == np.float32
  expected = ramp.astype(np.float32) / 65535 * 2 - 1
  np.testing.assert_allclose(image[..., 0], expected, atol=1e-5)
  np.testing.assert_array_equal(image[..., 0], image[..., 2])
  assert np.mean(image >= 1.0) < 0.05  # was 98% of pixels at +1
  # The same as the 8-bit image of the same picture, to 8-bit precision.
  eight = predict.load_image((ramp >> 8).astype(np.uint8), 64)
  assert np.abs(eight - image).max() < 2 / 255 + 1e-6
  np.testing.assert_allclose(predict.load_image(ramp, 64), image, atol=1e-6)


def _png_header_only(width, height):
  """A PNG whose IHDR says width x height (greyscale 8-bit) with one empty IDAT."""
  def chunk(kind, data):
    return (struct.pack('>I', len(data)) + kind + data
            + struct.pack('>I', zlib.crc32(kind + data) & 0xffffffff))
  ihdr = struct.pack('>IIBBBBB', width, height, 8, 0, 0, 0, 0)
  return (b'\x89PNG\r\n\x1a\n' + chunk(b'IHDR', ihdr) + chunk(b'IDAT', zlib.compress(b''))
          + chunk(b'IEND', b''))


def test_case9_huge_image_is_a_clear_error(tmp_path, good_npz, capsys):
  path = tmp_path / 'huge.png'
  path.write_bytes(_png_header_only(15000, 15000))
  with pytest.raises(ValueError, match=r"Cannot read image '.*huge.png': Image size "
                     r'\(225000000 pixels\) exceeds limit'):
    predict.load_image(str(path), 32)
  assert predict.main(['--model', 'ViT-Test_4', '--checkpoint', str(good_npz),
                       '--image', str(path)]) == 2
  err = capsys.readouterr().err
  assert err.count('\n') == 1 and 'huge.png' in err and 'MAX_IMAGE_PIXELS' in err


def test_case9_negative_top_k_refused(good_npz, png, capsys):
  with pytest.raises(SystemExit) as e:
    predict.main(['--model', 'ViT-Test_4', '--checkpoint', str(good_npz), '--image', png,
                  '--top_k', '-3'])
  assert e.value.code == 2
  assert "argument --top_k: must be a positive integer, got '-3'" in capsys.readouterr().err
  with pytest.raises(ValueError, match='positive'):
    predict.top_k(np.ones(4) / 4, 0)
  assert len(predict.top_k(np.ones(4) / 4, 10)) == 4


def test_case9_save_writes_normal_permissions(tmp_path, params):
  old = os.umask(0o022)
  try:
    checkpoint.save(params, tmp_path / 'a.npz')
    os.umask(0o027)
    checkpoint.save(params, tmp_path / 'b.npz')
  finally:
    os.umask(old)
  assert stat.S_IMODE(os.stat(tmp_path / 'a.npz').st_mode) == 0o644
  assert stat.S_IMODE(os.stat(tmp_path / 'b.npz').st_mode) == 0o640


def test_case9_text_file_renamed_npz(tmp_path):
  path = tmp_path / 'notes.npz'
  path.write_text('these are my notes\n')
  with pytest.raises(ValueError) as e:
    checkpoint.load(path)
  assert 'not an npz (zip) file' in str(e.value) and str(path) in str(e.value)
  assert 'pickl' not in str(e.value)


def test_case9_bad_safetensors_names_the_file(tmp_path, capsys):
  pytest.importorskip('safetensors')
  from vit_jax import convert  # pylint: disable=g-import-not-at-top
  path = tmp_path / 'model.safetensors'
  for content in (b'hello', b'\xff' * 8 + b'{}', struct.pack('<Q', 10**12) + b'{'):
    path.write_bytes(content)
    with pytest.raises(ValueError, match=rf"Cannot read safetensors file '{path}': not a valid"):
      convert.read_torch_file(str(path))
  assert convert.main(['--from', 'timm', '--to', 'npz', '--model', 'ViT-Test_4',
                       '--input', str(path), '--output', str(tmp_path / 'out.npz')]) == 2
  err = capsys.readouterr().err
  assert err.count('\n') == 1 and 'model.safetensors' in err


def test_case9_resnet_into_vit_names_the_file(tmp_path, params):
  bit = random_params('BiT-Test', 10, 32)
  path = tmp_path / 'BiT-M-R50x1.npz'
  checkpoint.save(bit, path)
  with pytest.raises(ValueError, match=rf"Checkpoint '{path}' looks like a 'resnet' model but "
                     "the target model is 'vit'"):
    checkpoint.load_pretrained(path, params, 'ViT-Test_4')
  # A tree read from the file (as train does to drop the head) keeps the name.
  with pytest.raises(ValueError, match=rf"Checkpoint '{path}' looks like a 'resnet' model"):
    checkpoint.load_pretrained(checkpoint.load(path), params, 'ViT-Test_4',
                               source_name=str(path))


# --- user errors are one clear message --------------------------------------------------

def test_user_errors_one_message_exit_2_traceback_on_request(tmp_path, png):
  (tmp_path / 'notes.npz').write_text('text')
  args = ['--model', 'ViT-Test_4', '--checkpoint', str(tmp_path / 'notes.npz'), '--image', png]
  code = f'import sys; from vit_jax import predict; sys.exit(predict.main({args!r}))'
  quiet = subprocess.run([sys.executable, '-c', code], cwd=REPO, capture_output=True, text=True,
                         timeout=240, env=dict(os.environ, VIT_JAX_TRACEBACK='0'))
  assert quiet.returncode == 2
  assert quiet.stderr.strip().splitlines()[-1].startswith('error: Cannot read checkpoint')
  assert 'Traceback' not in quiet.stderr and 'not an npz (zip) file' in quiet.stderr
  loud = subprocess.run([sys.executable, '-c', code], cwd=REPO, capture_output=True, text=True,
                        timeout=240, env=dict(os.environ, VIT_JAX_TRACEBACK='1'))
  assert loud.returncode == 2 and 'Traceback (most recent call last)' in loud.stderr
  assert loud.stderr.strip().splitlines()[-1].startswith('error: Cannot read checkpoint')
