"""mHC mapping math on sharded residual streams `[B, T, n, C]` equals the unsharded math.

Two paths: the explicit `shard_map` form (partial projection + sum of squares psum-ed over `tensor`)
and plain GSPMD (`jit` with feature-sharded inputs); both against a float64 NumPy oracle.
"""
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from mhc_jax.config import MeshConfig
from mhc_jax import sharding as S
from mhc_jax.ops.mappings import mhc_mappings
from mhc_jax.ops.streams import stream_post, stream_pre

B, T, N, C = 8, 8, 4, 32
W = N * N + 2 * N
ITERS = 20


def shard_map(fn: Callable, mesh: Mesh, in_specs, out_specs) -> Callable:
  """`jax.shard_map(fn, ...)` with `check_vma=False` (Pallas calls carry no varying-axis info)."""
  return jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)


def stream_specs(mesh_cfg: MeshConfig) -> dict[str, P]:
  """PartitionSpecs for kernel operands: `x [B,T,n,C]`, `y/u [B,T,C]`, `h [B,T,n]`, `h_res [B,T,n,n]`."""
  x = S.logical_spec(("batch", "length", "streams", "embed"), mesh_cfg)
  y = S.logical_spec(("batch", "length", "embed"), mesh_cfg)
  h = P(*x[:2], None)
  return {"x": x, "y": y, "h": h, "h_res": P(*x[:2], None, None)}


def mhc_mappings_shard_map(mesh: Mesh, mesh_cfg: MeshConfig, **kwargs) -> Callable:
  """`(x_BTnC, params) -> (h_pre, h_post, h_res)` as one shard_map over the strategy's stream layout.

  With `stream_sharding="feature"` the projection is psum-ed over `tensor`; otherwise the math is local.
  Keyword arguments go to the mapping (`sinkhorn_iters`, `sinkhorn_eps`, `norm_eps`, `pre_eps`).
  """
  specs = stream_specs(mesh_cfg)
  axis = "tensor" if mesh_cfg.stream_sharding == "feature" else None
  body = lambda x, p: mhc_mappings(x, p, axis=axis, **kwargs)  # noqa: E731
  p_specs = {"phi": P(), "b": P(), "alpha": P()}
  return shard_map(body, mesh, (specs["x"], p_specs),
                          (specs["h"], specs["h"], specs["h_res"]))


def oracle(x, phi, b, alpha, norm_eps=1e-6):
  """float64 NumPy: h = (vec x @ phi) / rms(vec x); sigmoid / 2 sigmoid / Sinkhorn (cols then rows)."""
  x, phi, b, alpha = (np.asarray(a, np.float64) for a in (x, phi, b, alpha))
  xf = x.reshape(*x.shape[:-2], N * C)
  h = (xf @ phi) / np.sqrt(np.mean(xf ** 2, axis=-1, keepdims=True) + norm_eps)
  sig = lambda z: 1.0 / (1.0 + np.exp(-z))
  h_pre = sig(alpha[0] * h[..., :N] + b[:N])
  h_post = 2.0 * sig(alpha[1] * h[..., N:2 * N] + b[N:2 * N])
  logits = (alpha[2] * h[..., 2 * N:] + b[2 * N:]).reshape(*h.shape[:-1], N, N)
  m = np.exp(logits - logits.max(axis=(-2, -1), keepdims=True))
  for _ in range(ITERS):
    m = m / m.sum(axis=-2, keepdims=True)
    m = m / m.sum(axis=-1, keepdims=True)
  return h_pre, h_post, m


def inputs(seed=0):
  k = jax.random.split(jax.random.key(seed), 4)
  # streams with distinct scales so that a wrong row/column slicing of phi cannot cancel out
  x = jax.random.normal(k[0], (B, T, N, C)) * jnp.arange(1, N + 1)[:, None]
  params = {"phi": 0.3 * jax.random.normal(k[1], (N * C, W)),
            "b": 0.5 * jax.random.normal(k[2], (W,)),
            "alpha": jnp.array([1.3, 0.7, 2.0])}
  return x, params


@pytest.mark.parametrize("strategy, shape, stream", [
    ("tp", (2, 1, 4), "feature"), ("fsdp_tp", (1, 4, 2), "feature"),
    ("tp", (2, 1, 4), "sequence"), ("dp", None, "replicated"),
])
def test_shard_map_mappings_match_oracle(strategy, shape, stream):
  cfg = MeshConfig(strategy, shape, stream)
  mesh = S.make_mesh(cfg)
  x, params = inputs()
  got = jax.jit(mhc_mappings_shard_map(mesh, cfg, sinkhorn_iters=ITERS))(x, params)
  want = oracle(x, params["phi"], params["b"], params["alpha"])
  for g, w in zip(got, want):
    np.testing.assert_allclose(np.asarray(g), w, rtol=2e-5, atol=2e-6)


