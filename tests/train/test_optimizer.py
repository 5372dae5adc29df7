"""Schedules and the weight-decay mask."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mhc_jax.config import ConnectionConfig, TrainConfig
from mhc_jax.configs import tiny
from mhc_jax.model import LM
from mhc_jax.train.optimizer import decay_mask, make_optimizer, make_schedule


def test_cosine_schedule_warmup_peak_and_floor():
  cfg = TrainConfig(steps=100, lr=1.0, warmup_steps=10, min_lr_ratio=0.1, schedule="cosine")
  s = make_schedule(cfg)
  np.testing.assert_allclose([s(0), s(5), s(10)], [0.0, 0.5, 1.0], atol=1e-6)
  mid = 0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * 45 / 90))
  np.testing.assert_allclose(s(55), mid, rtol=1e-5)
  np.testing.assert_allclose(s(100), 0.1, rtol=1e-5)


def test_paper_step_schedule_decays_at_80_and_90_percent():
  cfg = TrainConfig(steps=1000, lr=2.0, warmup_steps=100, schedule="paper_step")
  s = make_schedule(cfg)
  np.testing.assert_allclose(s(50), 1.0, rtol=1e-6)
  np.testing.assert_allclose([s(100), s(799)], [2.0, 2.0], rtol=1e-6)
  np.testing.assert_allclose([s(800), s(899)], [2.0 * 0.316] * 2, rtol=1e-5)
  np.testing.assert_allclose([s(900), s(999)], [0.2, 0.2], rtol=1e-5)


@pytest.mark.parametrize("kind", ["mhc", "hc"])
def test_decay_mask_exempts_norms_biases_gates_and_embedding(kind):
  cfg = tiny().model
  cfg = cfg.__class__(**{**cfg.__dict__, "connection": ConnectionConfig(kind=kind, n_streams=4)})
  params = nn.meta.unbox(jax.eval_shape(
      lambda: LM(cfg).init(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32)))["params"])
  mask = decay_mask(params)
  flat = {"/".join(str(k.key) for k in p): m
          for p, m in jax.tree_util.tree_leaves_with_path(mask)}
  decayed = sorted(k for k, m in flat.items() if m)
  kept = sorted(k for k, m in flat.items() if not m)
  assert "embed/embedding" in kept and "final_norm/scale" in kept
  assert "blocks/attn/query/kernel" in decayed and "blocks/mlp/wo/kernel" in decayed
  if kind == "mhc":
    assert {"blocks/attn_conn/b", "blocks/attn_conn/alpha", "blocks/attn_conn/norm/scale"} <= set(kept)
    assert "blocks/attn_conn/phi" in decayed
  else:
    assert {"blocks/mlp_conn/b_pre", "blocks/mlp_conn/b_post", "blocks/mlp_conn/b_res",
            "blocks/mlp_conn/alpha"} <= set(kept)
    assert "blocks/mlp_conn/theta_res" in decayed


def test_masked_adamw_leaves_exempt_params_undecayed():
  """With zero gradients, only decayed leaves move (by -lr*wd*p)."""
  cfg = TrainConfig(steps=10, lr=0.1, warmup_steps=0, weight_decay=0.5, clip_norm=0.0,
                    schedule="constant")
  params = {"w": jnp.ones((2, 2)), "b": jnp.ones((2,)), "norm": {"scale": jnp.ones((2,))}}
  tx = make_optimizer(cfg)
  upd, _ = tx.update(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)
  new = optax.apply_updates(params, upd)
  np.testing.assert_allclose(new["w"], 1 - 0.1 * 0.5, rtol=1e-6)
  np.testing.assert_array_equal(new["b"], 1.0)
  np.testing.assert_array_equal(new["norm"]["scale"], 1.0)


def test_decay_mask_reads_nnx_variable_names():
  """NNX state trees end each path in a Variable's `.value`: the mask still sees the name."""
  from flax import nnx
  state = nnx.state(nnx.Linear(3, 4, rngs=nnx.Rngs(0)), nnx.Param)
  mask = decay_mask(state)
  assert bool(mask["kernel"].value) and not bool(mask["bias"].value)
