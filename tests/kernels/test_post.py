"""Fused post kernel (interpret mode) vs the float64 oracle: forward and VJP."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mhc_jax.kernels import stream_post
from tests.kernels import oracle

CASES = [  # n, C, tokens, dtype, block_tokens, max_chunk
    (4, 64, 37, "float32", 16, None),
    (3, 48, 11, "bfloat16", None, 16),
    (1, 32, 4, "float32", None, None),
]


@pytest.mark.parametrize("n,c,t,dtype,bt,chunk", CASES)
def test_post_forward_and_vjp(n, c, t, dtype, bt, chunk):
  rng = np.random.default_rng(0)
  cast = lambda a: np.asarray(jnp.asarray(a, dtype).astype(jnp.float32))  # noqa: E731
  x, y = cast(rng.standard_normal((t, n, c))), cast(rng.standard_normal((t, c)))
  h_res = rng.uniform(-0.5, 1.0, (t, n, n)).astype(np.float32)      # not symmetric, not stochastic
  h_post = rng.uniform(0, 2, (t, n)).astype(np.float32)
  kw = dict(block_tokens=bt, max_chunk=chunk)
  args = (jnp.asarray(x, dtype), jnp.asarray(y, dtype), jnp.asarray(h_res), jnp.asarray(h_post))
  got = stream_post(*args, implementation="interpret", **kw)
  assert got.dtype == jnp.dtype(dtype) and got.shape == (t, n, c)
  want = oracle.post(x, y, h_res, h_post)
  tol = 1e-2 if dtype == "bfloat16" else 1e-5
  np.testing.assert_allclose(np.asarray(got, np.float64), want, atol=tol * np.abs(want).max())

  ct = rng.standard_normal((t, n, c)).astype(np.float32)
  _, pull = jax.vjp(lambda *a: stream_post(*a, implementation="interpret", **kw), *args)
  dx, dy, dres, dpost = (np.asarray(g, np.float64) for g in pull(jnp.asarray(ct, dtype)))
  ctq = np.asarray(jnp.asarray(ct, dtype).astype(jnp.float32), np.float64)
  np.testing.assert_allclose(dx, np.einsum("tij,tic->tjc", h_res, ctq), atol=tol * 10)
  np.testing.assert_allclose(dy, np.einsum("ti,tic->tc", h_post, ctq), atol=tol * 10)
  np.testing.assert_allclose(dres, np.einsum("tic,tjc->tij", ctq, x), atol=tol * np.sqrt(c) * 5)
  np.testing.assert_allclose(dpost, np.einsum("tic,tc->ti", ctq, y), atol=tol * np.sqrt(c) * 5)
