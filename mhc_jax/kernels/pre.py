"""Fused mHC / mHC-lite pre kernel: one pass over the streams gives the mappings and `u`.

Per token (x_flat = vec(x) in R^{nC}, DESIGN.md packed parameters):
    proj = x_flat @ phi,  r = rsqrt(mean(x_flat^2) + norm_eps),  z = alpha * (proj * r) + b
    (H_pre, H_post, H_res) = mapping(z)          (sigmoid, 2 sigmoid, Sinkhorn / permutation mix)
    u = sum_j H_pre[j] x[j]
Outputs `u [T, C]` (x dtype) and packed `H [T, W]` (float32, layout in `block.py`).

Backward (`jax.custom_vjp`): a second kernel recomputes the forward from x (nothing but x and the
parameters is saved), differentiates the mapping exactly (Sinkhorn iterates rebuilt in VMEM /
registers, never stored in HBM), and returns dx plus the per-token `dz`, `h = proj * r` and
`dproj`; the parameter gradients are float32 reductions over tokens done by XLA:
    dphi = x_flat^T dproj,  db = sum_t dz,  dalpha_g = sum_t sum_{k in g} dz_k h_k.

Two forms of the per-block feature passes (the math is the same):
  static: the feature axis cut into static chunks, unrolled (TPU / Mosaic, and interpret mode
          without `max_chunk`): one chunk per stream by default.
  looped: GPU (Triton), and interpret mode with `max_chunk`: every pass over the features is a
          `lax.fori_loop` over equal power-of-two chunks `s` (`loop_chunk`), sliced from the refs
          with `pl.ds(pl.multiple_of(j*C + q*s, s), s)`; only float32 accumulators (`proj [bt, W]`,
          `sumsq`, the n `<du, x[j]>`) are carried, so no tile grows with C: one x chunk
          `[bt, s]` and one phi chunk `[s, W]` per step. Unrolled chunks made Triton keep several
          chunks' tiles live (register spills on sm_90a, and shared memory past the H100's limit
          from C = 2048).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from mhc_jax.kernels import block, launch
from mhc_jax.kernels.block import col, mapping, mapping_vjp, project, row


def _xload(cfg, ref, j, o, s):
  """Chunk `[o, o+s)` of stream j from a `[bt, nC]` block. Chunks are re-read where needed rather
  than kept live (VMEM reads on TPU; cache reads on GPU, where registers are scarce)."""
  return ref[:, j * cfg.c + o:j * cfg.c + o + s]


def loop_chunk(cfg) -> int | None:
  """Feature chunk `s` of the looped form (module doc), or None for the static form (TPU, and
  interpret mode without `max_chunk`): the largest power of two <= max_chunk that divides C."""
  if cfg.max_chunk is None or cfg.backend == "tpu":
    return None
  s = 1 << (max(1, min(cfg.max_chunk, cfg.c)).bit_length() - 1)
  while cfg.c % s:
    s //= 2
  return s


def _ds(off, s):
  """`pl.ds` of a chunk start `off` (traced, a multiple of s) and static size s."""
  return pl.ds(pl.multiple_of(off, s), s)


def stats(cfg, x_ref, phi_ref):
  """`(proj [bt, W], sumsq [bt, 1])` of this block's features (all of them, or one shard's)."""
  s = loop_chunk(cfg)
  if s is not None:
    # x_flat and phi rows are both stream-major: chunk i is features [i*s, (i+1)*s) of x_flat.
    def body(i, carry):
      sl = _ds(i * s, s)
      p, t = project([x_ref[:, sl]], [phi_ref[sl, :]], cfg.bf16_passes)
      return carry[0] + p, carry[1] + t

    bt, f32 = x_ref.shape[0], jnp.float32
    init = (jnp.zeros((bt, cfg.spec.lanes), f32), jnp.zeros((bt, 1), f32))
    return jax.lax.fori_loop(0, cfg.nc // s, body, init)
  ch = block.chunks(cfg.c, cfg.max_chunk)
  pieces = [(j, o, s) for j in range(cfg.n) for o, s in ch]
  return project([_xload(cfg, x_ref, j, o, s) for j, o, s in pieces],
                 [phi_ref[j * cfg.c + o:j * cfg.c + o + s, :] for j, o, s in pieces],
                 cfg.bf16_passes)


def _forward_math(cfg, x_ref, phi_ref, prm_ref, vec_ref, m0_ref, m1_ref, stat_refs=None):
  """Everything up to the mapping. `stat_refs`: precomputed `(proj, sumsq)` (feature-sharded x,
  after the psum) instead of computing them from this block."""
  spec = cfg.spec
  ch = block.chunks(cfg.c, cfg.max_chunk)
  if stat_refs is None:
    proj, ss = stats(cfg, x_ref, phi_ref)
  else:
    proj, ss = stat_refs[0][...], stat_refs[1][...]
  r = jax.lax.rsqrt(ss * (1.0 / (cfg.norm_count or cfg.nc)) + spec.norm_eps)
  hh = proj * r
  prm = prm_ref[...]
  a_row, b_row = row(prm, 0), row(prm, 1)
  z = hh * a_row + b_row
  vecs, m0, m1 = vec_ref[...], m0_ref[...], m1_ref[...]
  return dict(ch=ch, proj=proj, r=r, hh=hh, z=z, a_row=a_row,
              fn=lambda z_: mapping(spec, z_, vecs, m0, m1),
              vjp=lambda z_: mapping_vjp(spec, z_, vecs, m0, m1))


def _fwd_body(cfg, x_ref, phi_ref, prm_ref, vec_ref, m0_ref, m1_ref, *rest):
  *stat_refs, u_ref, h_ref = rest
  f = _forward_math(cfg, x_ref, phi_ref, prm_ref, vec_ref, m0_ref, m1_ref, stat_refs or None)
  h = f["fn"](f["z"])
  h_ref[...] = h
  hpre = [col(h, j) for j in range(cfg.n)]
  s = loop_chunk(cfg)
  if s is not None:
    c, f32 = cfg.c, jnp.float32

    def body(q, carry):
      u = hpre[0] * x_ref[:, _ds(q * s, s)].astype(f32)
      for j in range(1, cfg.n):
        u = u + hpre[j] * x_ref[:, _ds(q * s + j * c, s)].astype(f32)
      u_ref[:, _ds(q * s, s)] = u.astype(u_ref.dtype)
      return carry

    jax.lax.fori_loop(0, c // s, body, 0)
    return
  for q, (o, s) in enumerate(f["ch"]):
    u = hpre[0] * _xload(cfg, x_ref, 0, o, s).astype(jnp.float32)
    for j in range(1, cfg.n):
      u = u + hpre[j] * _xload(cfg, x_ref, j, o, s).astype(jnp.float32)
    u_ref[:, o:o + s] = u.astype(u_ref.dtype)


def _dpre_static(cfg, ch, x_ref, du_ref):
  """`[<du, x[j]>]` per stream j (each `[bt, 1]`), static chunks."""
  dus = [du_ref[:, o:o + s].astype(jnp.float32) for o, s in ch]
  out = []
  for j in range(cfg.n):
    g = None
    for q, (o, s) in enumerate(ch):
      t = jnp.sum(dus[q] * _xload(cfg, x_ref, j, o, s).astype(jnp.float32), axis=1, keepdims=True)
      g = t if g is None else g + t
    out.append(g)
  return out


def _dpre_loop(cfg, s, x_ref, du_ref):
  """`[<du, x[j]>]` per stream j, one du chunk and n x chunks per loop step."""
  c, f32 = cfg.c, jnp.float32

  def body(q, g):
    du = du_ref[:, _ds(q * s, s)].astype(f32)
    return tuple(g[j] + jnp.sum(du * x_ref[:, _ds(q * s + j * c, s)].astype(f32), axis=1,
                                keepdims=True) for j in range(cfg.n))

  init = tuple(jnp.zeros((x_ref.shape[0], 1), f32) for _ in range(cfg.n))
  return list(jax.lax.fori_loop(0, c // s, body, init))


def _bwd_body(cfg, x_ref, phi_ref, prm_ref, vec_ref, m0_ref, m1_ref, *rest):
  *stat_refs, du_ref, dh_ref, dx_ref, dz_ref, hh_ref, dproj_ref = rest
  f = _forward_math(cfg, x_ref, phi_ref, prm_ref, vec_ref, m0_ref, m1_ref, stat_refs or None)
  ch = f["ch"]
  s = loop_chunk(cfg)
  dh = dh_ref[...]
  lanes = jax.lax.broadcasted_iota(jnp.int32, dh.shape, 1)
  if not cfg.dpre_given:      # u = sum_j H_pre[j] x[j]: dH_pre[j] += <du, x[j]>
    g = _dpre_static(cfg, ch, x_ref, du_ref) if s is None else _dpre_loop(cfg, s, x_ref, du_ref)
    for j in range(cfg.n):
      dh = dh + jnp.where(lanes == j, g[j], 0.0)
  # The mapping's saved iterates are live only from here to `vjp` (not across the feature loops).
  h, vjp = f["vjp"](f["z"])
  (dz,) = vjp(dh)
  dhh = dz * f["a_row"]
  r = f["r"]
  dproj = dhh * r
  dr = jnp.sum(dhh * f["proj"], axis=1, keepdims=True)
  dss2 = dr * (-1.0 / (cfg.norm_count or cfg.nc)) * r * r * r          # d/dx of ss is 2x; r = (ss/N + eps)^-1/2
  hpre = [col(h, j) for j in range(cfg.n)]
  f32 = jnp.float32
  if s is not None:
    c = cfg.c

    def body(q, carry):
      du = du_ref[:, _ds(q * s, s)].astype(f32)
      for j in range(cfg.n):
        sl = _ds(q * s + j * c, s)
        dx = block._dot_nt(dproj, phi_ref[sl, :])
        dx = dx + dss2 * x_ref[:, sl].astype(f32) + hpre[j] * du
        dx_ref[:, sl] = dx.astype(dx_ref.dtype)
      return carry

    jax.lax.fori_loop(0, c // s, body, 0)
  else:
    dus = [du_ref[:, o:o + s_].astype(f32) for o, s_ in ch]
    for j in range(cfg.n):
      for q, (o, s_) in enumerate(ch):
        dx = block._dot_nt(dproj, phi_ref[j * cfg.c + o:j * cfg.c + o + s_, :])
        dx = dx + dss2 * _xload(cfg, x_ref, j, o, s_).astype(f32) + hpre[j] * dus[q]
        dx_ref[:, j * cfg.c + o:j * cfg.c + o + s_] = dx.astype(dx_ref.dtype)
  dz_ref[...] = dz
  hh_ref[...] = f["hh"]
  dproj_ref[...] = dproj


def _operands(cfg, phi, b, alpha):
  spec = cfg.spec
  vecs, mats = block.constants(spec)
  return (block.pad_phi(spec, phi), block.param_rows(spec, b, alpha), jnp.asarray(vecs),
          jnp.asarray(mats[0]), jnp.asarray(mats[1]))


def _param_specs(cfg):
  w = cfg.spec.lanes
  return [launch.full_spec((cfg.nc, w)), launch.full_spec((8, w)), launch.full_spec((32, w)),
          launch.full_spec((w, w)), launch.full_spec((w, w))]


def _stat_specs(cfg, stat):
  return [] if stat is None else [launch.tokens_spec(cfg, cfg.spec.lanes), launch.tokens_spec(cfg, 1)]


def pre_fwd_call(cfg, x2d, phi, b, alpha, stat=None):
  """Forward kernel; `stat = (proj [T, W], sumsq [T, 1])` skips the projection (psum-ed stats)."""
  t = x2d.shape[0]
  w = cfg.spec.lanes
  return launch.call(
      cfg, functools.partial(_fwd_body, cfg), tokens=t,
      in_specs=[launch.tokens_spec(cfg, cfg.nc)] + _param_specs(cfg) + _stat_specs(cfg, stat),
      out_specs=[launch.tokens_spec(cfg, cfg.c), launch.tokens_spec(cfg, w)],
      out_shape=[jax.ShapeDtypeStruct((t, cfg.c), x2d.dtype),
                 jax.ShapeDtypeStruct((t, w), jnp.float32)],
  )(x2d, *_operands(cfg, phi, b, alpha), *(stat or ()))


def pre_bwd_call(cfg, x2d, phi, b, alpha, du, dh, stat=None):
  """Backward kernel: `(dx, dz, h, dproj)`; see the module docstring."""
  t = x2d.shape[0]
  w = cfg.spec.lanes
  f32 = jnp.float32
  return launch.call(
      cfg, functools.partial(_bwd_body, cfg), tokens=t,
      in_specs=[launch.tokens_spec(cfg, cfg.nc)] + _param_specs(cfg) + _stat_specs(cfg, stat)
      + [launch.tokens_spec(cfg, cfg.c), launch.tokens_spec(cfg, w)],
      out_specs=[launch.tokens_spec(cfg, cfg.nc)] + [launch.tokens_spec(cfg, w)] * 3,
      out_shape=[jax.ShapeDtypeStruct((t, cfg.nc), x2d.dtype)]
      + [jax.ShapeDtypeStruct((t, w), f32)] * 3,
  )(x2d, *_operands(cfg, phi, b, alpha), *(stat or ()), du.astype(x2d.dtype), dh.astype(f32))


def param_grads(cfg, x2d, dz, hh, dproj):
  """`(dphi, db, dalpha)`: float32 reductions over tokens of the backward kernel's outputs."""
  f32 = jnp.float32
  width = cfg.spec.width
  dphi = jnp.einsum("tk,tw->kw", x2d.astype(f32), dproj[:, :width],
                    precision=jax.lax.Precision.HIGHEST, preferred_element_type=f32)
  db = jnp.sum(dz[:, :width], axis=0)
  vecs, _ = block.constants(cfg.spec)
  dalpha = jnp.sum(dz * hh, axis=0) @ jnp.asarray(vecs[4:7].T)
  return dphi, db, dalpha


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def fused_pre(cfg: launch.KernelCfg, x2d, phi, b, alpha):
  """`(u [T, C], H [T, W])` from `x2d [T, nC]` and packed `phi, b, alpha` (see module doc)."""
  u, h = pre_fwd_call(cfg, x2d, phi, b, alpha)
  return u, h


def _fwd(cfg, x2d, phi, b, alpha):
  return pre_fwd_call(cfg, x2d, phi, b, alpha), (x2d, phi, b, alpha)


def _bwd(cfg, res, cts):
  x2d, phi, b, alpha = res
  du, dh = cts
  dx, dz, hh, dproj = pre_bwd_call(cfg, x2d, phi, b, alpha, du, dh)
  dphi, db, dalpha = param_grads(cfg, x2d, dz, hh, dproj)
  return dx, dphi.astype(phi.dtype), db.astype(b.dtype), dalpha.astype(alpha.dtype)


fused_pre.defvjp(_fwd, _bwd)
