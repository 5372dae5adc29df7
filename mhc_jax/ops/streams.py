"""Stream operations on `[..., n, C]` residual streams (mHC paper Eq. 3).

    u         = sum_j h_pre[j] x[j]                          (stream_pre)
    x_next[i] = sum_j h_res[i, j] x[j] + h_post[i] y         (stream_post)

Mixing accumulates in float32 (or `acc_dtype`) and returns the stream dtype.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def expand_streams(h: jax.Array, n: int) -> jax.Array:
  """`[..., C] -> [..., n, C]`: n copies of the hidden state (HC paper Sec. 2.1)."""
  return jnp.broadcast_to(h[..., None, :], (*h.shape[:-1], n, h.shape[-1]))


def collapse_streams(x: jax.Array) -> jax.Array:
  """`[..., n, C] -> [..., C]`: unweighted sum over streams (HC paper Alg. 1)."""
  return jnp.sum(x, axis=-2, dtype=jnp.float32).astype(x.dtype)


def stream_pre(x: jax.Array, h_pre: jax.Array, *, acc_dtype=jnp.float32) -> jax.Array:
  """`u[..., c] = sum_j h_pre[..., j] x[..., j, c]`; x `[..., n, C]`, h_pre `[..., n]`."""
  u = jnp.einsum("...j,...jc->...c", h_pre.astype(acc_dtype), x.astype(acc_dtype),
                 preferred_element_type=acc_dtype)
  return u.astype(x.dtype)


def stream_post(x: jax.Array, y: jax.Array, h_res: jax.Array, h_post: jax.Array, *,
                acc_dtype=jnp.float32) -> jax.Array:
  """`x_next[i] = sum_j h_res[i, j] x[j] + h_post[i] y`; y `[..., C]`, h_res `[..., n, n]`."""
  mixed = jnp.einsum("...ij,...jc->...ic", h_res.astype(acc_dtype), x.astype(acc_dtype),
                     preferred_element_type=acc_dtype)
  out = mixed + h_post.astype(acc_dtype)[..., :, None] * y.astype(acc_dtype)[..., None, :]
  return out.astype(x.dtype)
