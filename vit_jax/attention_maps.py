"""What a ViT's attention and position embeddings say, as numbers (NumPy only).

The quantities behind the paper's Section 4.5 figures, independent of any
plotting: patches of an image, the cosine similarity of position embeddings,
attention rollout (Abnar & Zuidema, 2020), the class token's attention, and
the mean attention distance per layer and head. vit_jax.visualize runs a model
and draws these.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np


def patch_grid(image: np.ndarray, patch_size: Sequence[int] | int) -> np.ndarray:
  """Cuts an (H, W, C) image into (rows, cols, ph, pw, C) non-overlapping patches.

  `rows * cols` is the number of tokens the patch embedding makes (without the
  class token). H and W must be multiples of the patch size.
  """
  image = np.asarray(image)
  ph, pw = as_pair(patch_size)
  height, width = image.shape[:2]
  if height % ph or width % pw:
    raise ValueError(f'image size {height}x{width} is not divisible by the patch '
                     f'size {ph}x{pw}')
  rows, cols = height // ph, width // pw
  patches = image.reshape(rows, ph, cols, pw, *image.shape[2:])
  return np.swapaxes(patches, 1, 2)


def position_embedding_similarity(pos_embedding: np.ndarray,
                                  grid_shape: Optional[Sequence[int]] = None
                                  ) -> np.ndarray:
  """Cosine similarity of every patch's position embedding with every other's.

  Args:
    pos_embedding: (1, tokens, D) or (tokens, D); leading tokens beyond
      rows*cols (the class token) are dropped.
    grid_shape: (rows, cols) of the patch grid; default: a square grid.

  Returns:
    (rows, cols, rows, cols) array: `sim[i, j]` is the map of patch (i, j)'s
    similarity with all patches, as in the paper's Fig. 7 (centre). Flattened
    to (rows*cols, rows*cols) it is symmetric with a unit diagonal.
  """
  emb = np.asarray(pos_embedding, np.float64)
  if emb.ndim == 3:
    emb = emb[0]
  if grid_shape is None:
    side = int(round(np.sqrt(emb.shape[0] - 1)))  # with a class token?
    if emb.shape[0] > 1 and side * side == emb.shape[0] - 1:
      grid_shape = (side, side)
  rows, cols = _grid_shape(emb.shape[0], grid_shape)
  emb = emb[emb.shape[0] - rows * cols:]
  unit = emb / np.maximum(np.linalg.norm(emb, axis=-1, keepdims=True), 1e-12)
  sim = np.clip(unit @ unit.T, -1.0, 1.0)
  return sim.reshape(rows, cols, rows, cols)


def stack_attention(attentions: Sequence[np.ndarray] | np.ndarray) -> np.ndarray:
  """(layers, batch, heads, tokens, tokens) float64 from the model's tuple."""
  stacked = np.stack([np.asarray(a, np.float64) for a in attentions])
  if stacked.ndim == 4:  # a single example without its batch axis
    stacked = stacked[:, None]
  if stacked.ndim != 5 or stacked.shape[-1] != stacked.shape[-2]:
    raise ValueError('attentions must be per-layer (batch, heads, tokens, tokens) '
                     f'arrays, got stacked shape {stacked.shape}')
  return stacked


def attention_rollout(attentions: Sequence[np.ndarray], *,
                      add_residual: bool = True) -> np.ndarray:
  """Attention rollout (Abnar & Zuidema, 2020) through all layers.

  Per layer the heads are averaged, the identity is added for the residual
  connection and rows are renormalised; the layer matrices are then multiplied
  from the first layer up: R = A_L ... A_2 A_1.

  Args:
    attentions: per layer, (batch, heads, tokens, tokens) with rows summing to 1.
    add_residual: add the identity before renormalising (the paper's variant).

  Returns:
    (batch, tokens, tokens); row q is how much each input token flows into
    output token q. Every row sums to 1.
  """
  stacked = stack_attention(attentions)
  num_tokens = stacked.shape[-1]
  rollout = np.broadcast_to(np.eye(num_tokens), stacked.shape[1:2] + (num_tokens,) * 2)
  for layer in stacked:
    a = layer.mean(axis=1)
    if add_residual:
      a = a + np.eye(num_tokens)
    a = a / a.sum(axis=-1, keepdims=True)
    rollout = a @ rollout
  return rollout


def _query_rows(matrix: np.ndarray, num_prefix_tokens: int) -> np.ndarray:
  """Attention of the class token (prefix 1) or, without one, of the mean query."""
  if num_prefix_tokens > 0:
    return matrix[..., 0, :]
  return matrix.mean(axis=-2)


