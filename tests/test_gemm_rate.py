"""benchmarks/gemm_rate.py runs and agrees with its own check (tiny shape, one short round)."""

import pytest


def test_gemm_rate_prints_both_rates_and_their_ratio(capsys):
  pytest.importorskip('torch')
  from benchmarks import gemm_rate  # pylint: disable=g-import-not-at-top
  result = gemm_rate.main(['--batch', '1', '--tokens', '17', '--hidden', '32', '--mlp', '64',
                           '--rounds', '1', '--seconds', '0.01', '--threads', '1'])
  out = capsys.readouterr().out
  assert result['shape'] == (17, 32, 64)
  assert result['gflops']['xla'] > 0 and result['gflops']['torch'] > 0
  assert 'fp32 GEMM (17 x 32) @ (32 x 64): XLA ' in out and 'XLA / PyTorch' in out
  assert 'threads; jax ' in out and 'load average' in out
