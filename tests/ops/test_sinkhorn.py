import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mhc_jax
from tests.ops import oracles


def _logits(seed, shape, scale):
  return scale * np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


@pytest.mark.parametrize("n", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("iters", [1, 3, 20])
def test_matches_float64_oracle(n, iters):
  L = _logits(n * 100 + iters, (5, n, n), 2.0)
  np.testing.assert_allclose(mhc_jax.sinkhorn(L, iters=iters), oracles.sinkhorn(L, iters),
                             rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize("n", [2, 4])
def test_eps_matches_deepseek_v4_kernel_order(n):
  L = _logits(7, (6, n, n), 3.0)
  np.testing.assert_allclose(mhc_jax.sinkhorn(L, iters=20, eps=1e-6),
                             oracles.sinkhorn(L, 20, eps=1e-6), rtol=2e-5, atol=2e-6)


def test_eps_differs_from_paper_for_wide_logits():
  L = _logits(8, (4, 4, 4), 10.0)
  d = np.abs(np.asarray(mhc_jax.sinkhorn(L, eps=1e-6)) - np.asarray(mhc_jax.sinkhorn(L)))
  assert d.max() > 1e-3   # the eps floor is a real change of numerics, not a no-op


def test_rows_exact_columns_close():
  L = _logits(1, (64, 4, 4), 1.0)
  A = np.asarray(mhc_jax.sinkhorn(L, iters=20))
  np.testing.assert_allclose(A.sum(-1), 1.0, atol=1e-6)
  np.testing.assert_allclose(A.sum(-2), 1.0, atol=1e-3)
  assert (A >= 0).all()


def test_batch_dims_and_dtype():
  L = jnp.asarray(_logits(2, (2, 3, 4, 4), 1.0), jnp.bfloat16)
  A = mhc_jax.sinkhorn(L)
  assert A.shape == (2, 3, 4, 4) and A.dtype == jnp.float32


@pytest.mark.parametrize("eps", [0.0, 1e-6])
def test_extreme_logits_finite(eps):
  rng = np.random.default_rng(3)
  L = (1e4 * rng.choice([-1.0, 1.0], size=(32, 4, 4))).astype(np.float32)
  A = mhc_jax.sinkhorn(L, eps=eps)
  g = jax.grad(lambda l: jnp.sum(mhc_jax.sinkhorn(l, eps=eps) * jnp.arange(16.0).reshape(4, 4)))(L)
  assert np.isfinite(np.asarray(A)).all() and np.isfinite(np.asarray(g)).all()


@pytest.mark.parametrize("eps", [0.0, 1e-6])
@pytest.mark.parametrize("n,iters", [(2, 5), (4, 20), (3, 1)])
def test_custom_vjp_equals_unrolled_autodiff(n, iters, eps):
  L = jnp.asarray(_logits(n + iters, (3, 5, n, n), 1.5))
  ct = jnp.asarray(_logits(99, (3, 5, n, n), 1.0))   # random cotangent, not all-ones
  f = lambda l, mode: mhc_jax.sinkhorn(l, iters=iters, eps=eps, backward=mode)  # noqa: E731
  _, vjp_r = jax.vjp(lambda l: f(l, "recompute"), L)
  _, vjp_a = jax.vjp(lambda l: f(l, "autodiff"), L)
  np.testing.assert_allclose(vjp_r(ct)[0], vjp_a(ct)[0], rtol=1e-6, atol=1e-7)


def test_gradient_against_float64_finite_differences():
  L = _logits(5, (3, 3), 1.0).astype(np.float64)
  ct = _logits(6, (3, 3), 1.0).astype(np.float64)
  g = np.asarray(jax.grad(lambda l: jnp.sum(mhc_jax.sinkhorn(l, iters=10) * ct))(L.astype(np.float32)))
  h = 1e-5
  fd = np.zeros_like(L)
  for i in np.ndindex(L.shape):
    e = np.zeros_like(L)
    e[i] = h
    fd[i] = ((oracles.sinkhorn(L + e, 10) * ct).sum() - (oracles.sinkhorn(L - e, 10) * ct).sum()) / (2 * h)
  np.testing.assert_allclose(g, fd, rtol=2e-3, atol=2e-4)


def test_recompute_stores_only_logits():
  L = jnp.asarray(_logits(4, (8, 4, 4), 1.0))
  _, res = jax.vjp(lambda l: mhc_jax.sinkhorn(l, iters=20), L)
  leaves = [x for x in jax.tree.leaves(res) if hasattr(x, "shape")]
  assert sum(x.size for x in leaves) <= L.size   # the iterates are not saved


@pytest.mark.parametrize("bad", [dict(iters=0), dict(eps=-1.0), dict(backward="implicit")])
def test_bad_arguments(bad):
  with pytest.raises(ValueError):
    mhc_jax.sinkhorn(jnp.zeros((4, 4)), **bad)
