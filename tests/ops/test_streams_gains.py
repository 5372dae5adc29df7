import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mhc_jax
from mhc_jax.ops import composite_suffixes, gain
from tests.ops import oracles


def _rand(seed, shape, scale=1.0):
  return (scale * np.random.default_rng(seed).standard_normal(shape)).astype(np.float32)


@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_stream_pre_post_oracle(n):
  x, y = _rand(1, (2, 3, n, 8)), _rand(2, (2, 3, 8))
  h_pre, h_post, h_res = _rand(3, (2, 3, n)), _rand(4, (2, 3, n)), _rand(5, (2, 3, n, n))
  np.testing.assert_allclose(mhc_jax.stream_pre(x, h_pre), oracles.stream_pre(x, h_pre), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(mhc_jax.stream_post(x, y, h_res, h_post),
                             oracles.stream_post(x, y, h_res, h_post), rtol=1e-5, atol=1e-5)


def test_orientation_non_symmetric_h_res():
  # x_next[i] = sum_j H[i, j] x[j]: with H = e_0 e_1^T, stream 0 receives stream 1, nothing else.
  n, c = 3, 4
  x = np.stack([np.full(c, 1.0), np.full(c, 10.0), np.full(c, 100.0)]).astype(np.float32)
  h = np.zeros((n, n), np.float32)
  h[0, 1] = 1.0
  out = np.asarray(mhc_jax.stream_post(x, np.zeros(c, np.float32), h, np.zeros(n, np.float32)))
  np.testing.assert_array_equal(out, np.stack([np.full(c, 10.0), np.zeros(c), np.zeros(c)]))


def test_stream_grads_random_cotangent():
  n = 3
  args = (_rand(1, (4, n, 8)), _rand(2, (4, 8)), _rand(3, (4, n, n)), _rand(4, (4, n)))
  ct = _rand(5, (4, n, 8))
  grads = jax.grad(lambda *a: jnp.sum(mhc_jax.stream_post(*a) * ct), argnums=(0, 1, 2, 3))(*args)
  x, y, h_res, h_post = (a.astype(np.float64) for a in args)
  want = (np.einsum("tic,tij->tjc", ct, h_res), np.einsum("tic,ti->tc", ct, h_post),
          np.einsum("tic,tjc->tij", ct, x), np.einsum("tic,tc->ti", ct, y))
  for g, w in zip(grads, want):
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)


def test_expand_collapse():
  h = _rand(1, (2, 5, 8))
  x = mhc_jax.expand_streams(h, 4)
  assert x.shape == (2, 5, 4, 8)
  np.testing.assert_allclose(mhc_jax.collapse_streams(x), 4 * h, rtol=1e-6)


def test_bf16_streams_accumulate_float32():
  x = jnp.asarray(_rand(1, (16, 4, 64)), jnp.bfloat16)
  out = mhc_jax.stream_post(x, x[:, 0], jnp.full((16, 4, 4), 0.25), jnp.ones((16, 4)))
  assert out.dtype == jnp.bfloat16


def test_amax_gain_composite_order_and_values():
  rng = np.random.default_rng(0)
  hs = rng.uniform(-1, 2, size=(5, 3, 4, 4)).astype(np.float32)   # [L, tokens, n, n]
  p = np.broadcast_to(np.eye(4), (3, 4, 4)).astype(np.float64)
  for h in hs.astype(np.float64):
    p = h @ p                        # P = H_{L-1} ... H_0
  fwd, bwd = mhc_jax.amax_gain(hs)
  np.testing.assert_allclose(fwd, np.abs(p.sum(-1)).max(-1), rtol=1e-5)
  np.testing.assert_allclose(bwd, np.abs(p.sum(-2)).max(-1), rtol=1e-5)
  suffix = np.asarray(composite_suffixes(hs))
  np.testing.assert_allclose(suffix[0], p, rtol=1e-5)
  np.testing.assert_allclose(suffix[-1], hs[-1], rtol=1e-6)
  f1, b1 = gain(hs[0])
  np.testing.assert_allclose(f1, np.abs(hs[0].sum(-1)).max(-1), rtol=1e-6)


def test_doubly_stochastic_composite_gain_is_one():
  rng = np.random.default_rng(1)
  hs = mhc_jax.mhc_lite_mappings(
      rng.standard_normal((12, 2, 3, 8)).astype(np.float32),
      {"phi": rng.standard_normal((24, 12)).astype(np.float32), "b": np.zeros(12, np.float32),
       "alpha": np.ones(3, np.float32)})[2]
  fwd, bwd = mhc_jax.amax_gain(hs)
  np.testing.assert_allclose(fwd, 1.0, atol=1e-5)
  np.testing.assert_allclose(bwd, 1.0, atol=1e-5)
