"""`MoEConfig` validation: one `ConfigError` line naming the field, the value and what is allowed."""
import pytest

from mhc_jax.config.checks import ConfigError
from mhc_jax.config.moe import MoEConfig


def test_defaults_are_the_paper_3b_moe():
  cfg = MoEConfig()
  assert (cfg.n_routed, cfg.top_k, cfg.n_shared, cfg.d_expert) == (64, 6, 2, 896)


@pytest.mark.parametrize("kw,field", [
    (dict(n_routed=4, top_k=5), "moe.top_k"),
    (dict(n_routed=0), "moe.n_routed"),
    (dict(n_shared=-1), "moe.n_shared"),
    (dict(top_k=0), "moe.top_k"),
    (dict(d_expert=2.5), "moe.d_expert"),
    (dict(routed_scale=0.0), "moe.routed_scale"),
    (dict(bias_update_rate=-1e-3), "moe.bias_update_rate"),
    (dict(seq_aux_weight=float("nan")), "moe.seq_aux_weight"),
    (dict(n_routed=True), "moe.n_routed"),
])
def test_bad_values_name_the_field(kw, field):
  with pytest.raises(ConfigError) as err:
    MoEConfig(**kw)
  msg = str(err.value)
  assert msg.startswith(f"{field}=") and "not allowed" in msg and "\n" not in msg, msg
  value = next(iter(kw.values())) if len(kw) == 1 else kw["top_k"]
  assert repr(value) in msg, msg


def test_top_k_message_says_what_is_allowed():
  with pytest.raises(ConfigError, match=r"moe\.top_k=5 .*\[1, moe\.n_routed=4\]"):
    MoEConfig(n_routed=4, top_k=5)
