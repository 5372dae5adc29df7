"""Connection mappings `(h_pre [..., n], h_post [..., n], h_res [..., n, n])`, float32.

mHC (paper Eqs. 7-9 in the fused form of Eqs. 14-19; packed layout in DESIGN.md):
    h       = (x_flat @ phi) * rsqrt(mean(x_flat^2) + norm_eps)       x_flat = vec(x) in R^{nC}
    H_pre   = sigmoid(a0 h_pre + b_pre) (+ pre_eps)
    H_post  = 2 sigmoid(a1 h_post + b_post)
    H_res   = sinkhorn(a2 mat(h_res) + b_res)                         mat() row-major
mHC-lite: H_res = sum_k softmax(a2 h_res + b_res)_k P_k,  P_k = eye(n)[perm_k].
HC (mHC paper Eq. 5, per-stream RMS norm x~_j):
    H_pre[j] = a0 tanh(theta_pre . x~_j) + b_pre[j],   H_post[j] = a1 tanh(theta_post . x~_j) + b_post[j]
    H_res[i, j] = a2 tanh(theta_res[i] . x~_j) + b_res[i, j]
"""
from __future__ import annotations

import functools
import itertools
import math
from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from mhc_jax.ops.sinkhorn import sinkhorn

_HIGHEST = jax.lax.Precision.HIGHEST


def mhc_width(n: int) -> int:
  """Packed width of the mHC projection: `[pre (n) | post (n) | res (n*n)]`."""
  return n * n + 2 * n


def mhc_lite_width(n: int) -> int:
  """Packed width of the mHC-lite projection: `[pre (n) | post (n) | res (n!)]`."""
  return math.factorial(n) + 2 * n


@functools.lru_cache(maxsize=None)
def permutation_matrices(n: int) -> np.ndarray:
  """`[n!, n, n]` float32; `P_k = eye(n)[perm_k]`, perms in itertools.permutations order."""
  perms = np.array(list(itertools.permutations(range(n))), dtype=np.int64)
  return np.eye(n, dtype=np.float32)[perms]


def projected_logits(x: jax.Array, phi: jax.Array, norm_eps: float,
                     axis: str | None = None) -> jax.Array:
  """`(vec(x) @ phi) * rsqrt(mean(vec(x)^2) + norm_eps)` in float32 (paper Eqs. 14-15).

  The RMS factor is applied after the matmul: one pass over x gives both the projection and the
  sum of squares. `axis`: x's features are split over this mesh axis (call inside `shard_map`;
  `x` is the local `[..., n, C/k]` block, `phi` the full `[n*C, w]`). Each shard contracts its own
  rows of phi (row `j*C + c`, stream-major), then one psum of `w + 1` floats per token
  (partial projection | partial sum of squares) completes both.
  """
  n, c_local = x.shape[-2:]
  w = phi.shape[-1]
  phi_f = phi.astype(jnp.float32).reshape(n, -1, w)
  if axis is not None:
    phi_f = jax.lax.dynamic_slice_in_dim(phi_f, jax.lax.axis_index(axis) * c_local, c_local, 1)
  xf = x.astype(jnp.float32)
  proj = jnp.einsum("...jc,jcw->...w", xf, phi_f, precision=_HIGHEST,
                    preferred_element_type=jnp.float32)
  sumsq = jnp.sum(jnp.square(xf), axis=(-2, -1))[..., None]
  if axis is not None:
    both = jax.lax.psum(jnp.concatenate([proj, sumsq], axis=-1), axis)
    proj, sumsq = both[..., :w], both[..., w:]
  return proj * jax.lax.rsqrt(sumsq / phi.shape[0] + norm_eps)


def _pre_post(logits: jax.Array, b: jax.Array, alpha: jax.Array, n: int, pre_eps: float):
  h_pre = jax.nn.sigmoid(alpha[0] * logits[..., :n] + b[:n]) + pre_eps
  h_post = 2.0 * jax.nn.sigmoid(alpha[1] * logits[..., n:2 * n] + b[n:2 * n])
  return h_pre, h_post


def _check_packed(name: str, x: jax.Array, params: Mapping[str, jax.Array], width: int,
                  axis: str | None = None):
  n, c = x.shape[-2:]
  if axis is not None:
    c *= jax.lax.axis_size(axis)
  _check_shapes(name, params, {"phi": (n * c, width), "b": (width,), "alpha": (3,)}, n, c)


