"""Export a trained model for serving without JAX: `python -m vit_jax.export`.

  python -m vit_jax.export --checkpoint /tmp/digits --format onnx --out /tmp/deploy/digits.onnx
  python -m vit_jax.export --checkpoint ViT-B_16.npz --model ViT-B_16 --image_size 384 \
      --format stablehlo --out vit_b16.stablehlo

Two formats, both with the weights baked in, one input `images` (NHWC float32
in [-1, 1], the model's own convention) with a dynamic batch dimension, and one
output `logits`:

- `onnx`: the model rebuilt in timm (ViT through `vit_jax.convert`'s key
  tables; the BiT ResNets and the R50 hybrid as timm `ResNetV2` with plain
  convolutions holding our weight-standardised kernels, so no epsilon of
  timm's enters) and written by `torch.onnx.export` (its dynamo exporter).
  Runs in ONNX Runtime, TensorRT, OpenVINO, ... `--preprocess` puts the resize
  (bilinear, half-pixel centres, no antialiasing: `tf.image.resize`'s default,
  the eval pipeline's) and the scaling to [-1, 1] in the graph: its input is
  then uint8 RGB (N, H, W, 3) of any size.
- `stablehlo`: `jax.export` of the jitted forward pass, serialised; reloaded
  with `jax.export.deserialize` where jax runs (any backend). Batch is symbolic;
  each new batch size compiles once when called. JAX guarantees to read an
  export for about six months of releases.

Why timm rather than jax2onnx (which converts the jaxpr directly): every
jax2onnx release pins `orbax-checkpoint<0.11.37`, which no install of this
package with its pinned orbax can satisfy (docs/deploy.md has the figures).

Every export is checked before it is kept: the file is written beside `--out`
under a hidden staging name and run there (ONNX Runtime, or the deserialised
StableHLO) on random batches of 1 and 5, its logits compared with the JAX
model's; a max |difference| above the tolerance (1e-4 x max(1, max |logit|),
float32, as `vit_jax.convert` checks) deletes it and fails naming the
difference, leaving an earlier export at `--out` as it was. Only a checked
export replaces `--out` and its sidecars, named after the whole file name:
`NAME.onnx.labels.txt` (class names) and `NAME.onnx.json` (preset, image size,
preprocessing, source checkpoint, the measured differences, the opset the file
declares, versions), so `NAME.stablehlo` beside it keeps its own. Values no
export can honour (a non-finite `--tolerance`, an opset torch.onnx does not
write) are refused; an MLP-Mixer `.npz` is exported at its token-mixing grid.

What a format cannot express is refused naming the reason: the ONNX route has
no representation layer (`pre_logits`: timm's ViT has none) and no Mixer;
`--preprocess` is ONNX-only. The export runs in float32 whatever dtype the
run trained in. torch, timm and onnxruntime are imported only when needed
(`pip install -c constraints.txt -e ".[export]"`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import errno
import functools
import hashlib
import json
import logging as std_logging
import math
import os
import sys
from typing import Any, Callable, Iterator, Optional, Sequence

import numpy as np

from vit_jax import checkpoint
from vit_jax import cli
from vit_jax import release_names

FORMATS = ('onnx', 'stablehlo')
TOLERANCE = 1e-4
CHECK_BATCHES = (1, 5)
INPUT_NAME = 'images'
OUTPUT_NAME = 'logits'
ONNX_OPSET = 18
MAX_OPSET = 99  # refused above this before loading; the written file's opset is checked too
CHECK_SEED = 0


class ExportCheckError(ValueError):
  """The written file does not compute the JAX model's logits (it has been deleted)."""


@dataclasses.dataclass
class Source:
  """A checkpoint ready to export: float32 params and the model they fit."""
  params: dict
  model_config: Any  # the preset with the run's overrides (vit_jax.configs.models)
  image_size: tuple[int, int]
  num_classes: int
  path: str
  _jitted: Any = dataclasses.field(default=None, repr=False, compare=False)

  @property
  def family(self) -> str:
    if checkpoint._config_get(self.model_config, 'model_type', 'vit') != 'vit':  # pylint: disable=protected-access
      return str(self.model_config.model_type)
    return 'hybrid' if self.model_config.get('resnet') else 'vit'

  @property
  def name(self) -> str:
    return str(self.model_config.get('name', self.family))


@dataclasses.dataclass
class Exported:
  path: str
  format: str
  checks: dict  # batch size -> max |logit difference|
  labels_path: str
  metadata_path: str


