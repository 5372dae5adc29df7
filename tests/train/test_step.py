"""Train/eval step pieces against float64 NumPy oracles."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mhc_jax.configs import tiny
from mhc_jax.model import LM, collect_mappings
from mhc_jax.config import apply_overrides
from mhc_jax.train.state import create_state, make_setup
from mhc_jax.train.step import (layer_sq_norms, make_diagnostics, make_train_step, token_losses)


def _batch(cfg, seed=0, b=None):
  rng = np.random.default_rng(seed)
  b = b or cfg.data.batch_size
  toks = rng.integers(0, 256, size=(b, cfg.data.seq_len + 1), dtype=np.int32)
  return {"inputs": jnp.asarray(toks[:, :-1]), "targets": jnp.asarray(toks[:, 1:])}


def test_token_losses_match_float64_oracle():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(2, 5, 11)) * 3
  targets = rng.integers(0, 11, size=(2, 5))
  ce, log_z = token_losses(jnp.asarray(logits, jnp.float32), jnp.asarray(targets))
  m = logits.max(-1, keepdims=True)
  lz = (m + np.log(np.exp(logits - m).sum(-1, keepdims=True)))[..., 0]
  want = lz - np.take_along_axis(logits, targets[..., None], -1)[..., 0]
  np.testing.assert_allclose(ce, want, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(log_z, lz, rtol=1e-5)


def _one_step(cfg, batch):
  setup = make_setup(cfg)
  state = create_state(cfg, setup)
  with setup.context():
    return jax.jit(make_train_step(cfg))(state, batch)


@pytest.mark.slow
def test_gradient_accumulation_equals_full_batch_and_z_loss():
  base = apply_overrides(tiny(), ["train.z_loss=0.01"])
  batch = _batch(base)
  s1, m1 = _one_step(base, batch)
  s2, m2 = _one_step(apply_overrides(base, ["train.grad_accum=2"]), batch)
  np.testing.assert_allclose(m1["loss"], m2["loss"], rtol=1e-5)
  np.testing.assert_allclose(m1["grad_norm"], m2["grad_norm"], rtol=1e-4)
  for a, b in zip(jax.tree.leaves(s1.params), jax.tree.leaves(s2.params)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
  assert int(s2.step) == 1
  # z term = 0.01 * mean(logsumexp^2) under the initial params.
  p0 = create_state(base, make_setup(base)).params
  logits = np.asarray(LM(base.model).apply({"params": p0}, batch["inputs"]), np.float64)
  lz = np.log(np.exp(logits).sum(-1))
  np.testing.assert_allclose(m1["z_loss"], 0.01 * np.mean(lz ** 2), rtol=1e-4)
  # Per-layer norms: positive, and part of the global norm.
  layers = np.asarray(m1["grad_norm_layers"])
  assert layers.shape == (base.model.n_layers,) and np.all(layers > 0)
  assert np.sum(layers ** 2) < float(m1["grad_norm"]) ** 2


def test_layer_sq_norms_scanned_and_unrolled_oracle():
  rng = np.random.default_rng(1)
  tree = {"blocks": {"w": rng.normal(size=(3, 4, 5)), "v": rng.normal(size=(3, 2))},
          "embed": {"embedding": rng.normal(size=(7, 4))}}
  want = (tree["blocks"]["w"] ** 2).sum((1, 2)) + (tree["blocks"]["v"] ** 2).sum(1)
  np.testing.assert_allclose(layer_sq_norms(jax.tree.map(jnp.asarray, tree), 3), want, rtol=1e-5)
  tree2 = {"block_0": {"w": tree["blocks"]["w"][0]}, "block_2": {"w": tree["blocks"]["w"][2]}}
  np.testing.assert_allclose(layer_sq_norms(jax.tree.map(jnp.asarray, tree2), 3),
                             [want_w := (tree["blocks"]["w"][0] ** 2).sum(), 0.0,
                              (tree["blocks"]["w"][2] ** 2).sum()], rtol=1e-5)
  assert want_w > 0


def _oracle_gains(h):   # h [S, B, T, n, n] float64
  s = h.shape[0]
  single_f = np.abs(h.sum(-1)).max(-1)
  single_b = np.abs(h.sum(-2)).max(-1)
  comp_f, comp_b = [], []
  for l in range(s):
    p = np.broadcast_to(np.eye(h.shape[-1]), h.shape[1:]).copy()
    for k in range(l, s):          # P_l = H_{S-1} ... H_l: apply H_l first
      p = np.einsum("...ij,...jk->...ik", h[k], p)
    comp_f.append(np.abs(p.sum(-1)).max(-1))
    comp_b.append(np.abs(p.sum(-2)).max(-1))
  return single_f, single_b, np.stack(comp_f), np.stack(comp_b)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["mhc", "hc"])
def test_diagnostics_match_oracle_on_trained_like_params(kind):
  cfg = apply_overrides(tiny(), [f"model.connection.kind={kind}"])
  params = nn.meta.unbox(LM(cfg.model).init(jax.random.PRNGKey(3), jnp.zeros((1, 8), jnp.int32))
                         ["params"])
  # Move away from the identity-like init so gains differ from 1 and between tokens.
  rng = np.random.default_rng(0)
  params = jax.tree_util.tree_map_with_path(
      lambda p, x: x + 0.5 * rng.normal(size=x.shape).astype(x.dtype)
      if "conn" in str(p[1].key) else x, params)
  batch = _batch(cfg, b=2)
  d = jax.jit(make_diagnostics(cfg))(params, batch)
  _, st = LM(cfg.model).apply({"params": params}, batch["inputs"], mutable=["intermediates"])
  h = np.asarray(collect_mappings(st["intermediates"], cfg.model)["h_res"], np.float64)
  sf, sb, cf, cb = _oracle_gains(h)
  ax = (1, 2)
  np.testing.assert_allclose(d["gain/fwd_max"], sf.max(ax), rtol=1e-4)
  np.testing.assert_allclose(d["gain/bwd_mean"], sb.mean(ax), rtol=1e-4)
  np.testing.assert_allclose(d["gain/composite_fwd_max"], cf.max(ax), rtol=1e-3)
  np.testing.assert_allclose(d["gain/composite_bwd_mean"], cb.mean(ax), rtol=1e-3)
  np.testing.assert_allclose(d["sinkhorn/row_err_max"], np.abs(h.sum(-1) - 1).max((1, 2, 3)),
                             atol=1e-5)
  np.testing.assert_allclose(d["sinkhorn/col_err_max"], np.abs(h.sum(-2) - 1).max((1, 2, 3)),
                             atol=1e-5)
  if kind == "mhc":
    assert float(np.max(d["sinkhorn/row_err_max"])) < 1e-5     # rows are exact after Sinkhorn
  else:
    assert float(np.max(cf)) > 1.01      # HC's composite drifts away from 1


def test_residual_has_no_diagnostics():
  cfg = apply_overrides(tiny(), ["model.connection.kind=residual", "model.connection.n_streams=1"])
  assert make_diagnostics(cfg) is None