def _check_shapes(name: str, params: Mapping[str, jax.Array], want: dict, n: int, c: int):
  """ValueError naming the mapping and the key when `params` lacks a key or has a wrong shape."""
  for key, shape in want.items():
    if key not in params:
      raise ValueError(f"{name}: params is missing {key!r} (needs {', '.join(want)})")
    if tuple(params[key].shape) != shape:
      raise ValueError(f"{name}: params[{key!r}] has shape {tuple(params[key].shape)}, "
                       f"expected {shape} for n={n}, C={c}")


def _packed_gates(x, params, width: int, norm_eps: float, pre_eps: float, axis, name: str):
  """`(H_pre, H_post, res)` of a packed `{phi, b, alpha}` site: the gates and the residual logits
  `alpha_res * h[2n:] + b[2n:]` that `H_res` is built from (Sinkhorn, or the permutation weights)."""
  n = x.shape[-2]
  _check_packed(name, x, params, width, axis)
  b = params["b"].astype(jnp.float32)
  alpha = params["alpha"].astype(jnp.float32)
  logits = projected_logits(x, params["phi"], norm_eps, axis)
  h_pre, h_post = _pre_post(logits, b, alpha, n, pre_eps)
  return h_pre, h_post, alpha[2] * logits[..., 2 * n:] + b[2 * n:]


def mhc_mappings(x: jax.Array, params: Mapping[str, jax.Array], *, sinkhorn_iters: int = 20,
                 sinkhorn_eps: float = 0.0, norm_eps: float = 1e-6, pre_eps: float = 0.0,
                 sinkhorn_backward: str = "recompute", axis: str | None = None):
  """mHC mappings from streams `x [..., n, C]` and packed `{phi, b, alpha}` (DESIGN.md).

  `axis`: x is a feature shard over this mesh axis (inside `shard_map`; see `projected_logits`);
  the mappings come out whole on every shard.
  """
  n = x.shape[-2]
  h_pre, h_post, res = _packed_gates(x, params, mhc_width(n), norm_eps, pre_eps, axis,
                                     "mhc_mappings")
  h_res = sinkhorn(res.reshape(*res.shape[:-1], n, n), iters=sinkhorn_iters, eps=sinkhorn_eps,
                   backward=sinkhorn_backward)
  return h_pre, h_post, h_res


def mhc_lite_mappings(x: jax.Array, params: Mapping[str, jax.Array], *, norm_eps: float = 1e-6,
                      pre_eps: float = 0.0, axis: str | None = None):
  """mHC-lite: `H_res` is a convex combination of the n! permutation matrices (exact).

  `axis`: as in `mhc_mappings`.
  """
  n = x.shape[-2]
  h_pre, h_post, res = _packed_gates(x, params, mhc_lite_width(n), norm_eps, pre_eps, axis,
                                     "mhc_lite_mappings")
  weights = jax.nn.softmax(res, axis=-1)
  h_res = jnp.einsum("...k,kij->...ij", weights, jnp.asarray(permutation_matrices(n)),
                     precision=_HIGHEST)
  return h_pre, h_post, h_res


def hc_mappings(x: jax.Array, params: Mapping[str, jax.Array], *, norm_eps: float = 1e-6):
  """HC (dynamic, tanh) mappings, mHC paper Eq. 5. Static HC: theta = 0."""
  n, c = x.shape[-2:]
  _check_shapes("hc_mappings", params,
                {"theta_pre": (c,), "theta_post": (c,), "theta_res": (n, c), "b_pre": (n,),
                 "b_post": (n,), "b_res": (n, n), "alpha": (3,)}, n, c)
  f32 = jnp.float32
  xf = x.astype(f32)
  theta = jnp.concatenate([params["theta_pre"][None], params["theta_post"][None],
                           params["theta_res"]], axis=0).astype(f32)          # [n+2, C]
  proj = jnp.einsum("...jc,kc->...jk", xf, theta, precision=_HIGHEST,
                    preferred_element_type=f32)                                # [..., n, n+2]
  inv_rms = jax.lax.rsqrt(jnp.mean(jnp.square(xf), axis=-1, keepdims=True) + norm_eps)
  t = jnp.tanh(proj * inv_rms)
  alpha = params["alpha"].astype(f32)
  h_pre = alpha[0] * t[..., 0] + params["b_pre"].astype(f32)
  h_post = alpha[1] * t[..., 1] + params["b_post"].astype(f32)
  # t[..., j, 2 + i] = tanh(theta_res[i] . x~_j): swap to [i, j].
  h_res = alpha[2] * jnp.swapaxes(t[..., 2:], -1, -2) + params["b_res"].astype(f32)
  return h_pre, h_post, h_res
