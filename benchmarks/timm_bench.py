"""The reference side: timm's VisionTransformer in PyTorch, same shapes as ours.

The timm model is built from our preset's numbers (width, depth, heads, MLP
width, patch, image size, classes, class token), not from a timm model name, so
both sides compute the same network. Its defaults match ours: q/k/v biases,
LayerNorm epsilon 1e-6, exact GELU, attention through
`torch.nn.functional.scaled_dot_product_attention`.

An MLP-Mixer preset is timed against timm's `MlpMixer` built from the preset's
numbers (for Mixer-B_16 at 224 that is timm's `mixer_b16_224`), with timm's
defaults: LayerNorm epsilon 1e-6, exact GELU (ours: the tanh form, the
published checkpoints').

bf16 means `torch.autocast(dtype=torch.bfloat16)` with float32 parameters,
the counterpart of our `dtype=bfloat16` with float32 params. Training is AdamW
with cross-entropy, `zero_grad(set_to_none=True)`. On CPU the intra-op thread
count is set to the number of cores (XLA's CPU client uses all of them).
"""

from __future__ import annotations

import contextlib
import time
from typing import Any

from benchmarks import measure

LEARNING_RATE = 1e-3
WEIGHT_DECAY = 0.1


def available() -> str | None:
  """None when torch and timm import, else why not."""
  try:
    import timm  # noqa: F401
    import torch  # noqa: F401
  except Exception as e:  # ImportError, or a broken install
    return f'{type(e).__name__}: {e}'
  return None


def timm_model(spec: dict[str, Any]):
  from timm.models.vision_transformer import VisionTransformer
  from vit_jax.configs import models

  config = models.get_config(spec['model'])
  if config.get('model_type') == 'mixer':
    from timm.models.mlp_mixer import MlpMixer
    patch = tuple(config.patches.size)
    if patch[0] != patch[1]:
      raise ValueError('timm reference needs square patches')
    return MlpMixer(
        num_classes=int(spec['num_classes']), img_size=int(spec['image_size']),
        patch_size=patch[0], num_blocks=config.num_blocks, embed_dim=config.hidden_dim,
        mlp_ratio=(config.tokens_mlp_dim / config.hidden_dim,
                   config.channels_mlp_dim / config.hidden_dim))
  if config.get('model_type', 'vit') != 'vit' or config.get('resnet'):
    raise ValueError(f'{spec["model"]} is not a plain ViT; no timm counterpart built')
  t = config.transformer
  patch = tuple(config.patches.size)
  if patch[0] != patch[1]:
    raise ValueError('timm reference needs square patches')
  token = config.classifier == 'token'
  return VisionTransformer(
      img_size=int(spec['image_size']), patch_size=patch[0], in_chans=3,
      num_classes=int(spec['num_classes']), global_pool='token' if token else 'avg',
      embed_dim=config.hidden_size, depth=t.num_layers, num_heads=t.num_heads,
      mlp_ratio=t.mlp_dim / config.hidden_size, qkv_bias=True, class_token=token,
      fc_norm=False)


def setup(spec: dict[str, Any]):
  import torch

  base_rss = measure.rss_bytes()
  threads = int(spec['threads'])
  torch.set_num_threads(threads)
  device = torch.device(spec.get('torch_device') or 'cpu')
  cuda = device.type == 'cuda'
  model = timm_model(spec).to(device)
  if spec.get('torch_compile'):
    model = torch.compile(model)  # compiled by the warm-up steps, not timed
  num_params = sum(p.numel() for p in model.parameters())
  batch, size = int(spec['batch']), int(spec['image_size'])
  gen = torch.Generator().manual_seed(0)
  images = (torch.rand(batch, 3, size, size, generator=gen) * 2 - 1).to(device)
  labels = torch.randint(0, int(spec['num_classes']), (batch,), generator=gen).to(device)

  def autocast():
    if spec['dtype'] == 'bf16':
      return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()

  sync = torch.cuda.synchronize if cuda else (lambda: None)
  if cuda:
    torch.cuda.reset_peak_memory_stats(device)

  if spec['mode'] == 'train':
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE, weight_decay=WEIGHT_DECAY)

    def one():
      opt.zero_grad(set_to_none=True)
      with autocast():
        loss = torch.nn.functional.cross_entropy(model(images), labels)
      loss.backward()
      opt.step()
  else:
    model.eval()

    def one():
      with torch.inference_mode(), autocast():
        model(images)

  def run(steps: int) -> None:
    for _ in range(steps):
      one()
    sync()

  start = time.perf_counter()
  run(1)  # first execution: allocations, thread pools (the memory peak)
  per_step = time.perf_counter() - start
  if spec.get('warmup_steps', 2) > 1:  # benchmarks/max_batch.py needs only the first
    start = time.perf_counter()
    run(1)
    per_step = time.perf_counter() - start
  steps = spec.get('steps') or measure.steps_for(per_step, spec['min_repeat_seconds'])
  ready = dict(compile_s=0.0, steps=steps, warmup_step_s=per_step)

  def finish() -> dict:
    device_memory = {}
    if cuda:
      device_memory = {'peak_bytes_in_use': int(torch.cuda.max_memory_allocated(device))}
    return dict(framework='timm', platform=device.type,
                torch_compile=bool(spec.get('torch_compile')), threads=torch.get_num_threads(),
                params=int(num_params), rss_base_bytes=base_rss, device_memory=device_memory)

  return ready, run, finish
