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
written out (einsum, mask, float32 softmax). RoPE is `ops.rope` (rotate-half form). The math is
`mhc_jax.ops.mla` (`mla_attention`, `mla_decode`); this module holds the parameters and the cache.
"""
from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from mhc_jax.config.mla import MLAConfig
from mhc_jax.ops.mla import mla_attention, mla_decode


class _NormScale(nn.Module):
  """The `scale [D]` of an RMSNorm (`layers.norm.RMSNorm`'s parameter, applied in `ops.mla`)."""
  dim: int

  @nn.compact
  def __call__(self):
    return self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("embed",)),
                      (self.dim,), jnp.float32)


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
    return nn.unbox(self.param(name, nn.with_logical_partitioning(init, axes), shape, jnp.float32))

  @nn.compact
  def __call__(self, x_BTC):
    cfg, h = self.cfg, self.n_heads
    b, t, c = x_BTC.shape
    n, r = cfg.nope_dim, cfg.rope_dim
    p = {}
    if cfg.q_rank == 0:
      p["q"] = self._kernel("q", (c, h, n + r), ("embed", "heads", "kv"))
    else:
      p["q_down"] = self._kernel("q_down", (c, cfg.q_rank), ("embed", "q_lora"))
      p["q_norm"] = nn.unbox(_NormScale(cfg.q_rank, name="q_norm")())
      p["q_up"] = self._kernel("q_up", (cfg.q_rank, h, n + r), ("q_lora", "heads", "kv"))
    p["kv_down"] = self._kernel("kv_down", (c, cfg.kv_rank), ("embed", "kv_lora"))
    p["kv_norm"] = nn.unbox(_NormScale(cfg.kv_rank, name="kv_norm")())
    p["k_rope"] = self._kernel("k_rope", (c, r), ("embed", None))
    p["k_up"] = self._kernel("k_up", (cfg.kv_rank, h, n), ("kv_lora", "heads", "kv"))
    p["v_up"] = self._kernel("v_up", (cfg.kv_rank, h, cfg.v_dim), ("kv_lora", "heads", "kv"))
    p["out"] = self._kernel("out", (h, cfg.v_dim, c), ("heads", "kv", "embed"), self.out_std)
    kw = dict(cfg=cfg, rope_theta=self.rope_theta, norm_eps=self.norm_eps, dtype=self.dtype,
              constrain=nn.with_logical_constraint)
    if not self.decode:
      return mla_attention(p, x_BTC, **kw)
    initialized = self.has_variable("cache", "cached_latent")
    cc = self.variable("cache", "cached_latent", jnp.zeros, (b, self.max_len, cfg.kv_rank),
                       self.dtype)
    ckr = self.variable("cache", "cached_k_rope", jnp.zeros, (b, self.max_len, r), self.dtype)
    idx = self.variable("cache", "cache_index", lambda: jnp.zeros((), jnp.int32))
    if not initialized:   # init call: shapes only
      return mla_attention(p, x_BTC, start=idx.value, **kw)
    y, new = mla_decode(p, x_BTC, {"cached_latent": cc.value, "cached_k_rope": ckr.value,
                                   "cache_index": idx.value}, **kw)
    cc.value, ckr.value, idx.value = new["cached_latent"], new["cached_k_rope"], new["cache_index"]
    return y
