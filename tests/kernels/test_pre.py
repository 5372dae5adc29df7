"""Fused pre kernel (interpret mode) vs a float64 NumPy oracle: forward and VJP.

VJPs are checked two ways: elementwise against the XLA reference VJP (`mhc_jax.ops`), and as
directional derivatives against central differences of the float64 oracle (random cotangents).
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mhc_jax import ops
from mhc_jax.kernels import mhc_pre
from tests.kernels import oracle

# kind, n, C, tokens, dtype, block_tokens, max_chunk (None: TPU-style, one static chunk; int:
# GPU-style, a fori_loop over chunks of the largest power of two <= max_chunk dividing C)
CASES = [
    ("mhc", 4, 64, 37, "float32", 16, None),      # ragged: 3 blocks, last one partial
    pytest.param("mhc", 3, 48, 20, "bfloat16", 16, 32,   # chunks 32 + 16, bf16 streams, odd n
                 marks=pytest.mark.slow),
    ("mhc_lite", 3, 32, 9, "float32", None, None),
    ("mhc", 1, 32, 5, "float32", None, None),
    # looped chunks (the GPU form: lax.fori_loop over pl.ds slices), C = 4 s: 4 chunks per stream
    ("mhc", 4, 64, 37, "float32", 16, 16),
    ("mhc", 4, 128, 20, "bfloat16", 16, 32),
    ("mhc_lite", 3, 64, 9, "float32", 16, 16),
]


def _inputs(kind, n, c, t, dtype, seed=0):
  rng = np.random.default_rng(seed)
  w = ops.mhc_width(n) if kind == "mhc" else ops.mhc_lite_width(n)
  x = rng.standard_normal((t, n, c)) * rng.uniform(0.5, 2.0, (t, 1, 1))
  x = np.asarray(jnp.asarray(x, dtype).astype(jnp.float32))            # exactly representable
  params = {"phi": (rng.standard_normal((n * c, w)) * 2 / np.sqrt(n * c)).astype(np.float32),
            "b": rng.standard_normal(w).astype(np.float32),
            "alpha": np.array([0.8, 1.3, 2.5], np.float32)}
  return x, params


def _run(impl, x, params, kind, dtype, kw, bt=None, chunk=None):
  extra = {} if impl == "xla" else {"block_tokens": bt, "max_chunk": chunk}
  return mhc_pre(jnp.asarray(x, dtype), params, kind=kind, implementation=impl, **kw, **extra)


def _tol(dtype):
  return 2e-2 if dtype == "bfloat16" else 2e-5


@pytest.mark.parametrize("kind,n,c,t,dtype,bt,chunk", CASES)
def test_pre_forward_and_vjp(kind, n, c, t, dtype, bt, chunk):
  kw = dict(sinkhorn_iters=2, norm_eps=1e-6) if kind == "mhc" else dict(norm_eps=1e-6)
  x, params = _inputs(kind, n, c, t, dtype)
  want = oracle.pre(x, params["phi"], params["b"], params["alpha"], kind=kind,
                    iters=kw.get("sinkhorn_iters", 0))
  got = _run("interpret", x, params, kind, dtype, kw, bt, chunk)
  for name, g, w in zip(("u", "h_pre", "h_post", "h_res"), got, want):
    g = np.asarray(g, np.float64)
    scale = max(1.0, np.abs(w).max())
    tol = _tol(dtype) if name == "u" else 2e-5       # mappings are float32 math either way
    np.testing.assert_allclose(g, w, atol=tol * scale, rtol=0, err_msg=name)
  # H_res really is non-symmetric here (orientation would be caught).
  if n > 1:
    assert np.abs(want[3] - np.swapaxes(want[3], 1, 2)).max() > 1e-2

  rng = np.random.default_rng(1)
  cts = tuple(rng.standard_normal(np.shape(w)).astype(np.float32) for w in want)

  def vjp(impl):
    def f(x_, p_):
      return _run(impl, x_, p_, kind, dtype, kw, bt, chunk)
    out, pull = jax.vjp(f, jnp.asarray(x, dtype), params)
    return pull(tuple(jnp.asarray(ct, o.dtype) for ct, o in zip(cts, out)))

  gk, gr = vjp("interpret"), vjp("xla")
  for a, b in zip(jax.tree.leaves(gk), jax.tree.leaves(gr)):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    np.testing.assert_allclose(a, b, atol=_tol(dtype) * max(1e-3, np.abs(b).max()), rtol=0)

  # Directional derivatives against the float64 oracle (central differences).
  def scalar(xx, phi, b, alpha):
    outs = oracle.pre(xx, phi, b, alpha, kind=kind, iters=kw.get("sinkhorn_iters", 0))
    return sum(float(np.sum(ct * o)) for ct, o in zip(cts, outs))

  gx, gp = gk
  base = [x, params["phi"], params["b"], params["alpha"]]
  grads = [gx, gp["phi"], gp["b"], gp["alpha"]]
  for k in range(4):
    v = rng.standard_normal(np.shape(base[k]))
    h = 1e-4
    plus = [np.asarray(a, np.float64) for a in base]
    minus = [np.asarray(a, np.float64) for a in base]
    plus[k] = plus[k] + h * v
    minus[k] = minus[k] - h * v
    fd = (scalar(*plus) - scalar(*minus)) / (2 * h)
    ad = float(np.sum(np.asarray(grads[k], np.float64) * v))
    assert abs(ad - fd) <= 5 * _tol(dtype) * max(1.0, abs(fd)), (k, ad, fd)


def test_pre_dsv4_numerics_and_wide_n():
  """eps > 0 (DeepSeek-V4 Sinkhorn and pre_eps) and n = 8 (128 lanes)."""
  kind, n, c, t = "mhc", 8, 16, 6
  x, params = _inputs(kind, n, c, t, "float32", seed=3)
  kw = dict(sinkhorn_iters=20, sinkhorn_eps=1e-6, pre_eps=1e-6)
  got = _run("interpret", x, params, kind, "float32", kw)
  want = oracle.pre(x, params["phi"], params["b"], params["alpha"], iters=20, eps=1e-6,
                    pre_eps=1e-6)
  for g, w in zip(got, want):
    np.testing.assert_allclose(np.asarray(g, np.float64), w, atol=3e-5 * max(1, np.abs(w).max()))
  ref = _run("xla", x, params, kind, "float32", kw)
  for g, r in zip(got, ref):
    np.testing.assert_allclose(np.asarray(g), np.asarray(r), atol=3e-6 * max(1, np.abs(r).max()))


def test_pre_leading_dims_and_jit():
  x, params = _inputs("mhc", 2, 32, 12, "float32", seed=5)
  x4 = jnp.asarray(x).reshape(3, 4, 2, 32)
  f = jax.jit(lambda a: mhc_pre(a, params, sinkhorn_iters=3, implementation="interpret"))
  u, hp, hq, hr = f(x4)
  assert u.shape == (3, 4, 32) and hp.shape == (3, 4, 2) and hr.shape == (3, 4, 2, 2)
  want = oracle.pre(x, params["phi"], params["b"], params["alpha"], iters=3)
  np.testing.assert_allclose(np.asarray(hr).reshape(12, 2, 2), want[3], atol=2e-5)
