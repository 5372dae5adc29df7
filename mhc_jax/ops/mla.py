"""Multi-head Latent Attention (DeepSeek-V2 arXiv 2405.04434 §2.1) as pure functions.

With H heads, per-head dims n = nope_dim, r = rope_dim, d_v = v_dim, latent width K = kv_rank:

  queries   q = x W_q  (q_rank == 0)   or   q = RMSNorm(x W_dq) W_uq  (q_rank > 0)
            [q_nope, q_rope] = q,   q_rope <- rope(q_rope)
  latent    c = RMSNorm(x W_dkv) [K];   rope key  k_rope = rope(x W_kr) [r]  (shared by all heads)
  full      k_h = [c W_uk_h, k_rope],  v_h = c W_uv_h,  o_h = softmax_causal(q_h k_h^T / sqrt(n + r)) v_h
  decode    (weight-absorbed, over the cached c and k_rope)
            s_h = (q_nope_h W_uk_h^T) c^T + q_rope_h k_rope^T,  o_h = (softmax(s_h / sqrt(n + r)) c) W_uv_h
  output    y = sum_h o_h W_o_h

`params` (float32, cast to `dtype`): `q [C, H, n+r]` or `q_down [C, q_rank]`, `q_norm [q_rank]`,
`q_up [q_rank, H, n+r]`; `kv_down [C, K]`, `kv_norm [K]`, `k_rope [C, r]`, `k_up [K, H, n]`,
`v_up [K, H, d_v]`, `out [H, d_v, C]` (the norms are the RMSNorm scales). The decode cache is
`{"cached_latent": [B, S, K], "cached_k_rope": [B, S, r], "cache_index": int32 scalar}`.
`constrain(a, logical_axes)` is an optional sharding hook (identity by default).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from mhc_jax.ops.norm import rms_norm
from mhc_jax.ops.rope import rope
from mhc_jax.ops.weights import materialize

_NEG = -1e30   # masked score (finite: no NaN even if a row were fully masked)


def _identity(a, axes):
  del axes
  return a


def _softmax_f32(s_BHTS, mask_TS):
  s_BHTS = jnp.where(mask_TS[None, None], s_BHTS.astype(jnp.float32), _NEG)
  return jax.nn.softmax(s_BHTS, axis=-1)


def _w(params, name, dtype):
  return materialize(params[name], dtype)     # a float kernel, or a quantised one (W = q · s)


def mla_project(params, x_BTC, *, q_rank: int, norm_eps: float, dtype, constrain=_identity):
  """`(q [B, T, H, n+r], c [B, T, K], k_rope before rotation [B, T, r])`."""
  x_BTC = x_BTC.astype(dtype)
  if q_rank == 0:
    q_BTHD = jnp.einsum("btc,chd->bthd", x_BTC, _w(params, "q", dtype))
  else:
    cq_BTQ = rms_norm(x_BTC @ _w(params, "q_down", dtype), params["q_norm"], norm_eps, dtype)
    q_BTHD = jnp.einsum("btq,qhd->bthd", cq_BTQ, _w(params, "q_up", dtype))
  q_BTHD = constrain(q_BTHD, ("batch", "length", "heads", "kv"))
  c_BTK = rms_norm(x_BTC @ _w(params, "kv_down", dtype), params["kv_norm"], norm_eps, dtype)
  c_BTK = constrain(c_BTK, ("batch", "length", "kv_lora"))
  kr_BTR = x_BTC @ _w(params, "k_rope", dtype)
  return q_BTHD, c_BTK, kr_BTR


def _rope_split(q_BTHD, kr_BTR, start, nope_dim, theta):
  """Split q, rotate q_rope and the shared key at absolute positions start + [0, T)."""
  b, t = kr_BTR.shape[:2]
  pos_BT = jnp.broadcast_to(start + jnp.arange(t), (b, t))
  qn_BTHN, qr_BTHR = q_BTHD[..., :nope_dim], q_BTHD[..., nope_dim:]
  qr_BTHR = rope(qr_BTHR, pos_BT, theta)
  kr_BTR = rope(kr_BTR[:, :, None, :], pos_BT, theta)[:, :, 0]
  return qn_BTHN, qr_BTHR, kr_BTR


def _output(params, out_BTHV, dtype, constrain):
  out_BTHV = constrain(out_BTHV, ("batch", "length", "heads", "kv"))
  return jnp.einsum("bthv,hvc->btc", out_BTHV, _w(params, "out", dtype))


def _full(params, q_BTHD, c_BTK, kr_BTR, start, *, nope_dim, qk_dim, theta, dtype):
  t = q_BTHD.shape[1]
  qn_BTHN, qr_BTHR, kr_BTR = _rope_split(q_BTHD, kr_BTR, start, nope_dim, theta)
  kn_BTHN = jnp.einsum("btk,khn->bthn", c_BTK, _w(params, "k_up", dtype))
  v_BTHV = jnp.einsum("btk,khv->bthv", c_BTK, _w(params, "v_up", dtype))
  s_BHTS = (jnp.einsum("bthn,bshn->bhts", qn_BTHN, kn_BTHN, preferred_element_type=jnp.float32)
            + jnp.einsum("bthr,bsr->bhts", qr_BTHR, kr_BTR, preferred_element_type=jnp.float32))
  causal_TS = jnp.tril(jnp.ones((t, t), bool))
  p_BHTS = _softmax_f32(s_BHTS / jnp.sqrt(float(qk_dim)), causal_TS)
  return jnp.einsum("bhts,bshv->bthv", p_BHTS.astype(dtype), v_BTHV)


def mla_attention(params, x_BTC, *, cfg, rope_theta: float, norm_eps: float, dtype, start=0,
                  constrain=_identity):
  """Causal MLA over `x [B, T, C]` (explicit keys/values), positions start + [0, T) -> `[B, T, C]`.
  `cfg` is an `MLAConfig`; the head count comes from the params."""
  q_BTHD, c_BTK, kr_BTR = mla_project(params, x_BTC, q_rank=cfg.q_rank, norm_eps=norm_eps,
                                      dtype=dtype, constrain=constrain)
  out_BTHV = _full(params, q_BTHD, c_BTK, kr_BTR, start, nope_dim=cfg.nope_dim, qk_dim=cfg.qk_dim,
                   theta=rope_theta, dtype=dtype)
  return _output(params, out_BTHV, dtype, constrain)


def mla_decode(params, x_BTC, cache, *, cfg, rope_theta: float, norm_eps: float, dtype,
               constrain=_identity):
  """Append the T new tokens' latent c and roped shared key at `cache_index`, attend in the absorbed
  form over cached positions <= each query's. Returns `(y [B, T, C], new cache)`."""
  q_BTHD, c_BTK, kr_BTR = mla_project(params, x_BTC, q_rank=cfg.q_rank, norm_eps=norm_eps,
                                      dtype=dtype, constrain=constrain)
  t = c_BTK.shape[1]
  max_len = cache["cached_latent"].shape[1]
  start = cache["cache_index"]
  qn_BTHN, qr_BTHR, kr_BTR = _rope_split(q_BTHD, kr_BTR, start, cfg.nope_dim, rope_theta)
  c_BSK = jax.lax.dynamic_update_slice(cache["cached_latent"],
                                       c_BTK.astype(cache["cached_latent"].dtype), (0, start, 0))
  kr_BSR = jax.lax.dynamic_update_slice(cache["cached_k_rope"],
                                        kr_BTR.astype(cache["cached_k_rope"].dtype), (0, start, 0))
  new_cache = {"cached_latent": c_BSK, "cached_k_rope": kr_BSR, "cache_index": start + t}
  ql_BTHK = jnp.einsum("bthn,khn->bthk", qn_BTHN, _w(params, "k_up", dtype))   # q_nope W_uk^T
  s_BHTS = (jnp.einsum("bthk,bsk->bhts", ql_BTHK, c_BSK, preferred_element_type=jnp.float32)
            + jnp.einsum("bthr,bsr->bhts", qr_BTHR, kr_BSR, preferred_element_type=jnp.float32))
  mask_TS = jnp.arange(max_len)[None, :] <= (start + jnp.arange(t))[:, None]
  p_BHTS = _softmax_f32(s_BHTS / jnp.sqrt(float(cfg.qk_dim)), mask_TS)
  ol_BTHK = jnp.einsum("bhts,bsk->bthk", p_BHTS.astype(dtype), c_BSK)
  out_BTHV = jnp.einsum("bthk,khv->bthv", ol_BTHK, _w(params, "v_up", dtype))
  return _output(params, out_BTHV, dtype, constrain), new_cache
