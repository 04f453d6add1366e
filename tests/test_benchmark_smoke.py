"""Smoke test of benchmarks/benchmark.py (the `smoke` preset) and the analytic FLOP count.

The benchmark starts its own worker processes, so it runs as a subprocess here;
it imports no TensorFlow and uses timm only when torch and timm are installed.
"""

import json
import os
import subprocess
import sys

import pytest

from vit_jax import flops
from vit_jax.configs import models

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize('name, gmacs', [
    ('ViT-Ti_16', 1.254), ('ViT-S_16', 4.599), ('ViT-B_16', 17.564)])
def test_analytic_macs(name, gmacs):
  macs = flops.vit_macs(models.get_config(name), 224, 1000)
  assert macs / 1e9 == pytest.approx(gmacs, abs=1e-3)


def test_analytic_flops_vit_b16():
  config = models.get_config('ViT-B_16')
  forward = flops.vit_flops(config, 224, 1000)
  assert forward / 1e9 == pytest.approx(35.1, abs=0.1)
  assert flops.vit_flops(config, 224, 1000, train=True) == 3 * forward


def test_analytic_rejects_bad_input():
  with pytest.raises(ValueError, match='not divisible'):
    flops.vit_macs(models.get_config('ViT-B_16'), 100, 1000)
  with pytest.raises(ValueError, match='plain ViT'):
    flops.vit_macs(models.get_config('R50+ViT-B_16'), 224, 1000)


def test_smoke_preset(tmp_path):
  out = tmp_path / 'bench.json'
  env = dict(os.environ)
  env.pop('XLA_FLAGS', None)  # the benchmark sets device counts per worker
  proc = subprocess.run(
      [sys.executable, os.path.join(REPO, 'benchmarks', 'benchmark.py'),
       '--preset', 'smoke', '--json', str(out)],
      capture_output=True, text=True, env=env, cwd=REPO, timeout=600)
  assert proc.returncode == 0, proc.stdout + proc.stderr[-4000:]
  assert 'Throughput, images/s' in proc.stdout
  assert 'Weak scaling' in proc.stdout
  result = json.loads(out.read_text())
  (row,) = result['rows']
  assert row['model'] == 'ViT-Test_4' and row['analytic']['forward'] > 0
  for mode in ('infer', 'train'):
    cell = row['cells'][f'jax_{mode}']
    assert cell['images_per_s'] > 0
    assert cell['rss_peak_bytes'] > 0
    assert cell['xla_flops_per_image'] > 0
    assert not cell['tensorflow_imported']
    if sys.platform.startswith('linux'):
      assert cell['host_memory'] == 'retain'  # the default, for both frameworks
    if result['meta']['timm_note'] is None:
      timm_cell = row['cells'][f'timm_{mode}']
      assert timm_cell['images_per_s'] > 0
      # Same network on both sides.
      assert timm_cell['params'] == cell['params']
      assert timm_cell['host_memory'] == cell['host_memory']
  assert [c['spec']['devices'] for c in result['scaling']] == [1, 2]
  assert result['meta']['probe']['host_cpu']  # the CPU the ratios were measured on
  assert all(c['images_per_s'] > 0 for c in result['scaling'])


def test_attention_benchmark_runs(tmp_path):
  out = tmp_path / 'attention.json'
  proc = subprocess.run(
      [sys.executable, os.path.join(REPO, 'benchmarks', 'attention_benchmark.py'),
       '--batch', '2', '--tokens', '17', '--heads', '2', '--head-dim', '8',
       '--rounds', '2', '--json', str(out)],
      capture_output=True, text=True, cwd=REPO, timeout=300)
  assert proc.returncode == 0, proc.stdout + proc.stderr[-4000:]
  assert '| explicit |' in proc.stdout
  result = json.loads(out.read_text())
  assert set(result['results']) >= {'explicit', 'xla'}
  for timings in result['results'].values():
    assert timings['forward']['ms'] > 0 and timings['forward+backward']['ms'] > 0
  assert result['results']['xla']['forward']['speedup_vs_xla'] == 1.0


def test_variant_tokens():
  sys.path.insert(0, REPO)
  from benchmarks import benchmark
  devices, flags, code, env, spec = benchmark.split_variant(
      'devices=2 env:GLIBC_TUNABLES=glibc.malloc.hugetlb=1 host_memory=default --xla_a=1', 1)
  assert (devices, flags, code) == (2, '--xla_a=1', None)
  assert env == {'GLIBC_TUNABLES': 'glibc.malloc.hugetlb=1'}
  assert spec == {'host_memory': 'default'}
  with pytest.raises(ValueError, match='retain or default'):
    benchmark.split_variant('host_memory=sometimes', 1)
  with pytest.raises(ValueError, match='env:NAME=VALUE'):
    benchmark.split_variant('env:NO_VALUE', 1)


