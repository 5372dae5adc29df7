"""NNX LM vs Linen LM: same parameters give the same logits, gradients, mappings and decode steps;
conversion round trip; an NNX checkpoint restores into the Linen model."""
import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mhc_jax import model as linen_model
from mhc_jax import nnx as mnnx
from mhc_jax.config import ConfigError, ConnectionConfig, ModelConfig

KINDS_N = [("residual", 1), ("hc", 2), ("mhc", 4), ("mhc_lite", 2)]


def _cfg(kind="mhc", n=2, **kw):
  base = dict(vocab_size=32, d_model=16, n_layers=2, n_heads=2, max_seq_len=8, dtype="float32")
  base.update(kw)
  return ModelConfig(connection=ConnectionConfig(kind=kind, n_streams=n), **base)


def _tokens(b=2, t=8, seed=2):
  return jax.random.randint(jax.random.PRNGKey(seed), (b, t), 0, 32)


def _linen_params(cfg, seed=1):
  """Linen-initialised params, perturbed so every mapping and bias is non-trivial."""
  p = nn.meta.unbox(linen_model.LM(cfg).init(jax.random.PRNGKey(0), _tokens()))["params"]
  leaves, tree = jax.tree.flatten(p)
  keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
  return jax.tree.unflatten(tree, [l + 0.05 * jax.random.normal(k, l.shape) for l, k in zip(leaves, keys)])


def _nnx_logits(model, params, tok):
  return mnnx.from_linen_params(nnx.clone(model), params)(tok)