# ---------------------------------------------------------------------------
# Loading.
# ---------------------------------------------------------------------------

def _npz_image_size(path: str, config) -> Optional[tuple[int, int]]:
  """The resolution an .npz was trained at (its position-embedding grid, or a Mixer's
  token-mixing grid); None without either (a BiT ResNet)."""
  from vit_jax.configs import schema  # pylint: disable=g-import-not-at-top
  specs = checkpoint.read_npz_specs(path)
  preset = schema.model_config(config)
  if checkpoint.POSEMB_KEY in specs:
    preset.classifier = 'token' if 'cls' in specs else 'gap'
  elif checkpoint.MIXER_GRID_KEY not in specs:
    return None
  return tuple(checkpoint.infer_image_size(specs, preset))


def load(checkpoint_path: str, model: Optional[str] = None, config: Optional[str] = None,
         image_size: Optional[Sequence[int]] = None) -> Source:
  """A run's workdir (its newest checkpoint) or an `.npz`, checked against its model.

  The model: `model` (a preset), else `config`'s (a config file), else (for a
  workdir) the run's own as its metrics.jsonl recorded it. The resolution:
  `image_size`, else the run's, else the .npz's own (its position embeddings),
  else the config's. Position embeddings are resampled as fine-tuning does.
  """
  from vit_jax import evaluate  # pylint: disable=g-import-not-at-top
  from vit_jax.configs import schema  # pylint: disable=g-import-not-at-top
  from vit_jax import storage  # pylint: disable=g-import-not-at-top
  path = storage.resolve(checkpoint_path)  # a local path or a gs:// URL
  cfg = evaluate.load_config(config) if config else schema.resolve({})
  if not storage.isdir(path):
    if not storage.exists(path):
      raise FileNotFoundError(f'no such checkpoint file or workdir: {path!r}')
    if model or not config:  # a release file name says which preset it holds
      model = release_names.preset_for(path, model)
    if not model and not config:
      raise ValueError(f'{path!r} is an .npz: name its model with --model PRESET or --config '
                       'FILE (a run\'s workdir records its own)')
    probe = schema.replace(cfg, model_name=model) if model else cfg
    own_size = _npz_image_size(path, probe)
    if (image_size is not None and own_size is not None and tuple(image_size) != own_size
        and checkpoint.MIXER_GRID_KEY in checkpoint.read_npz_specs(path)):
      raise ValueError(
          f'{path!r} is an MLP-Mixer trained at {own_size[0]}x{own_size[1]}: its token-mixing '
          f'MLP fixes the patch grid, so --image_size {image_size[0]}x{image_size[1]} cannot '
          'be served from it; leave --image_size out, or fine-tune at that size first')
    image_size = own_size if image_size is None else image_size
  loaded = evaluate.load_checkpoint(path, cfg, model_name=model,
                                    image_size=tuple(image_size) if image_size else None)
  if loaded.head_classes is None:
    raise ValueError(f'{path!r} has no classification head: there are no logits to serve')
  params = checkpoint.unflatten({k: np.asarray(v, np.float32)
                                 for k, v in checkpoint.flatten(loaded.params).items()})
  from vit_jax.configs.image_size import image_hw  # pylint: disable=g-import-not-at-top
  return Source(params, schema.model_config(loaded.config),
                tuple(image_hw(loaded.config.image_size)), int(loaded.head_classes), path)


def flax_model(source: Source):
  """The float32 Flax module of `source`."""
  from vit_jax.configs import models  # pylint: disable=g-import-not-at-top
  return models.build_model(source.model_config, source.num_classes)


def jax_logits(source: Source) -> Callable[[np.ndarray], np.ndarray]:
  """images (N, H, W, 3) float32 in [-1, 1] -> logits, by the JAX model (jitted once per source)."""
  import jax  # pylint: disable=g-import-not-at-top
  if source._jitted is None:  # pylint: disable=protected-access
    model = flax_model(source)
    source._jitted = jax.jit(lambda p, x: model.apply({'params': p}, x, train=False)[0])  # pylint: disable=protected-access
  fn = source._jitted  # pylint: disable=protected-access
  return lambda images: np.asarray(fn(source.params, images), np.float32)


