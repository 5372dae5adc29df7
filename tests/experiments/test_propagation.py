"""mhc_jax.analysis.propagation against float64 NumPy oracles written here."""
import json
import math

import numpy as np
import pytest

from mhc_jax.analysis import mean_std, propagation


def _oracle_gains(h):
  depth, tokens, n, _ = h.shape
  fwd = np.empty((depth, tokens))
  bwd = np.empty((depth, tokens))
  for t in range(tokens):
    p = np.eye(n)
    for d in range(depth):
      p = h[d, t] @ p                          # x <- H x: later layers multiply on the left
      fwd[d, t] = np.max(np.abs(p.sum(1)))
      bwd[d, t] = np.max(np.abs(p.sum(0)))
  return np.log10(fwd), np.log10(bwd)


def test_composite_gains_match_direct_product_nonsymmetric():
  rng = np.random.default_rng(0)
  h = np.eye(3) + 0.4 * rng.standard_normal((12, 5, 3, 3))   # non-symmetric, signed
  fwd, bwd = propagation.composite_gains_over_depth(h)
  ofwd, obwd = _oracle_gains(h)
  np.testing.assert_allclose(fwd, ofwd, rtol=0, atol=1e-10)
  np.testing.assert_allclose(bwd, obwd, rtol=0, atol=1e-10)


def test_composite_order_matters():
  # H1 then H2 differs from H2 then H1 for these non-commuting matrices: catches a reversed product.
  h1 = np.array([[1.0, 0.0], [0.0, 0.0]])
  h2 = np.array([[0.0, 1.0], [0.0, 1.0]])
  h = np.stack([h1, h2])[:, None]
  _, bwd = propagation.composite_gains_over_depth(h)
  # H2 @ H1 = [[0,0],[0,0]] -> gain 0 (log -inf); H1 @ H2 would give [[0,1],[0,0]].
  assert np.isneginf(bwd[1, 0])


def test_huge_gains_stay_finite():
  h = np.full((200, 2, 4, 4), 8.0)             # rows sum to 32: gain 32^d, overflows float64 at d ~ 205
  fwd, bwd = propagation.composite_gains_over_depth(h)
  np.testing.assert_allclose(fwd[:, 0], np.arange(1, 201) * math.log10(32), rtol=1e-12)
  np.testing.assert_allclose(bwd, fwd)


def test_families_have_their_constraints():
  lite = propagation.mixing_matrices("mhc_lite", n=4, depth=3, tokens=7, scale=3.0, seed=1)
  np.testing.assert_allclose(lite.sum(-1), 1, atol=1e-12)
  np.testing.assert_allclose(lite.sum(-2), 1, atol=1e-12)
  assert lite.min() >= 0
  sk = propagation.mixing_matrices("sinkhorn", n=4, depth=3, tokens=7, scale=1.0, iters=20)
  np.testing.assert_allclose(sk.sum(-1), 1, atol=1e-5)
  np.testing.assert_allclose(sk.sum(-2), 1, atol=1e-3)
  raw = propagation.mixing_matrices("sinkhorn", n=4, depth=2, tokens=3, scale=1.0, iters=0, seed=2)
  g = np.random.default_rng(2).standard_normal((2, 3, 4, 4))
  np.testing.assert_allclose(raw, np.exp(g))
  hc = propagation.mixing_matrices("hc", n=4, depth=2, tokens=3, scale=0.1, seed=3)
  np.testing.assert_allclose(hc, np.eye(4) + 0.1 * np.random.default_rng(3).standard_normal((2, 3, 4, 4)))
  with pytest.raises(ValueError, match="family='nope'"):
    propagation.mixing_matrices("nope", n=4, depth=1, tokens=1, scale=1.0)


def test_row_stochastic_positive_composite_is_bounded_by_n():
  # One Sinkhorn iteration: rows exact, columns off. The composite's column sums can never exceed n.
  h = propagation.mixing_matrices("sinkhorn", n=4, depth=64, tokens=32, scale=6.0, iters=1)
  fwd, bwd = propagation.composite_gains_over_depth(h)
  assert np.max(np.abs(fwd)) < 1e-5
  assert np.max(bwd) <= math.log10(4) + 1e-6
  assert np.max(bwd) > 0.1      # and the gap is real at this logit scale


def test_gain_summary_mean_is_mean_of_gains():
  lg = np.log10(np.array([[1.0, 10.0, 100.0], [2.0, 2.0, 2.0]]))
  s = propagation.gain_summary(lg)
  np.testing.assert_allclose(10 ** np.array(s["log10_mean"]), [37.0, 2.0])
  np.testing.assert_allclose(10 ** np.array(s["log10_max"]), [100.0, 2.0])
  np.testing.assert_allclose(10 ** np.array(s["log10_median"]), [10.0, 2.0])


def test_sinkhorn_errors_decrease():
  logits = 2.0 * np.random.default_rng(0).standard_normal((64, 4, 4))
  e = propagation.sinkhorn_errors(logits, [1, 5, 50])
  assert max(e["row_err"]) < 1e-5
  assert e["col_err"][0] > e["col_err"][1] > e["col_err"][2]


def test_mean_std_matches_numpy():
  v = [3.1, 2.7, 3.3, 2.9]
  m, s = mean_std(v)
  assert m == pytest.approx(np.mean(v))
  assert s == pytest.approx(np.std(v, ddof=1))
  assert mean_std([5.0]) == (5.0, 0.0)


def test_birkhoff_decomposition_reconstructs_mhc_lite_matrix():
  from mhc_jax.analysis import birkhoff_decompose, recompose
  from mhc_jax.ops.mappings import permutation_matrices
  rng = np.random.default_rng(4)
  w = rng.dirichlet(np.ones(24) * 0.3)
  a = np.einsum("k,kij->ij", w, permutation_matrices(4).astype(np.float64))
  weights, idx, residual = birkhoff_decompose(a)
  assert np.max(np.abs(residual)) < 1e-9
  assert len(weights) <= 10 and np.all(weights > 0)
  np.testing.assert_allclose(weights.sum(), 1.0, atol=1e-9)
  np.testing.assert_allclose(recompose(weights, idx, 4), a, atol=1e-9)
  # A permutation matrix decomposes into itself.
  weights, idx, _ = birkhoff_decompose(permutation_matrices(4)[7])
  assert list(idx) == [7] and weights[0] == pytest.approx(1.0)
  with pytest.raises(ValueError, match="n <= 6"):
    birkhoff_decompose(np.eye(7))
