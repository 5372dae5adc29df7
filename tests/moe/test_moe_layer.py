"""The Linen `MoE` module: same output as `moe_ffn` with its params, the balance bias outside
"params" (in "moe_state"), router statistics sown, logical axis names, `update_balance_bias`."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mhc_jax.config.moe import MoEConfig
from mhc_jax.layers.moe import MoE, update_balance_bias
from mhc_jax.ops.moe import moe_ffn, sequence_balance_loss

B, T, C = 2, 5, 6


def _setup(n_shared=1, seq_aux_weight=1e-3):
  cfg = MoEConfig(n_routed=8, n_shared=n_shared, top_k=2, d_expert=4, routed_scale=2.0,
                  seq_aux_weight=seq_aux_weight)
  model = MoE(cfg, init_std=0.3, out_std=0.3)
  x = jnp.asarray(np.random.default_rng(0).normal(size=(B, T, C)), jnp.float32)
  variables = model.init(jax.random.key(0), x)
  return cfg, model, x, variables


def _ops_params(variables):
  p = dict(nn.unbox(variables["params"]))
  p["bias"] = nn.unbox(variables["moe_state"])["bias"]
  return p


@pytest.mark.parametrize("n_shared", [0, 2])
def test_module_equals_moe_ffn(n_shared):
  cfg, model, x, variables = _setup(n_shared)
  y, inter = model.apply(variables, x, mutable=["intermediates"])
  y_ops, stats = moe_ffn(x.reshape(-1, C), _ops_params(variables), top_k=cfg.top_k,
                         routed_scale=cfg.routed_scale)
  assert y.shape == x.shape
  np.testing.assert_allclose(np.asarray(y).reshape(-1, C), np.asarray(y_ops), rtol=1e-6, atol=1e-7)
  sown = inter["intermediates"]
  np.testing.assert_array_equal(np.asarray(sown["counts"][0]), np.asarray(stats["counts"]))
  np.testing.assert_allclose(np.asarray(sown["load"][0]), np.asarray(stats["load"]))
  want_aux = sequence_balance_loss(stats["affinity"].reshape(B, T, -1),
                                   stats["expert_ids"].reshape(B, T, -1), alpha=cfg.seq_aux_weight)
  np.testing.assert_allclose(float(sown["seq_aux_loss"][0]), float(want_aux), rtol=1e-6)


def test_bias_lives_outside_params_and_is_used():
  cfg, model, x, variables = _setup()
  params = nn.unbox(variables["params"])
  assert set(variables) == {"params", "moe_state"}
  assert "bias" not in params and set(params) == {
      "router", "gate", "up", "down", "shared_gate", "shared_up", "shared_down"}
  assert nn.unbox(variables["moe_state"])["bias"].shape == (cfg.n_routed,)
  assert params["gate"].shape == (8, C, 4) and params["down"].shape == (8, 4, C)
  assert params["router"].shape == (C, 8) and params["shared_up"].shape == (C, 1 * 4)
  # logical names (the model never names mesh axes)
  names = jax.tree.map(lambda b: b.names, variables["params"],
                       is_leaf=lambda v: isinstance(v, nn.Partitioned))
  assert names["gate"] == ("experts", "embed", "mlp") and names["down"] == ("experts", "mlp", "embed")
  assert names["router"] == ("embed", None) and names["shared_gate"] == ("embed", "mlp")
  assert variables["moe_state"]["bias"].names == ("experts",)
  # gradients exist for params only; the bias (another collection) changes the routing
  grads = jax.grad(lambda p: jnp.sum(model.apply({**variables, "params": p}, x) ** 2))(
      variables["params"])
  assert "bias" not in nn.unbox(grads)
  y0 = model.apply(variables, x)
  hot = jax.tree.map(lambda b: b.replace_boxed(b.value.at[3].set(10.0)), variables["moe_state"],
                     is_leaf=lambda v: isinstance(v, nn.Partitioned))
  _, inter = model.apply({**variables, "moe_state": hot}, x, mutable=["intermediates"])
  assert int(inter["intermediates"]["counts"][0][3]) == B * T
  assert not np.allclose(np.asarray(model.apply({**variables, "moe_state": hot}, x)), np.asarray(y0))


def test_update_balance_bias_from_sown_load():
  cfg, model, x, variables = _setup(seq_aux_weight=0.0)
  _, inter = model.apply(variables, x, mutable=["intermediates"])
  assert "seq_aux_loss" not in inter["intermediates"]
  new_state = update_balance_bias(variables["moe_state"], inter["intermediates"], 0.01)
  counts = np.asarray(inter["intermediates"]["counts"][0])
  want = 0.01 * np.sign(counts.mean() - counts)
  assert np.any(want > 0) and np.any(want < 0)
  np.testing.assert_allclose(np.asarray(new_state["bias"].value), want, rtol=1e-6)
  assert new_state["bias"].names == ("experts",)
  # the module runs with the new state
  model.apply({**variables, "moe_state": new_state}, x)