def scale_uint8(images: np.ndarray, size: Sequence[int]) -> np.ndarray:
  """The reference for `--preprocess`, in JAX: bilinear resize (half-pixel, no antialiasing), x / 127.5 - 1."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  x = jnp.asarray(images, jnp.float32)
  if tuple(x.shape[1:3]) != tuple(size):
    x = jax.image.resize(x, (x.shape[0], *size, 3), method='linear', antialias=False)
  return np.asarray(x / 127.5 - 1.0, np.float32)


# ---------------------------------------------------------------------------
# ONNX: the model in timm, written by torch.onnx.
# ---------------------------------------------------------------------------

def _standardized(kernel: np.ndarray, weight_std: str, epsilon: float) -> np.ndarray:
  """Our StdConv's kernel as the convolution sees it, as a torch (O, I, H, W) weight."""
  k = kernel.astype(np.float64)
  mean = k.mean(axis=(0, 1, 2), keepdims=True)
  var = k.var(axis=(0, 1, 2), keepdims=True)
  k = (k - mean) / (np.sqrt(var + epsilon) if weight_std == 'var' else np.sqrt(var) + epsilon)
  return np.ascontiguousarray(k.astype(np.float32).transpose(3, 2, 0, 1))


def _conv_factory(padding: str):
  """A timm `conv_layer`: a plain Conv2d (kernels arrive standardised) with our padding."""
  import torch  # pylint: disable=g-import-not-at-top
  from timm.layers import create_conv2d  # pylint: disable=g-import-not-at-top

  def conv(in_chs, out_chs, kernel_size, stride=1, dilation=1, groups=1, bias=False, **kw):
    if padding == 'same':  # TF 'SAME': the odd pixel at the end
      return create_conv2d(in_chs, out_chs, kernel_size, stride=stride, dilation=dilation,
                           groups=groups, bias=bias, padding='same', **kw)
    pad = (kernel_size - 1) // 2 * dilation  # symmetric, as the BiT reference pads
    return torch.nn.Conv2d(in_chs, out_chs, kernel_size, stride=stride, padding=pad,
                           dilation=dilation, groups=groups, bias=bias, **kw)
  return conv


def _timm_resnet(num_layers, width: int, padding: str, gn_epsilon: float, preact: bool,
                 num_classes: int):
  from timm.layers import GroupNormAct  # pylint: disable=g-import-not-at-top
  from timm.models import resnetv2  # pylint: disable=g-import-not-at-top
  channels = tuple(width * 4 * 2**i for i in range(len(num_layers)))
  stem = ('fixed' if padding == 'explicit' else 'same')
  return resnetv2.ResNetV2(
      layers=tuple(num_layers), channels=channels, stem_chs=width, stem_type=stem,
      preact=preact, num_classes=num_classes, global_pool='avg' if num_classes else '',
      conv_layer=_conv_factory(padding),
      norm_layer=functools.partial(GroupNormAct, num_groups=32, eps=gn_epsilon))


def _resnet_state_dict(flat: dict, prefix: str, num_layers, preact: bool, weight_std: str,
                       epsilon: float, out: str = '') -> dict:
  """Our ResNet tree (BiT ResNetV2 or the hybrid stem) -> timm ResNetV2 keys."""
  sd = {}
  conv = lambda key: _standardized(flat.pop(f'{prefix}{key}/kernel'), weight_std, epsilon)

  def norm(ours, theirs):
    sd[f'{out}{theirs}.weight'] = flat.pop(f'{prefix}{ours}/scale')
    sd[f'{out}{theirs}.bias'] = flat.pop(f'{prefix}{ours}/bias')

  sd[f'{out}stem.conv.weight'] = conv('conv_root')
  if not preact:
    norm('gn_root', 'stem.norm')
  for s, units in enumerate(num_layers):
    for u in range(units):
      ours, theirs = f'block{s + 1}/unit{u + 1}/', f'stages.{s}.blocks.{u}.'
      for i in (1, 2, 3):
        sd[f'{out}{theirs}conv{i}.weight'] = conv(f'{ours}conv{i}')
        norm(f'{ours}gn{i}', f'{theirs}norm{i}')
      if f'{prefix}{ours}conv_proj/kernel' in flat:
        sd[f'{out}{theirs}downsample.conv.weight'] = conv(f'{ours}conv_proj')
        if not preact:
          norm(f'{ours}gn_proj', f'{theirs}downsample.norm')
  return sd


