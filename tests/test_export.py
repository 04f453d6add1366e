"""vit_jax.export: ONNX (run by onnxruntime) and StableHLO files compute the JAX model's logits.

Each exported file is run outside the exporter -- ONNX by onnxruntime, the
StableHLO file by `jax.export.deserialize` in a fresh process -- at batch 1 and
5 and compared with the Flax model to 1e-4. Models: ViT-Ti/16 and BiT-Test (a
BiT ResNetV2 with all four stages, one unit each) at 32x32, the tiny R50-hybrid
and a 'gap' ViT. A tampered file is caught by the
check and removed; what a format cannot express is refused naming why.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from vit_jax import checkpoint
from vit_jax import export
from vit_jax import onnx_classify

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOL = 1e-4  # times max(1, max |logit|), as the exporter checks


def _within(got, want) -> bool:
  return float(np.max(np.abs(got - want))) <= TOL * max(1.0, float(np.max(np.abs(want))))


def _npz(tmp_dir, name: str, size: int, classes: int = 7, seed: int = 0, **overrides) -> str:
  """Initialised weights with a random head (the init's is zero) as a published-layout .npz."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from vit_jax.configs import models  # pylint: disable=g-import-not-at-top
  config = models.get_config(name)
  config.update(overrides)
  model = models.build_model(config, classes)
  # Compiled whole: op-by-op initialisation of a ResNet is slow on CPU.
  params = jax.jit(lambda key: model.init(key, jnp.zeros((1, size, size, 3)), train=False))(
      jax.random.PRNGKey(seed))
  flat = {k: np.asarray(v, np.float32) for k, v in checkpoint.flatten(params['params']).items()}
  rng = np.random.default_rng(seed)
  fan_in = flat['head/kernel'].shape[0]
  flat['head/kernel'] = rng.normal(0, 3 / fan_in**0.5, flat['head/kernel'].shape).astype(np.float32)
  flat['head/bias'] = rng.normal(0, 0.1, flat['head/bias'].shape).astype(np.float32)
  path = os.path.join(tmp_dir, f'{name.replace("+", "-")}-{size}-{seed}.npz')
  checkpoint.save(checkpoint.unflatten(flat), path)
  return path


def _images(batch: int, size: int, seed: int = 7) -> np.ndarray:
  return np.random.default_rng(seed).uniform(-1, 1, (batch, size, size, 3)).astype(np.float32)


def _ort(path: str, images: np.ndarray) -> np.ndarray:
  import onnxruntime as ort  # pylint: disable=g-import-not-at-top
  session = ort.InferenceSession(path, providers=['CPUExecutionProvider'])
  return session.run(['logits'], {'images': images})[0]


@pytest.fixture(scope='module')
def tmp_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp('export'))


CASES = {
    'vit_ti16': ('ViT-Ti_16', 32, {}),
    'bit_test': ('BiT-Test', 32, {}),
    'hybrid': ('R-Test+ViT-Test_1', 16, {}),
    'vit_gap': ('ViT-Test_4', 16, {'classifier': 'gap'}),
}


@pytest.fixture(scope='module')
def exports(tmp_dir):
  """(npz, source, {format: Exported}) per case, each written once for the module."""
  cache = {}

  def get(case: str, fmt: str):
    name, size, overrides = CASES[case]
    if case not in cache:
      npz = _npz(tmp_dir, name, size, **overrides)
      model = name if not overrides else None
      config = None
      if overrides:  # a gap ViT: its preset says 'token', the file has no class token
        model = name
      cache[case] = (npz, export.load(npz, model=model, config=config), {})
    npz, source, done = cache[case]
    if fmt not in done:
      done[fmt] = export.export(npz, fmt, os.path.join(tmp_dir, f'{case}.{fmt}'),
                                source=source)
    return npz, source, done[fmt]
  return get


