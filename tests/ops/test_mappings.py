import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mhc_jax
from mhc_jax.ops import mhc_lite_width, mhc_width
from tests.ops import oracles


def _rand(seed, shape, scale=1.0):
  return (scale * np.random.default_rng(seed).standard_normal(shape)).astype(np.float32)


def _mhc_params(seed, n, c, width, scale=0.3):
  return {"phi": _rand(seed, (n * c, width), scale / np.sqrt(n * c)),
          "b": _rand(seed + 1, (width,), 0.5), "alpha": np.array([0.7, 1.3, 2.1], np.float32)}


def _hc_params(seed, n, c):
  r = lambda k, s, sc=1.0: _rand(seed + k, s, sc)  # noqa: E731
  return {"theta_pre": r(1, (c,), 0.5), "theta_post": r(2, (c,), 0.5), "theta_res": r(3, (n, c), 0.5),
          "b_pre": r(4, (n,)), "b_post": r(5, (n,)), "b_res": r(6, (n, n)),
          "alpha": np.array([0.4, 0.9, 1.7], np.float32)}


def _close(got, want, tol=2e-5):
  for g, w in zip(got, want):
    np.testing.assert_allclose(np.asarray(g), w, rtol=tol, atol=tol)


@pytest.mark.parametrize("n,c,lead", [(1, 8, (5,)), (2, 16, (2, 3)), (3, 8, (4,)), (4, 32, (2, 5))])
def test_mhc_mappings_oracle(n, c, lead):
  x = _rand(n, (*lead, n, c), 2.0)
  p = _mhc_params(10 + n, n, c, mhc_width(n))
  _close(mhc_jax.mhc_mappings(x, p, sinkhorn_iters=20), oracles.mhc(x, **p, iters=20))


@pytest.mark.parametrize("n,c", [(1, 8), (2, 16), (3, 8), (4, 16)])
def test_mhc_lite_mappings_oracle(n, c):
  x = _rand(n + 20, (3, 4, n, c), 2.0)
  p = _mhc_params(30 + n, n, c, mhc_lite_width(n))
  got = mhc_jax.mhc_lite_mappings(x, p)
  _close(got, oracles.mhc_lite(x, **p))
  h_res = np.asarray(got[2])
  np.testing.assert_allclose(h_res.sum(-1), 1.0, atol=1e-6)   # exactly doubly stochastic
  np.testing.assert_allclose(h_res.sum(-2), 1.0, atol=1e-6)


@pytest.mark.parametrize("n,c", [(1, 8), (2, 16), (3, 8), (4, 32)])
def test_hc_mappings_oracle(n, c):
  x = _rand(n + 40, (2, 3, n, c), 2.0)
  p = _hc_params(50 + n, n, c)
  _close(mhc_jax.hc_mappings(x, p), oracles.hc(x, p))


def test_hc_res_orientation_column_j_driven_by_stream_j():
  # H_res[i, j] = a tanh(theta_res[i] . x~_j): scaling stream j's direction moves column j only.
  n, c = 3, 8
  p = _hc_params(3, n, c)
  x = _rand(4, (n, c))
  x2 = x.copy()
  x2[1] = _rand(5, (c,))
  d = np.abs(np.asarray(mhc_jax.hc_mappings(x2, p)[2]) - np.asarray(mhc_jax.hc_mappings(x, p)[2]))
  assert d[:, 1].min() > 0 and np.delete(d, 1, axis=1).max() == 0


def test_mhc_mappings_doubly_stochastic_and_ranges():
  n, c = 4, 16
  x = _rand(1, (64, n, c), 3.0)
  h_pre, h_post, h_res = mhc_jax.mhc_mappings(x, _mhc_params(2, n, c, mhc_width(n)))
  h_res = np.asarray(h_res)
  np.testing.assert_allclose(h_res.sum(-1), 1.0, atol=1e-6)
  np.testing.assert_allclose(h_res.sum(-2), 1.0, atol=1e-3)
  assert (h_res >= 0).all() and (0 < np.asarray(h_pre)).all() and (np.asarray(h_pre) < 1).all()
  assert (0 < np.asarray(h_post)).all() and (np.asarray(h_post) < 2).all()