def _bit_module(source: Source):
  cfg = source.model_config
  flat = dict(checkpoint.flatten(source.params))
  width = int(cfg.width * cfg.width_factor)
  model = _timm_resnet(cfg.num_layers, width, cfg.padding, cfg.gn_epsilon, True,
                       source.num_classes)
  sd = _resnet_state_dict(flat, '', cfg.num_layers, True, cfg.weight_std,
                          cfg.weight_std_epsilon)
  sd['norm.weight'] = flat.pop('norm_pre_head/scale')
  sd['norm.bias'] = flat.pop('norm_pre_head/bias')
  kernel = flat.pop('head/kernel')
  sd['head.fc.weight'] = np.ascontiguousarray(kernel.T[:, :, None, None])
  sd['head.fc.bias'] = flat.pop('head/bias')
  return model, sd, flat


def _hybrid_module(source: Source):
  from timm.layers import HybridEmbed  # pylint: disable=g-import-not-at-top
  from timm.models import vision_transformer  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  from vit_jax import convert  # pylint: disable=g-import-not-at-top
  from vit_jax import models_resnet  # pylint: disable=g-import-not-at-top
  cfg = source.model_config
  flat = dict(checkpoint.flatten(source.params))
  layers = tuple(cfg.resnet.num_layers)
  width = int(64 * cfg.resnet.width_factor)
  # The hybrid stem's own numerics (models_resnet.hybrid_stem).
  backbone = _timm_resnet(layers, width, 'same', models_resnet.HYBRID_GN_EPSILON, False, 0)
  sd = _resnet_state_dict(flat, '', layers, False, 'std', models_resnet.WEIGHT_STD_EPSILON,
                          out='patch_embed.backbone.')
  stride = models_resnet.hybrid_stem_stride(cfg.resnet)
  # The transformer on top is a plain ViT over the stem's feature map.
  plain = cfg.to_dict()
  plain['resnet'] = None
  kwargs = convert.timm_kwargs(plain, source.num_classes, source.image_size)
  embed = functools.partial(HybridEmbed, backbone=backbone, feature_ratio=stride)
  model = vision_transformer.VisionTransformer(
      embed_layer=embed, norm_layer=functools.partial(torch.nn.LayerNorm,
                                                      eps=convert.LAYER_NORM_EPSILON), **kwargs)
  # What is left once the stem's keys are popped is a plain ViT's tree.
  vit = _to_timm(checkpoint.unflatten(flat), cfg)
  sd.update(vit)  # its patch_embed.proj is HybridEmbed's 1x1 projection
  return model, sd, {}


def _to_timm(params, model_config) -> dict:
  """convert.to_timm, without its warning: our timm model is built with the config's GELU."""
  from absl import logging  # pylint: disable=g-import-not-at-top
  from vit_jax import convert  # pylint: disable=g-import-not-at-top
  level = logging.get_verbosity()
  logging.set_verbosity(logging.ERROR)
  try:
    return convert.to_timm(params, convert.uses_tanh_gelu(model_config))
  finally:
    logging.set_verbosity(level)


def _vit_module(source: Source):
  from vit_jax import convert  # pylint: disable=g-import-not-at-top
  model = convert.build_timm_model(source.model_config, source.num_classes, source.image_size)
  return model, _to_timm(source.params, source.model_config), {}


def onnx_refusal(source: Source) -> Optional[str]:
  """Why the ONNX route cannot express `source`, or None."""
  if source.family == 'mixer':
    return 'the ONNX route rebuilds the model in timm, which has no mapping of our MLP-Mixer yet'
  if source.family not in ('vit', 'hybrid', 'resnet'):
    return f'no timm mapping for model_type {source.family!r}'
  if 'pre_logits' in source.params:
    return ('the checkpoint has a representation layer (pre_logits), which timm\'s '
            'VisionTransformer cannot express; fine-tune without it, or export --format stablehlo')
  return None


def torch_module(source: Source, preprocess: bool = False):
  """A torch module computing `source`'s logits from NHWC images (timm inside, eval mode).

  With `preprocess`, from uint8 RGB images of any size (resized and scaled in
  the module). ValueError naming the reason for what timm cannot express.
  """
  import torch  # pylint: disable=g-import-not-at-top
  reason = onnx_refusal(source)
  if reason:
    raise ValueError(f'cannot export {source.name} to ONNX: {reason}')
  build = {'vit': _vit_module, 'hybrid': _hybrid_module, 'resnet': _bit_module}[source.family]
  model, sd, left = build(source)
  if left:
    raise ValueError(f'{source.name}: parameters the timm model has no place for: {sorted(left)}')
  # Copies: some arrays are read-only views, which torch warns about on the console.
  result = model.load_state_dict({k: torch.from_numpy(np.array(v, copy=True))
                                  for k, v in sd.items()}, strict=False)
  if result.missing_keys or result.unexpected_keys:
    raise ValueError(f'{source.name} does not fit the timm model: missing '
                     f'{result.missing_keys}, unexpected {result.unexpected_keys}')
  return _Nhwc(model.eval(), source.image_size if preprocess else None).eval()


