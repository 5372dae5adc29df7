"""NNX Multi-head Latent Attention and DeepSeekMoE FFN: thin parameter holders over `mhc_jax.ops.mla`
and `mhc_jax.ops.moe`, with the parameter trees of `mhc_jax.layers.mla.MLA` / `mhc_jax.layers.moe.MoE`.

    MLA:  c = RMSNorm(x W_dkv),  k_h = [c W_uk_h, rope(x W_kr)],  v_h = c W_uv_h,
          y = sum_h softmax_causal(q_h k_h^T / sqrt(n + r)) v_h W_o_h    (decode: absorbed, cache c, k_rope)
    MoE:  y = sum_{e in TopK(s + b)} g_e FFN_e(x) + FFN_shared(x),  s = sigmoid(x W_r)

The MoE balance bias `b [E]` is a `MoEState` variable (not an `nnx.Param`: no gradient, the optimizer
never sees it), at the path of the Linen `moe_state` collection (`.../moe/bias`).
"""
from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp
from flax import nnx

from mhc_jax.config.mla import MLAConfig
from mhc_jax.config.moe import MoEConfig
from mhc_jax.layers.moe import _ffn, router_entropy
from mhc_jax.nnx.layers import _normal
from mhc_jax.nnx.norm import RMSNorm, param
from mhc_jax.ops.mla import mla_attention, mla_decode
from mhc_jax.ops.moe import sequence_balance_loss


class MoEState(nnx.Variable):
  """Non-trainable MoE state (the auxiliary-loss-free balance bias); the Linen `moe_state` collection."""


class MLA(nnx.Module):
  """`__call__(x [B, T, C], decode=False) -> [B, T, C]`. Params as the Linen `MLA`: `q` or
  `q_down, q_norm.scale, q_up`; `kv_down, kv_norm.scale, k_rope, k_up, v_up, out`. With a cache
  (`init_cache`: `cached_latent [B, S, K]`, `cached_k_rope [B, S, r]`, `cache_index`) `decode=True`
  appends the tokens and attends in the weight-absorbed form."""

  def __init__(self, d_model, cfg: MLAConfig, n_heads, max_len, *, rope_theta=10000.0, init_std=0.02,
               out_std=0.02, dtype=jnp.float32, norm_eps=1e-6, rngs: nnx.Rngs):
    self.cfg, self.max_len, self.rope_theta, self.dtype, self.norm_eps = (
        cfg, max_len, rope_theta, dtype, norm_eps)
    c, h, n, r = d_model, n_heads, cfg.nope_dim, cfg.rope_dim
    w = lambda shape, axes, std=init_std: param(_normal(rngs, shape, std), axes)  # noqa: E731
    if cfg.q_rank == 0:
      self.q = w((c, h, n + r), ("embed", "heads", "kv"))
    else:
      self.q_down = w((c, cfg.q_rank), ("embed", "q_lora"))
      self.q_norm = RMSNorm(cfg.q_rank, norm_eps, dtype)
      self.q_up = w((cfg.q_rank, h, n + r), ("q_lora", "heads", "kv"))
    self.kv_down = w((c, cfg.kv_rank), ("embed", "kv_lora"))
    self.kv_norm = RMSNorm(cfg.kv_rank, norm_eps, dtype)
    self.k_rope = w((c, r), ("embed", None))
    self.k_up = w((cfg.kv_rank, h, n), ("kv_lora", "heads", "kv"))
    self.v_up = w((cfg.kv_rank, h, cfg.v_dim), ("kv_lora", "heads", "kv"))
    self.out = w((h, cfg.v_dim, c), ("heads", "kv", "embed"), out_std)

  def init_cache(self, batch_size: int, dtype=None):
    """Zero compressed cache and index 0 (names as the Linen `cache` collection)."""
    dtype = dtype or self.dtype
    self.cached_latent = nnx.Cache(jnp.zeros((batch_size, self.max_len, self.cfg.kv_rank), dtype))
    self.cached_k_rope = nnx.Cache(jnp.zeros((batch_size, self.max_len, self.cfg.rope_dim), dtype))
    self.cache_index = nnx.Cache(jnp.zeros((), jnp.int32))

  def _params(self):
    names = (("q",) if self.cfg.q_rank == 0 else ("q_down", "q_up")) + (
        "kv_down", "k_rope", "k_up", "v_up", "out")
    p = {k: getattr(self, k)[...] for k in names}
    p["kv_norm"] = self.kv_norm.scale[...]
    if self.cfg.q_rank:
      p["q_norm"] = self.q_norm.scale[...]
    return p

  def __call__(self, x_BTC, decode: bool = False):
    kw = dict(cfg=self.cfg, rope_theta=self.rope_theta, norm_eps=self.norm_eps, dtype=self.dtype,
              constrain=nn.with_logical_constraint)
    if not decode:
      return mla_attention(self._params(), x_BTC, **kw)
    if not hasattr(self, "cache_index"):
      raise ValueError("decode=True needs a KV cache: call model.init_cache(batch_size) first")
    names = ("cached_latent", "cached_k_rope", "cache_index")
    y, new = mla_decode(self._params(), x_BTC, {k: getattr(self, k)[...] for k in names}, **kw)
    for k in names:
      getattr(self, k)[...] = new[k]
    return y