@pytest.mark.slow
@pytest.mark.parametrize('case', ['vit_ti16', 'bit_test', 'hybrid', 'vit_gap'])
def test_onnx_matches_jax_at_batch_1_and_5(exports, case):
  _, source, result = exports(case, 'onnx')
  assert set(result.checks) == {1, 5}
  reference = export.jax_logits(source)
  size = source.image_size[0]
  for batch in (1, 5):
    images = _images(batch, size)
    got = _ort(result.path, images)  # onnxruntime, outside the exporter
    want = reference(images)
    assert got.shape == (batch, source.num_classes)
    assert _within(got, want), (batch, np.max(np.abs(got - want)), np.max(np.abs(want)))
    assert np.std(want) > 0.05  # a function of the image, not a constant head


def test_onnx_graph_interface(exports):
  import onnx  # pylint: disable=g-import-not-at-top
  _, source, result = exports('vit_ti16', 'onnx')
  graph = onnx.load(result.path).graph
  (inp,), (out,) = graph.input, graph.output
  dims = lambda v: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
  assert inp.name == 'images' and out.name == 'logits'
  assert isinstance(dims(inp)[0], str) and dims(inp)[1:] == [32, 32, 3]
  assert inp.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
  assert dims(out)[1] == source.num_classes
  with open(result.metadata_path, encoding='utf-8') as f:
    meta = json.load(f)
  assert meta['model'] == 'ViT-Ti_16' and meta['image_size'] == [32, 32]
  assert meta['input']['layout'] == 'NHWC' and meta['input']['range'] == [-1.0, 1.0]
  assert set(meta['check']['max_abs_logit_diff']) == {'1', '5'}
  assert meta['source_checkpoint'].endswith('.npz')
  with open(result.labels_path, encoding='utf-8') as f:
    assert len(f.read().splitlines()) == source.num_classes


