"""Flax linen modules: thin parameter holders that call `mhc_jax.ops`."""
from mhc_jax.layers.attention import Attention, rope
from mhc_jax.layers.block import Block
from mhc_jax.layers.connection import CollapseHead, Connection
from mhc_jax.layers.mla import MLA
from mhc_jax.layers.mlp import MLP
from mhc_jax.layers.moe import MoE
from mhc_jax.layers.norm import RMSNorm
