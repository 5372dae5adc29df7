"""Flax NNX modules for HC / mHC / mHC-lite over the same `ops` / `kernels` as `mhc_jax.layers`.

Drop-in: wrap any sublayer of an NNX model with `Connection(cfg, d_model, site=..., rngs=...)` and
call `conn(x [B, T, n, C], branch)`. `LM` is the NNX twin of `mhc_jax.model.LM`; its parameter tree
is the Linen one (`to_linen_params` / `from_linen_params`).
"""
from mhc_jax.nnx.connection import MAPPINGS, CollapseHead, Connection
from mhc_jax.nnx.convert import (from_linen_moe_state, from_linen_params, to_linen_moe_state,
                                 to_linen_params)
from mhc_jax.nnx.layers import MLP, Attention
from mhc_jax.nnx.model import LM, Block
from mhc_jax.nnx.moe import MLA, MoE, MoEState
from mhc_jax.nnx.norm import RMSNorm

__all__ = ["Attention", "Block", "CollapseHead", "Connection", "LM", "MAPPINGS", "MLA", "MLP", "MoE",
           "MoEState", "RMSNorm", "from_linen_moe_state", "from_linen_params", "to_linen_moe_state",
           "to_linen_params"]
