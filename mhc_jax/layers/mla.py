"""Multi-head Latent Attention (DeepSeek-V2 arXiv 2405.04434 §2.1), a drop-in for `Attention`.

With H heads, per-head dims n = nope_dim, r = rope_dim, d_v = v_dim, latent width K = kv_rank:

  queries   q = x W_q                   q_rank == 0:  W_q [C, H, n+r]
            q = RMSNorm(x W_dq) W_uq    q_rank > 0:   W_dq [C, q_rank], W_uq [q_rank, H, n+r]
            [q_nope, q_rope] = q,   q_rope <- rope(q_rope)
  latent    c = RMSNorm(x W_dkv)        W_dkv [C, K], weighted norm "kv_norm"
  rope key  k_rope = rope(x W_kr)       W_kr [C, r], ONE key shared by all heads
  keys      k_h = [c W_uk_h, k_rope]    W_uk [K, H, n]
  values    v_h = c W_uv_h              W_uv [K, H, d_v]
  output    o_h = softmax_causal(q_h k_h^T / sqrt(n + r)) v_h
            y = sum_h o_h W_o_h          W_o [H, d_v, C]  (init std out_std; the rest init_std)

W_dkv and W_kr are two kernels (DeepSeek packs them as one `wkv_a`; splitting them keeps the
rope part's logical axes `("embed", None)` apart from the latent's `("embed", "kv_lora")`).
The full forward (`decode=False`) uses the explicit keys/values above. `decode=True` caches
only `c` (`cached_latent [B, max_len, kv_rank]`) and `k_rope` (`cached_k_rope [B, max_len, r]`)
and attends in the weight-absorbed form:

  q_lat_h = q_nope_h W_uk_h^T  [K],   s_h = q_lat_h c^T + q_rope_h k_rope^T,
  o_lat_h = softmax(s_h / sqrt(n + r)) c  [K],   o_h = o_lat_h W_uv_h.

`jax.nn.dot_product_attention` requires the value head dim to equal the key's, so the attention is
written out (einsum, mask, float32 softmax). RoPE is `attention.rope` (rotate-half form).
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from mhc_jax.config.mla import MLAConfig
from mhc_jax.layers.attention import rope
from mhc_jax.layers.norm import RMSNorm

_NEG = -1e30   # masked score (finite: no NaN even if a row were fully masked)


def _softmax_f32(s_BHTS, mask_TS):
  s_BHTS = jnp.where(mask_TS[None, None], s_BHTS.astype(jnp.float32), _NEG)
  return jax.nn.softmax(s_BHTS, axis=-1)


class MLA(nn.Module):
  """Multi-head Latent Attention: `__call__(x_BTC) -> [B, T, C]`; cache `cached_latent`,
  `cached_k_rope`, `cache_index` when `decode` (same index semantics as `Attention`)."""
  cfg: MLAConfig
  n_heads: int
  max_len: int
  rope_theta: float = 10000.0
  init_std: float = 0.02
  out_std: float = 0.02
  dtype: jnp.dtype = jnp.float32
  decode: bool = False
  norm_eps: float = 1e-6

  def _kernel(self, name, shape, axes, std=None):
    init = nn.initializers.normal(self.init_std if std is None else std)
    w = self.param(name, nn.with_logical_partitioning(init, axes), shape, jnp.float32)
    return jnp.asarray(w, self.dtype)

  @nn.compact
  def __call__(self, x_BTC):
    cfg, h = self.cfg, self.n_heads
    b, t, c = x_BTC.shape
    n, r = cfg.nope_dim, cfg.rope_dim
    x_BTC = x_BTC.astype(self.dtype)

    if cfg.q_rank == 0:
      wq_CHD = self._kernel("q", (c, h, n + r), ("embed", "heads", "kv"))
      q_BTHD = jnp.einsum("btc,chd->bthd", x_BTC, wq_CHD)
    else:
      wdq_CQ = self._kernel("q_down", (c, cfg.q_rank), ("embed", "q_lora"))
      cq_BTQ = RMSNorm(self.norm_eps, self.dtype, name="q_norm")(x_BTC @ wdq_CQ)
      wuq_QHD = self._kernel("q_up", (cfg.q_rank, h, n + r), ("q_lora", "heads", "kv"))
      q_BTHD = jnp.einsum("btq,qhd->bthd", cq_BTQ, wuq_QHD)
    q_BTHD = nn.with_logical_constraint(q_BTHD, ("batch", "length", "heads", "kv"))

    wdkv_CK = self._kernel("kv_down", (c, cfg.kv_rank), ("embed", "kv_lora"))
    c_BTK = RMSNorm(self.norm_eps, self.dtype, name="kv_norm")(x_BTC @ wdkv_CK)
    c_BTK = nn.with_logical_constraint(c_BTK, ("batch", "length", "kv_lora"))
    wkr_CR = self._kernel("k_rope", (c, r), ("embed", None))
    kr_BTR = x_BTC @ wkr_CR
    wuk_KHN = self._kernel("k_up", (cfg.kv_rank, h, n), ("kv_lora", "heads", "kv"))
    wuv_KHV = self._kernel("v_up", (cfg.kv_rank, h, cfg.v_dim), ("kv_lora", "heads", "kv"))

    if self.decode:
      out_BTHV = self._decode(q_BTHD, c_BTK, kr_BTR, wuk_KHN, wuv_KHV)
    else:
      out_BTHV = self._full(q_BTHD, c_BTK, kr_BTR, wuk_KHN, wuv_KHV, 0)
    out_BTHV = nn.with_logical_constraint(out_BTHV, ("batch", "length", "heads", "kv"))
    wo_HVC = self._kernel("out", (h, cfg.v_dim, c), ("heads", "kv", "embed"), self.out_std)
    return jnp.einsum("bthv,hvc->btc", out_BTHV, wo_HVC)

  def _rope(self, q_BTHD, kr_BTR, start):
    """Split q, rotate q_rope and the shared key at absolute positions start + [0, T)."""
    b, t = kr_BTR.shape[:2]
    pos_BT = jnp.broadcast_to(start + jnp.arange(t), (b, t))
    qn_BTHN, qr_BTHR = q_BTHD[..., :self.cfg.nope_dim], q_BTHD[..., self.cfg.nope_dim:]
    qr_BTHR = rope(qr_BTHR, pos_BT, self.rope_theta)
    kr_BTR = rope(kr_BTR[:, :, None, :], pos_BT, self.rope_theta)[:, :, 0]
    return qn_BTHN, qr_BTHR, kr_BTR

  def _full(self, q_BTHD, c_BTK, kr_BTR, wuk_KHN, wuv_KHV, start):
    """Explicit form: k_nope = c W_uk, v = c W_uv per head; causal softmax over T."""
    t = q_BTHD.shape[1]
    qn_BTHN, qr_BTHR, kr_BTR = self._rope(q_BTHD, kr_BTR, start)
    kn_BTHN = jnp.einsum("btk,khn->bthn", c_BTK, wuk_KHN)
    v_BTHV = jnp.einsum("btk,khv->bthv", c_BTK, wuv_KHV)
    s_BHTS = (jnp.einsum("bthn,bshn->bhts", qn_BTHN, kn_BTHN, preferred_element_type=jnp.float32)
              + jnp.einsum("bthr,bsr->bhts", qr_BTHR, kr_BTR, preferred_element_type=jnp.float32))
    causal_TS = jnp.tril(jnp.ones((t, t), bool))
    p_BHTS = _softmax_f32(s_BHTS / jnp.sqrt(float(self.cfg.qk_dim)), causal_TS)
    return jnp.einsum("bhts,bshv->bthv", p_BHTS.astype(self.dtype), v_BTHV)

  def _decode(self, q_BTHD, c_BTK, kr_BTR, wuk_KHN, wuv_KHV):
    """Write c and the roped shared key at the cache index; absorbed attention over positions
    <= each query's absolute position."""
    b, t, _ = c_BTK.shape
    initialized = self.has_variable("cache", "cached_latent")
    cc = self.variable("cache", "cached_latent", jnp.zeros, (b, self.max_len, self.cfg.kv_rank),
                       c_BTK.dtype)
    ckr = self.variable("cache", "cached_k_rope", jnp.zeros, (b, self.max_len, self.cfg.rope_dim),
                        kr_BTR.dtype)
    idx = self.variable("cache", "cache_index", lambda: jnp.zeros((), jnp.int32))
    start = idx.value
    if not initialized:   # init call: shapes only
      return self._full(q_BTHD, c_BTK, kr_BTR, wuk_KHN, wuv_KHV, start)
    qn_BTHN, qr_BTHR, kr_BTR = self._rope(q_BTHD, kr_BTR, start)
    cc.value = jax.lax.dynamic_update_slice(cc.value, c_BTK, (0, start, 0))
    ckr.value = jax.lax.dynamic_update_slice(ckr.value, kr_BTR, (0, start, 0))
    idx.value = start + t
    c_BSK, kr_BSR = cc.value, ckr.value
    ql_BTHK = jnp.einsum("bthn,khn->bthk", qn_BTHN, wuk_KHN)                 # q_nope W_uk^T
    s_BHTS = (jnp.einsum("bthk,bsk->bhts", ql_BTHK, c_BSK, preferred_element_type=jnp.float32)
              + jnp.einsum("bthr,bsr->bhts", qr_BTHR, kr_BSR, preferred_element_type=jnp.float32))
    mask_TS = jnp.arange(self.max_len)[None, :] <= (start + jnp.arange(t))[:, None]
    p_BHTS = _softmax_f32(s_BHTS / jnp.sqrt(float(self.cfg.qk_dim)), mask_TS)
    ol_BTHK = jnp.einsum("bhts,bsk->bthk", p_BHTS.astype(self.dtype), c_BSK)
    return jnp.einsum("bthk,khv->bthv", ol_BTHK, wuv_KHV)
