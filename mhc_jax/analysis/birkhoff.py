"""Birkhoff-von Neumann: a doubly stochastic matrix is a convex combination of permutation matrices.

`birkhoff_decompose(A)` peels permutations off greedily: at each step take the permutation P_k whose
smallest entry of A on its support is largest, weight w_k = that entry, A <- A - w_k P_k. For an
exactly doubly stochastic A such a permutation with w_k > 0 always exists (Birkhoff), so the
residual reaches 0 in at most (n-1)^2 + 1 steps. Brute force over the n! permutations: n <= 6.
"""
from __future__ import annotations

import numpy as np

from mhc_jax.ops.mappings import permutation_matrices


def birkhoff_decompose(a: np.ndarray, *, tol: float = 1e-9, max_terms: int | None = None):
  """`(weights [K], perm_indices [K], residual [n, n])` with `A ~= sum_k w_k P_{idx_k}`.

  Permutation indices follow `itertools.permutations(range(n))`, as in mHC-lite.
  """
  a = np.array(a, dtype=np.float64)
  n = a.shape[-1]
  if a.shape != (n, n) or n > 6:
    raise ValueError(f"birkhoff_decompose: needs one [n, n] matrix with n <= 6, got {a.shape}")
  perms = permutation_matrices(n).astype(bool)                # [n!, n, n]
  max_terms = max_terms or (n - 1) ** 2 + 1
  weights, idx = [], []
  for _ in range(max_terms):
    if np.max(np.abs(a)) <= tol:
      break
    mins = np.where(perms, a[None], np.inf).min(axis=(-1, -2))  # min of A on each permutation
    k = int(np.argmax(mins))
    if mins[k] <= tol:
      break
    weights.append(float(mins[k]))
    idx.append(k)
    a = a - mins[k] * perms[k]
  return np.array(weights), np.array(idx, dtype=np.int64), a


def recompose(weights: np.ndarray, perm_indices: np.ndarray, n: int) -> np.ndarray:
  """`sum_k w_k P_{idx_k}`."""
  p = permutation_matrices(n).astype(np.float64)[np.asarray(perm_indices, np.int64)]
  return np.einsum("k,kij->ij", np.asarray(weights, np.float64), p)
