"""The deployment side: our model exported to ONNX (`vit_jax.export`), run by ONNX Runtime.

The same preset and shapes as ours, random weights (initialised, with a random
head), exported by `vit_jax.export.write_onnx` (timm + torch.onnx) and checked
against JAX before timing. Inference only, float32. ONNX Runtime gets the
same thread count as the other contenders (`intra_op_num_threads`), one
inter-op thread, and `allow_spinning` off: spinning worker threads would eat
the cores a shared machine's other contender is timed on.
"""

from __future__ import annotations

import os
import tempfile
import time
from typing import Any

from benchmarks import measure


def available() -> str | None:
  """None when onnxruntime and the exporter's libraries import, else why not."""
  try:
    import onnxruntime  # noqa: F401
    import onnxscript  # noqa: F401
    import timm  # noqa: F401
    import torch  # noqa: F401
  except Exception as e:  # ImportError, or a broken install
    return f'{type(e).__name__}: {e}'
  return None


def _source(spec: dict[str, Any]):
  import jax
  import jax.numpy as jnp
  import numpy as np
  from vit_jax import checkpoint, export
  from vit_jax.configs import models

  config = models.get_config(spec['model'])
  size = int(spec['image_size'])
  classes = int(spec['num_classes'])
  model = models.build_model(config, classes)
  params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, size, size, 3)), train=False)
  flat = {k: np.asarray(v, np.float32) for k, v in checkpoint.flatten(params['params']).items()}
  flat['head/kernel'] = np.random.default_rng(0).normal(
      0, 0.02, flat['head/kernel'].shape).astype(np.float32)
  return export.Source(checkpoint.unflatten(flat), config, (size, size), classes, spec['model'])


def setup(spec: dict[str, Any]):
  import numpy as np
  import onnxruntime as ort
  from vit_jax import export

  if spec['mode'] != 'infer' or spec['dtype'] != 'fp32':
    raise ValueError('ONNX Runtime contender: float32 inference only')
  base_rss = measure.rss_bytes()
  source = _source(spec)
  workdir = tempfile.mkdtemp(prefix='onnx_bench')
  path = os.path.join(workdir, 'model.onnx')
  start = time.perf_counter()
  export.write_onnx(source, path)
  checks = export.verify(path, 'onnx', source)
  export_s = time.perf_counter() - start
  threads = int(spec['threads'])
  options = ort.SessionOptions()
  options.intra_op_num_threads = threads
  options.inter_op_num_threads = 1
  options.add_session_config_entry('session.intra_op.allow_spinning', '0')
  session = ort.InferenceSession(path, options, providers=['CPUExecutionProvider'])
  batch, size = int(spec['batch']), int(spec['image_size'])
  images = np.random.default_rng(0).uniform(-1, 1, (batch, size, size, 3)).astype(np.float32)

  def run(steps: int) -> None:
    for _ in range(steps):
      session.run([export.OUTPUT_NAME], {export.INPUT_NAME: images})

  start = time.perf_counter()
  run(1)
  run(1)
  per_step = (time.perf_counter() - start) / 2
  steps = spec.get('steps') or measure.steps_for(per_step, spec['min_repeat_seconds'])
  ready = dict(compile_s=export_s, steps=steps, warmup_step_s=per_step)

  def finish() -> dict:
    os.remove(path)
    os.rmdir(workdir)
    num_params = sum(int(np.prod(v.shape)) for v in
                     export.checkpoint.flatten(source.params).values())
    return dict(framework='onnx', platform='cpu', onnxruntime=ort.__version__,
                threads=threads, allow_spinning=False, params=num_params,
                max_abs_logit_diff={str(b): d for b, d in checks.items()},
                rss_base_bytes=base_rss, device_memory={})

  return ready, run, finish
