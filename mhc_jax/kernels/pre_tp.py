"""Fused pre on feature-sharded streams (call inside `shard_map`; features split over `axis`).

Each device holds `x [T, n, C/k]` and the matching rows of `phi`. Then:
  1. stats kernel: partial `proj = x_shard @ phi_shard` and partial sum of squares;
  2. one `psum` over `axis` of `n*n + 2n + 1` floats per token (the packed projection and sumsq);
  3. finish kernel (the pre kernel with the stats given): mapping, and the local slice of `u`.
Backward: the psum-ed stats are saved from the forward (W + 1 floats per token, so no second
psum); psum the coefficient cotangent together with the partial `<du, x[j]>`
(shard_map hands each shard 1/k of a replicated output's cotangent); then the backward kernel with
stats and dH given. `dx` and the `dphi` rows are local. `db` and `dalpha` come out equal on every
shard of `axis` and shard_map sums a replicated input's cotangent over it, so they are divided by k.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from mhc_jax.kernels import launch
from mhc_jax.kernels.pre import param_grads, pre_bwd_call, pre_fwd_call, stats


def _stats_body(cfg, x_ref, phi_ref, proj_ref, ss_ref):
  proj, ss = stats(cfg, x_ref, phi_ref)
  proj_ref[...] = proj
  ss_ref[...] = ss


def _global_stats(cfg, axis, x2d, phi_l):
  t = x2d.shape[0]
  w = cfg.spec.lanes
  proj, ss = launch.call(
      cfg, functools.partial(_stats_body, cfg), tokens=t,
      in_specs=[launch.tokens_spec(cfg, cfg.nc), launch.full_spec((cfg.nc, w))],
      out_specs=[launch.tokens_spec(cfg, w), launch.tokens_spec(cfg, 1)],
      out_shape=[jax.ShapeDtypeStruct((t, w), jnp.float32),
                 jax.ShapeDtypeStruct((t, 1), jnp.float32)],
  )(x2d, jnp.pad(phi_l.astype(jnp.float32), ((0, 0), (0, w - phi_l.shape[1]))))
  both = jax.lax.psum(jnp.concatenate([proj[:, :cfg.spec.width], ss], axis=1), axis)
  proj = jnp.pad(both[:, :-1], ((0, 0), (0, w - cfg.spec.width)))
  return proj, both[:, -1:]


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def fused_pre_tp(cfg: launch.KernelCfg, axis: str, x2d, phi_l, b, alpha):
  """`(u_shard [T, C/k], H [T, W])` from a feature shard `x2d [T, n*C/k]` and its `phi_l` rows."""
  return pre_fwd_call(cfg, x2d, phi_l, b, alpha, _global_stats(cfg, axis, x2d, phi_l))


def _fwd(cfg, axis, x2d, phi_l, b, alpha):
  stat = _global_stats(cfg, axis, x2d, phi_l)
  return pre_fwd_call(cfg, x2d, phi_l, b, alpha, stat), (x2d, phi_l, b, alpha, stat)


def _bwd(cfg, axis, res, cts):
  x2d, phi_l, b, alpha, stat = res
  du, dh = cts
  # Each shard got 1/k of dH (H is replicated over `axis`); dH_pre also needs <du, x[j]> over all
  # features. One psum completes both before the kernel.
  t, n = x2d.shape[0], cfg.n
  f32 = jnp.float32
  dpre = jnp.einsum("tjc,tc->tj", x2d.reshape(t, n, cfg.c).astype(f32), du.astype(f32),
                    precision=jax.lax.Precision.HIGHEST)
  dh = jax.lax.psum(dh.astype(f32) + jnp.pad(dpre, ((0, 0), (0, dh.shape[1] - n))), axis)
  cfg = dataclasses.replace(cfg, dpre_given=True)
  dx, dz, hh, dproj = pre_bwd_call(cfg, x2d, phi_l, b, alpha, du, dh, stat)
  dphi, db, dalpha = param_grads(cfg, x2d, dz, hh, dproj)
  k = jax.lax.axis_size(axis)
  return (dx, dphi.astype(phi_l.dtype), (db / k).astype(b.dtype),
          (dalpha / k).astype(alpha.dtype))


fused_pre_tp.defvjp(_fwd, _bwd)


def local_phi_rows(phi: jax.Array, n: int, c_local: int, axis: str) -> jax.Array:
  """Rows of `phi [n*C, w]` (stream-major) for this device's feature shard: `[n*C/k, w]`."""
  w = phi.shape[-1]
  idx = jax.lax.axis_index(axis)
  phi_ncw = phi.reshape(n, -1, w)
  return jax.lax.dynamic_slice_in_dim(phi_ncw, idx * c_local, c_local, axis=1).reshape(-1, w)


def pre_feature_shard(cfg: launch.KernelCfg, axis: str, x2d, phi, b, alpha):
  """`(u_shard [T, C/k], H [T, W])` for the local feature shard `x2d [T, n*C/k]` (inside
  `shard_map`); `phi` is the full `[n*C, w]`, `cfg` is made for the local width C/k."""
  k = jax.lax.axis_size(axis)
  cfg = dataclasses.replace(cfg, norm_count=cfg.nc * k)
  return fused_pre_tp(cfg, axis, x2d, local_phi_rows(phi, cfg.n, cfg.c, axis), b, alpha)
