"""The MoE module's logical names resolve under every sharding strategy ("experts" maps to the
`expert` mesh axis, size 1 unless expert parallelism is asked for), and a sharded forward + gradient
equals one device."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mhc_jax import sharding as S
from mhc_jax.config import MeshConfig
from mhc_jax.config.moe import MoEConfig
from mhc_jax.layers.moe import MoE

CFG = MoEConfig(n_routed=4, n_shared=1, top_k=2, d_expert=4, seq_aux_weight=0.0)
MODEL = MoE(CFG, init_std=0.3, out_std=0.3)
X = jnp.asarray(np.random.default_rng(0).normal(size=(8, 3, 8)), jnp.float32)   # B = 8 devices
BOXED = MODEL.init(jax.random.key(0), X)


def _loss(variables, x):
  return jnp.sum(MODEL.apply(variables, x) ** 2)


@pytest.mark.parametrize("strategy, shape", [("dp", None), ("fsdp", None), ("fsdp_tp", (1, 4, 2)),
                                             ("hsdp", (2, 4, 1)),
                                             ("ep", (4, 2, 1))])
def test_sharded_matches_single_device(strategy, shape):
  mesh_cfg = MeshConfig(strategy=strategy, shape=shape)
  specs = nn.get_partition_spec(BOXED)
  assert specs["params"]["gate"] == jax.sharding.PartitionSpec("experts", "embed", "mlp") and specs["moe_state"]["bias"] == jax.sharding.PartitionSpec("experts")
  for spec in jax.tree.leaves(specs, is_leaf=lambda v: isinstance(v, jax.sharding.PartitionSpec)):
    resolved = S.logical_spec(tuple(spec), mesh_cfg)            # no unknown-name errors
    assert len(resolved) == len(spec)
  assert S.logical_spec(("experts", "embed", "mlp"), mesh_cfg)[0] == "expert"
  mesh = S.make_mesh(mesh_cfg)
  v_sh = S.param_shardings(BOXED, mesh, mesh_cfg)
  x_sh = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(S.BATCH_AXES, None, None))
  fn = jax.jit(jax.value_and_grad(_loss), in_shardings=(v_sh, x_sh),
               out_shardings=(S.replicated(mesh), v_sh))
  with S.sharding_context(mesh, mesh_cfg):
    loss, grads = fn(BOXED, X)
  want_loss, want_grads = jax.jit(jax.value_and_grad(_loss))(BOXED, X)
  np.testing.assert_allclose(float(loss), float(want_loss), rtol=1e-5)
  for (path, g), w in zip(jax.tree_util.tree_leaves_with_path(nn.unbox(grads["params"])),
                          jax.tree.leaves(nn.unbox(want_grads["params"]))):
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-4, atol=1e-6, err_msg=str(path))
