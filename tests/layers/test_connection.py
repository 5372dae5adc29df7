import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mhc_jax.config import ConnectionConfig
from mhc_jax.layers.connection import CollapseHead, Connection
from tests.ops import oracles

C = 16


def _rand(seed, shape, scale=1.0):
  return (scale * np.random.default_rng(seed).standard_normal(shape)).astype(np.float32)


class Branch(nn.Module):
  """A fixed non-linear branch: y = tanh(u W)."""
  @nn.compact
  def __call__(self, u):
    w = self.param("w", nn.initializers.normal(0.5), (u.shape[-1], u.shape[-1]))
    return jnp.tanh(u @ w)


class Wrapped(nn.Module):
  cfg: ConnectionConfig
  site: int = 0

  @nn.compact
  def __call__(self, x):
    return Connection(self.cfg, name="conn")(x, Branch(name="branch"), self.site)


def _init(cfg, x, site=0):
  m = Wrapped(cfg, site)
  return m, nn.meta.unbox(m.init(jax.random.PRNGKey(0), x))


def _randomise(params, seed):
  """Replace the connection's parameters with random values (so every mapping is non-trivial)."""
  leaves, tree = jax.tree.flatten(params["conn"])
  leaves = [l + _rand(seed + i, l.shape, 0.3) for i, l in enumerate(leaves)]
  return {**params, "conn": jax.tree.unflatten(tree, leaves)}


def _rmsnorm64(u, scale, eps=1e-6):
  return u / np.sqrt((u ** 2).mean(-1, keepdims=True) + eps) * scale


@pytest.mark.parametrize("kind,n", [("mhc", 4), ("mhc", 2), ("mhc_lite", 3), ("hc", 4), ("hc", 3)])
def test_sublayer_matches_float64_oracle(kind, n):
  cfg = ConnectionConfig(kind=kind, n_streams=n, sinkhorn_iters=20)
  x = _rand(1, (2, 5, n, C), 2.0)
  m, v = _init(cfg, x)
  v = {"params": _randomise(v["params"], 3)}
  got = np.asarray(m.apply(v, x))
  p = jax.tree.map(np.asarray, v["params"])
  cp = {k: val for k, val in p["conn"].items() if k != "norm"}
  if kind == "mhc":
    h_pre, h_post, h_res = oracles.mhc(x, **cp, iters=20)
  elif kind == "mhc_lite":
    h_pre, h_post, h_res = oracles.mhc_lite(x, **cp)
  else:
    h_pre, h_post, h_res = oracles.hc(x, cp)
  u = oracles.stream_pre(x, h_pre)
  y = np.tanh(_rmsnorm64(u, p["conn"]["norm"]["scale"]) @ p["branch"]["w"].astype(np.float64))
  want = oracles.stream_post(x, y, h_res, h_post)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kind,n", [("mhc", 4), ("mhc_lite", 3), ("hc", 4)])
@pytest.mark.parametrize("block", ["pre", "post", "res"])
def test_each_mapping_is_used(kind, n, block):
  cfg = ConnectionConfig(kind=kind, n_streams=n)
  x = _rand(2, (2, 3, n, C))
  m, v = _init(cfg, x)
  params = _randomise(v["params"], 5)
  base = np.asarray(m.apply({"params": params}, x))
  conn = dict(params["conn"])
  if kind == "hc":
    key = {"pre": "b_pre", "post": "b_post", "res": "b_res"}[block]
    conn[key] = conn[key] + 0.1 * jnp.arange(1, conn[key].size + 1).reshape(conn[key].shape)
  else:
    sl = {"pre": slice(0, n), "post": slice(n, 2 * n), "res": slice(2 * n, None)}[block]
    b = np.array(conn["b"])
    b[sl] += 0.5 * np.arange(1, b[sl].size + 1)
    conn["b"] = jnp.asarray(b)
  moved = np.asarray(m.apply({"params": {**params, "conn": conn}}, x))
  assert np.abs(moved - base).max() > 1e-3, f"perturbing H_{block} did not change the output"


