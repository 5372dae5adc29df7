"""The kernels under a mesh: `shard_map` over the axes that shard tokens (and features).

Pallas calls are opaque to GSPMD, so a sharded `jit` would gather their operands; inside
`shard_map` each device runs the kernel on its own token block. Both ops are token-local:

  stream_post: also feature-local, so x / y may be sharded on C as well (`P(..., "tensor")`).
  mhc_pre:     token-sharded -> the fused kernel per device. Feature-sharded (C split over an
               axis) -> the mappings need a psum of the partial projection and sum of squares
               (w + 1 floats per token): `pre_tp.fused_pre_tp` (stats kernel, psum, finish kernel)
               for kernel implementations, `mhc_jax.sharding.sharded_mhc_mappings` for `xla`;
               `u` is then local.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
from jax.sharding import PartitionSpec as P

from mhc_jax import ops
from mhc_jax.kernels import block, launch
from mhc_jax.kernels.api import _split_h, mhc_pre, resolve, stream_post
from mhc_jax.kernels.pre_tp import fused_pre_tp, local_phi_rows


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
    body = functools.partial(_pre_feature_sharded, axis=feat, kwargs=kwargs)
  return _shard_map(body, mesh, (x_spec, p_specs), (u_spec, h_spec, h_spec, r_spec))


def stream_post_sharded(mesh, x_spec: P, **kwargs):
  """`(x, y, h_res, h_post) -> x_next` under `mesh`; x may be sharded on tokens and features."""
  lead, feat, y_spec, h_spec, r_spec = _specs(x_spec)
  body = lambda x, y, r, q: stream_post(x, y, r, q, **kwargs)  # noqa: E731
  return _shard_map(body, mesh, (P(*x_spec), y_spec, r_spec, h_spec), P(*x_spec))


def _pre_feature_sharded(x, params, *, axis, kwargs):
  """Body for feature-sharded x (inside shard_map): kernels with a psum of the stats, or XLA."""
  kind = kwargs.get("kind", "mhc")
  impl = resolve(kwargs.get("implementation", "auto"), x, kind)
  keys = ("sinkhorn_iters", "sinkhorn_eps", "norm_eps", "pre_eps")
  opts = {k: kwargs[k] for k in keys if k in kwargs}
  if impl == "xla":
    if kind != "mhc":
      raise ValueError("mhc_pre_sharded: feature-sharded x on the xla path supports kind='mhc' only")
    from mhc_jax import sharding
    h_pre, h_post, h_res = sharding.sharded_mhc_mappings(x, params, axis=axis, **opts)
    return ops.stream_pre(x, h_pre), h_pre, h_post, h_res
  *lead, n, c_local = x.shape
  t = x.size // (n * c_local)
  k = jax.lax.axis_size(axis)
  defaults = block.MapSpec(kind, n)
  spec = block.MapSpec(kind, n, int(opts.get("sinkhorn_iters", defaults.sinkhorn_iters)),
                       float(opts.get("sinkhorn_eps", defaults.sinkhorn_eps)),
                       float(opts.get("norm_eps", defaults.norm_eps)),
                       float(opts.get("pre_eps", defaults.pre_eps)))
  cfg = launch.make_cfg(impl, n, c_local, x.dtype, t, spec=spec,
                        bt=kwargs.get("block_tokens"), max_chunk=kwargs.get("max_chunk"))
  cfg = dataclasses.replace(cfg, norm_count=n * c_local * k)
  phi_l = local_phi_rows(params["phi"], n, c_local, axis)
  u, h = fused_pre_tp(cfg, axis, x.reshape(t, n * c_local), phi_l, params["b"], params["alpha"])
  return (u.reshape(*lead, c_local),) + _split_h(h, lead, n)
