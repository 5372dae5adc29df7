"""The kernels under a mesh: `shard_map` over the axes that shard tokens (and features).

Pallas calls are opaque to GSPMD, so a sharded `jit` would gather their operands; inside
`shard_map` each device runs the kernel on its own token block. Both ops are token-local:

  stream_post: also feature-local, so x / y may be sharded on C as well (`P(..., "tensor")`).
  mhc_pre:     token-sharded -> the fused kernel per device. Feature-sharded (C split over an
               axis) -> the mappings need a psum of the partial projection and sum of squares
               (`mhc_jax.sharding.sharded_projected_logits`, w + 1 floats per token), done in XLA;
               `u` is then local. (A kernel for the partial statistics is not written yet.)
"""
from __future__ import annotations

import jax
from jax.sharding import PartitionSpec as P

from mhc_jax import ops
from mhc_jax.kernels.api import mhc_pre, stream_post


def _shard_map(fn, mesh, in_specs, out_specs):
  return jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)


def _specs(x_spec: P):
  x_spec = P(*x_spec)
  lead = tuple(x_spec[:-2])
  feat = x_spec[-1]
  return lead, feat, P(*lead, feat), P(*lead, None), P(*lead, None, None)


def mhc_pre_sharded(mesh, x_spec: P, **kwargs):
  """`(x [..., n, C], params) -> (u, h_pre, h_post, h_res)` under `mesh` with x laid out as `x_spec`.

  `x_spec` must leave the stream axis unsharded. kwargs go to `mhc_pre` (kind, sinkhorn_iters, ...,
  implementation).
  """
  lead, feat, u_spec, h_spec, r_spec = _specs(x_spec)
  if x_spec[-2] is not None:
    raise ValueError(f"mhc_pre_sharded: x_spec={x_spec} shards the stream axis; leave it None")
  p_specs = {"phi": P(), "b": P(), "alpha": P()}
  if feat is None:
    body = lambda x, p: mhc_pre(x, p, **kwargs)  # noqa: E731
  else:
    from mhc_jax import sharding
    kind = kwargs.get("kind", "mhc")
    if kind != "mhc":
      raise ValueError("mhc_pre_sharded: feature-sharded x supports kind='mhc' only")
    keys = ("sinkhorn_iters", "sinkhorn_eps", "norm_eps", "pre_eps")

    def body(x, p):
      h_pre, h_post, h_res = sharding.sharded_mhc_mappings(
          x, p, axis=feat, **{k: kwargs[k] for k in keys if k in kwargs})
      return ops.stream_pre(x, h_pre), h_pre, h_post, h_res
  return _shard_map(body, mesh, (x_spec, p_specs), (u_spec, h_spec, h_spec, r_spec))


def stream_post_sharded(mesh, x_spec: P, **kwargs):
  """`(x, y, h_res, h_post) -> x_next` under `mesh`; x may be sharded on tokens and features."""
  lead, feat, y_spec, h_spec, r_spec = _specs(x_spec)
  body = lambda x, y, r, q: stream_post(x, y, r, q, **kwargs)  # noqa: E731
  return _shard_map(body, mesh, (P(*x_spec), y_spec, r_spec, h_spec), P(*x_spec))
