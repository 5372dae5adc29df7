"""Sinkhorn-Knopp projection onto the Birkhoff polytope (mHC paper Eq. 9).

Orientation: the output `A` is applied as `x_next = A @ x` (DESIGN.md). One iteration is
`T_r(T_c(M))`: normalise columns, then rows, so rows are exact at the end.

    M0 = exp(L - max L);  M_t = T_r(T_c(M_{t-1}));  A = M_iters

Two exact realisations of that math:
- `eps = 0` (the paper): the iterations run in the log domain, `f -= logsumexp(f, cols)`,
  `f -= logsumexp(f, rows)`, `A = exp(f)`. Identical to Eq. 9 in exact arithmetic, and every
  iterate stays finite for any finite logits (+-1e4 included), forward and backward: no row can
  underflow to all zeros and divide 0/0.
- `eps > 0` (DeepSeek-V4's kernel `hc_split_sinkhorn`, in our orientation `A = comb^T`): a
  max-subtracted column softmax plus `eps`, then `+eps` in every row/column denominator. The eps
  floor keeps every entry >= eps, so this path is finite too.

Layout: `token_major` iterates on `[..., n, n]` as given; `token_minor` moves the two n axes to the
front (`[n, n, ...]`, tokens in the minor/lane dimension) for the iterations and back at the end.
Same math and the same reductions; on TPU it avoids padding each n x n block to an (8, 128) tile.
`auto` is token_minor on TPU/GPU and token_major on CPU.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


def _iterate(f: jax.Array, iters: int, eps: float, col: int, row: int) -> jax.Array:
  """The iterations on float32 logits `f`; `col` / `row` are the axes summed by T_c / T_r."""
  if eps == 0:
    for _ in range(iters):
      f = f - jax.nn.logsumexp(f, axis=col, keepdims=True)        # T_c
      f = f - jax.nn.logsumexp(f, axis=row, keepdims=True)        # T_r (rows exact)
    return jnp.exp(f)
  m = jax.nn.softmax(f, axis=col) + eps                           # exp, then T_c
  m = m / (jnp.sum(m, axis=row, keepdims=True) + eps)             # T_r
  for _ in range(iters - 1):
    m = m / (jnp.sum(m, axis=col, keepdims=True) + eps)           # T_c
    m = m / (jnp.sum(m, axis=row, keepdims=True) + eps)           # T_r (rows exact)
  return m


def _sinkhorn_unrolled(logits: jax.Array, iters: int, eps: float,
                       layout: str = "token_major") -> jax.Array:
  f = logits.astype(jnp.float32)
  if layout == "token_minor" and f.ndim > 2:
    f = jnp.moveaxis(f, (-2, -1), (0, 1))                         # [n, n, ...]
    return jnp.moveaxis(_iterate(f, iters, eps, 0, 1), (0, 1), (-2, -1))
  return _iterate(f, iters, eps, -2, -1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def _sinkhorn_recompute(logits, iters, eps, layout):
  return _sinkhorn_unrolled(logits, iters, eps, layout)


def _fwd(logits, iters, eps, layout):
  # Residual: the logits only. The iterates are rebuilt in the backward pass.
  return _sinkhorn_unrolled(logits, iters, eps, layout), logits


def _bwd(iters, eps, layout, logits, g):
  _, vjp = jax.vjp(lambda l: _sinkhorn_unrolled(l, iters, eps, layout), logits)
  return vjp(g)


_sinkhorn_recompute.defvjp(_fwd, _bwd)


LAYOUTS = ("auto", "token_major", "token_minor")


def sinkhorn(logits: jax.Array, *, iters: int = 20, eps: float = 0.0,
             backward: str = "recompute", layout: str = "auto") -> jax.Array:
  """Project `logits [..., n, n]` to a (nearly) doubly stochastic matrix, float32.

  Args:
    logits: `[..., n, n]` in any float dtype; math is float32.
    iters: number of (column, row) normalisation pairs, static, >= 1.
    eps: 0 for the paper's Eq. 9; 1e-6 for DeepSeek-V4 numerics.
    backward: "recompute" (custom VJP that stores only the logits and replays the
      iterations: exact, memory-light) or "autodiff" (plain autodiff through the loop;
      kept as a test oracle).
    layout: "auto" | "token_major" | "token_minor" (see the module docstring); numerics are the
      same either way.
  """
  if int(iters) != iters or iters < 1:
    raise ValueError(f"sinkhorn: iters={iters!r} must be an integer >= 1")
  if eps < 0:
    raise ValueError(f"sinkhorn: eps={eps!r} must be >= 0")
  if logits.ndim < 2 or logits.shape[-1] != logits.shape[-2]:
    raise ValueError(f"sinkhorn: logits shape {logits.shape} must end in a square [n, n]")
  if layout not in LAYOUTS:
    raise ValueError(f"sinkhorn: layout={layout!r}; allowed: {', '.join(map(repr, LAYOUTS))}")
  if layout == "auto":
    layout = "token_major" if jax.default_backend() == "cpu" else "token_minor"
  logits = logits.astype(jnp.float32)
  if backward == "recompute":
    return _sinkhorn_recompute(logits, int(iters), float(eps), layout)
  if backward == "autodiff":
    return _sinkhorn_unrolled(logits, int(iters), float(eps), layout)
  raise ValueError(f"sinkhorn: backward={backward!r}; allowed: 'recompute', 'autodiff'")