@pytest.mark.slow
@pytest.mark.parametrize('case', ['vit_ti16', 'bit_test'])
def test_stablehlo_reloads_in_a_fresh_process(exports, tmp_dir, case):
  _, source, result = exports(case, 'stablehlo')
  # The weights are constants there, so XLA may fold the weight standardisation.
  assert max(result.checks.values()) <= TOL
  size = source.image_size[0]
  inputs = {b: _images(b, size, seed=b) for b in (1, 5)}
  np.savez(os.path.join(tmp_dir, f'{case}-in.npz'), **{str(b): x for b, x in inputs.items()})
  code = (
      'import sys, numpy as np, jax\n'
      'exp = jax.export.deserialize(bytearray(open(sys.argv[1], "rb").read()))\n'
      'x = np.load(sys.argv[2])\n'
      'np.savez(sys.argv[3], **{k: np.asarray(exp.call(x[k])) for k in x.files})\n')
  out = os.path.join(tmp_dir, f'{case}-out.npz')
  env = dict(os.environ)
  env.pop('XLA_FLAGS', None)
  proc = subprocess.run([sys.executable, '-c', code, result.path,
                         os.path.join(tmp_dir, f'{case}-in.npz'), out],
                        capture_output=True, text=True, env=env, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  got = np.load(out)
  reference = export.jax_logits(source)
  for b, x in inputs.items():
    assert _within(got[str(b)], reference(x))


def _bilinear_half_pixel(images: np.ndarray, h: int, w: int) -> np.ndarray:
  """Bilinear resize with half-pixel centres and edge clamping, from the definition."""
  def axis(n_in, n_out):
    pos = np.clip((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0, n_in - 1)
    lo = np.floor(pos).astype(int)
    hi = np.minimum(lo + 1, n_in - 1)
    return lo, hi, pos - lo
  y0, y1, fy = axis(images.shape[1], h)
  x0, x1, fx = axis(images.shape[2], w)
  x = images.astype(np.float64)
  rows = x[:, y0] * (1 - fy)[None, :, None, None] + x[:, y1] * fy[None, :, None, None]
  return rows[:, :, x0] * (1 - fx)[None, None, :, None] + rows[:, :, x1] * fx[None, None, :, None]


def test_preprocess_bakes_resize_and_scaling(tmp_dir, exports):
  npz, source, _ = exports('vit_gap', 'onnx')
  out = os.path.join(tmp_dir, 'pre.onnx')
  result = export.export(npz, 'onnx', out, source=source, preprocess=True)
  raw = np.random.default_rng(3).integers(0, 256, (2, 40, 27, 3), dtype=np.uint8)
  want = export.jax_logits(source)(
      (_bilinear_half_pixel(raw, 16, 16) / 127.5 - 1.0).astype(np.float32))
  assert _within(_ort(out, raw), want)
  with open(result.metadata_path, encoding='utf-8') as f:
    assert json.load(f)['input']['dtype'] == 'uint8'


def _tamper_onnx(path: str) -> None:
  import onnx  # pylint: disable=g-import-not-at-top
  from onnx import numpy_helper  # pylint: disable=g-import-not-at-top
  model = onnx.load(path)
  biggest = max(model.graph.initializer, key=lambda t: int(np.prod(t.dims)))
  values = numpy_helper.to_array(biggest).copy()
  values.flat[::7] += 0.05
  biggest.CopyFrom(numpy_helper.from_array(values, biggest.name))
  onnx.save(model, path)


def test_tampered_onnx_is_caught_and_deleted(tmp_dir, exports):
  npz, source, good = exports('vit_gap', 'onnx')
  bad = os.path.join(tmp_dir, 'tampered.onnx')
  with open(good.path, 'rb') as src, open(bad, 'wb') as dst:
    dst.write(src.read())
  _tamper_onnx(bad)
  with pytest.raises(export.ExportCheckError, match=r'max \|logit difference\| [\d.e-]+ at batch 1'):
    export.verify(bad, 'onnx', source)
  assert not os.path.exists(bad)


def _tampering_writer(good_path: str):
  """A stand-in for export.write_onnx: the real writer's file (copied), then tampered."""
  def write(source, path, *args, **kwargs):
    del source, args, kwargs
    with open(good_path, 'rb') as src, open(path, 'wb') as dst:
      dst.write(src.read())
    _tamper_onnx(path)
  return write


def test_failed_check_leaves_nothing_behind(tmp_dir, exports, monkeypatch):
  npz, source, good = exports('vit_gap', 'onnx')
  monkeypatch.setattr(export, 'write_onnx', _tampering_writer(good.path))
  out = os.path.join(tmp_dir, 'broken', 'model.onnx')
  with pytest.raises(export.ExportCheckError, match='does not compute the JAX model'):
    export.export(npz, 'onnx', out, source=source)
  assert not os.listdir(os.path.dirname(out))


def test_truncated_stablehlo_is_caught_and_deleted(tmp_dir, exports):
  _, source, good = exports('vit_ti16', 'stablehlo')
  bad = os.path.join(tmp_dir, 'cut.stablehlo')
  with open(good.path, 'rb') as src, open(bad, 'wb') as dst:
    dst.write(src.read()[: os.path.getsize(good.path) // 2])
  with pytest.raises(export.ExportCheckError, match='cannot read'):
    export.verify(bad, 'stablehlo', source)
  assert not os.path.exists(bad)


def test_refusals_name_the_reason(tmp_dir):
  npz = _npz(tmp_dir, 'ViT-Test_4', 16, representation_size=8)
  source = export.load(npz, model='ViT-Test_4')
  with pytest.raises(ValueError, match='representation layer'):
    export.export(npz, 'onnx', os.path.join(tmp_dir, 'r.onnx'), source=source)
  assert not os.path.exists(os.path.join(tmp_dir, 'r.onnx'))
  with pytest.raises(ValueError, match='--preprocess is for --format onnx'):
    export.export(npz, 'stablehlo', os.path.join(tmp_dir, 'r.stablehlo'), source=source,
                  preprocess=True)
  assert export.onnx_refusal(export.load(_npz(tmp_dir, 'ViT-Test_4', 16), model='ViT-Test_4')) is None


@pytest.mark.parametrize('args, message', [
    (['--format', 'onnx'], 'name its model with --model'),
    (['--format', 'onnx', '--model', 'ViT-Nope'], "Unknown model 'ViT-Nope'"),
    (['--format', 'stablehlo', '--model', 'ViT-Test_4', '--preprocess'], '--preprocess is for'),
])
def test_cli_user_errors(tmp_dir, capsys, args, message):
  npz = _npz(tmp_dir, 'ViT-Test_4', 16)
  out = os.path.join(tmp_dir, 'cli', 'm.bin')
  assert export.main(['--checkpoint', npz, '--out', out] + args) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith('error: ') and message in err[0], err
  assert not os.path.exists(out)


def test_cli_missing_checkpoint_in_a_subprocess(tmp_dir):
  env = dict(os.environ)
  env.pop('XLA_FLAGS', None)
  proc = subprocess.run([sys.executable, '-m', 'vit_jax.export', '--checkpoint',
                         os.path.join(tmp_dir, 'absent.npz'), '--model', 'ViT-Test_4',
                         '--format', 'onnx', '--out', os.path.join(tmp_dir, 'x.onnx')],
                        capture_output=True, text=True, cwd=REPO, env=env, timeout=300)
  assert proc.returncode == 2
  errors = [l for l in proc.stderr.splitlines() if l.startswith('error:')]
  assert len(errors) == 1 and 'absent.npz' in errors[0], proc.stderr
  assert 'Traceback' not in proc.stderr


def test_onnx_classify_example_prints_top_k(tmp_dir, exports, capsys):
  from PIL import Image  # pylint: disable=g-import-not-at-top
  _, source, result = exports('vit_gap', 'onnx')
  photo = os.path.join(tmp_dir, 'photo.png')
  Image.fromarray(np.arange(20 * 30 * 3, dtype=np.uint8).reshape(20, 30, 3)).save(photo)
  assert onnx_classify.main(['--onnx', result.path, '--image', photo, '--top_k', '3']) == 0
  lines = capsys.readouterr().out.splitlines()
  assert len(lines) == 4 and lines[1].lstrip().startswith('1.'), lines
  # The same probabilities as the JAX model on the same resized pixels.
  with Image.open(photo) as im:
    pixels = np.asarray(im.convert('RGB').resize((16, 16), Image.BILINEAR), np.float32)
  logits = export.jax_logits(source)((pixels / 127.5 - 1.0)[None])[0]
  best = int(np.argmax(logits))
  assert f'[{best:4d}]' in lines[1]


# --- Issue 31: what export keeps, the values it takes, the sidecars onnx_classify reads -----

_REAL_WRITE_ONNX = export.write_onnx


def _digest(folder) -> dict:
  from test_cli_errors import tree_digest  # pylint: disable=g-import-not-at-top
  return tree_digest(str(folder))


def _one_error(capsys, status, *fragments) -> str:
  out = capsys.readouterr()
  errors = [l for l in (out.out + out.err).splitlines() if l.startswith('error:')]
  assert status == 2 and len(errors) == 1, out.out + out.err
  assert 'Traceback' not in out.out + out.err
  for fragment in fragments:
    assert fragment in errors[0], (fragment, errors[0])
  return errors[0]


def test_failed_reexport_keeps_the_earlier_export_and_formats_keep_their_sidecars(
    tmp_dir, exports, monkeypatch, capsys):
  """A StableHLO export beside NAME.onnx has sidecars of its own; a re-export that fails
  its check (a tampered writer) or its values leaves every earlier file byte for byte."""
  npz, source, done = exports('vit_gap', 'onnx')
  folder = os.path.join(tmp_dir, 'keep')
  os.makedirs(folder)
  onnx_path, hlo_path = os.path.join(folder, 'm.onnx'), os.path.join(folder, 'm.stablehlo')
  for src, dst in zip((done.path, done.labels_path, done.metadata_path),
                      (onnx_path, *export.sidecar_paths(onnx_path))):
    with open(src, 'rb') as f_in, open(dst, 'wb') as f_out:
      f_out.write(f_in.read())
  export.export(npz, 'stablehlo', hlo_path, source=source)
  assert sorted(os.listdir(folder)) == ['m.onnx', 'm.onnx.json', 'm.onnx.labels.txt',
                                        'm.stablehlo', 'm.stablehlo.json',
                                        'm.stablehlo.labels.txt']
  with open(export.sidecar_paths(hlo_path)[1], encoding='utf-8') as f:
    assert json.load(f)['file'] == 'm.stablehlo'
  before = _digest(folder)
  monkeypatch.setattr(export, 'write_onnx', _tampering_writer(done.path))
  monkeypatch.setattr(export, 'load', lambda *args, **kwargs: source)
  args = ['--checkpoint', npz, '--model', 'ViT-Test_4', '--format', 'onnx', '--out', onnx_path]
  _one_error(capsys, export.main(args), 'does not compute the JAX model')
  monkeypatch.setattr(export, 'write_onnx', _REAL_WRITE_ONNX)
  assert _digest(folder) == before
  for extra, fragment in [(['--tolerance', 'nan'], '--tolerance must be a positive finite'),
                          (['--tolerance', '-1'], '--tolerance must be a positive finite'),
                          (['--opset', '1'], 'torch.onnx wrote opset 18 instead'),
                          (['--opset', '1000'], '--opset must be an ONNX opset from 1')]:
    _one_error(capsys, export.main(args + extra), fragment)
    assert _digest(folder) == before, extra


def test_mixer_npz_exports_at_its_own_size(tmp_dir, capsys):
  npz = _npz(tmp_dir, 'Mixer-Test_4', 16)
  out = os.path.join(tmp_dir, 'mixer', 'm.stablehlo')
  result = export.export(npz, 'stablehlo', out, model='Mixer-Test_4')
  with open(result.metadata_path, encoding='utf-8') as f:
    assert json.load(f)['image_size'] == [16, 16]
  line = _one_error(capsys, export.main(['--checkpoint', npz, '--model', 'Mixer-Test_4',
                                         '--image_size', '32', '--format', 'stablehlo',
                                         '--out', out + '2']),
                    'MLP-Mixer trained at 16x16', '--image_size 32x32')
  assert '--config.' not in line


@pytest.mark.parametrize('args, fragment', [
    (['--format', 'onnx'], 'the following arguments are required: --checkpoint, --out'),
    (['--checkpoint', 'x.npz', '--out', 'x.onnx', '--format', 'tflite'], "invalid choice"),
])
def test_cli_usage_errors_in_one_line(args, fragment, capsys):
  with pytest.raises(SystemExit) as e:
    export.main(args)
  _one_error(capsys, e.value.code, fragment)


# Run in one fresh process: each case's status and console, and the process's peak RSS.
_CLASSIFY_CASES_SCRIPT = r'''
import contextlib, io, json, sys, traceback
from vit_jax import onnx_classify
results = {}
for name, argv in json.loads(sys.argv[1]).items():
  out, err = io.StringIO(), io.StringIO()
  with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
    try:
      status = onnx_classify.main(argv)
    except SystemExit as e:
      status = e.code
    except BaseException:  # pylint: disable=broad-except
      status, err = 'raised', io.StringIO(err.getvalue() + traceback.format_exc())
  results[name] = (status, out.getvalue() + err.getvalue())
# VmHWM, not ru_maxrss: Linux carries the forking parent's (pytest's) peak into ru_maxrss.
with open('/proc/self/status') as f:
  peak = next(int(l.split()[1]) for l in f if l.startswith('VmHWM:')) * 1024
print(json.dumps({'results': results, 'peak_rss_bytes': peak}))
'''


def _hostile_models(root: str, good: export.Exported) -> dict:
  """name -> (onnx_classify argv, fragment of its error line): each a copy of a good export
  with one thing made hostile."""
  import onnx  # pylint: disable=g-import-not-at-top
  from PIL import Image  # pylint: disable=g-import-not-at-top
  from test_faults import _png_header_only  # pylint: disable=g-import-not-at-top
  os.makedirs(root)
  photo = os.path.join(root, 'photo.png')
  Image.fromarray(np.zeros((20, 30, 3), np.uint8)).save(photo)
  bomb = os.path.join(root, 'bomb.png')
  with open(bomb, 'wb') as f:
    f.write(_png_header_only(20000, 20000))
  with open(good.metadata_path, encoding='utf-8') as f:
    meta = json.load(f)
  cases = {}

  def case(name, fragment, meta_change=None, model_bytes=None, image=photo, extra=None):
    folder = os.path.join(root, name)
    os.makedirs(folder)
    path = os.path.join(folder, 'm.onnx')
    with open(good.path, 'rb') as f:
      data = f.read()
    with open(path, 'wb') as f:
      f.write(model_bytes(data) if model_bytes else data)
    changed = dict(meta, file='m.onnx', labels='m.onnx.labels.txt')
    changed.update(meta_change or {})
    with open(f'{path}.json', 'w', encoding='utf-8') as f:
      json.dump(changed, f)
    with open(good.labels_path, 'rb') as src, open(f'{path}.labels.txt', 'wb') as dst:
      dst.write(src.read())
    if extra:
      extra(folder)
    cases[name] = (['--onnx', path, '--image', image], fragment)

  def external_zero(data: bytes) -> bytes:
    model = onnx.load_from_string(data)
    biggest = max(model.graph.initializer, key=lambda t: int(np.prod(t.dims)))
    biggest.ClearField('raw_data')
    biggest.data_location = onnx.TensorProto.EXTERNAL
    for key, value in (('location', '../../../../dev/zero'), ('offset', '0'),
                       ('length', str(7 << 30))):
      entry = biggest.external_data.add()
      entry.key, entry.value = key, value
    return model.SerializeToString()

  case('good', None)
  case('truncated_onnx', 'ONNX Runtime cannot load', model_bytes=lambda d: d[: len(d) // 3])
  case('external_dev_zero', 'ONNX Runtime cannot load', model_bytes=external_zero)
  case('bomb_png', 'MAX_IMAGE_PIXELS', image=bomb)
  case('huge_image_size', 'image_size', {'image_size': [100000, 100000]})
  case('labels_dev_zero', 'labels must be a file name beside the model', {'labels': '/dev/zero'})
  case('labels_up', 'labels must be a file name beside the model', {'labels': '../x.txt'})
  case('labels_link_out', 'links out of the model', {'labels': 'l.txt'},
       extra=lambda folder: os.symlink('/dev/zero', os.path.join(folder, 'l.txt')))
  case('num_classes', 'num_classes', {'num_classes': 10**9})
  case('input_dtype', 'input dtype', {'input': dict(meta['input'], dtype='uint8')})
  case('metadata_2mib', 'larger than', {'padding': 'x' * (2 << 20)})
  return cases


def test_onnx_classify_refuses_hostile_files_in_one_line_with_bounded_memory(tmp_dir, exports):
  """Issue 31 (5): a truncated model, external data at /dev/zero, a decompression-bomb PNG
  and sidecars asking for 100000x100000 pixels, /dev/zero or links out as labels, other
  classes or dtypes, or 2 MiB of JSON: each one `error:` line, status 2, no traceback; the
  process running them all peaks under 400 MB (onnxruntime, numpy, Pillow: ~70 MB)."""
  _, _, good = exports('vit_gap', 'onnx')
  root = os.path.join(tmp_dir, 'hostile')
  cases = _hostile_models(root, good)
  env = dict(os.environ, PYTHONPATH=REPO)
  proc = subprocess.run([sys.executable, '-c', _CLASSIFY_CASES_SCRIPT,
                         json.dumps({k: v[0] for k, v in cases.items()})],
                        capture_output=True, text=True, cwd=REPO, env=env, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  report = json.loads(proc.stdout.strip().splitlines()[-1])
  for name, (status, console) in report['results'].items():
    fragment = cases[name][1]
    if fragment is None:
      assert status == 0 and 'top-5' in console, console
      continue
    errors = [l for l in console.splitlines() if l.startswith('error:')]
    assert status == 2 and len(errors) == 1 and fragment in errors[0], (name, console)
    assert 'Traceback' not in console, (name, console)
  assert report['peak_rss_bytes'] < 400 << 20, report['peak_rss_bytes']
