"""The MoE / MLA language model: every connection kind, scan and remat, the training step's balancing
rule and sequence loss, checkpoints, decoding, and the paper presets' parameter counts."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mhc_jax.config import (ConfigError, ConnectionConfig, MLAConfig, ModelConfig, MoEConfig,
                            apply_overrides, with_connection)
from mhc_jax.configs import get_preset
from mhc_jax.configs.paper import TABLE5
from mhc_jax.model import LM, param_counts
from mhc_jax.ops.moe import balance_bias_update
from mhc_jax.sample import generate
from mhc_jax.train.step import loss_fn, make_train_step, update_moe_state
from mhc_jax.train.trainer import Trainer
from tests.train.helpers import tiny_config, write_corpus

MOE = MoEConfig(n_routed=8, n_shared=1, top_k=2, d_expert=16, seq_aux_weight=1e-2)
MLA = MLAConfig(kv_rank=8, rope_dim=4, nope_dim=8, v_dim=8)


def _cfg(kind="mhc", n=2, **kw):
  base = ModelConfig(vocab_size=256, d_model=32, n_layers=3, n_heads=2, max_seq_len=16,
                     dtype="float32", moe=MOE, mla=MLA, n_dense_layers=1,
                     connection=ConnectionConfig(kind="mhc", n_streams=2, sinkhorn_iters=3))
  return dataclasses.replace(with_connection(base, kind, n), **kw)


TOK = jax.random.randint(jax.random.PRNGKey(0), (2, 8), 0, 256)


def _forward(cfg, variables):
  logits, mut = LM(cfg).apply(variables, TOK, mutable=["moe_stats"])
  return logits, mut["moe_stats"]


@pytest.mark.parametrize("kind,scan", [("residual", True), ("hc", True), ("mhc", True),
                                       ("mhc_lite", True), ("mhc", False)])
def test_every_connection_kind_routes_every_token(kind, scan):
  cfg = _cfg(kind, scan_layers=scan)
  v = LM(cfg).init(jax.random.PRNGKey(1), TOK)
  assert ("dense_blocks" in v["params"]) == scan and ("blocks" in v["params"]) == scan
  logits, st = _forward(cfg, {"params": v["params"], "moe_state": v["moe_state"]})
  assert np.isfinite(np.asarray(logits)).all()
  # two MoE layers; each routes every one of the B*T tokens to exactly k experts (dropless)
  np.testing.assert_array_equal(np.asarray(st["counts"]).sum(-1), [2 * 8 * MOE.top_k] * 2)
  assert st["router_entropy"].shape == (2,) and float(st["seq_aux_loss"]) > 0


@pytest.mark.parametrize("scan", [True, False])
def test_remat_and_paper_groups_match_plain_with_stats(scan):
  """remat="full" and the mhc_paper recompute groups (which apply the blocks by hand) give the plain
  forward's logits, MoE statistics and gradients (random cotangent; seq loss included)."""
  cfg = _cfg(scan_layers=scan)
  v = LM(cfg).init(jax.random.PRNGKey(1), TOK)
  state = {"moe_state": v["moe_state"]}
  ct = jax.random.normal(jax.random.PRNGKey(2), (2, 8, 256))

  def run(c):
    def f(p):
      logits, st = _forward(c, {"params": p, **state})
      return jnp.sum(logits * ct) + st["seq_aux_loss"], st
    (val, st), g = jax.value_and_grad(f, has_aux=True)(v["params"])
    return val, st, g

  want = run(cfg)
  for rm in ("full", "mhc_paper"):
    got = run(dataclasses.replace(cfg, remat=rm, remat_group=2))
    np.testing.assert_allclose(got[0], want[0], rtol=1e-5)
    np.testing.assert_array_equal(got[1]["counts"], want[1]["counts"])
    np.testing.assert_allclose(got[1]["seq_aux_loss"], want[1]["seq_aux_loss"], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(got[2]), jax.tree.leaves(want[2])):
      np.testing.assert_allclose(a, b, rtol=2e-4, atol=1e-6)


def test_seq_aux_loss_is_in_the_loss():
  cfg = _cfg()
  v = LM(cfg).init(jax.random.PRNGKey(1), TOK)
  batch = {"inputs": TOK, "targets": TOK}
  def run(model):
    return loss_fn(v["params"], batch, dataclasses.replace(get_preset("tiny"), model=model),
                   v["moe_state"])
  total, (ce, z, st) = run(cfg)
  np.testing.assert_allclose(total, ce + z + st["seq_aux_loss"], rtol=1e-6)
  off = dataclasses.replace(cfg, moe=dataclasses.replace(MOE, seq_aux_weight=0.0))
  total_off, (ce_off, _, st_off) = run(off)
  assert float(st_off["seq_aux_loss"]) == 0.0
  np.testing.assert_allclose(ce_off, ce, rtol=1e-6)   # the balance loss changes no logits


