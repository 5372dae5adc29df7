"""Recompute policies: `remat="mhc_paper"` (mHC paper Eq. 20) is exact, stores the streams only at
group boundaries, and lowers the compiled temp memory; the group size is the Eq. 20 optimum."""
import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax._src.ad_checkpoint import saved_residuals

from mhc_jax.config import ConfigError, ConnectionConfig, ModelConfig
from mhc_jax.model import LM, collect_mappings
from mhc_jax.remat import mhc_paper_group

B, T, C = 2, 8, 16


def _cfg(kind="mhc", n=4, remat="none", scan=True, layers=3, group=0):
  return ModelConfig(d_model=C, n_layers=layers, n_heads=2, d_ff=24, max_seq_len=T, dtype="float32",
                     scan_layers=scan, remat=remat, remat_group=group,
                     connection=ConnectionConfig(kind=kind, n_streams=n, sinkhorn_iters=4))


def _params(cfg, seed=0):
  """Initial params plus noise, so every mapping (phi, theta, gates) is non-trivial."""
  tok = jnp.zeros((B, T), jnp.int32)
  p = nn.meta.unbox(LM(dataclasses.replace(cfg, remat="none")).init(jax.random.PRNGKey(seed), tok))
  leaves, tree = jax.tree.flatten(p["params"])
  keys = jax.random.split(jax.random.PRNGKey(seed + 1), len(leaves))
  return jax.tree.unflatten(tree, [a + 0.05 * jax.random.normal(k, a.shape) for a, k in zip(leaves, keys)])


def _tokens():
  return jax.random.randint(jax.random.PRNGKey(7), (B, T), 0, 256)


def _loss(cfg, ct):
  tok = _tokens()
  return lambda p: jnp.sum(LM(cfg).apply({"params": p}, tok) * ct)


def test_group_is_eq20_optimum():
  for n in (1, 2, 4):
    for layers in (1, 2, 5, 12, 24, 61):
      g = mhc_paper_group(n, layers)
      cost = [n * math.ceil(layers / r) + (n + 2) * 2 * r for r in range(1, layers + 1)]
      assert cost[g - 1] == min(cost)
      assert g == 1 + int(np.argmin(cost))     # smallest minimiser
  # L counts sublayers (2 per block): sqrt(n * 2L / (n + 2)) sublayers = 5.66 -> 3 blocks (6 sublayers)
  assert mhc_paper_group(4, 24) == 3
  assert abs(math.sqrt(4 * 48 / 6) / 2 - 3) < 0.5


@pytest.mark.parametrize("kind,n,scan,layers,group", [
    ("mhc", 4, True, 3, 2),        # one scanned group of 2 + a last group of 1
    pytest.param("mhc", 4, False, 3, 2, marks=pytest.mark.slow),       # unrolled blocks
    pytest.param("hc", 2, True, 3, 0, marks=pytest.mark.slow),         # Eq. 20 group
    pytest.param("mhc_lite", 3, True, 2, 1, marks=pytest.mark.slow),
    pytest.param("residual", 1, True, 3, 3, marks=pytest.mark.slow),
])
def test_mhc_paper_gradients_equal_none(kind, n, scan, layers, group):
  cfg = _cfg(kind, n, "none", scan, layers, group)
  params = _params(cfg)
  ct = jax.random.normal(jax.random.PRNGKey(3), (B, T, 256))      # random cotangent
  v0, g0 = jax.jit(jax.value_and_grad(_loss(cfg, ct)))(params)
  v1, g1 = jax.jit(jax.value_and_grad(_loss(dataclasses.replace(cfg, remat="mhc_paper"), ct)))(params)
  np.testing.assert_allclose(v1, v0, rtol=1e-5)
  flat0, flat1 = jax.tree_util.tree_leaves_with_path(g0), jax.tree.leaves(g1)
  assert len(flat0) == len(flat1)
  nonzero = 0
  for (path, a), b in zip(flat0, flat1):
    a, b = np.asarray(a), np.asarray(b)
    scale = max(np.max(np.abs(a)), 1e-12)
    assert np.max(np.abs(a - b)) <= 2e-4 * scale, jax.tree_util.keystr(path)
    nonzero += bool(np.any(a))
  assert nonzero == len(flat0)       # every parameter gets a gradient (the test can see a dropped one)


