"""Activation rematerialisation of the encoder blocks: the model field `remat_policy`.

Training memory is mostly the activations each block keeps for its backward pass.
A policy says which of them a block keeps; the rest is recomputed from the
block's input while the gradient flows back:

  'none'   keep everything (fastest, most memory)
  'dots'   keep the outputs of the weight matmuls (q, k, v, the attention output
           projection, both MLP layers); recompute the attention scores and
           probabilities, layer norms and GELU (`dots_with_no_batch_dims_saveable`)
  'block'  keep only each block's input; recompute the whole block (the "full"
           per-block remat: one extra forward pass)

The published parameter tree is the same under every policy.

Why the recomputation is tied to the incoming gradient: `jax.checkpoint` stops
XLA from merging the recomputation back into the forward pass with an
optimization barrier, but XLA:CPU removes those barriers before its common-
subexpression pass, so on a CPU the policy silently changes nothing (measured:
same compiled temp memory, same number of dots). Adding a zero that depends on
the cotangent to every saved residual makes the recomputation different from the
forward computation and unable to run before the backward pass reaches the
block, on every backend; it costs one fused add per residual.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

POLICIES: dict[str, Optional[Callable[..., bool]]] = {
    'none': None,
    'dots': jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    'block': jax.checkpoint_policies.nothing_saveable,
}
DEFAULT = 'dots'


def check_policy(name: str) -> str:
  if name not in POLICIES:
    raise ValueError(f'remat_policy must be one of {sorted(POLICIES)}, got {name!r}')
  return name


def _tie_to_cotangent(tree: Any, cotangent: Any) -> Any:
  """`tree` plus a zero computed from `cotangent` (XLA does not fold x * 0 for floats)."""
  zero = jax.tree.leaves(cotangent)[0].ravel()[0] * 0
  return jax.tree.map(
      lambda r: r + zero.astype(r.dtype) if jnp.issubdtype(r.dtype, jnp.inexact) else r, tree)


def apply_block(block_cls: type[nn.Module], policy: str, kwargs: dict[str, Any], name: str,
                x: jax.Array, *static_args: Any) -> Any:
  """`block_cls(**kwargs, name=name)(x, *static_args)` under `policy`.

  Call from inside a compact module: the block's variables live under `name`,
  exactly where a plain call would put them.
  """
  if check_policy(policy) == 'none':
    return block_cls(**kwargs, name=name)(x, *static_args)
  num_static = len(static_args)
  remat_cls = nn.remat(block_cls, policy=POLICIES[policy],
                       static_argnums=tuple(range(2, 2 + num_static)))
  block = remat_cls(**kwargs, name=name)

  def run(module, x):
    return module(x, *static_args)

  def forward(module, x):
    return nn.vjp(run, module, x)  # residuals: what the policy keeps, inside vjp_fn

  def backward(vjp_fn, cotangent):
    return _tie_to_cotangent(vjp_fn, cotangent)(cotangent)

  return nn.custom_vjp(run, forward_fn=forward, backward_fn=backward)(block, x)
