"""NNX LM with MoE FFNs and MLA attention vs the Linen LM (same converted params and balance
biases): logits, MoE statistics, gradients, decode; the parameter tree and its logical axes."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mhc_jax import model as linen_model
from mhc_jax import nnx as mnnx
from mhc_jax.config import ConnectionConfig, ModelConfig
from mhc_jax.config.mla import MLAConfig
from mhc_jax.config.moe import MoEConfig


def _cfg(**kw):
  base = dict(vocab_size=256, d_model=32, n_layers=3, n_heads=2, max_seq_len=8, dtype="float32",
              n_dense_layers=1, moe=MoEConfig(n_routed=8, n_shared=1, top_k=2, d_expert=16),
              mla=MLAConfig(kv_rank=8, rope_dim=4, nope_dim=8, v_dim=8),
              connection=ConnectionConfig(kind="mhc", n_streams=2, sinkhorn_iters=3))
  base.update(kw)
  return ModelConfig(**base)


def _tokens(b=2, t=8, seed=2):
  return jax.random.randint(jax.random.PRNGKey(seed), (b, t), 0, 256)


def _linen_vars(cfg, seed=1):
  """Linen-initialised params (perturbed) and random balance biases (so routing depends on them)."""
  v = nn.meta.unbox(linen_model.LM(cfg).init(jax.random.PRNGKey(0), _tokens()))
  perturb = lambda t, s, scale: jax.tree.map(  # noqa: E731
      lambda l, k: l + scale * jax.random.normal(k, l.shape), t,
      jax.tree.unflatten(jax.tree.structure(t),
                         list(jax.random.split(jax.random.PRNGKey(s), len(jax.tree.leaves(t))))))
  return perturb(v["params"], seed, 0.05), perturb(v[linen_model.MOE_STATE], seed + 1, 0.1)


def _nnx(cfg, params, state):
  model = mnnx.from_linen_params(mnnx.LM(cfg, rngs=nnx.Rngs(0)), params)
  return mnnx.from_linen_moe_state(model, state)


def _linen(cfg, params, state, tok):
  logits, upd = linen_model.LM(cfg).apply({"params": params, linen_model.MOE_STATE: state}, tok,
                                          mutable=[linen_model.MOE_STATS])
  return logits, upd[linen_model.MOE_STATS]


def _close(a, b, what, rtol=1e-5, atol=1e-6):
  for path, x in jax.tree_util.tree_leaves_with_path(a):
    y = b
    for k in path:
      y = y[k.key]
    np.testing.assert_allclose(x, y, rtol=rtol, atol=atol, err_msg=what + jax.tree_util.keystr(path))


def _check_parity(cfg):
  """Logits, MoE stats and gradients (random cotangent on the logits plus the sequence loss), one
  compile per side: `value_and_grad` with the logits and stats as aux."""
  params, state = _linen_vars(cfg)
  tok = _tokens()
  model = mnnx.LM(cfg, rngs=nnx.Rngs(0))
  shapes = lambda t: jax.tree.map(lambda a: (a.shape, a.dtype), t)  # noqa: E731
  assert shapes(mnnx.to_linen_params(model)) == shapes(params)
  assert shapes(mnnx.to_linen_moe_state(model)) == shapes(state)
  ct = jax.random.normal(jax.random.PRNGKey(9), (*tok.shape, cfg.vocab_size))

  def loss(forward):
    def f(p):
      logits, st = forward(p)
      return jnp.sum(logits * ct) + st["seq_aux_loss"], (logits, st)
    return jax.jit(jax.value_and_grad(f, has_aux=True))(params)

  (_, (want, want_stats)), g_lin = loss(lambda p: _linen(cfg, p, state, tok))
  (_, (got, got_stats)), g_nnx = loss(lambda p: _nnx(cfg, p, state)(tok, return_stats=True))
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  assert set(got_stats) == set(want_stats) == {"counts", "router_entropy", "seq_aux_loss"}
  assert got_stats["counts"].shape == (cfg.n_moe_layers, cfg.moe.n_routed)
  np.testing.assert_array_equal(got_stats["counts"], want_stats["counts"])
  _close(got_stats, want_stats, "stats")
  assert jax.tree.structure(g_lin) == jax.tree.structure(g_nnx)
  _close(g_nnx, g_lin, "grad")


@pytest.mark.parametrize("scan", [True, False])
def test_moe_mla_lm_matches_linen(scan):
  _check_parity(_cfg(scan_layers=scan))


@pytest.mark.slow
def test_moe_mla_lm_mhc_paper_remat_matches_linen():
  """Recompute groups of 2 per stack: `dense_blocks` (1 layer) is one short group, `blocks` (2) one
  scanned group."""
  _check_parity(_cfg(remat="mhc_paper", remat_group=2))


def test_partitioning_matches_linen():
  cfg = _cfg(mla=MLAConfig(kv_rank=8, q_rank=8, rope_dim=4, nope_dim=8, v_dim=8))
  boxed = linen_model.LM(cfg).init(jax.random.PRNGKey(0), _tokens())
  model = mnnx.LM(cfg, rngs=nnx.Rngs(0))
  is_spec = lambda x: isinstance(x, jax.sharding.PartitionSpec)  # noqa: E731
  for col, kind in (("params", nnx.Param), (linen_model.MOE_STATE, mnnx.MoEState)):
    want = jax.tree.map(lambda s: s, nn.get_partition_spec(boxed[col]), is_leaf=is_spec)
    assert nnx.to_pure_dict(nnx.get_partition_spec(nnx.state(model, kind))) == want, col


def test_moe_mla_decode_matches_linen_full_forward():
  cfg = _cfg()
  params, state = _linen_vars(cfg)
  tok = _tokens(t=6)
  model = _nnx(cfg, params, state)
  model.init_cache(tok.shape[0])
  step = nnx.jit(lambda m, t: m(t, decode=True))
  outs = [step(model, tok[:, :3])] + [step(model, tok[:, t:t + 1]) for t in range(3, tok.shape[1])]
  full, _ = _linen(cfg, params, state, tok)
  np.testing.assert_allclose(jnp.concatenate(outs, 1), full, rtol=1e-4, atol=1e-5)
