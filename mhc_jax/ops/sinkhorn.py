"""Sinkhorn-Knopp projection onto the Birkhoff polytope (mHC paper Eq. 9).

Orientation: the output `A` is applied as `x_next = A @ x` (DESIGN.md). One iteration is
`T_r(T_c(M))`: normalise columns, then rows, so rows are exact at the end.

    M0 = exp(L - max L);  M_t = T_r(T_c(M_{t-1}));  A = M_iters

We start from a column softmax (`exp` then `T_c`, max-subtracted per column), which is the same
math with better range. With `eps > 0` every denominator gets `+eps` and the softmax gets `+eps`:
this is DeepSeek-V4's kernel (`hc_split_sinkhorn`) in our orientation, `A = comb^T`.
With `eps = 0` the denominators get the smallest normal float32 instead, a no-op for any normal
sum that keeps fully underflowed rows finite (logits of +-1e4 never give NaN).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

_TINY = float(jnp.finfo(jnp.float32).tiny)


def _sinkhorn_unrolled(logits: jax.Array, iters: int, eps: float) -> jax.Array:
  d = eps if eps > 0 else _TINY
  m = jax.nn.softmax(logits.astype(jnp.float32), axis=-2) + eps   # exp, then T_c
  m = m / (jnp.sum(m, axis=-1, keepdims=True) + d)                # T_r
  for _ in range(iters - 1):
    m = m / (jnp.sum(m, axis=-2, keepdims=True) + d)              # T_c
    m = m / (jnp.sum(m, axis=-1, keepdims=True) + d)              # T_r (rows exact)
  return m


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def _sinkhorn_recompute(logits, iters, eps):
  return _sinkhorn_unrolled(logits, iters, eps)


def _fwd(logits, iters, eps):
  # Residual: the logits only. The iterates are rebuilt in the backward pass.
  return _sinkhorn_unrolled(logits, iters, eps), logits


def _bwd(iters, eps, logits, g):
  _, vjp = jax.vjp(lambda l: _sinkhorn_unrolled(l, iters, eps), logits)
  return vjp(g)


_sinkhorn_recompute.defvjp(_fwd, _bwd)


def sinkhorn(logits: jax.Array, *, iters: int = 20, eps: float = 0.0,
             backward: str = "recompute") -> jax.Array:
  """Project `logits [..., n, n]` to a (nearly) doubly stochastic matrix, float32.

  Args:
    logits: `[..., n, n]` in any float dtype; math is float32.
    iters: number of (column, row) normalisation pairs, static, >= 1.
    eps: 0 for the paper's Eq. 9; 1e-6 for DeepSeek-V4 numerics.
    backward: "recompute" (custom VJP that stores only the logits and replays the
      iterations: exact, memory-light) or "autodiff" (plain autodiff through the loop;
      kept as a test oracle).
  """
  if int(iters) != iters or iters < 1:
    raise ValueError(f"sinkhorn: iters={iters!r} must be an integer >= 1")
  if eps < 0:
    raise ValueError(f"sinkhorn: eps={eps!r} must be >= 0")
  if logits.ndim < 2 or logits.shape[-1] != logits.shape[-2]:
    raise ValueError(f"sinkhorn: logits shape {logits.shape} must end in a square [n, n]")
  logits = logits.astype(jnp.float32)
  if backward == "recompute":
    return _sinkhorn_recompute(logits, int(iters), float(eps))
  if backward == "autodiff":
    return _sinkhorn_unrolled(logits, int(iters), float(eps))
  raise ValueError(f"sinkhorn: backward={backward!r}; allowed: 'recompute', 'autodiff'")
