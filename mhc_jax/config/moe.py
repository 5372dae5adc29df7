"""`MoEConfig`: the DeepSeekMoE feed-forward layer (DeepSeek-V3 routing, auxiliary-loss-free balancing).

Defaults follow the mHC paper's 3B MoE model (Table 5: 64 routed experts, 6 active, 2 shared, expert
width 896) and DeepSeek-V3 for what the mHC paper does not give (bias update speed gamma = 0.001,
sequence-wise balance weight alpha = 1e-4). `routed_scale` is DeepSeek-V3's routed scaling factor
(V3 uses 2.5); the mHC paper does not state one, so the default is 1.0.
"""
from __future__ import annotations

import dataclasses

from mhc_jax.config.checks import check_float, check_int, fail


@dataclasses.dataclass(frozen=True)
class MoEConfig:
  """DeepSeekMoE layer: `y = sum_{e in TopK} g_e FFN_e(x) + sum_{s < n_shared} FFN_s(x)`.

  n_routed: routed experts E.            n_shared: shared experts (0 allowed), each of width d_expert.
  top_k: routed experts per token (<= n_routed).   d_expert: SwiGLU hidden width F of one expert.
  routed_scale: the gates of the k chosen experts sum to this.
  bias_update_rate: gamma of the auxiliary-loss-free rule `b += gamma * sign(mean(load) - load)`.
  seq_aux_weight: alpha of the complementary sequence-wise balance loss (0 turns it off).
  """
  n_routed: int = 64
  n_shared: int = 2
  top_k: int = 6
  d_expert: int = 896
  routed_scale: float = 1.0
  bias_update_rate: float = 1e-3
  seq_aux_weight: float = 1e-4

  def __post_init__(self):
    check_int("moe.n_routed", self.n_routed, 1)
    check_int("moe.n_shared", self.n_shared, 0)
    check_int("moe.top_k", self.top_k, 1)
    if self.top_k > self.n_routed:
      fail("moe.top_k", self.top_k, f"an integer in [1, moe.n_routed={self.n_routed}]")
    check_int("moe.d_expert", self.d_expert, 1)
    check_float("moe.routed_scale", self.routed_scale, 0.0, strict=True)
    check_float("moe.bias_update_rate", self.bias_update_rate)
    check_float("moe.seq_aux_weight", self.seq_aux_weight)
