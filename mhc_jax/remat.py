"""Recompute (rematerialisation) policies for `ModelConfig.remat`.

  none       save everything (no recompute)
  full       recompute each block in the backward pass (`jax.checkpoint`, nothing saved)
  dots       save matmul outputs without batch dimensions (`dots_with_no_batch_dims_saveable`)
  mhc_paper  the mHC paper's recompute groups (Eq. 20): blocks in groups of `mhc_paper_group`, the
             streams stored only at group boundaries, inside a group `mhc_paper_policy`
"""
from __future__ import annotations

import math

import jax

from mhc_jax.layers.connection import BRANCH_OUT, COEFFS

POLICIES = {
    "full": None,   # save nothing: recompute the whole block in the backward pass
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    # "mhc_paper" is not a per-block policy: see `mhc_paper_policy` and `mhc_jax.model.LM._grouped_blocks`.
}


def mhc_paper_group(n_streams: int, n_layers: int) -> int:
  """Blocks per recompute group for remat="mhc_paper" (mHC paper Eq. 20).

  The paper's L counts mHC-wrapped layers, i.e. sublayers (attention and MLP each): S = 2L here.
  Per token, a group of S_r sublayers stores its input streams (nC) and holds (n+2)C per sublayer
  while it is recomputed, so we take the exact integer optimum over whole blocks g (S_r = 2g):
      g* = argmin_g  n * ceil(L / g) + (n + 2) * 2g        (~ sqrt(nS/(n+2)) / 2 blocks)
  """
  cost = lambda g: n_streams * math.ceil(n_layers / g) + (n_streams + 2) * 2 * g  # noqa: E731
  return min(range(1, n_layers + 1), key=cost)


def mhc_paper_policy(n_streams: int):
  """Saveable values inside a recompute group (Eq. 20 / Table 3 of the mHC paper).

  Saved: each sublayer's branch output `y` and mapping coefficients (`checkpoint_name`s in
  `layers/connection.py`), and every matmul output of the attention / MLP branches (so the backward
  pass never recomputes them) and of the small mapping projection `x phi`. Not saved: the stream
  states, `H_pre x` and `RMSNorm(H_pre x)`, i.e. everything else; the stream-mixing contractions
  (batched dots contracting only over the n-sized stream axis) are excluded from the saved matmuls.

  A policy sees only a primitive and its operands' shapes, not which op produced it, so the stream
  mix is recognised by that structure; a batched dot whose contracted dimensions all happen to equal
  n (e.g. attention with head_dim == n) would be recomputed too (slower backward, same values).
  """
  names = jax.checkpoint_policies.save_only_these_names(BRANCH_OUT, COEFFS)

  def policy(prim, *avals, **params):
    if prim is jax.lax.dot_general_p:
      (lhs_c, _), (lhs_b, _) = params["dimension_numbers"]
      stream_mix = bool(lhs_b) and all(avals[0].shape[d] == n_streams for d in lhs_c)
      return not stream_mix
    return names(prim, *avals, **params)
  return policy