def test_mhc_res_block_is_row_major():
  # Only b_res[i*n + j] is large: H_res must concentrate on entry (i, j), not (j, i).
  n, c = 3, 4
  b = np.full(mhc_width(n), 0.0, np.float32)
  b[2 * n:] = -20.0
  for i, j in [(0, 1), (1, 2), (2, 0)]:
    b[2 * n + i * n + j] = 20.0
  p = {"phi": np.zeros((n * c, mhc_width(n)), np.float32), "b": b, "alpha": np.ones(3, np.float32)}
  h_res = np.asarray(mhc_jax.mhc_mappings(_rand(0, (n, c)), p)[2])
  np.testing.assert_allclose(h_res, np.eye(n)[[1, 2, 0]], atol=1e-5)


def test_bf16_input_float32_math():
  n, c = 4, 16
  x = jnp.asarray(_rand(7, (2, 3, n, c)), jnp.bfloat16)
  p = _mhc_params(8, n, c, mhc_width(n))
  outs = mhc_jax.mhc_mappings(x, p)
  assert all(o.dtype == jnp.float32 for o in outs)
  _close(outs, oracles.mhc(np.asarray(x.astype(jnp.float32)), **p, iters=20))


@pytest.mark.parametrize("fn", ["mhc", "lite", "hc"])
def test_mapping_gradients_finite_differences(fn):
  n, c = 3, 4
  x = _rand(11, (2, n, c), 1.5)
  cts = [_rand(12 + k, s) for k, s in enumerate([(2, n), (2, n), (2, n, n)])]
  if fn == "hc":
    p = _hc_params(13, n, c)
    f_jax = lambda x, p: mhc_jax.hc_mappings(x, p)  # noqa: E731
    f_np = lambda x, p: oracles.hc(x, p)  # noqa: E731
  else:
    width = mhc_width(n) if fn == "mhc" else mhc_lite_width(n)
    p = _mhc_params(14, n, c, width, scale=2.0)
    if fn == "mhc":
      f_jax = lambda x, p: mhc_jax.mhc_mappings(x, p, sinkhorn_iters=8)  # noqa: E731
      f_np = lambda x, p: oracles.mhc(x, **p, iters=8)  # noqa: E731
    else:
      f_jax = lambda x, p: mhc_jax.mhc_lite_mappings(x, p)  # noqa: E731
      f_np = lambda x, p: oracles.mhc_lite(x, **p)  # noqa: E731

  def loss_np(x, p):
    return sum((o * ct).sum() for o, ct in zip(f_np(x, p), cts))

  gx, gp = jax.grad(lambda x, p: sum(jnp.sum(o * ct) for o, ct in zip(f_jax(x, p), cts)),
                    argnums=(0, 1))(x, p)
  rng = np.random.default_rng(0)
  h = 1e-4
  for name, arr, grad in [("x", x, gx)] + [(k, p[k], gp[k]) for k in p]:
    for _ in range(4):   # random coordinates
      idx = tuple(rng.integers(0, s) for s in arr.shape)
      def shifted(delta):
        xs = x.astype(np.float64)
        ps = {k: v.astype(np.float64) for k, v in p.items()}
        tgt = xs if name == "x" else ps[name]
        tgt[idx] += delta
        return loss_np(xs, ps)
      fd = (shifted(h) - shifted(-h)) / (2 * h)
      np.testing.assert_allclose(np.asarray(grad)[idx], fd, rtol=3e-3, atol=3e-4,
                                 err_msg=f"{fn}: d/d{name}{idx}")


def test_bad_param_shapes():
  x = jnp.zeros((2, 4, 8))
  with pytest.raises(ValueError, match="phi"):
    mhc_jax.mhc_mappings(x, {"phi": jnp.zeros((8, 24)), "b": jnp.zeros(24), "alpha": jnp.zeros(3)})
  with pytest.raises(ValueError, match="missing"):
    mhc_jax.hc_mappings(x, {})
