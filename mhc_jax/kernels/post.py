"""Fused post kernel: `x_next[i] = sum_j H_res[i, j] x[j] + H_post[i] y` in one pass.

Reads x (n*C) and y (C), writes x_next (n*C) per token; mixing accumulates in float32.
The coefficients come packed `hp [T, W]` (lanes [n, 2n) = H_post, [2n, 2n + n*n) = H_res row-major,
the layout of `block.py`), so the pre kernel's output can feed it directly.

Backward kernel (one pass over x, y and the cotangent g):
    dx[j] = sum_i H_res[i, j] g[i],  dy = sum_i H_post[i] g[i],
    dH_res[i, j] = <g[i], x[j]>,     dH_post[i] = <g[i], y>       (float32)
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from mhc_jax.kernels import block, launch
from mhc_jax.kernels.block import col


def lanes(n: int) -> int:
  return block.MapSpec("mhc", n).lanes


def _fwd_body(cfg, x_ref, y_ref, hp_ref, o_ref):
  n, c = cfg.n, cfg.c
  hp = hp_ref[...]
  post = [col(hp, n + i) for i in range(n)]
  res = [[col(hp, 2 * n + i * n + j) for j in range(n)] for i in range(n)]
  for o, s in block.chunks(c, cfg.max_chunk):
    xs = [x_ref[:, j * c + o:j * c + o + s].astype(jnp.float32) for j in range(n)]
    y = y_ref[:, o:o + s].astype(jnp.float32)
    for i in range(n):
      acc = post[i] * y
      for j in range(n):
        acc = acc + res[i][j] * xs[j]
      o_ref[:, i * c + o:i * c + o + s] = acc.astype(o_ref.dtype)


def _bwd_body(cfg, x_ref, y_ref, hp_ref, g_ref, dx_ref, dy_ref, dhp_ref):
  n, c = cfg.n, cfg.c
  hp = hp_ref[...]
  post = [col(hp, n + i) for i in range(n)]
  res = [[col(hp, 2 * n + i * n + j) for j in range(n)] for i in range(n)]
  dpost = [None] * n
  dres = [[None] * n for _ in range(n)]

  def add(a, b):
    return b if a is None else a + b

  for o, s in block.chunks(c, cfg.max_chunk):
    xs = [x_ref[:, j * c + o:j * c + o + s].astype(jnp.float32) for j in range(n)]
    gs = [g_ref[:, i * c + o:i * c + o + s].astype(jnp.float32) for i in range(n)]
    y = y_ref[:, o:o + s].astype(jnp.float32)
    dy = None
    for i in range(n):
      dy = add(dy, post[i] * gs[i])
      dpost[i] = add(dpost[i], jnp.sum(gs[i] * y, axis=1, keepdims=True))
      for j in range(n):
        dres[i][j] = add(dres[i][j], jnp.sum(gs[i] * xs[j], axis=1, keepdims=True))
    dy_ref[:, o:o + s] = dy.astype(dy_ref.dtype)
    for j in range(n):
      dx = None
      for i in range(n):
        dx = add(dx, res[i][j] * gs[i])
      dx_ref[:, j * c + o:j * c + o + s] = dx.astype(dx_ref.dtype)
  ids = jax.lax.broadcasted_iota(jnp.int32, hp.shape, 1)
  dhp = jnp.zeros(hp.shape, jnp.float32)
  for i in range(n):
    dhp = dhp + jnp.where(ids == n + i, dpost[i], 0.0)
    for j in range(n):
      dhp = dhp + jnp.where(ids == 2 * n + i * n + j, dres[i][j], 0.0)
  dhp_ref[...] = dhp


def _post_fwd_call(cfg, x2d, y, hp):
  t = x2d.shape[0]
  return launch.call(
      cfg, functools.partial(_fwd_body, cfg), tokens=t,
      in_specs=[launch.tokens_spec(cfg, cfg.nc), launch.tokens_spec(cfg, cfg.c),
                launch.tokens_spec(cfg, hp.shape[1])],
      out_specs=launch.tokens_spec(cfg, cfg.nc),
      out_shape=jax.ShapeDtypeStruct((t, cfg.nc), x2d.dtype),
  )(x2d, y, hp)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def fused_post(cfg: launch.KernelCfg, x2d, y, hp):
  """`x_next [T, nC]` from `x2d [T, nC]`, `y [T, C]` and packed `hp [T, W]` float32."""
  return _post_fwd_call(cfg, x2d, y, hp)


def _fwd(cfg, x2d, y, hp):
  return _post_fwd_call(cfg, x2d, y, hp), (x2d, y, hp)


def _bwd(cfg, res, g):
  x2d, y, hp = res
  t, w = hp.shape
  return tuple(launch.call(
      cfg, functools.partial(_bwd_body, cfg), tokens=t,
      in_specs=[launch.tokens_spec(cfg, cfg.nc), launch.tokens_spec(cfg, cfg.c),
                launch.tokens_spec(cfg, w), launch.tokens_spec(cfg, cfg.nc)],
      out_specs=[launch.tokens_spec(cfg, cfg.nc), launch.tokens_spec(cfg, cfg.c),
                 launch.tokens_spec(cfg, w)],
      out_shape=[jax.ShapeDtypeStruct((t, cfg.nc), x2d.dtype),
                 jax.ShapeDtypeStruct((t, cfg.c), y.dtype),
                 jax.ShapeDtypeStruct((t, w), jnp.float32)],
  )(x2d, y, hp, g.astype(x2d.dtype)))


fused_post.defvjp(_fwd, _bwd)