class MoE(nnx.Module):
  """`__call__(x [..., T, C]) -> (y, stats)` with `stats = {counts [E], seq_aux_loss, router_entropy}`
  (the Linen `MoE(with_stats=True)`). Params `router [C, E]`, `gate/up [E, C, F]`, `down [E, F, C]`,
  with shared experts `shared_gate/shared_up [C, S·F]`, `shared_down [S·F, C]`; `bias [E]` a `MoEState`."""

  def __init__(self, d_model, cfg: MoEConfig, *, init_std=0.02, out_std=0.02, dtype=jnp.float32,
               implementation="auto", rngs: nnx.Rngs):
    self.cfg, self.dtype, self.implementation = cfg, dtype, implementation
    C, E, F = d_model, cfg.n_routed, cfg.d_expert
    w = lambda shape, axes, std=init_std: param(_normal(rngs, shape, std), axes)  # noqa: E731
    self.router = w((C, E), ("embed", None))
    self.gate = w((E, C, F), ("experts", "embed", "mlp"))
    self.up = w((E, C, F), ("experts", "embed", "mlp"))
    self.down = w((E, F, C), ("experts", "mlp", "embed"), out_std)
    if cfg.n_shared:
      S = cfg.n_shared * F
      self.shared_gate = w((C, S), ("embed", "mlp"))
      self.shared_up = w((C, S), ("embed", "mlp"))
      self.shared_down = w((S, C), ("mlp", "embed"), out_std)
    self.bias = MoEState(jnp.zeros((E,), jnp.float32), out_sharding=("experts",),
                         eager_sharding=False)

  def __call__(self, x):
    cfg = self.cfg
    C, E = x.shape[-1], cfg.n_routed
    names = ("router", "gate", "up", "down") + (
        ("shared_gate", "shared_up", "shared_down") if cfg.n_shared else ())
    params = {k: getattr(self, k)[...] for k in names}
    params["bias"] = self.bias[...]
    lead = x.shape[:-1]
    y_TC, stats = _ffn(x.reshape(-1, C), params, cfg, self.dtype, self.implementation)
    seq_loss = jnp.zeros((), jnp.float32)
    if cfg.seq_aux_weight > 0:
      T = lead[-1] if lead else 1
      seq_loss = sequence_balance_loss(stats["affinity"].reshape(-1, T, E),
                                       stats["expert_ids"].reshape(-1, T, cfg.top_k),
                                       alpha=cfg.seq_aux_weight)
    return y_TC.reshape(*lead, C), {"counts": stats["counts"], "seq_aux_loss": seq_loss,
                                    "router_entropy": router_entropy(stats["affinity"])}
