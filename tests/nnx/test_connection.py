"""NNX Connection / CollapseHead: parity with the Linen modules, oracles, orientation, errors."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mhc_jax import nnx as mnnx
from mhc_jax.config import ConfigError, ConnectionConfig
from mhc_jax.layers import connection as linen_conn
from tests.ops import oracles

C = 8
KINDS_N = [("residual", 1)] + [(k, n) for k in ("hc", "mhc", "mhc_lite") for n in (1, 2, 4)]
W = (0.5 * np.random.default_rng(7).standard_normal((C, C))).astype(np.float32)


def branch(u):
  """A fixed non-linear branch: y = tanh(u W)."""
  return jnp.tanh(u @ W)


def _rand(seed, shape, scale=1.0):
  return (scale * np.random.default_rng(seed).standard_normal(shape)).astype(np.float32)


def _pair(cfg, site=0, seed=3):
  """(NNX connection, Linen connection, shared random params)."""
  x = jnp.zeros((1, 1, cfg.n, C))
  lin = linen_conn.Connection(cfg)
  params = nn.meta.unbox(lin.init(jax.random.PRNGKey(0), x, branch, site))["params"]
  leaves, tree = jax.tree.flatten(params)
  params = jax.tree.unflatten(tree, [l + _rand(seed + i, l.shape, 0.3) for i, l in enumerate(leaves)])
  conn = mnnx.Connection(cfg, C, site=site, rngs=nnx.Rngs(0))
  return mnnx.from_linen_params(conn, params), lin, params


def _nnx_apply(conn, params, x):
  return mnnx.from_linen_params(nnx.clone(conn), params)(x, branch)


@pytest.mark.parametrize("kind,n", KINDS_N)
def test_outputs_and_grads_match_linen(kind, n):
  cfg = ConnectionConfig(kind=kind, n_streams=n)
  conn, lin, params = _pair(cfg, site=1)
  x, ct = _rand(1, (2, 5, n, C), 2.0), _rand(2, (2, 5, n, C))
  np.testing.assert_allclose(conn(x, branch), lin.apply({"params": params}, x, branch, 1),
                             rtol=1e-6, atol=1e-6)
  f_nnx = lambda p, x: jnp.sum(_nnx_apply(conn, p, x) * ct)  # noqa: E731
  f_lin = lambda p, x: jnp.sum(lin.apply({"params": p}, x, branch, 1) * ct)  # noqa: E731
  g_nnx = jax.grad(f_nnx, argnums=(0, 1))(params, x)
  g_lin = jax.grad(f_lin, argnums=(0, 1))(params, x)
  assert jax.tree.structure(g_nnx) == jax.tree.structure(g_lin)
  for a, b in zip(jax.tree.leaves(g_nnx), jax.tree.leaves(g_lin)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind,n", [(k, n) for k, n in KINDS_N if k != "residual"])
@pytest.mark.parametrize("site", [0, 3])
def test_init_matches_linen(kind, n, site):
  """The deterministic initial parameters (biases, gates, phi for hc_like) equal Linen's."""
  cfg = ConnectionConfig(kind=kind, n_streams=n)
  lin = nn.meta.unbox(linen_conn.Connection(cfg).init(
      jax.random.PRNGKey(0), jnp.zeros((1, 1, n, C)), branch, site))["params"]
  got = mnnx.to_linen_params(mnnx.Connection(cfg, C, site=site, rngs=nnx.Rngs(0)))
  assert jax.tree.structure(got) == jax.tree.structure(lin)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(lin)):
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("kind,n", [("mhc", 4), ("mhc_lite", 3), ("hc", 4)])
def test_matches_float64_oracle(kind, n):
  cfg = ConnectionConfig(kind=kind, n_streams=n, sinkhorn_iters=20)
  conn, _, params = _pair(cfg)
  x = _rand(1, (2, 5, n, C), 2.0)
  p = jax.tree.map(np.asarray, params)
  cp = {k: v for k, v in p.items() if k != "norm"}
  if kind == "mhc":
    h_pre, h_post, h_res = oracles.mhc(x, **cp, iters=20)
  elif kind == "mhc_lite":
    h_pre, h_post, h_res = oracles.mhc_lite(x, **cp)
  else:
    h_pre, h_post, h_res = oracles.hc(x, cp)
  u = oracles.stream_pre(x, h_pre)
  normed = u / np.sqrt((u ** 2).mean(-1, keepdims=True) + 1e-6) * p["norm"]["scale"]
  want = oracles.stream_post(x, np.tanh(normed @ W.astype(np.float64)), h_res, h_post)
  got, sown = nnx.capture(conn, nnx.Intermediate)(x, branch)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(nnx.to_pure_dict(sown)["h_res"][0], h_res, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind,n", [("mhc", 4), ("mhc_lite", 3), ("hc", 4)])
@pytest.mark.parametrize("block", ["pre", "post", "res"])
def test_each_mapping_is_used(kind, n, block):
  conn, _, params = _pair(ConnectionConfig(kind=kind, n_streams=n))
  x = _rand(2, (2, 3, n, C))
  base = np.asarray(conn(x, branch))
  if kind == "hc":
    key = {"pre": "b_pre", "post": "b_post", "res": "b_res"}[block]
    conn_param = getattr(conn, key)
    conn_param[...] = conn_param[...] + 0.1 * jnp.arange(1, conn_param.size + 1).reshape(conn_param.shape)
  else:
    sl = {"pre": slice(0, n), "post": slice(n, 2 * n), "res": slice(2 * n, None)}[block]
    b = np.array(conn.b[...])
    b[sl] += 0.5 * np.arange(1, b[sl].size + 1)
    conn.b[...] = jnp.asarray(b)
  assert np.abs(np.asarray(conn(x, branch)) - base).max() > 1e-3, f"H_{block} is not used"


@pytest.mark.parametrize("kind", ["hc", "mhc"])
def test_orientation_non_symmetric_h_res(kind):
  """x_next[i] = sum_j H_res[i, j] x[j]: with H_res the cyclic permutation e_i <- e_{i+1} and a
  zero branch, stream i receives stream i + 1 (a transposed H_res would send it to i - 1)."""
  n = 3
  conn = mnnx.Connection(ConnectionConfig(kind=kind, n_streams=n), C, rngs=nnx.Rngs(0))
  perm = np.roll(np.eye(n, dtype=np.float32), 1, axis=1)          # perm[i, (i + 1) % n] = 1
  assert not np.array_equal(perm, perm.T)
  if kind == "hc":
    conn.b_res[...] = jnp.asarray(perm)
    conn.alpha[...] = jnp.zeros((3,))
  else:
    conn.b[...] = conn.b[...].at[2 * n:].set(jnp.asarray(np.where(perm, 30.0, -30.0).ravel()))
  x = np.stack([np.full(C, 10.0 ** j) for j in range(n)]).astype(np.float32)[None, None]
  out = np.asarray(conn(x, lambda u: jnp.zeros_like(u)))
  np.testing.assert_allclose(out[0, 0], x[0, 0, [1, 2, 0]], rtol=1e-5)


def test_collapse_head_matches_linen():
  n = 4
  x = _rand(4, (2, 3, n, C))
  p = {"phi": _rand(5, (n * C, n), 0.2), "b": _rand(6, (n,)), "alpha": np.array([0.8], np.float32)}
  head = mnnx.from_linen_params(mnnx.CollapseHead(n, C, eps=1e-6), p)
  want = linen_conn.CollapseHead(eps=1e-6).apply({"params": p}, x)
  np.testing.assert_allclose(head(x), want, rtol=1e-6, atol=1e-6)


def test_errors_name_the_field():
  cfg = ConnectionConfig(kind="mhc", n_streams=2)
  conn = mnnx.Connection(cfg, C, rngs=nnx.Rngs(0))
  params = mnnx.to_linen_params(conn)
  bad = {**params, "phi": np.zeros((2 * C, 3), np.float32)}
  with pytest.raises(ValueError, match=r"params phi: shape \(16, 3\)"):
    mnnx.from_linen_params(conn, bad)
  with pytest.raises(ValueError, match=r"params: missing \['alpha'\]"):
    mnnx.from_linen_params(conn, {k: v for k, v in params.items() if k != "alpha"})
  with pytest.raises(ValueError, match=r"x: shape \(2, 3, 4, 8\)"):
    conn(np.zeros((2, 3, 4, C), np.float32), branch)
  with pytest.raises(ConfigError, match="d_model=0"):
    mnnx.Connection(cfg, 0, rngs=nnx.Rngs(0))
  with pytest.raises(ConfigError, match="connection.n_streams"):
    mnnx.Connection(ConnectionConfig(kind="residual", n_streams=2), C, rngs=nnx.Rngs(0))


@pytest.mark.parametrize("kind", ["mhc", "mhc_lite"])
def test_kernel_path_matches_linen(kind):
  """`implementation="interpret"`: the Pallas kernels (interpreted on CPU) behind the NNX module."""
  cfg = ConnectionConfig(kind=kind, n_streams=2, implementation="interpret")
  conn, lin, params = _pair(cfg)
  x = _rand(1, (2, 8, 2, C))
  np.testing.assert_allclose(conn(x, branch), lin.apply({"params": params}, x, branch, 0),
                             rtol=1e-6, atol=1e-6)