def _check_parity(cfg, tok=None, rtol=1e-5):
  tok = _tokens() if tok is None else tok
  params = _linen_params(cfg)
  model = mnnx.LM(cfg, rngs=nnx.Rngs(0))
  ct = jax.random.normal(jax.random.PRNGKey(9), (*tok.shape, cfg.vocab_size))
  f_lin = lambda p: jnp.sum(linen_model.LM(cfg).apply({"params": p}, tok) * ct)  # noqa: E731
  f_nnx = lambda p: jnp.sum(_nnx_logits(model, p, tok) * ct)  # noqa: E731
  np.testing.assert_allclose(jax.jit(lambda p: _nnx_logits(model, p, tok))(params),
                             linen_model.LM(cfg).apply({"params": params}, tok), rtol=rtol, atol=1e-6)
  g_lin, g_nnx = jax.jit(jax.grad(f_lin))(params), jax.jit(jax.grad(f_nnx))(params)
  assert jax.tree.structure(g_lin) == jax.tree.structure(g_nnx)
  for path, a in jax.tree_util.tree_leaves_with_path(g_nnx):
    b = g_lin
    for k in path:
      b = b[k.key]
    np.testing.assert_allclose(a, b, rtol=rtol, atol=1e-6, err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize("kind,n", KINDS_N)
@pytest.mark.parametrize("scan", [True, pytest.param(False, marks=pytest.mark.slow)])
def test_lm_matches_linen(kind, n, scan):
  _check_parity(_cfg(kind, n, scan_layers=scan, collapse="head" if kind == "mhc" else "sum",
                     tie_embeddings=kind != "hc"))


@pytest.mark.parametrize("remat,group,scan", [
    ("full", 0, True), pytest.param("dots", 0, False, marks=pytest.mark.slow),
    pytest.param("mhc_paper", 2, True, marks=pytest.mark.slow)])
def test_lm_remat_matches_linen(remat, group, scan):
  """One case per policy (recompute does not change the math; the Linen side checks every policy
  against the plain forward in tests/test_recompute.py, scanned and not). 3 layers: mhc_paper with
  groups of 2 runs one scanned group and a shorter last group."""
  _check_parity(_cfg("mhc", 2, n_layers=3, scan_layers=scan, remat=remat, remat_group=group))


@pytest.mark.parametrize("scan", [True, False])
def test_param_tree_and_partitioning_match_linen(scan):
  cfg = _cfg("mhc", 2, scan_layers=scan, collapse="head", tie_embeddings=False)
  boxed = linen_model.LM(cfg).init(jax.random.PRNGKey(0), _tokens())["params"]
  want = nn.get_partition_spec(boxed)
  model = mnnx.LM(cfg, rngs=nnx.Rngs(0))
  got = nnx.to_pure_dict(nnx.get_partition_spec(nnx.state(model, nnx.Param)))
  assert got == jax.tree.map(lambda s: s, want, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
  shapes = lambda t: jax.tree.map(lambda a: (a.shape, a.dtype), t)  # noqa: E731
  assert shapes(mnnx.to_linen_params(model)) == shapes(nn.meta.unbox(boxed))


def test_round_trip_is_bit_exact_and_restores_into_linen(tmp_path):
  import orbax.checkpoint as ocp
  cfg = _cfg("mhc", 2)
  model = mnnx.LM(cfg, rngs=nnx.Rngs(3))
  params = mnnx.to_linen_params(model)
  other = mnnx.from_linen_params(mnnx.LM(cfg, rngs=nnx.Rngs(4)), params)
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(mnnx.to_linen_params(other))):
    np.testing.assert_array_equal(a, b)
  # NNX checkpoint -> Linen model: save the converted params, restore against the Linen layout.
  with ocp.StandardCheckpointer() as ckpt:
    ckpt.save(tmp_path / "params", params)
  abstract = nn.meta.unbox(jax.eval_shape(lambda: linen_model.LM(cfg).init(jax.random.PRNGKey(0), _tokens())))
  with ocp.StandardCheckpointer() as ckpt:
    restored = ckpt.restore(tmp_path / "params", abstract["params"])
  tok = _tokens()
  np.testing.assert_array_equal(linen_model.LM(cfg).apply({"params": restored}, tok), model(tok))


@pytest.mark.parametrize("scan", [True, False])
def test_mappings_match_linen_collect(scan):
  cfg = _cfg("mhc", 2, scan_layers=scan)
  params, tok = _linen_params(cfg), _tokens()
  _, inter = linen_model.LM(cfg).apply({"params": params}, tok, mutable=["intermediates"])
  want = linen_model.collect_mappings(inter["intermediates"], cfg)
  got = mnnx.from_linen_params(mnnx.LM(cfg, rngs=nnx.Rngs(0)), params).mappings(tok)
  assert set(got) == {"h_pre", "h_post", "h_res"}
  for k in want:
    np.testing.assert_allclose(got[k], want[k], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("scan", [True, pytest.param(False, marks=pytest.mark.slow)])
def test_decode_matches_linen_and_full_forward(scan):
  cfg = _cfg("mhc", 2, scan_layers=scan)
  params, tok = _linen_params(cfg), _tokens(t=5)
  model = mnnx.from_linen_params(mnnx.LM(cfg, rngs=nnx.Rngs(0)), params)
  model.init_cache(tok.shape[0])
  cache = linen_model.init_cache(cfg, tok.shape[0])
  lin = jax.jit(lambda c, t: linen_model.LM(cfg, decode=True).apply(
      {"params": params, "cache": c}, t, mutable=["cache"]))
  nnx_step = nnx.jit(lambda m, t: m(t, decode=True))
  steps = []
  for t in range(tok.shape[1]):
    got = nnx_step(model, tok[:, t:t + 1])
    want, upd = lin(cache, tok[:, t:t + 1])
    cache = upd["cache"]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    steps.append(got)
  full = linen_model.LM(cfg).apply({"params": params}, tok)
  np.testing.assert_allclose(jnp.concatenate(steps, 1), full, rtol=1e-4, atol=1e-5)


def test_decode_needs_a_cache():
  model = mnnx.LM(_cfg(scan_layers=False), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="init_cache"):
    model(_tokens(t=1), decode=True)


@pytest.mark.slow
def test_jit_train_step_with_nnx_optimizer_matches_optax_on_linen_params():
  import optax
  from mhc_jax.config import TrainConfig
  from mhc_jax.train.optimizer import make_optimizer
  from mhc_jax.train.step import token_losses
  cfg = _cfg("mhc", 2)
  # adam_eps well above the gradients' float noise: a first Adam step is g / (|g| + eps)
  tx = make_optimizer(TrainConfig(lr=1e-2, warmup_steps=0, steps=10, adam_eps=1e-3))
  params, tok = _linen_params(cfg), _tokens()
  model = mnnx.from_linen_params(mnnx.LM(cfg, rngs=nnx.Rngs(0)), params)
  opt = nnx.Optimizer(model, tx, wrt=nnx.Param)

  @nnx.jit
  def step(model, opt, tok):
    loss, grads = nnx.value_and_grad(lambda m: jnp.mean(token_losses(m(tok[:, :-1]), tok[:, 1:])[0]))(model)
    opt.update(model, grads)
    return loss

  step(model, opt, tok)
  lin_loss = lambda p: jnp.mean(token_losses(linen_model.LM(cfg).apply({"params": p}, tok[:, :-1]), tok[:, 1:])[0])  # noqa: E731
  grads = jax.grad(lin_loss)(params)
  updates, _ = tx.update(grads, tx.init(params), params)
  want = optax.apply_updates(params, updates)
  for a, b in zip(jax.tree.leaves(mnnx.to_linen_params(model)), jax.tree.leaves(want)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_bad_config_is_one_clear_error():
  with pytest.raises(ConfigError, match="model.remat='bogus'"):
    _cfg(remat="bogus")
  with pytest.raises(ConfigError, match="cfg="):
    mnnx.LM(dataclasses.asdict(_cfg()), rngs=nnx.Rngs(0))
  model = mnnx.LM(_cfg(), rngs=nnx.Rngs(0))
  params = mnnx.to_linen_params(model)
  params["blocks"]["attn"]["query"]["kernel"] = np.zeros((3, 16, 2, 4), np.float32)
  with pytest.raises(ValueError, match=r"params blocks/attn/query/kernel: shape \(3, 16, 2, 4\)"):
    mnnx.from_linen_params(model, params)
