"""Transformer block: two connection sites, attention (site 2l) then the FFN (site 2l + 1).

Attention is multi-head with RoPE, or Multi-head Latent Attention when `cfg.mla` is set; the FFN is a
dense SwiGLU, or the DeepSeekMoE layer in a block built with `moe=True`.
"""
from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from mhc_jax.config import ModelConfig
from mhc_jax.layers.attention import Attention
from mhc_jax.layers.connection import STREAM_AXES, Connection
from mhc_jax.layers.mla import MLA
from mhc_jax.layers.mlp import MLP
from mhc_jax.layers.moe import MoE


class Block(nn.Module):
  """`__call__(x [B, T, n, C], layer) -> (x, stats)`: the scan-body form. `stats` is None for a dense
  block and the MoE layer's statistics (`counts [E]`, `seq_aux_loss`, `router_entropy`) for an MoE
  block: returned as values, they pass through `nn.scan`, `nn.remat` and `jax.checkpoint` as
  ordinary outputs."""
  cfg: ModelConfig
  dtype: jnp.dtype = jnp.float32
  decode: bool = False
  moe: bool = False
  experts: Any = None     # MoE blocks: an expert source (`layers.moe.MoE.experts`), None = params

  @nn.compact
  def __call__(self, x, layer):
    cfg = self.cfg
    out_std = cfg.init_std / math.sqrt(2 * cfg.n_layers)
    if cfg.mla is not None:
      attn = MLA(cfg.mla, cfg.n_heads, cfg.max_seq_len, cfg.rope_theta, cfg.init_std, out_std,
                 self.dtype, self.decode, norm_eps=cfg.norm_eps, name="attn")
    else:
      attn = Attention(cfg.n_heads, cfg.head_dim, cfg.max_seq_len, cfg.rope_theta, cfg.init_std,
                       out_std, self.dtype, self.decode, cfg.kv_cache, name="attn")
    stats = {}
    if self.moe:
      moe = MoE(cfg.moe, cfg.init_std, out_std, self.dtype, with_stats=True, experts=self.experts,
                name="moe")

      def ffn(u):
        y, s = moe(u, layer)
        stats.update(s)
        return y
    else:
      ffn = MLP(cfg.ff_dim, cfg.init_std, out_std, self.dtype, name="mlp")
    conn = lambda name: Connection(cfg.connection, cfg.norm_eps, self.dtype, name=name)  # noqa: E731
    x = conn("attn_conn")(x, attn, 2 * layer)
    x = nn.with_logical_constraint(x, STREAM_AXES)
    x = conn("mlp_conn")(x, ffn, 2 * layer + 1)
    x = nn.with_logical_constraint(x, STREAM_AXES)
    return x, (stats or None)
