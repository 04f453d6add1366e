"""What a Vision Transformer looks at: the pictures of the paper's Section 4.5.

Two layers, kept apart so the numbers can be tested without drawing anything:

* pure numpy functions that compute what each figure shows
  (`patch_grid`, `position_embedding_similarity`, `class_token_attention`,
  `attention_rollout`, `mean_attention_distance`, `top_k`);
* `plot_*` functions that each return a `matplotlib.figure.Figure` built with
  the object-oriented API (no pyplot state, any backend; files are written
  with Agg).

`analyze` runs a model once and collects every number; `write_figures`
turns an `Analysis` into PNG files. The command line does both:

  python -m vit_jax.visualize --model ViT-B_16 --checkpoint ViT-B_16.npz \
      --image cat.jpg --out /tmp/vis
  python -m vit_jax.visualize --workdir /tmp/digits --config configs/default.py \
      --image digits:test:0 --out /tmp/vis       # a `vit_jax.train` run
  python -m vit_jax.visualize --model ViT-Test_4 --random-init --image-size 32x48 \
      --image skimage:chelsea --out /tmp/vis

`--image` takes a file, `skimage:NAME` (a photo shipped with scikit-image,
e.g. `skimage:chelsea`, `skimage:astronaut`) or `digits:SPLIT:INDEX` (an image
of the embedded digits dataset). Repeated, or as a range `digits:test:0-127`,
it averages the mean attention distance over all the images; the other figures
show the first. `--palette` writes 256-colour PNGs, small enough for docs.
`--image-size` is H (square) or HxW; when it gives another patch grid than the
checkpoint's, the position embeddings are resampled to it
(`checkpoint.resize_posemb`, linear, as fine-tuning does).

An MLP-Mixer has no attention: for a Mixer preset the command writes the
Mixer paper's Figure 5 instead (`token_mixing.png`: the hidden units of the
first token-mixing MLPs, each unit's weights over the patches drawn as an image
of the patch grid), with the patch grid and the top-5 predictions.

The numbers behind the figures are vit_jax.attention_maps (NumPy only), the
images vit_jax.images; what stays here is running the model, the matplotlib
figures and the command line that ties a checkpoint, images and figures
together (the figures are most of this module's length).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from typing import Any, Optional, Sequence

import numpy as np
import jax
from PIL import Image

from vit_jax import attention_maps
from vit_jax import checkpoint
from vit_jax import cli
from vit_jax import evaluate
from vit_jax import images as images_lib

from vit_jax import predict
from vit_jax import release_names
from vit_jax import train_checkpoints
from vit_jax.configs import models as model_configs
from vit_jax.configs import schema
from vit_jax.configs.image_size import image_hw

# Files written by `write_figures`, in order.
FIGURE_FILES = {
    'patches': 'patches.png',
    'position_embedding_similarity': 'position_embedding_similarity.png',
    'attention_maps': 'attention_maps.png',
    'attention_rollout': 'attention_rollout.png',
    'attention_distance': 'attention_distance.png',
    'top_k': 'top5.png',
}
PNG_MAGIC = b'\x89PNG\r\n\x1a\n'


# ----------------------------------------------------------------------------
# Running a model.
# ----------------------------------------------------------------------------

def _resize_float(values: np.ndarray, size: tuple[int, int]) -> np.ndarray:
  """Bilinear resize of a 2-D float array (PIL's 32-bit float mode)."""
  h, w = size
  return np.asarray(Image.fromarray(np.asarray(values, np.float32)).resize(
      (w, h), Image.BILINEAR))


@dataclasses.dataclass
class Analysis:
  """Everything the figures show, for one image (batch axis dropped)."""
  image: np.ndarray                  # uint8 (H, W, 3): the model's input
  patch_size: tuple[int, int]        # pixels per token
  grid_shape: tuple[int, int]
  num_prefix_tokens: int
  logits: np.ndarray                 # (classes,)
  attentions: np.ndarray             # (layers, heads, tokens, tokens)
  position_similarity: Optional[np.ndarray]  # (rows, cols, rows, cols)
  class_attention: np.ndarray        # (layers, heads, rows, cols)
  rollout: np.ndarray                # (tokens, tokens)
  rollout_map: np.ndarray            # (rows, cols)
  attention_distance: np.ndarray     # (layers, heads), pixels
  labels: Optional[Sequence[str]] = None
  display_image: Optional[np.ndarray] = None  # same view, higher resolution
  distance_images: int = 1           # images averaged in `attention_distance`

  def top_k(self, k: int = 5) -> list[tuple[str, float]]:
    idx, probs = attention_maps.top_k(self.logits, k)
    return [(label_name(self.labels, int(i)), float(p)) for i, p in zip(idx, probs)]

  def summary(self) -> dict[str, Any]:
    return {
        'image_size': list(self.image.shape[:2]),
        'patch_size': list(self.patch_size),
        'grid_shape': list(self.grid_shape),
        'num_layers': int(self.attentions.shape[0]),
        'num_heads': int(self.attentions.shape[1]),
        'top5': [{'label': l, 'probability': p} for l, p in self.top_k(5)],
        'mean_attention_distance_px': self.attention_distance.round(3).tolist(),
        'mean_attention_distance_images': self.distance_images,
    }


def label_name(labels: Optional[Sequence[str]], index: int) -> str:
  if labels is not None and 0 <= index < len(labels):
    return str(labels[index])
  return f'class {index}'


def analyze(model, params, image: np.ndarray, labels: Optional[Sequence[str]] = None,
            display_image: Optional[np.ndarray] = None) -> Analysis:
  """Runs a `VisionTransformer` on one uint8 image and computes every figure's numbers.

  `image` must already have the model's input size (see `prepare_image`).
  """
  image = np.asarray(image)
  if not hasattr(model, 'patch_stride'):
    raise ValueError(f'{type(model).__name__} has no attention to visualise; '
                     'use a VisionTransformer')
  logits, out = _attention_forward(model)(params, images_lib.to_model_input(image))
  attentions = attention_maps.stack_attention([np.asarray(a) for a in out['attention_weights']])
  patch_size = tuple(int(s) for s in model.patch_stride)
  grid = (image.shape[0] // patch_size[0], image.shape[1] // patch_size[1])
  prefix = attentions.shape[-1] - grid[0] * grid[1]
  pos = _find_pos_embedding(params)
  rollout = attention_maps.attention_rollout(attentions)
  return Analysis(
      image=image.astype(np.uint8),
      patch_size=patch_size,
      grid_shape=grid,
      num_prefix_tokens=prefix,
      logits=np.asarray(logits[0]),
      attentions=attentions[:, 0],
      position_similarity=(None if pos is None
                           else attention_maps.position_embedding_similarity(pos, grid)),
      class_attention=attention_maps.class_token_attention(attentions, grid, prefix)[:, 0],
      rollout=rollout[0],
      rollout_map=attention_maps.rollout_map(rollout, grid, prefix)[0],
      attention_distance=attention_maps.mean_attention_distance(attentions, patch_size, grid, prefix),
      labels=labels,
      display_image=display_image,
  )


_FORWARD_CACHE: dict[str, Any] = {}


def _attention_forward(model):
  """The jitted forward pass returning attention weights, compiled once per model.

  Keyed by the module's repr (its full configuration): Flax modules holding
  dicts cannot be hashed.
  """
  key = repr(model)
  if key not in _FORWARD_CACHE:
    if len(_FORWARD_CACHE) >= 8:
      _FORWARD_CACHE.pop(next(iter(_FORWARD_CACHE)))
    _FORWARD_CACHE[key] = jax.jit(lambda p, x: model.apply(
        {'params': p}, x, train=False, return_attention=True))
  return _FORWARD_CACHE[key]


def attention_distance_over(model, params, images: np.ndarray,
                            batch_size: int = 64) -> np.ndarray:
  """`mean_attention_distance` (layers, heads) averaged over uint8 images (N, H, W, 3)."""
  images = np.asarray(images)
  forward = _attention_forward(model)
  patch_size = tuple(int(s) for s in model.patch_stride)
  grid = (images.shape[1] // patch_size[0], images.shape[2] // patch_size[1])
  total, count = 0.0, 0
  for start in range(0, len(images), batch_size):
    chunk = images[start:start + batch_size]
    _, out = forward(params, images_lib.to_model_input(chunk))
    attentions = [np.asarray(a) for a in out['attention_weights']]
    prefix = attentions[0].shape[-1] - grid[0] * grid[1]
    total = total + attention_maps.mean_attention_distance(attentions, patch_size, grid, prefix) * len(chunk)
    count += len(chunk)
  return total / count


def _find_pos_embedding(params) -> Optional[np.ndarray]:
  try:
    return np.asarray(params['Transformer']['posembed_input']['pos_embedding'])
  except (KeyError, TypeError):
    return None


# ----------------------------------------------------------------------------
# Figures.
# ----------------------------------------------------------------------------

def _figure(width: float, height: float):
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top
  return Figure(figsize=(width, height), dpi=100, layout='constrained')


def _shown(image: np.ndarray, display_image: Optional[np.ndarray]) -> np.ndarray:
  return image if display_image is None else display_image


def _overlay(ax, background: np.ndarray, heat: np.ndarray, title: str = '',
             alpha: float = 0.6, cmap: str = 'inferno') -> None:
  """Draws `heat` (rows, cols), stretched to its own range, over the image."""
  h, w = background.shape[:2]
  ax.imshow(background, extent=(0, w, h, 0), interpolation='nearest')
  ax.imshow(_stretch(heat), extent=(0, w, h, 0), cmap=cmap,
            alpha=alpha, vmin=0.0, vmax=1.0, interpolation='bilinear')
  ax.set_title(title, fontsize=8)
  ax.set_axis_off()


def _stretch(values: np.ndarray) -> np.ndarray:
  """Linearly maps the smallest value to 0 and the largest to 1 (constant: zeros)."""
  values = np.asarray(values, np.float64)
  low, high = float(values.min()), float(values.max())
  return (values - low) / (high - low) if high > low else np.zeros_like(values)


def plot_patch_grid(image: np.ndarray, patch_size: Sequence[int] | int,
                    display_image: Optional[np.ndarray] = None, max_tiles: int = 16):
  """Left: the image with the patch grid; right: the patches pulled apart."""
  patches = attention_maps.patch_grid(image, patch_size)
  rows, cols = patches.shape[:2]
  shown = _shown(image, display_image)
  fig = _figure(9, 4.5)
  left, right = fig.subfigures(1, 2)
  ax = left.add_subplot()
  h, w = shown.shape[:2]
  ax.imshow(shown, extent=(0, w, h, 0), interpolation='nearest')
  for r in range(1, rows):
    ax.axhline(r * h / rows, color='white', lw=0.8)
  for c in range(1, cols):
    ax.axvline(c * w / cols, color='white', lw=0.8)
  ax.set_title(f'{image.shape[0]}x{image.shape[1]} image, '
               f'{rows}x{cols} = {rows * cols} patches of '
               f'{attention_maps.as_pair(patch_size)[0]}x{attention_maps.as_pair(patch_size)[1]}', fontsize=9)
  ax.set_axis_off()
  # Pulled apart: one small axis per patch, subsampled for very fine grids.
  step = max(1, int(np.ceil(max(rows, cols) / max_tiles)))
  sub_rows, sub_cols = range(0, rows, step), range(0, cols, step)
  axes = right.subplots(len(sub_rows), len(sub_cols), squeeze=False,
                        gridspec_kw=dict(wspace=0.06, hspace=0.06))
  ph = h / rows
  pw = w / cols
  for i, r in enumerate(sub_rows):
    for j, c in enumerate(sub_cols):
      tile = shown[int(round(r * ph)):int(round((r + 1) * ph)),
                   int(round(c * pw)):int(round((c + 1) * pw))]
      axes[i, j].imshow(tile, interpolation='nearest')
      axes[i, j].set_axis_off()
  right.suptitle('patches' + (f' (every {step}th)' if step > 1 else ''), fontsize=9)
  return fig


def _mosaic(tiles: np.ndarray, pad: int = 1) -> np.ndarray:
  """(R, C, h, w) tiles -> one (R*(h+pad)-pad, C*(w+pad)-pad) array, NaN between tiles."""
  rows, cols, h, w = tiles.shape
  out = np.full((rows * (h + pad) - pad, cols * (w + pad) - pad), np.nan)
  for r in range(rows):
    for c in range(cols):
      out[r * (h + pad):r * (h + pad) + h, c * (w + pad):c * (w + pad) + w] = tiles[r, c]
  return out


def plot_position_embedding_similarity(similarity: np.ndarray):
  """Paper Fig. 7 (centre): tile (i, j) shows patch (i, j)'s similarity to all patches."""
  rows, cols = similarity.shape[:2]
  fig = _figure(5.6, 5)
  ax = fig.add_subplot()
  pad = 1 if max(rows, cols) > 1 else 0
  image = ax.imshow(_mosaic(similarity, pad), cmap='viridis', vmin=-1, vmax=1,
                    interpolation='nearest')
  step_r, step_c = rows + pad, cols + pad
  ax.set_xticks(np.arange(cols) * step_c + (cols - 1) / 2)
  ax.set_xticklabels([str(c + 1) for c in range(cols)], fontsize=6)
  ax.set_yticks(np.arange(rows) * step_r + (rows - 1) / 2)
  ax.set_yticklabels([str(r + 1) for r in range(rows)], fontsize=6)
  ax.set_xlabel('input patch column')
  ax.set_ylabel('input patch row')
  ax.set_title('Position embedding similarity')
  ax.tick_params(length=0)
  for side in ax.spines.values():
    side.set_visible(False)
  fig.colorbar(image, ax=ax, shrink=0.8, label='cosine similarity')
  return fig


def plot_attention_maps(image: np.ndarray, class_attention: np.ndarray,
                        display_image: Optional[np.ndarray] = None):
  """Class-token attention of every layer (rows) and head (columns) over the image."""
  layers, heads = class_attention.shape[:2]
  shown = _shown(image, display_image)
  if shown.shape[0] > 128:  # small tiles: a lighter picture looks the same
    shown = images_lib.resize(shown, (128, int(round(128 * shown.shape[1] / shown.shape[0]))))
  size = 1.6
  fig = _figure(size * heads + 0.6, size * layers + 0.5)
  axes = fig.subplots(layers, heads, squeeze=False)
  for l in range(layers):
    for h in range(heads):
      _overlay(axes[l, h], shown, class_attention[l, h], f'layer {l + 1}, head {h + 1}')
  fig.suptitle('Attention of the class token (each map stretched to its own range)',
               fontsize=10)
  return fig


def plot_attention_rollout(image: np.ndarray, rollout_grid: np.ndarray,
                           display_image: Optional[np.ndarray] = None,
                           title: Optional[str] = None):
  """The image, the rollout map over it, and the image masked by the map."""
  shown = _shown(image, display_image)
  fig = _figure(9, 3.3)
  axes = fig.subplots(1, 3)
  axes[0].imshow(shown, interpolation='nearest')
  axes[0].set_title('input', fontsize=9)
  axes[0].set_axis_off()
  _overlay(axes[1], shown, rollout_grid, 'attention rollout (all layers)')
  # Mask: upsample the map to the shown image and multiply.
  h, w = shown.shape[:2]
  rows, cols = rollout_grid.shape
  mask = np.asarray(_resize_float(_stretch(rollout_grid), (h, w)))[..., None]
  axes[2].imshow((shown.astype(np.float32) * mask).astype(np.uint8),
                 interpolation='nearest')
  axes[2].set_title('image x rollout', fontsize=9)
  axes[2].set_axis_off()
  if title:
    fig.suptitle(title, fontsize=10)
  return fig


def plot_attention_distance(distances: np.ndarray, image_size: Optional[Sequence[int]] = None,
                            num_images: Optional[int] = None,
                            uniform_reference: Optional[float] = None):
  """Paper Fig. 7 (right): mean attention distance of each head against depth.

  `uniform_reference` (e.g. `attention_maps.patch_distances(grid, patch).mean()`) draws the
  value a head attending uniformly to all patches would have.
  """
  distances = np.asarray(distances)
  layers, heads = distances.shape
  fig = _figure(5, 4)
  ax = fig.add_subplot()
  depth = np.arange(1, layers + 1)
  colors = _colors(heads)
  for h in range(heads):
    ax.scatter(depth, distances[:, h], s=18, color=colors[h], label=f'head {h + 1}')
  if uniform_reference is not None:
    ax.axhline(uniform_reference, color='grey', ls='--', lw=1,
               label='uniform attention')
  ax.set_xlabel('network depth (layer)')
  ax.set_ylabel('mean attention distance (pixels)')
  ax.set_xticks(depth)
  ax.set_ylim(bottom=0)
  if image_size is not None:
    ax.set_ylim(top=float(np.hypot(*attention_maps.as_pair(image_size))) / np.sqrt(2))
  if heads <= 16:
    ax.legend(fontsize=7, ncol=2 if heads > 6 else 1, loc='lower right', framealpha=0.9)
  ax.grid(alpha=0.3)
  ax.set_title('Mean attention distance per head' +
               (f' ({num_images} images)' if num_images else ''))
  return fig


def _colors(n: int):
  from matplotlib import colormaps  # pylint: disable=g-import-not-at-top
  cmap = colormaps['viridis']
  return [cmap(i / max(n - 1, 1)) for i in range(n)]


def plot_top_k(predictions: Sequence[tuple[str, float]], title: str = 'Top-5 predictions'):
  """Horizontal bar chart of (label, probability) pairs, most likely on top."""
  labels = [l for l, _ in predictions]
  probs = [p for _, p in predictions]
  fig = _figure(5.5, 0.45 * len(labels) + 1.2)
  ax = fig.add_subplot()
  y = np.arange(len(labels))
  ax.barh(y, probs, color='tab:blue')
  ax.set_yticks(y)
  ax.set_yticklabels([_shorten(l) for l in labels], fontsize=8)
  ax.invert_yaxis()
  ax.set_xlim(0, 1.12)
  for yi, p in zip(y, probs):
    ax.text(p + 0.01, yi, f'{p:.1%}', va='center', fontsize=8)
  ax.set_xlabel('probability')
  ax.set_title(title, fontsize=10)
  return fig


def _shorten(label: str, width: int = 28) -> str:
  return label if len(label) <= width else label[:width - 1] + '…'


def figures(analysis: Analysis) -> dict[str, Any]:
  """Every figure of an `Analysis`, keyed like `FIGURE_FILES`."""
  a = analysis
  out = {'patches': plot_patch_grid(a.image, a.patch_size, a.display_image)}
  if a.position_similarity is not None:
    out['position_embedding_similarity'] = plot_position_embedding_similarity(
        a.position_similarity)
  out['attention_maps'] = plot_attention_maps(a.image, a.class_attention, a.display_image)
  out['attention_rollout'] = plot_attention_rollout(a.image, a.rollout_map,
                                                    a.display_image)
  out['attention_distance'] = plot_attention_distance(
      a.attention_distance, a.image.shape[:2], a.distance_images,
      float(attention_maps.patch_distances(a.grid_shape, a.patch_size).mean()))
  out['top_k'] = plot_top_k(a.top_k(5))
  return out


def save_figure(fig, path: str, dpi: int = 100, palette: bool = False) -> str:
  """Writes a Figure as PNG with the Agg canvas (no pyplot, no display needed).

  `palette=True` stores 256 colours instead of full RGB: files about 2-3x
  smaller (for documentation), with slight banding in smooth gradients.
  """
  from matplotlib.backends.backend_agg import FigureCanvasAgg  # pylint: disable=g-import-not-at-top
  FigureCanvasAgg(fig)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path, format='png', dpi=dpi)
  if palette:
    with Image.open(path) as im:
      rgb = im.convert('RGB')
    rgb.quantize(colors=256, method=Image.Quantize.MEDIANCUT,
                 dither=Image.Dither.NONE).save(path, format='PNG', optimize=True)
  return path


def write_figures(analysis: Analysis, out_dir: str, dpi: int = 100,
                  palette: bool = False) -> dict[str, str]:
  """Writes every figure as PNG plus `analysis.json`; returns {name: path}."""
  os.makedirs(out_dir, exist_ok=True)
  paths = {}
  for name, fig in figures(analysis).items():
    paths[name] = save_figure(fig, os.path.join(out_dir, FIGURE_FILES[name]), dpi, palette)
  with open(os.path.join(out_dir, 'analysis.json'), 'w') as f:
    json.dump(analysis.summary(), f, indent=2)
  return paths


# ----------------------------------------------------------------------------
# Inputs for the command line and the notebooks.
# ----------------------------------------------------------------------------

def read_labels(path: Optional[str], num_classes: int,
                dataset: Optional[str] = None) -> list[str]:
  """Class names: a file (one per line), 0-9 for digits, ImageNet-1k's for 1000 classes."""
  if not path and dataset == 'digits' and num_classes == 10:
    return [str(i) for i in range(10)]
  return predict.class_names(num_classes, path)


def load_params(path: str) -> dict:
  """Parameters (nested dict) from a published-format `.npz`."""
  return checkpoint.load(path)


def image_size_from_params(params, patch_stride: Sequence[int]) -> Optional[int]:
  """Square input size implied by the position embeddings (a Mixer's token-mixing
  weights), if it is unambiguous.

  A non-square grid cannot be read off the token count: then None.
  """
  pos = _find_pos_embedding(params)
  if pos is None:
    try:
      return checkpoint.mixer_grid(checkpoint.flatten(params))[0] * int(patch_stride[0])
    except ValueError:
      return None
  tokens = pos.shape[1]
  for prefix in (1, 0):
    side = int(round(np.sqrt(tokens - prefix)))
    if side * side == tokens - prefix:
      return side * int(patch_stride[0])
  return None


def fit_position_embedding(params: dict, patch_stride: Sequence[int],
                           image_size: int | Sequence[int]) -> dict:
  """`params` with position embeddings for `image_size`, resampled if the grid differs.

  The stored grid must be square (its token count says nothing else) unless it
  already has the new grid's token count. Resampling is the reference's linear
  one (`checkpoint.resize_posemb`), as fine-tuning at a new resolution does.
  """
  pos = _find_pos_embedding(params)
  if pos is None:
    return params
  height, width = attention_maps.as_pair(image_size)
  ph, pw = attention_maps.as_pair(patch_stride)
  new_grid = (height // ph, width // pw)
  prefix = 1 if 'cls' in params else 0
  tokens = pos.shape[1] - prefix
  if tokens == new_grid[0] * new_grid[1]:
    return params
  side = int(np.sqrt(tokens))
  if side * side != tokens:
    raise ValueError(f'the position embeddings have {tokens} patch tokens, not a square '
                     f'grid, and {height}x{width} input needs {new_grid[0]}x{new_grid[1]}')
  resized = checkpoint.resize_posemb(pos, new_grid, prefix, old_grid=(side, side))
  params = dict(params)
  params['Transformer'] = dict(params['Transformer'])
  params['Transformer']['posembed_input'] = dict(params['Transformer']['posembed_input'],
                                                 pos_embedding=resized)
  return params


def params_from_workdir(workdir: str) -> tuple[dict, dict]:
  """(params, run metadata) of a `vit_jax.train` run.

  Prefers `workdir/params.npz` (written with `config.export_params`), else the
  newest run checkpoint; the metadata (model_name, dataset, step) comes from
  that checkpoint when there is one.
  """
  from vit_jax import storage  # pylint: disable=g-import-not-at-top
  meta: dict = {}
  params = None
  exported = storage.join(workdir, 'params.npz')
  if storage.isdir(storage.join(workdir, train_checkpoints.CHECKPOINT_DIR)):
    checkpointer = train_checkpoints.RunCheckpointer(workdir, max_to_keep=None,
                                                     async_save=False)
    try:
      state, meta = checkpointer.restore_latest()
    finally:
      checkpointer.close()
    meta = dict(meta or {})
    if state is not None and not storage.exists(exported):
      params = state['params'] if isinstance(state, dict) else state.params
  if storage.exists(exported):
    params = load_params(exported)
  if params is None:
    raise SystemExit(f'{workdir} holds neither params.npz nor a run checkpoint')
  return jax_to_numpy(params), meta


def jax_to_numpy(tree):
  return jax.tree.map(np.asarray, tree)


def build_from_args(args) -> tuple[Any, dict, tuple[int, int], Optional[str]]:
  """(model, params, (height, width), dataset name) from the command-line flags."""

  model_config, dataset, params = None, None, None
  image_size = args.image_size
  if args.config:
    config = schema.resolve(schema.load_file(args.config))
    model_config = schema.model_config(config)
    image_size = image_size or tuple(config.image_size)
    dataset = config.dataset
  if args.workdir:
    params, meta = params_from_workdir(args.workdir)
    run = evaluate.run_model_fields(args.workdir)
    if model_config is None and not args.model and run is not None:
      # The run's preset with its overrides (e.g. a Mixer's token MLP widened for its grid).
      config = schema.resolve(run)
      model_config = schema.model_config(config)
      image_size = image_size or tuple(config.image_size)
    elif model_config is None and meta.get('model_name') and not args.model:
      model_config = model_configs.get_config(meta['model_name'])
    dataset = dataset or meta.get('dataset')
  if args.checkpoint and (args.model or model_config is None):
    # A release file name says which preset it holds; a --model that does not fit is refused.
    model = release_names.preset_for(args.checkpoint, args.model)
    if model:
      model_config = model_configs.get_config(model)
  elif args.model:
    model_config = model_configs.get_config(args.model)
  if model_config is None:
    raise SystemExit('--model is required (or --config / --workdir naming one, or a '
                     'checkpoint named like a released file)')
  if args.checkpoint:
    params = load_params(args.checkpoint)
  if params is not None:
    num_classes = int(np.asarray(params['head']['kernel']).shape[-1])
  else:
    num_classes = args.num_classes or 1000
  model = model_configs.build_model(model_config, num_classes)
  if not hasattr(model, 'patch_stride'):
    raise SystemExit(f'{model_config.name} is not a Vision Transformer: '
                     'it has no attention to visualise')
  if image_size is None and params is not None:
    image_size = image_size_from_params(params, model.patch_stride)
  image_size = image_hw(image_size or 224)
  if params is not None:
    try:
      params = fit_position_embedding(params, model.patch_stride, image_size)
    except ValueError as e:
      raise SystemExit(f'--image-size {image_size[0]}x{image_size[1]}: {e}') from None
  if params is None:
    if not args.random_init:
      raise SystemExit('give --checkpoint, --workdir or --random-init')
    dummy = np.zeros((1, *image_size, 3), np.float32)
    params = jax.jit(lambda r, x: model.init(r, x, train=False))(
        jax.random.PRNGKey(args.seed), dummy)['params']
  return model, params, image_size, dataset


def _image_size_arg(text: str) -> tuple[int, int]:
  try:
    return predict.parse_image_size(text)
  except ValueError as e:
    raise argparse.ArgumentTypeError(str(e)) from None


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
  p = cli.ArgumentParser(
      prog='python -m vit_jax.visualize',

      description='Writes PNGs of what a Vision Transformer attends to: patch grid, '
                  'position-embedding similarity, class-token attention per layer and '
                  'head, attention rollout, mean attention distance and top-5 predictions.')
  p.add_argument('--model', help="preset name, e.g. 'ViT-B_16' or 'ViT-Digits_4'")
  p.add_argument('--checkpoint', help='published-format .npz parameters')
  p.add_argument('--workdir', help='a vit_jax.train working directory to take the params from')
  p.add_argument('--config', help='experiment config file (e.g. configs/default.py): '
                 'model preset with its overrides, image size and dataset')
  p.add_argument('--random-init', action='store_true',
                 help='use randomly initialised parameters (for smoke tests)')
  p.add_argument('--num-classes', type=int, help='classes for --random-init (default 1000)')
  p.add_argument('--image', action='append',
                 help='image file, skimage:NAME or digits:SPLIT:INDEX (default skimage:chelsea); '
                 'repeat it, or give digits:SPLIT:A-B, to average the attention distance over '
                 'several images (the other figures show the first)')
  p.add_argument('--image-size', type=_image_size_arg,
                 help='model input size, H (square) or HxW (default: from the config or the '
                 'position embeddings, which are resampled when the patch grid differs)')
  p.add_argument('--display-size', type=int, default=224,
                 help='pixels of the images drawn under the overlays')
  p.add_argument('--labels', help='class names file, one per line')
  p.add_argument('--dpi', type=int, default=100)
  p.add_argument('--palette', action='store_true',
                 help='write 256-colour PNGs (2-3x smaller, e.g. for docs)')
  p.add_argument('--seed', type=int, default=0)
  p.add_argument('--out', required=True, help='output directory for the PNGs')
  p.add_argument('--verbose', action='store_true',
                 help=f'print the traceback of an error too (or set {cli.TRACEBACK_ENV}=1)')
  return p.parse_args(argv)



# ----------------------------------------------------------------------------
# MLP-Mixer: the Mixer paper's Figure 5.
# ----------------------------------------------------------------------------

MIXER_FIGURE_FILES = {'patches': 'patches.png', 'token_mixing': 'token_mixing.png',
                      'top_k': 'top5.png'}


def token_mixing_units(params, block: int, grid: Sequence[int],
                       max_units: Optional[int] = None) -> np.ndarray:
  """(units, rows, cols): block `block`'s token-mixing Dense_0 weights, one image per hidden unit.

  Each hidden unit of a token-mixing MLP has one weight per input patch, so its
  weights form an image of the patch grid (the Mixer paper's Figure 5). Units
  are sorted by the mean spatial frequency of their weights (low first), as the
  paper orders them by filter frequency.
  """
  flat = checkpoint.flatten(params)
  key = f'MixerBlock_{block}/token_mixing/Dense_0/kernel'
  if key not in flat:
    raise ValueError(f'no {key} in these parameters (not an MLP-Mixer, or fewer blocks)')
  kernel = np.asarray(flat[key], np.float32)
  rows, cols = (int(g) for g in grid)
  if kernel.shape[0] != rows * cols:
    raise ValueError(f'{key} mixes {kernel.shape[0]} patches, not a {rows}x{cols} grid')
  units = kernel.T.reshape(-1, rows, cols)
  power = np.abs(np.fft.fft2(units - units.mean(axis=(1, 2), keepdims=True))) ** 2
  fy = np.abs(np.fft.fftfreq(rows))[:, None]
  fx = np.abs(np.fft.fftfreq(cols))[None, :]
  frequency = (power * np.hypot(fy, fx)).sum(axis=(1, 2)) / np.maximum(
      power.sum(axis=(1, 2)), 1e-12)
  order = np.argsort(frequency, kind='stable')
  return units[order[:max_units] if max_units else order]


def plot_token_mixing(params, grid: Sequence[int], blocks: Sequence[int] = (0, 1, 2),
                      max_units: int = 64):
  """Figure 5 of the Mixer paper: the token-mixing units of `blocks`, one panel each."""
  fig = _figure(4.2 * len(blocks), 4.6)
  axes = fig.subplots(1, len(blocks), squeeze=False)[0]
  for ax, block in zip(axes, blocks):
    units = token_mixing_units(params, block, grid, max_units)
    # Each unit scaled on its own to [-1, 1]: the pattern, not the magnitude, is the point.
    units = units / np.maximum(np.abs(units).max(axis=(1, 2), keepdims=True), 1e-12)
    n, h, w = units.shape
    cols = int(np.ceil(np.sqrt(n)))
    rows = -(-n // cols)
    tiles = np.full((rows * cols, h, w), np.nan)
    tiles[:n] = units
    ax.imshow(_mosaic(tiles.reshape(rows, cols, h, w)), cmap='RdBu_r', vmin=-1, vmax=1,
              interpolation='nearest')
    ax.set_title(f'MixerBlock_{block}: {units.shape[0]} token-mixing units', fontsize=9)
    ax.set_axis_off()
  return fig


def _mixer_blocks(params) -> int:
  return sum(1 for k in params if k.startswith('MixerBlock_'))


def write_mixer_figures(model, params, image: np.ndarray, out_dir: str,
                        labels: Optional[Sequence[str]] = None,
                        display_image: Optional[np.ndarray] = None, dpi: int = 100,
                        palette: bool = False) -> tuple[dict[str, str], list]:
  """The Mixer figures (patch grid, Figure 5's token-mixing units, top-5) and analysis.json."""
  patch = tuple(int(s) for s in model.patch_stride)
  grid = (image.shape[0] // patch[0], image.shape[1] // patch[1])
  probs = np.asarray(predict.predict(model, params, images_lib.to_model_input(image)))[0]
  top = [(label_name(labels, i), p) for i, _, p in predict.top_k(probs, 5)]
  blocks = tuple(range(min(3, _mixer_blocks(params))))
  figs = {'patches': plot_patch_grid(image, patch, display_image),
          'token_mixing': plot_token_mixing(params, grid, blocks),
          'top_k': plot_top_k(top)}
  os.makedirs(out_dir, exist_ok=True)
  paths = {name: save_figure(fig, os.path.join(out_dir, MIXER_FIGURE_FILES[name]), dpi, palette)
           for name, fig in figs.items()}
  with open(os.path.join(out_dir, 'analysis.json'), 'w') as f:
    json.dump({'image_size': list(image.shape[:2]), 'patch_size': list(patch),
               'grid_shape': list(grid), 'token_mixing_blocks': list(blocks),
               'top5': [{'label': l, 'probability': p} for l, p in top]}, f, indent=2)
  return paths, top


def main(argv: Optional[Sequence[str]] = None) -> dict[str, str]:
  args = parse_args(argv)
  cli.check_writable_dir(args.out, '--out')
  model, params, image_size, dataset = build_from_args(args)

  num_classes = int(np.asarray(params['head']['kernel']).shape[-1])
  labels = read_labels(args.labels, num_classes, dataset)
  images = [image for spec in (args.image or ['skimage:chelsea'])
            for image in images_lib.load_images(spec, image_size)]
  model_input, shown = images_lib.prepare_image(images[0], image_size, args.display_size)
  if any(k.startswith('MixerBlock_') for k in params):
    paths, top = write_mixer_figures(model, params, model_input, args.out, labels, shown,
                                     args.dpi, args.palette)
    for name, path in paths.items():
      print(f'{name}: {path}')
    print('top-5: ' + ', '.join(f'{l} {p:.1%}' for l, p in top))
    return paths
  analysis = analyze(model, params, model_input, labels, shown)
  if len(images) > 1:
    inputs = np.stack([images_lib.prepare_image(im, image_size, 0)[0] for im in images])
    analysis.attention_distance = attention_distance_over(model, params, inputs)
    analysis.distance_images = len(images)
  paths = write_figures(analysis, args.out, args.dpi, args.palette)
  for name, path in paths.items():
    print(f'{name}: {path}')
  print('top-5: ' + ', '.join(f'{l} {p:.1%}' for l, p in analysis.top_k(5)))
  return paths


if __name__ == '__main__':
  cli.quiet_console()  # before TensorFlow and JAX's backends load
  sys.exit(cli.run(main))