def _stream_residuals(cfg):
  """Saved residuals (forward -> backward) whose trailing shape is a stream state [T, n, C]."""
  n = cfg.connection.n
  res = saved_residuals(_loss(cfg, jnp.ones((B, T, 256))), _params(cfg))
  count = 0
  for aval, _ in res:
    shape = tuple(aval.shape)
    if shape[-3:] == (T, n, C):
      count += math.prod(shape[:-3]) // B       # stacked over groups / layers by the scan
  return count


def test_mhc_paper_stores_streams_only_at_group_boundaries():
  layers, group = 4, 2
  base = _cfg("mhc", 3, "none", True, layers, group)
  assert _stream_residuals(base) >= 2 * layers         # no recompute: every sublayer's streams
  paper = dataclasses.replace(base, remat="mhc_paper")
  assert _stream_residuals(paper) == layers // group    # one [B, T, n, C] per group input
  unrolled = dataclasses.replace(paper, scan_layers=False)
  assert _stream_residuals(unrolled) == layers // group


def _temp_bytes(cfg):
  tok = jnp.zeros((4, 32), jnp.int32)
  cfg = dataclasses.replace(cfg, max_seq_len=32)
  params = nn.meta.unbox(LM(dataclasses.replace(cfg, remat="none")).init(jax.random.PRNGKey(0), tok))
  f = jax.jit(jax.grad(lambda p: jnp.sum(LM(cfg).apply(p, tok))))
  return f.lower(params).compile().memory_analysis().temp_size_in_bytes


@pytest.mark.slow
def test_mhc_paper_lowers_temp_memory():
  """compiled.memory_analysis() on CPU: mHC n=4 needs less temp memory with mhc_paper than without,
  and its overhead over the residual model shrinks."""
  mem = {(k, r): _temp_bytes(_cfg(k, 1 if k == "residual" else 4, r, True, 4))
         for k in ("residual", "mhc") for r in ("none", "mhc_paper")}
  assert mem["mhc", "mhc_paper"] < 0.8 * mem["mhc", "none"]
  over_none = mem["mhc", "none"] / mem["residual", "none"]
  over_paper = mem["mhc", "mhc_paper"] / mem["residual", "mhc_paper"]
  assert over_paper < over_none


def test_mhc_paper_forward_paths_unchanged():
  """Diagnostics (`mutable=["intermediates"]`) and the plain forward agree under mhc_paper."""
  cfg = _cfg("mhc", 4, "mhc_paper", True, 3, 2)
  params = _params(cfg)
  tok = _tokens()
  plain = LM(cfg).apply({"params": params}, tok)
  ref = LM(dataclasses.replace(cfg, remat="none")).apply({"params": params}, tok)
  diag, state = LM(cfg).apply({"params": params}, tok, mutable=["intermediates"])
  np.testing.assert_allclose(plain, ref, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(diag, ref, rtol=1e-5, atol=1e-6)
  assert collect_mappings(state["intermediates"], cfg)["h_res"].shape == (6, B, T, 4, 4)


def test_remat_config_errors():
  ModelConfig(n_layers=4, remat="mhc_paper", remat_group=4)
  with pytest.raises(ConfigError, match=r"model.remat_group=-1 .*integer >= 0"):
    ModelConfig(remat_group=-1)
  with pytest.raises(ConfigError, match=r"model.remat_group=5 .*at most model.n_layers=4"):
    ModelConfig(n_layers=4, remat="mhc_paper", remat_group=5)
  with pytest.raises(ConfigError, match=r"model.remat='paper'.*'mhc_paper'"):
    ModelConfig(remat="paper")