def test_residual_kind_is_bit_exact_pre_norm_residual():
  cfg = ConnectionConfig(kind="residual", n_streams=1)
  x = _rand(3, (2, 7, 1, C))
  m, v = _init(cfg, x)
  got = m.apply(v, x)
  p = v["params"]
  h = jnp.asarray(x[..., 0, :])
  hf = h.astype(jnp.float32)
  normed = hf * jax.lax.rsqrt(jnp.mean(jnp.square(hf), -1, keepdims=True) + 1e-6) * p["conn"]["norm"]["scale"]
  want = h + jnp.tanh(normed @ p["branch"]["w"])
  np.testing.assert_array_equal(np.asarray(got[..., 0, :]), np.asarray(want))


def test_init_presets_and_site_dependence():
  n = 4
  x = _rand(0, (1, 2, n, C))
  b = lambda init, site: np.asarray(_init(ConnectionConfig(init=init), x, site)[1]["params"]["conn"]["b"])  # noqa: E731
  np.testing.assert_array_equal(b("hc_like", 6)[:n], [-1, -1, 1, -1])       # site 6 mod 4 = 2
  np.testing.assert_array_equal(b("hc_like", 1)[n:2 * n], 0)
  res = b("hc_like", 0)[2 * n:].reshape(n, n)
  np.testing.assert_array_equal(res, np.where(np.eye(n), 0.0, -8.0))
  np.testing.assert_array_equal(b("uniform", 3), 0)
  v = _init(ConnectionConfig(init="identity"), x)[1]["params"]["conn"]
  np.testing.assert_array_equal(v["alpha"], 0)
  assert np.abs(v["phi"]).max() > 0
  hc = _init(ConnectionConfig(kind="hc"), x, 5)[1]["params"]["conn"]
  np.testing.assert_array_equal(hc["b_pre"], [0, 1, 0, 0])
  np.testing.assert_array_equal(hc["b_res"], np.eye(n))
  np.testing.assert_array_equal(hc["b_post"], 1)
  np.testing.assert_allclose(hc["alpha"], 0.01)
  static = _init(ConnectionConfig(kind="hc", dynamic=False), x)[1]["params"]["conn"]
  assert "theta_res" not in static and "b_res" in static


def test_param_names_match_design():
  x = _rand(0, (1, 2, 4, C))
  names = lambda cfg: set(_init(cfg, x)[1]["params"]["conn"])  # noqa: E731
  assert names(ConnectionConfig(kind="mhc")) == {"phi", "b", "alpha", "norm"}
  assert names(ConnectionConfig(kind="mhc_lite")) == {"phi", "b", "alpha", "norm"}
  assert names(ConnectionConfig(kind="hc")) == {"theta_pre", "theta_post", "theta_res", "b_pre",
                                                "b_post", "b_res", "alpha", "norm"}
  shapes = jax.tree.map(np.shape, _init(ConnectionConfig(kind="mhc_lite"), x)[1]["params"]["conn"])
  assert shapes["phi"] == (4 * C, 24 + 8) and shapes["b"] == (32,)


def test_collapse_head_oracle():
  n = 4
  x = _rand(4, (2, 3, n, C))
  head = CollapseHead(eps=1e-6)
  v = nn.meta.unbox(head.init(jax.random.PRNGKey(0), x))
  p = {"phi": _rand(5, (n * C, n), 0.2), "b": _rand(6, (n,)), "alpha": np.array([0.8], np.float32)}
  got = head.apply({"params": p}, x)
  xf = x.reshape(2, 3, n * C).astype(np.float64)
  logits = xf @ p["phi"] / np.sqrt((xf ** 2).mean(-1, keepdims=True) + 1e-6)
  w = oracles.sigmoid(0.8 * logits + p["b"]) + 1e-6
  np.testing.assert_allclose(got, oracles.stream_pre(x, w), rtol=1e-5, atol=1e-5)
  assert set(v["params"]) == {"phi", "b", "alpha"}