def test_feature_sharded_projection_really_is_partial():
  """Each shard alone holds only part of the projection: the psum is what completes it."""
  cfg = MeshConfig("tp", (1, 1, 8), "feature")
  mesh = S.make_mesh(cfg)
  x, params = inputs(1)
  spec = stream_specs(cfg)["x"]

  def local_only(x_blk, phi):   # the same contraction without the psum
    k = jax.lax.axis_index("tensor")
    c = x_blk.shape[-1]
    phi_blk = jax.lax.dynamic_slice_in_dim(phi.reshape(N, C, W), k * c, c, axis=1)
    return jnp.einsum("btjc,jcw->btw", x_blk, phi_blk)[None]

  partial = shard_map(local_only, mesh, (spec, P()), P("tensor"))(x, params["phi"])
  full = np.einsum("btk,kw->btw", np.asarray(x, np.float64).reshape(B, T, N * C),
                   np.asarray(params["phi"], np.float64))
  np.testing.assert_allclose(np.asarray(partial).sum(0), full, rtol=1e-4, atol=1e-4)
  assert np.abs(np.asarray(partial[0]) - full).max() > 1e-1


def test_shard_map_mapping_gradients_match_unsharded():
  cfg = MeshConfig("fsdp_tp", (1, 2, 4), "feature")
  mesh = S.make_mesh(cfg)
  x, params = inputs(2)
  keys = jax.random.split(jax.random.key(9), 3)
  cts = [jax.random.normal(keys[0], (B, T, N)), jax.random.normal(keys[1], (B, T, N)),
         jax.random.normal(keys[2], (B, T, N, N))]

  def loss(fn):
    return lambda x, p: sum(jnp.sum(h * c) for h, c in zip(fn(x, p), cts))

  sharded = mhc_mappings_shard_map(mesh, cfg, sinkhorn_iters=ITERS)
  g_sh = jax.jit(jax.grad(loss(sharded), argnums=(0, 1)))(x, params)
  g_ref = jax.grad(loss(lambda x, p: mhc_mappings(x, p, sinkhorn_iters=ITERS)), argnums=(0, 1))(
      x, params)
  for a, b in zip(jax.tree.leaves(g_sh), jax.tree.leaves(g_ref)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4,
                               atol=1e-5 * float(jnp.abs(b).max()))


@pytest.mark.parametrize("stream", ["feature", "sequence"])
def test_gspmd_path_is_automatic(stream):
  """Plain `jit(mhc_mappings)` on sharded streams: XLA inserts the reduction itself."""
  cfg = MeshConfig("tp", (2, 1, 4), stream)
  mesh = S.make_mesh(cfg)
  x, params = inputs(3)
  xs = jax.device_put(x, NamedSharding(mesh, stream_specs(cfg)["x"]))
  fn = jax.jit(lambda x, p: mhc_mappings(x, p, sinkhorn_iters=ITERS))
  got = fn(xs, params)
  want = oracle(x, params["phi"], params["b"], params["alpha"])
  for g, w in zip(got, want):
    np.testing.assert_allclose(np.asarray(g), w, rtol=2e-5, atol=2e-6)
  if stream == "feature":
    hlo = fn.lower(xs, params).compile().as_text()
    # XLA either reduces partial projections or gathers the features first: a collective either way.
    assert any(op in hlo for op in ("all-reduce", "reduce-scatter", "all-gather"))


@pytest.mark.parametrize("stream", ["replicated", "feature", "sequence"])
def test_stream_ops_under_kernel_shard_map_match_unsharded(stream):
  """The stream mix is token-local and contracts over streams only: local under every layout."""
  cfg = MeshConfig("fsdp_tp", (1, 2, 4), stream)
  mesh = S.make_mesh(cfg)
  k = jax.random.split(jax.random.key(4), 4)
  x = jax.random.normal(k[0], (B, T, N, C))
  y = jax.random.normal(k[1], (B, T, C))
  h_pre = jax.random.uniform(k[2], (B, T, N))
  h_res = jax.random.uniform(k[3], (B, T, N, N))   # not doubly stochastic, not symmetric
  h_post = 2 * h_pre[..., ::-1]
  sp = stream_specs(cfg)
  pre = shard_map(stream_pre, mesh, (sp["x"], sp["h"]), sp["y"])
  post = shard_map(stream_post, mesh, (sp["x"], sp["y"], sp["h_res"], sp["h"]), sp["x"])
  xd = np.asarray(x, np.float64)
  np.testing.assert_allclose(np.asarray(jax.jit(pre)(x, h_pre)),
                             np.einsum("btj,btjc->btc", np.asarray(h_pre, np.float64), xd),
                             rtol=1e-5, atol=1e-5)
  want_post = (np.einsum("btij,btjc->btic", np.asarray(h_res, np.float64), xd)
               + np.asarray(h_post, np.float64)[..., None] * np.asarray(y, np.float64)[:, :, None])
  np.testing.assert_allclose(np.asarray(jax.jit(post)(x, y, h_res, h_post)), want_post,
                             rtol=1e-5, atol=1e-5)
