"""Transformer block: two connection sites, attention (site 2l) then SwiGLU MLP (site 2l + 1)."""
from __future__ import annotations

import math

import flax.linen as nn
import jax.numpy as jnp

from mhc_jax.config import ModelConfig
from mhc_jax.layers.attention import Attention
from mhc_jax.layers.connection import STREAM_AXES, Connection
from mhc_jax.layers.mlp import MLP


class Block(nn.Module):
  """`__call__(x [B, T, n, C], layer) -> x`; returns `(x, None)` so it can be an nn.scan body."""
  cfg: ModelConfig
  dtype: jnp.dtype = jnp.float32
  decode: bool = False

  @nn.compact
  def __call__(self, x, layer):
    cfg = self.cfg
    out_std = cfg.init_std / math.sqrt(2 * cfg.n_layers)
    attn = Attention(cfg.n_heads, cfg.head_dim, cfg.max_seq_len, cfg.rope_theta, cfg.init_std,
                     out_std, self.dtype, self.decode, name="attn")
    mlp = MLP(cfg.ff_dim, cfg.init_std, out_std, self.dtype, name="mlp")
    conn = lambda name: Connection(cfg.connection, cfg.norm_eps, self.dtype, name=name)  # noqa: E731
    x = conn("attn_conn")(x, attn, 2 * layer)
    x = nn.with_logical_constraint(x, STREAM_AXES)
    x = conn("mlp_conn")(x, mlp, 2 * layer + 1)
    x = nn.with_logical_constraint(x, STREAM_AXES)
    return x, None
