"""`MLAConfig`: DeepSeek-V2/V3 Multi-head Latent Attention (arXiv 2405.04434 §2.1).

Defaults follow the mHC paper's models (Table 5: KV rank 512, RoPE dim 64, attention dimension 128)
and DeepSeek-V3 for the rest (`nope_dim = v_dim = 128`). `q_rank = 0` projects queries with one full
matrix; the mHC paper does not give a query rank, and the full projection is what makes the Table 5
parameter totals come out (`mhc_jax.configs.paper`).
"""
from __future__ import annotations

import dataclasses

from mhc_jax.config.checks import check_int, fail


@dataclasses.dataclass(frozen=True)
class MLAConfig:
  """Per head h: `q_h = [q_nope_h, rope(q_rope_h)]`, `k_h = [c W_uk_h, rope(x W_kr)]`, `v_h = c W_uv_h`
  with the shared KV latent `c = RMSNorm(x W_dkv) [kv_rank]`; the decode cache holds `c` and the
  shared RoPE key only (`kv_rank + rope_dim` numbers per token, all heads together).

  kv_rank: width of the compressed KV latent.   q_rank: low-rank queries' width (0: full projection).
  rope_dim: decoupled RoPE dimensions per head (queries per head, one key shared by the heads).
  nope_dim: per-head query/key dimensions without position.   v_dim: per-head value dimensions.
  """
  kv_rank: int = 512
  q_rank: int = 0
  rope_dim: int = 64
  nope_dim: int = 128
  v_dim: int = 128

  def __post_init__(self):
    check_int("mla.kv_rank", self.kv_rank, 1)
    check_int("mla.q_rank", self.q_rank, 0)
    check_int("mla.rope_dim", self.rope_dim, 2)
    if self.rope_dim % 2:
      fail("mla.rope_dim", self.rope_dim, "an even integer (RoPE rotates pairs)")
    check_int("mla.nope_dim", self.nope_dim, 1)
    check_int("mla.v_dim", self.v_dim, 1)

  @property
  def qk_dim(self) -> int:
    """Per-head query/key width: `nope_dim + rope_dim` (the softmax scale is its inverse root)."""
    return self.nope_dim + self.rope_dim