@pytest.mark.parametrize("scan", [True, False])
def test_train_step_moves_bias_by_the_rule(scan):
  """After one step every MoE bias is `b + gamma·sign(mean(load) − load)` with the counts of the
  step's own forward pass (the parameters before the update); params change, biases get no gradient."""
  run = dataclasses.replace(get_preset("tiny"), model=_cfg(scan_layers=scan))
  trainer = Trainer(run, devices=jax.devices()[:1])
  trainer.init()
  batch = {"inputs": np.asarray(TOK), "targets": np.asarray(TOK)}
  before = jax.device_get(trainer.state)
  _, (_, _, st) = loss_fn(before.params, {k: jnp.asarray(x) for k, x in batch.items()}, run,
                          before.moe_state)
  trainer.step(batch)
  after = jax.device_get(trainer.state.moe_state)
  want = update_moe_state(before.moe_state, st["counts"], run.model)
  for a, b in zip(jax.tree.leaves(after), jax.tree.leaves(want)):
    np.testing.assert_allclose(a, b, atol=1e-7)
  gamma = MOE.bias_update_rate
  leaf = jax.tree.leaves(after)[0]
  assert np.all(np.isin(np.round(np.asarray(leaf) / gamma), [-1.0, 0.0, 1.0]))
  counts0 = np.asarray(st["counts"][0])
  expect0 = balance_bias_update(jnp.zeros(8), counts0, gamma)
  first = after["blocks"]["moe"]["bias"][0] if scan else after["block_1"]["moe"]["bias"]
  np.testing.assert_allclose(first, expect0, atol=1e-7)


def test_checkpoint_round_trip_keeps_the_biases(tmp_path):
  corpus = write_corpus(str(tmp_path / "corpus"))
  cfg = tiny_config(corpus, str(tmp_path / "cache"), "model.moe.n_routed=8", "model.moe.top_k=2",
                    "model.moe.n_shared=1", "model.moe.d_expert=16", "model.n_dense_layers=1",
                    "train.steps=4", "train.checkpoint_every=2", "train.eval_every=0",
                    "train.sample_tokens=0")
  from mhc_jax.train.loop import load_checkpoint, train
  result = train(cfg, str(tmp_path / "run"))
  bias = jax.device_get(result.state.moe_state)
  assert np.abs(jax.tree.leaves(bias)[0]).sum() > 0      # the biases moved
  loaded = load_checkpoint(str(tmp_path / "run"), 4)
  for a, b in zip(jax.tree.leaves(jax.device_get(loaded.state.moe_state)), jax.tree.leaves(bias)):
    np.testing.assert_array_equal(a, b)
  # decoding uses the biases: greedy tokens equal the argmax of full forwards
  prompt = np.asarray([[5, 9, 3]], np.int32)
  toks = generate(cfg.model, loaded.state.params, prompt, max_new_tokens=4, temperature=0,
                  moe_state=loaded.state.moe_state)
  seq = prompt
  for _ in range(4):
    logits = LM(cfg.model).apply({"params": loaded.state.params,
                                  "moe_state": loaded.state.moe_state}, jnp.asarray(seq))
    seq = np.concatenate([seq, np.argmax(np.asarray(logits[:, -1]), -1)[:, None]], 1)
  np.testing.assert_array_equal(toks, seq[:, 3:])


@pytest.mark.parametrize("name", sorted(TABLE5))
def test_paper_presets_match_table5(name):
  cfg = get_preset(name)
  t = TABLE5[name]
  got = param_counts(cfg.model)
  assert abs(got["total"] / t["total"] - 1) < 0.02, got
  assert abs(got["active"] / t["active"] - 1) < 0.02, got
  assert abs(got["vocab"] / t["vocab_params"] - 1) < 0.02, got
  m = cfg.model
  assert (m.n_layers, m.d_model, m.n_heads, m.moe.n_routed, m.moe.d_expert) == (
      t["layers"], t["d"], t["heads"], t["routed"], t["ffn"])
  assert (m.moe.top_k, m.moe.n_shared, m.n_dense_layers, m.mla.kv_rank, m.mla.rope_dim) == (6, 2, 1, 512, 64)
  assert (m.vocab_size, cfg.data.seq_len, cfg.data.batch_size, cfg.train.steps) == (
      129280, 4096, t["batch"], t["steps"])
  assert (cfg.train.b1, cfg.train.b2, cfg.train.lr, cfg.train.schedule) == (0.9, 0.95, t["lr"], "paper_step")
  assert m.connection.kind == "mhc" and m.connection.n == 4 and m.connection.sinkhorn_iters == 20


@pytest.mark.parametrize("overrides,field", [
    (["model.n_dense_layers=1"], "model.n_dense_layers"),
    (["model.moe.top_k=2", "model.n_dense_layers=2"], "model.n_dense_layers"),
    (["model.moe.n_routed=4", "model.moe.top_k=6"], "moe.top_k"),
    (["model.mla.rope_dim=5"], "mla.rope_dim"),
])
def test_bad_moe_config_is_one_clear_error(overrides, field):
  with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
    apply_overrides(get_preset("tiny"), overrides)


def test_quantize_checks_moe_and_mla_widths():
  """MoE and MLA models quantise (experts, shared experts, MLA projections); an int4 group size
  that does not divide one of their contraction widths is one clear error naming the field."""
  from mhc_jax.quant.core import QuantSpec, check_spec
  check_spec(QuantSpec(mode="int8"), _cfg())
  check_spec(QuantSpec(mode="int4", group_size=16), _cfg())
  with pytest.raises(ConfigError, match=r"--group-size=32 .*model\.ff_dim=48"):
    check_spec(QuantSpec(mode="int4", group_size=32), _cfg())
  odd = dataclasses.replace(_cfg(), moe=dataclasses.replace(MOE, d_expert=24, n_shared=0))
  with pytest.raises(ConfigError, match=r"--group-size=16 .*model\.moe\.d_expert=24"):
    check_spec(QuantSpec(mode="int4", group_size=16), odd)
  with pytest.raises(ConfigError, match=r"--group-size=8 .*model\.mla\.kv_rank=12"):
    check_spec(QuantSpec(mode="int4", group_size=8),
               dataclasses.replace(_cfg(), mla=dataclasses.replace(MLA, kv_rank=12)))

