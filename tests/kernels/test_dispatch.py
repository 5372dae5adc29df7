"""`implementation` resolution: auto falls back to XLA on CPU, explicit pallas raises clearly."""
import jax.numpy as jnp
import numpy as np
import pytest

from mhc_jax import ops
from mhc_jax.config import ConfigError
from mhc_jax.kernels import api, mhc_pre, resolve, stream_post, unsupported


def _x(n=4, c=256, dtype=jnp.float32):
  return jnp.zeros((2, 3, n, c), dtype)


def test_auto_is_xla_on_cpu_and_matches_ops(monkeypatch):
  assert resolve("auto", _x()) == "xla"
  called = []
  monkeypatch.setattr(api, "fused_pre", lambda *a: called.append(a))
  monkeypatch.setattr(api, "fused_post", lambda *a: called.append(a))
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((5, 2, 8)), jnp.float32)
  p = {"phi": jnp.asarray(rng.standard_normal((16, ops.mhc_width(2))), jnp.float32),
       "b": jnp.zeros(ops.mhc_width(2)), "alpha": jnp.ones(3)}
  u, h_pre, h_post, h_res = mhc_pre(x, p, sinkhorn_iters=5)
  r = ops.mhc_mappings(x, p, sinkhorn_iters=5)
  np.testing.assert_array_equal(np.asarray(h_res), np.asarray(r[2]))
  np.testing.assert_array_equal(np.asarray(u), np.asarray(ops.stream_pre(x, r[0])))
  y = jnp.ones((5, 8))
  np.testing.assert_array_equal(np.asarray(stream_post(x, y, h_res, h_post)),
                                np.asarray(ops.stream_post(x, y, h_res, h_post)))
  assert not called


def test_explicit_pallas_on_cpu_raises_one_line():
  with pytest.raises(ConfigError, match="implementation='pallas' is not available here.*cpu"):
    resolve("pallas", _x())


def test_bad_implementation_and_kind():
  with pytest.raises(ConfigError, match="implementation='cuda'"):
    resolve("cuda", _x())
  with pytest.raises(ConfigError, match="kind='hc'"):
    mhc_pre(_x(), {}, kind="hc")


@pytest.mark.parametrize("backend,x,kind,frag", [
    ("gpu", _x(c=200), "mhc", "C=200"),
    ("tpu", _x(n=9, c=256), "mhc", "n_streams=9"),
    ("tpu", _x(n=6, c=256), "mhc_lite", "mhc_lite"),
    ("gpu", _x(dtype=jnp.float16), "mhc", "float16"),
])
def test_unsupported_reasons(backend, x, kind, frag):
  assert frag in unsupported(backend, x, kind)


@pytest.mark.parametrize("backend,x", [("tpu", _x(c=256)), ("gpu", _x(c=7168)), ("gpu", _x(n=3, c=48)),
                                       ("tpu", _x(n=1, c=96)), ("tpu", _x(c=200))])
def test_supported(backend, x):
  assert unsupported(backend, x) is None


def test_pallas_on_a_supported_platform_uses_the_kernel(monkeypatch):
  monkeypatch.setattr(api, "platform_backend", lambda: "tpu")
  assert resolve("pallas", _x()) == "tpu" and resolve("auto", _x()) == "tpu"
  assert resolve("auto", _x(c=200)) == "xla"            # compiles, but not lane-aligned
  assert resolve("pallas", _x(c=200)) == "tpu"
  monkeypatch.setattr(api, "platform_backend", lambda: "gpu")
  with pytest.raises(ConfigError, match="C=200"):
    resolve("pallas", _x(c=200))
  # GPU: explicit pallas takes the Triton kernels (C % 16 == 0); auto only where the sm_90a
  # compiles show no large spills (n <= 4, C % 128 == 0, eps = 0, <= 20 Sinkhorn iterations).
  assert resolve("pallas", _x()) == "gpu" and resolve("auto", _x()) == "gpu"
  assert resolve("auto", _x(dtype=jnp.bfloat16), "mhc_lite") == "gpu"
  assert resolve("pallas", _x(n=3, c=48)) == "gpu" and resolve("auto", _x(n=3, c=48)) == "xla"
  assert resolve("pallas", _x(n=8)) == "gpu" and resolve("auto", _x(n=8)) == "xla"
  assert resolve("auto", _x(), sinkhorn_eps=1e-6) == "xla"
  assert resolve("auto", _x(), sinkhorn_iters=40) == "xla"
  assert resolve("auto", _x(), sinkhorn_iters=20) == "gpu"
