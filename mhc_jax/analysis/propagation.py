"""The "telephone game": how per-layer mixing matrices compound across depth (mHC paper Sec. 3.1).

A signal on the n residual streams passes L mixing matrices, `x_L = P_L x_0` with
`P_L = H_L ... H_1` (orientation of DESIGN.md, `x <- H x`). The Amax gains of P (forward: max |row
sum|, backward: max |column sum|) tell how much the identity path amplifies (or kills) signals and
gradients. Matrix families, all `[L, T, n, n]` with independent draws per layer and token:

  hc:        H = I + scale * G,   G ~ N(0, 1)    (unconstrained, HC's b_res + a tanh(.) near I)
  sinkhorn:  H = SK_iters(scale * G)             (mHC; iters = 0 is M0 = exp(logits), Eq. 9 t = 0)
  mhc_lite:  H = sum_k softmax(scale * g)_k P_k  (exact convex combination of the n! permutations)

Composites are accumulated in float64 with a running log-scale so gains up to 10^300+ stay finite.
"""
from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

from mhc_jax.ops.mappings import permutation_matrices
from mhc_jax.ops.sinkhorn import sinkhorn

FAMILIES = ("hc", "sinkhorn", "mhc_lite")


def sinkhorn_or_exp(logits: np.ndarray, iters: int) -> np.ndarray:
  """`sinkhorn(logits, iters)` for iters >= 1; `exp(logits)` (the unnormalised M0) for iters = 0."""
  if iters == 0:
    return np.exp(np.asarray(logits, np.float64))
  return np.asarray(sinkhorn(jnp.asarray(logits, jnp.float32), iters=iters), np.float64)


def mixing_matrices(family: str, *, n: int, depth: int, tokens: int, scale: float, iters: int = 20,
                    seed: int = 0) -> np.ndarray:
  """`[depth, tokens, n, n]` float64 per-layer mixing matrices of one family (module docstring)."""
  if family not in FAMILIES:
    raise ValueError(f"family={family!r} is not allowed: choose one of {', '.join(FAMILIES)}")
  rng = np.random.default_rng(seed)
  if family == "hc":
    g = rng.standard_normal((depth, tokens, n, n))
    return np.eye(n) + scale * g
  if family == "sinkhorn":
    g = rng.standard_normal((depth, tokens, n, n))
    return sinkhorn_or_exp(scale * g, iters)
  g = rng.standard_normal((depth, tokens, math.factorial(n)))
  w = np.exp(scale * g - np.max(scale * g, -1, keepdims=True))
  w /= w.sum(-1, keepdims=True)
  return np.einsum("...k,kij->...ij", w, permutation_matrices(n).astype(np.float64))


def composite_gains_over_depth(h_LTnn: np.ndarray):
  """Gains of every prefix product `P_d = H_d ... H_1`, d = 1..L.

  Returns `(log10_fwd [L, T], log10_bwd [L, T])`: log10 of max |row sum| and max |column sum|
  of P_d per token (-inf where a gain is exactly 0).
  """
  h = np.asarray(h_LTnn, np.float64)
  depth, tokens, n, _ = h.shape
  p = np.broadcast_to(np.eye(n), (tokens, n, n)).copy()
  log_scale = np.zeros(tokens)
  fwd = np.empty((depth, tokens))
  bwd = np.empty((depth, tokens))
  with np.errstate(divide="ignore"):
    for d in range(depth):
      p = np.einsum("tij,tjk->tik", h[d], p)
      m = np.max(np.abs(p), axis=(-1, -2))
      m = np.where(m > 0, m, 1.0)
      p /= m[:, None, None]
      log_scale += np.log10(m)
      fwd[d] = np.log10(np.max(np.abs(p.sum(-1)), -1)) + log_scale
      bwd[d] = np.log10(np.max(np.abs(p.sum(-2)), -1)) + log_scale
  return fwd, bwd


def gain_summary(log10_gain_LT: np.ndarray) -> dict:
  """Per-depth statistics over tokens: mean (of the gains, as the paper averages), median, max."""
  lg = np.asarray(log10_gain_LT, np.float64)
  # mean of 10^lg computed stably: max + log10(mean(10^(lg - max))).
  top = np.max(lg, axis=1, keepdims=True)
  with np.errstate(over="ignore", invalid="ignore"):
    log_mean = top[:, 0] + np.log10(np.mean(10.0 ** (lg - top), axis=1))
  return {"log10_mean": log_mean.tolist(), "log10_median": np.median(lg, 1).tolist(),
          "log10_max": top[:, 0].tolist()}


def sinkhorn_errors(logits: np.ndarray, iters_list) -> dict:
  """Max |row sum - 1| and max |column sum - 1| of `sinkhorn_or_exp(logits, t)` for each t."""
  out = {"iters": list(iters_list), "row_err": [], "col_err": []}
  for t in iters_list:
    h = sinkhorn_or_exp(logits, t)
    out["row_err"].append(float(np.max(np.abs(h.sum(-1) - 1))))
    out["col_err"].append(float(np.max(np.abs(h.sum(-2) - 1))))
  return out
