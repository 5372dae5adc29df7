"""The train state is born sharded under the mesh strategy, and a step gives the same loss on every
strategy (8 fake CPU devices)."""
import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from mhc_jax.configs import tiny
from mhc_jax.config import apply_overrides
from mhc_jax.train.state import create_state, make_setup
from mhc_jax.train.step import make_train_step


def _batch(cfg):
  rng = np.random.default_rng(0)
  toks = rng.integers(0, 256, size=(cfg.data.batch_size, cfg.data.seq_len + 1), dtype=np.int32)
  return {"inputs": toks[:, :-1], "targets": toks[:, 1:]}


def _mu_leaves(opt_state):
  """First Adam moment (`mu`) of the AdamW chain, as a dict tree like params."""
  found = []
  def visit(x):
    if hasattr(x, "mu"):
      found.append(x.mu)
    elif isinstance(x, (tuple, list)):
      for y in x:
        visit(y)
    elif hasattr(x, "inner_state"):
      visit(x.inner_state)
  visit(opt_state)
  assert found
  return found[0]


def test_fsdp_state_is_born_sharded_with_sharded_moments():
  cfg = apply_overrides(tiny(), ["mesh.strategy=fsdp"])
  setup = make_setup(cfg)
  assert setup.mesh.shape["fsdp"] == 8
  state = create_state(cfg, setup)
  emb = state.params["embed"]["embedding"]
  assert emb.sharding.spec == P(None, ("data", "expert", "fsdp"))
  assert emb.addressable_shards[0].data.shape == (256, 32 // 8)
  mu = _mu_leaves(state.opt_state)["embed"]["embedding"]
  assert mu.sharding.spec == emb.sharding.spec


@pytest.mark.slow
def test_one_step_loss_is_the_same_under_dp_and_fsdp():
  losses = {}
  for strategy in ("dp", "fsdp"):
    cfg = apply_overrides(tiny(), [f"mesh.strategy={strategy}"])
    setup = make_setup(cfg)
    state = create_state(cfg, setup)
    batch = {k: jax.device_put(v, setup.batch_sharding) for k, v in _batch(cfg).items()}
    with setup.context():
      step = jax.jit(make_train_step(cfg), out_shardings=(setup.state_shardings, None),
                     donate_argnums=0)
      state, m = step(state, batch)
      state, m = step(state, batch)
    losses[strategy] = float(m["loss"])
  np.testing.assert_allclose(losses["dp"], losses["fsdp"], rtol=1e-5)