def _nhwc_class():
  import torch  # pylint: disable=g-import-not-at-top

  class Nhwc(torch.nn.Module):
    """NHWC in (our convention), NCHW to timm; optionally uint8 resized and scaled first."""

    def __init__(self, model, resize_to: Optional[tuple[int, int]]):
      super().__init__()
      self.model = model
      self.resize_to = resize_to

    def forward(self, images):
      x = images.permute(0, 3, 1, 2)
      if self.resize_to is not None:
        x = x.float()
        x = torch.nn.functional.interpolate(x, size=tuple(self.resize_to), mode='bilinear',
                                            align_corners=False, antialias=False)
        x = x / 127.5 - 1.0
      return self.model(x)

  return Nhwc


def _Nhwc(model, resize_to):  # pylint: disable=invalid-name
  return _nhwc_class()(model, resize_to)


@contextlib.contextmanager
def _quiet_loggers(*names: str) -> Iterator[None]:
  """Warnings of the exporter's libraries off the console (the written opset is checked)."""
  loggers = [std_logging.getLogger(name) for name in names]
  levels = [logger.level for logger in loggers]
  for logger in loggers:
    logger.setLevel(std_logging.ERROR)
  try:
    yield
  finally:
    for logger, level in zip(loggers, levels):
      logger.setLevel(level)


def write_onnx(source: Source, path: str, preprocess: bool = False,
               opset: int = ONNX_OPSET) -> None:
  """`source` as an ONNX file (weights inside; dynamic batch; H, W too with `preprocess`)."""
  import io  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  module = torch_module(source, preprocess)
  h, w = source.image_size
  if preprocess:
    example = torch.zeros((2, h + 3, w + 5, 3), dtype=torch.uint8)
    dims = {0: torch.export.Dim('batch'), 1: torch.export.Dim('height', min=2),
            2: torch.export.Dim('width', min=2)}
  else:
    example = torch.zeros((2, h, w, 3), dtype=torch.float32)
    dims = {0: torch.export.Dim('batch')}
  log = io.StringIO()
  try:
    with contextlib.redirect_stdout(log), _quiet_loggers('torch.onnx', 'onnxscript'), \
        torch.no_grad():
      program = torch.onnx.export(module, (example,), None, dynamo=True, opset_version=opset,
                                  input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                                  dynamic_shapes=({k: v for k, v in dims.items()},),
                                  external_data=False, verbose=False)
      program.save(path, external_data=False)
  except ImportError as e:
    raise ImportError(f'ONNX export needs torch, timm, onnx and onnxscript ({e}); '
                      'pip install -c constraints.txt -e ".[export]"') from None
  except Exception as e:  # pylint: disable=broad-except
    raise ValueError(f'torch.onnx.export failed for {source.name}: {type(e).__name__}: '
                     f'{str(e).splitlines()[0] if str(e) else ""}') from e
  written = written_opset(path)
  if written != opset:  # torch.onnx replaces opsets it cannot convert to by its own
    raise ValueError(f'--opset {opset}: torch.onnx wrote opset {written} instead; ask for '
                     f'another (the default, {ONNX_OPSET}, is written as is)')


def written_opset(path: str) -> Optional[int]:
  """The default-domain opset an ONNX file declares (read without its weights)."""
  import onnx  # pylint: disable=g-import-not-at-top
  model = onnx.load(path, load_external_data=False)
  return next((int(o.version) for o in model.opset_import if o.domain in ('', 'ai.onnx')), None)


def run_onnx(path: str, images: np.ndarray, threads: int = 1) -> np.ndarray:
  """Logits of an ONNX file on `images`, run by ONNX Runtime on the CPU."""
  try:
    import onnxruntime as ort  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError(f'checking the ONNX file needs onnxruntime ({e})') from None
  options = ort.SessionOptions()
  options.intra_op_num_threads = threads
  options.inter_op_num_threads = 1
  try:
    session = ort.InferenceSession(path, options, providers=['CPUExecutionProvider'])
    return np.asarray(session.run([OUTPUT_NAME], {INPUT_NAME: images})[0], np.float32)
  except Exception as e:  # pylint: disable=broad-except
    # onnxruntime raises its own exception types for unreadable or invalid graphs.
    raise ExportCheckError(f'ONNX Runtime cannot run {path!r}: '
                           f'{str(e).splitlines()[0] if str(e) else type(e).__name__}') from None


