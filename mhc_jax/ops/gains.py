"""Amax gain magnitudes of products of mixing matrices (mHC paper Sec. 3.1, Fig. 3).

For a per-token matrix P (applied as x <- P x): forward gain = max_i |sum_j P_ij| (row sums),
backward gain = max_j |sum_i P_ij| (column sums).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def gain(p: jax.Array):
  """`(forward, backward)` Amax gains of `p [..., n, n]`."""
  p = p.astype(jnp.float32)
  return jnp.max(jnp.abs(jnp.sum(p, -1)), -1), jnp.max(jnp.abs(jnp.sum(p, -2)), -1)


def composite(h_res_layers: jax.Array) -> jax.Array:
  """`P = H_{L-1} ... H_1 H_0` of `h_res_layers [L, ..., n, n]` (layer 0 applied first)."""
  def step(p, h):
    return jnp.einsum("...ij,...jk->...ik", h, p, precision=jax.lax.Precision.HIGHEST), None
  h = h_res_layers.astype(jnp.float32)
  p, _ = jax.lax.scan(step, h[0], h[1:])
  return p


def composite_suffixes(h_res_layers: jax.Array) -> jax.Array:
  """`[L, ..., n, n]`: for each l, `P_l = H_{L-1} ... H_l`, the map from layer l to the output."""
  def step(p, h):
    p = jnp.einsum("...ij,...jk->...ik", p, h, precision=jax.lax.Precision.HIGHEST)
    return p, p
  h = h_res_layers.astype(jnp.float32)
  eye = jnp.broadcast_to(jnp.eye(h.shape[-1], dtype=jnp.float32), h.shape[1:])
  _, ps = jax.lax.scan(step, eye, h, reverse=True)
  return ps


def amax_gain(h_res_layers: jax.Array):
  """`(forward, backward)` gains of the composite `H_{L-1} ... H_0`, per token `[...]`."""
  return gain(composite(h_res_layers))