def test_gpu_check_dry_run_prints_a_command_the_benchmark_accepts():
  import shlex  # pylint: disable=g-import-not-at-top
  proc = subprocess.run(['bash', os.path.join(REPO, 'benchmarks', 'gpu_check.sh'), '--dry-run'],
                        capture_output=True, text=True, cwd=REPO, timeout=60)
  assert proc.returncode == 0, proc.stderr
  words = shlex.split(proc.stdout)
  assert words[:2] == ['python', 'benchmarks/benchmark.py'], words
  sys.path.insert(0, REPO)
  from benchmarks import benchmark  # pylint: disable=g-import-not-at-top
  args = benchmark.parse_args(words[2:])
  assert (args.models, args.batch_size, args.dtypes) == (['ViT-B_16@224'], [256], ['bf16'])
  assert set(args.modes) == {'infer', 'train'} and args.scaling_devices == []
  assert args.attention == 'xla' and args.remat_policy is None  # the preset's default policy
  assert [benchmark.split_variant(v, 1)[4] for v in args.xla_variants] == [
      {'attention': 'cudnn'}]
  assert args.timm_variants == ['eager', 'compiled'] and args.table == 'contenders'
  bad = subprocess.run(['bash', os.path.join(REPO, 'benchmarks', 'gpu_check.sh'), '--fast'],
                       capture_output=True, text=True, cwd=REPO, timeout=60)
  assert bad.returncode == 2 and "unknown argument '--fast'" in bad.stderr


@pytest.mark.parametrize('threshold', [7, 8, 13, 100, 777, 4096, 5000])
def test_max_batch_search_finds_the_largest_fitting_multiple(threshold):
  sys.path.insert(0, REPO)
  from benchmarks import max_batch  # pylint: disable=g-import-not-at-top
  tried = []

  def fits(batch):
    tried.append(batch)
    return batch <= threshold

  best = max_batch.largest_fitting(fits, start=8, granularity=8, limit=4096)
  expected = None if threshold < 8 else min(threshold, 4096) // 8 * 8
  assert best == expected, tried
  assert len(tried) <= 2 * 12, tried  # doubling, then bisection
  assert all(b % 8 == 0 and b <= 4096 for b in tried)


def test_variant_tokens_name_their_bad_values():
  sys.path.insert(0, REPO)
  from benchmarks import benchmark  # pylint: disable=g-import-not-at-top
  assert benchmark.split_variant('remat=block attention=xla --xla_x=1', 1) == (
      1, '--xla_x=1', None, {}, {'remat_policy': 'block', 'attention': 'xla'})
  with pytest.raises(ValueError, match="remat is one of"):
    benchmark.split_variant('remat=sometimes', 1)
  with pytest.raises(ValueError, match="attention is one of"):
    benchmark.split_variant('attention=flash', 1)


def test_host_cpu_names_the_model_and_the_matmul_isa(tmp_path):
  sys.path.insert(0, REPO)
  from benchmarks import measure  # pylint: disable=g-import-not-at-top
  info = tmp_path / 'cpuinfo'
  info.write_text('processor\t: 0\nmodel name\t: Intel(R) Xeon(R) Platinum 8481C\n'
                  'flags\t\t: fpu sse2 avx2 avx512f amx_tile amx_bf16\n\n'
                  'processor\t: 1\nmodel name\t: Intel(R) Xeon(R) Platinum 8481C\n')
  assert measure.host_cpu(str(info)) == 'Intel(R) Xeon(R) Platinum 8481C (avx2, avx512f, amx_bf16)'
  info.write_text('model name\t: AMD EPYC\nflags\t\t: fpu sse2 fma\n')
  assert measure.host_cpu(str(info)) == 'AMD EPYC (no AVX2)'
  assert measure.host_cpu(str(tmp_path / 'missing'))  # falls back to platform's name


def test_remat_policies_names_bad_arguments(capsys):
  sys.path.insert(0, REPO)
  from benchmarks import remat_policies  # pylint: disable=g-import-not-at-top
  args = remat_policies.parse_args(['--policies', 'block,dots', '--batch-size', '4,8'])
  assert args.policies == ['block', 'dots'] and args.batch_size == [4, 8]
  for argv, message in ((['--policies', 'dots,sometimes'], "must be one of ['block', 'dots', 'none'], got 'sometimes'"),
                        (['--batch-size', '8,x'], '--batch-size must be')):
    with pytest.raises(SystemExit):
      remat_policies.parse_args(argv)
    assert message in capsys.readouterr().err