# ---------------------------------------------------------------------------
# StableHLO: jax.export.
# ---------------------------------------------------------------------------

def write_stablehlo(source: Source, path: str, preprocess: bool = False) -> None:
  """`jax.export` of the forward pass (weights as constants, symbolic batch), serialised."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  if preprocess:
    raise ValueError('--preprocess is for --format onnx: a resize from any input size needs '
                     'static shapes in jax.export; resize and scale before calling the '
                     'StableHLO export (x / 127.5 - 1)')
  model = flax_model(source)
  params = jax.tree_util.tree_map(jnp.asarray, source.params)
  forward = jax.jit(lambda images: model.apply({'params': params}, images, train=False)[0])
  batch, = jax.export.symbolic_shape('batch')
  spec = jax.ShapeDtypeStruct((batch, *source.image_size, 3), jnp.float32)
  exported = jax.export.export(forward)(spec)
  with open(path, 'wb') as f:
    f.write(exported.serialize())


def run_stablehlo(path: str, images: np.ndarray) -> np.ndarray:
  """Logits of a serialised `jax.export` file on `images`."""
  import jax  # pylint: disable=g-import-not-at-top
  with open(path, 'rb') as f:
    data = f.read()
  try:
    exported = jax.export.deserialize(bytearray(data))
  except Exception as e:  # pylint: disable=broad-except
    raise ExportCheckError(f'jax.export cannot read {path!r}: {type(e).__name__}: '
                           f'{str(e).splitlines()[0] if str(e) else ""}') from None
  return np.asarray(exported.call(images), np.float32)


# ---------------------------------------------------------------------------
# The check, files and CLI.
# ---------------------------------------------------------------------------

def check_images(source: Source, batch: int, preprocess: bool) -> np.ndarray:
  """Random check inputs: [-1, 1] float32, or uint8 of another size than the model's."""
  rng = np.random.default_rng(CHECK_SEED + batch)
  h, w = source.image_size
  if preprocess:
    return rng.integers(0, 256, (batch, h * 3 // 2, w + 4, 3), dtype=np.uint8)
  return rng.uniform(-1, 1, (batch, h, w, 3)).astype(np.float32)


def verify(path: str, fmt: str, source: Source, preprocess: bool = False,
           tolerance: float = TOLERANCE) -> dict[int, float]:
  """Runs the written file on batches of 1 and 5 and compares with the JAX model.

  Returns {batch: max |logit difference|}. Above `tolerance` x max(1, max
  |logit|) (or a file that
  does not run) the file is deleted and ExportCheckError names the difference.
  """
  reference = jax_logits(source)
  checks = {}
  try:
    for batch in CHECK_BATCHES:
      images = check_images(source, batch, preprocess)
      want = reference(scale_uint8(images, source.image_size) if preprocess else images)
      got = run_onnx(path, images) if fmt == 'onnx' else run_stablehlo(path, images)
      if got.shape != want.shape:
        raise ExportCheckError(f'{path}: logits of shape {got.shape} at batch {batch}, '
                               f'expected {want.shape}')
      diff = float(np.max(np.abs(got.astype(np.float64) - want)))
      # As vit_jax.convert checks: float32 rounding grows with the logits' size.
      scale = max(1.0, float(np.max(np.abs(want))))
      if not np.isfinite(diff) or diff > tolerance * scale:
        raise ExportCheckError(
            f'{path} does not compute the JAX model: max |logit difference| {diff:.3g} at '
            f'batch {batch} exceeds {tolerance:g} x {scale:.3g} (max |logit|); '
            'the file was deleted')
      checks[batch] = diff
  except BaseException:
    _remove(path)
    raise
  return checks


def _remove(path: str) -> None:
  if os.path.lexists(path):
    os.remove(path)


def sidecar_paths(path: str) -> tuple[str, str]:
  """(labels, metadata) beside an export, named after its whole file name:
  NAME.onnx.labels.txt and NAME.onnx.json (so NAME.onnx and NAME.stablehlo keep their own)."""
  return f'{path}.labels.txt', f'{path}.json'


def _sha256(path: str) -> str:
  digest = hashlib.sha256()
  with open(path, 'rb') as f:
    for chunk in iter(lambda: f.read(1 << 20), b''):
      digest.update(chunk)
  return digest.hexdigest()


def _versions(fmt: str) -> dict:
  import jax  # pylint: disable=g-import-not-at-top
  versions = {'jax': jax.__version__}
  if fmt == 'onnx':
    import onnxruntime  # pylint: disable=g-import-not-at-top
    import timm  # pylint: disable=g-import-not-at-top
    import torch  # pylint: disable=g-import-not-at-top
    versions.update(torch=torch.__version__, timm=timm.__version__,
                    onnxruntime=onnxruntime.__version__)
  return versions


def metadata(source: Source, fmt: str, path: str, checks: dict, preprocess: bool,
             labels_file: str, tolerance: float, opset: Optional[int]) -> dict:
  h, w = source.image_size
  if preprocess:
    images = {'name': INPUT_NAME, 'shape': ['batch', 'height', 'width', 3], 'dtype': 'uint8',
              'layout': 'NHWC', 'range': [0, 255], 'color': 'RGB'}
    steps = [f'bilinear resize to {h}x{w} (half-pixel centres, no antialiasing)',
             'x / 127.5 - 1']
  else:
    images = {'name': INPUT_NAME, 'shape': ['batch', h, w, 3], 'dtype': 'float32',
              'layout': 'NHWC', 'range': [-1.0, 1.0], 'color': 'RGB'}
    steps = []
  return {
      'format': fmt,
      'file': os.path.basename(path),
      'sha256': _sha256(path),
      'model': source.name,
      'model_config': source.model_config.to_dict(),
      'num_classes': source.num_classes,
      'image_size': [h, w],
      'input': images,
      'output': {'name': OUTPUT_NAME, 'shape': ['batch', source.num_classes],
                 'dtype': 'float32'},
      'preprocessing': {
          'in_graph': steps,
          'caller': ([] if preprocess else
                     [f'resize RGB to {h}x{w} (bilinear, no crop)', 'x / 127.5 - 1']),
      },
      'labels': os.path.basename(labels_file),
      'source_checkpoint': source.path,
      'check': {'tolerance': tolerance,
                'max_abs_logit_diff': {str(b): d for b, d in checks.items()},
                'reference': 'the JAX model (float32) on random inputs'},
      'onnx_opset': opset,
      'versions': _versions(fmt),
      'created': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
  }


def _staging(path: str) -> str:
  """A hidden sibling of `path` ending in its name: written and checked there, then moved."""
  directory, base = os.path.split(path)
  return os.path.join(directory, f'.partial-{os.getpid()}-{base}')


def check_values(fmt: str, tolerance: float, opset: int) -> None:
  """Refuses values no export can honour, before anything is loaded."""
  if fmt not in FORMATS:
    raise ValueError(f'--format must be one of {", ".join(FORMATS)}, got {fmt!r}')
  if not (math.isfinite(tolerance) and tolerance > 0):
    raise ValueError(f'--tolerance must be a positive finite number (the check compares '
                     f'logits to it), got {tolerance!r}')
  if not 1 <= opset <= MAX_OPSET:
    raise ValueError(f'--opset must be an ONNX opset from 1 to {MAX_OPSET}, got {opset}')


def export(checkpoint_path: str, fmt: str, out: str, *, model: Optional[str] = None,
           config: Optional[str] = None, image_size: Optional[Sequence[int]] = None,
           preprocess: bool = False, labels: Optional[str] = None,
           tolerance: float = TOLERANCE, opset: int = ONNX_OPSET,
           source: Optional[Source] = None) -> Exported:
  """Loads, writes `out` in `fmt`, checks it against JAX, writes the labels and JSON beside it.

  Everything is written beside `out` under hidden staging names and checked
  there; only a checked export replaces `out` and its sidecars. A failed export
  leaves what was there before untouched (and no staging file).
  """
  from vit_jax import predict  # pylint: disable=g-import-not-at-top
  check_values(fmt, tolerance, opset)
  out = os.path.abspath(os.path.expanduser(out))
  if os.path.isdir(out):
    raise IsADirectoryError(errno.EISDIR, 'is a directory (--out names the file to write)', out)
  if source is None:
    source = load(checkpoint_path, model, config, image_size)
  if fmt == 'onnx':
    reason = onnx_refusal(source)
    if reason:
      raise ValueError(f'cannot export {source.name} to ONNX: {reason}')
  elif preprocess:
    write_stablehlo(source, out, preprocess)  # raises, naming why
  names = predict.class_names(source.num_classes, labels)
  os.makedirs(os.path.dirname(out), exist_ok=True)
  final = (out, *sidecar_paths(out))
  staged = tuple(_staging(path) for path in final)
  model_path, labels_path, meta_path = staged
  try:
    if fmt == 'onnx':
      write_onnx(source, model_path, preprocess, opset)
    else:
      write_stablehlo(source, model_path)
    checks = verify(model_path, fmt, source, preprocess, tolerance)
    with open(labels_path, 'w', encoding='utf-8') as f:
      f.write(''.join(f'{n}\n' for n in names))
    meta = metadata(source, fmt, model_path, checks, preprocess, final[1], tolerance,
                    opset if fmt == 'onnx' else None)
    meta['file'] = os.path.basename(out)
    with open(meta_path, 'w', encoding='utf-8') as f:
      json.dump(meta, f, indent=2)
      f.write('\n')
    for path, target in zip(staged, final):  # the model first, its description last
      os.replace(path, target)
  finally:
    for path in staged:
      _remove(path)
  return Exported(out, fmt, checks, final[1], final[2])


def _image_size(text: str) -> tuple[int, int]:
  from vit_jax import predict  # pylint: disable=g-import-not-at-top
  return predict._argparse_image_size(text)  # pylint: disable=protected-access


def _main(argv: Sequence[str]) -> int:
  parser = cli.ArgumentParser(
      prog='python -m vit_jax.export',
      description='Export a checkpoint to ONNX or StableHLO (weights inside, dynamic batch, '
                  'input "images" NHWC float32 in [-1, 1], output "logits"). The file is run '
                  'on batches of 1 and 5 and compared with the JAX model before it is kept.')
  parser.add_argument('--checkpoint', required=True,
                      help="a training run's workdir (its newest checkpoint) or an .npz")
  which = parser.add_mutually_exclusive_group()
  which.add_argument('--model', default=None, help='model preset, e.g. ViT-B_16 (default: '
                     "the run's)")
  which.add_argument('--config', default=None,
                     help='config file whose model to use, e.g. configs/default.py')
  parser.add_argument('--image_size', type=_image_size, default=None,
                      help="H or HxW (default: the run's or the checkpoint's own); another "
                      'patch grid resamples the position embeddings')
  parser.add_argument('--format', required=True, choices=FORMATS)
  parser.add_argument('--out', required=True, help='file to write (.onnx, .stablehlo)')
  parser.add_argument('--preprocess', action='store_true',
                      help='ONNX: take uint8 RGB images of any size; resize and scaling to '
                      '[-1, 1] are in the graph')
  parser.add_argument('--labels', default=None,
                      help='class names, one per line (default: ImageNet-1k for 1000 classes, '
                      'else indices)')
  parser.add_argument('--opset', type=int, default=ONNX_OPSET, help='ONNX opset')
  parser.add_argument('--tolerance', type=float, default=TOLERANCE,
                      help='largest max |logit difference| from the JAX model accepted')
  parser.add_argument('--verbose', action='store_true',
                      help=f'print the traceback of an error too (or set {cli.TRACEBACK_ENV}=1)')
  args = parser.parse_args(argv)
  check_values(args.format, args.tolerance, args.opset)
  cli.check_writable_dir(os.path.dirname(os.path.abspath(os.path.expanduser(args.out))),
                         '--out')
  result = export(args.checkpoint, args.format, args.out, model=args.model, config=args.config,
                  image_size=args.image_size, preprocess=args.preprocess, labels=args.labels,
                  tolerance=args.tolerance, opset=args.opset)
  diffs = ', '.join(f'batch {b} {d:.2g}' for b, d in result.checks.items())
  print(f'Wrote {result.path} ({result.format}; checked against JAX: max |logit difference| '
        f'{diffs})')
  print(f'  and {result.labels_path}, {result.metadata_path}')
  return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
  """The command; a user error (bad value, missing file, refused model, failed check) is
  one `error:` line and status 2, and leaves an earlier export at --out as it was."""
  return cli.run(_main, argv)


if __name__ == '__main__':
  cli.quiet_console()  # before TensorFlow and JAX's backends load
  sys.exit(main())