def class_token_attention(attentions: Sequence[np.ndarray],
                          grid_shape: Optional[Sequence[int]] = None,
                          num_prefix_tokens: int = 1) -> np.ndarray:
  """Each layer's and head's attention from the class token to the patches.

  Returns (layers, batch, heads, rows, cols); each map is the class token's
  attention row restricted to the patch tokens (so it sums to at most 1).
  With `num_prefix_tokens=0` (global-average-pool models) the mean over all
  queries stands in for the class token.
  """
  stacked = stack_attention(attentions)
  rows, cols = _grid_shape(stacked.shape[-1] - num_prefix_tokens, grid_shape)
  maps = _query_rows(stacked, num_prefix_tokens)[..., num_prefix_tokens:]
  return maps.reshape(maps.shape[:-1] + (rows, cols))


def rollout_map(rollout: np.ndarray, grid_shape: Optional[Sequence[int]] = None,
                num_prefix_tokens: int = 1) -> np.ndarray:
  """The rollout row of the class token over the patch grid: (batch, rows, cols)."""
  rollout = np.asarray(rollout)
  rows, cols = _grid_shape(rollout.shape[-1] - num_prefix_tokens, grid_shape)
  m = _query_rows(rollout, num_prefix_tokens)[..., num_prefix_tokens:]
  return m.reshape(m.shape[:-1] + (rows, cols))


def patch_distances(grid_shape: Sequence[int], patch_size: Sequence[int] | int
                    ) -> np.ndarray:
  """(N, N) Euclidean distances in pixels between patch centres, N = rows*cols."""
  rows, cols = grid_shape
  ph, pw = as_pair(patch_size)
  yy, xx = np.meshgrid((np.arange(rows) + 0.5) * ph, (np.arange(cols) + 0.5) * pw,
                       indexing='ij')
  centres = np.stack([yy.ravel(), xx.ravel()], axis=-1)
  return np.linalg.norm(centres[:, None] - centres[None], axis=-1)


def mean_attention_distance(attentions: Sequence[np.ndarray],
                            patch_size: Sequence[int] | int,
                            grid_shape: Optional[Sequence[int]] = None,
                            num_prefix_tokens: int = 1) -> np.ndarray:
  """The paper's "attention distance" (Fig. 7 right), in pixels, per layer and head.

  For each patch query, the distances in image space to all patch keys are
  averaged with the attention weights as weights; the result is averaged over
  queries and images. Attention to the class token is left out and the
  patch-to-patch weights renormalised, so each value lies between 0 and the
  largest distance between two patch centres (less than the image diagonal).

  Returns (layers, heads).
  """
  stacked = stack_attention(attentions)
  rows, cols = _grid_shape(stacked.shape[-1] - num_prefix_tokens, grid_shape)
  a = stacked[..., num_prefix_tokens:, num_prefix_tokens:]
  a = a / np.maximum(a.sum(axis=-1, keepdims=True), 1e-12)
  dist = patch_distances((rows, cols), patch_size)
  per_query = np.einsum('lbhqk,qk->lbhq', a, dist)
  return per_query.mean(axis=(1, 3))


def softmax(logits: np.ndarray) -> np.ndarray:
  logits = np.asarray(logits, np.float64)
  z = np.exp(logits - logits.max(axis=-1, keepdims=True))
  return z / z.sum(axis=-1, keepdims=True)


def top_k(logits: np.ndarray, k: int = 5) -> tuple[np.ndarray, np.ndarray]:
  """(indices, probabilities) of the k most likely classes of one logits vector."""
  probs = softmax(np.asarray(logits).reshape(-1))
  k = min(k, probs.shape[0])
  order = np.argsort(-probs, kind='stable')[:k]
  return order, probs[order]


def as_pair(x: Sequence[int] | int) -> tuple[int, int]:
  """(a, a) for an int, (a, b) for a pair."""
  if isinstance(x, (int, np.integer)):
    return int(x), int(x)
  a, b = x
  return int(a), int(b)


def _grid_shape(num_patches: int, grid_shape: Optional[Sequence[int]]
                ) -> tuple[int, int]:
  if grid_shape is not None:
    rows, cols = as_pair(grid_shape)
    if rows * cols > num_patches:
      raise ValueError(f'grid {rows}x{cols} needs {rows * cols} tokens, have {num_patches}')
    return rows, cols
  side = int(round(np.sqrt(num_patches)))
  if side * side != num_patches:
    raise ValueError(f'{num_patches} patch tokens do not form a square grid; '
                     'pass grid_shape')
  return side, side
