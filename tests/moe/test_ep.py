"""Expert parallelism: `moe_ffn_ep` under `shard_map` (expert axis 8, and data 2 × expert 4), the MoE
layer under an expert × fsdp mesh, the `expert` mesh config and its errors."""
import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, PartitionSpec as P

from mhc_jax import sharding as S
from mhc_jax.config import ConfigError, MeshConfig
from mhc_jax.config.moe import MoEConfig
from mhc_jax.layers.moe import MoE
from mhc_jax.ops.moe import moe_ffn
from mhc_jax.ops.moe_ep import moe_ffn_ep

E, C, F, K, T = 16, 8, 4, 3, 64
EXPERT_KEYS = ("gate", "up", "down")


def _params(seed=0):
  rng = np.random.default_rng(seed)
  f = lambda *s: jnp.asarray(rng.normal(size=s) * 0.4, jnp.float32)   # noqa: E731
  bias = np.zeros(E, np.float32)
  bias[0] = bias[1] = 10.0              # skewed: every token picks experts 0 and 1 (both on rank 0)
  return {"router": f(C, E), "gate": f(E, C, F), "up": f(E, C, F), "down": f(E, F, C),
          "shared_gate": f(C, 2 * F), "shared_up": f(C, 2 * F), "shared_down": f(2 * F, C),
          "bias": jnp.asarray(bias)}


def _mesh(shape, names):
  return jax.make_mesh(shape, names, axis_types=(AxisType.Auto,) * len(names))


@pytest.mark.parametrize("shape, names", [((8,), ("expert",)), ((2, 4), ("data", "expert"))])
def test_ep_matches_single_device(shape, names):
  params = _params()
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.normal(size=(T, C)), jnp.float32)
  cot = jnp.asarray(rng.normal(size=(T, C)), jnp.float32)
  mesh = _mesh(shape, names)
  tok = P(names)
  p_specs = {k: P("expert") if k in EXPERT_KEYS else P() for k in params}
  stat_specs = {"counts": P(), "load": P(), "expert_ids": tok, "weights": tok, "affinity": tok}
  ep_fn = jax.shard_map(functools.partial(moe_ffn_ep, top_k=K, routed_scale=2.5, axis_name="expert",
                                          batch_axes=names),
                        mesh=mesh, in_specs=(tok, p_specs), out_specs=(tok, stat_specs))
  ref_fn = functools.partial(moe_ffn, top_k=K, routed_scale=2.5)

  def loss(fn, x, p):
    y, stats = fn(x, p)
    return jnp.sum(y * cot), (y, stats)

  (l_ep, (y_ep, s_ep)), g_ep = jax.jit(jax.value_and_grad(functools.partial(loss, ep_fn), (0, 1),
                                                          has_aux=True))(x, params)
  (l_ref, (y_ref, s_ref)), g_ref = jax.jit(jax.value_and_grad(functools.partial(loss, ref_fn), (0, 1),
                                                              has_aux=True))(x, params)
  np.testing.assert_allclose(np.asarray(y_ep), np.asarray(y_ref), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(float(l_ep), float(l_ref), rtol=1e-5)
  assert int(s_ep["counts"].sum()) == T * K                       # dropless
  assert int(s_ep["counts"][0]) == T and int(s_ep["counts"][1]) == T   # rank 0 gets every token
  for key in s_ref:
    np.testing.assert_allclose(np.asarray(s_ep[key]), np.asarray(s_ref[key]), rtol=1e-6, err_msg=key)
  np.testing.assert_allclose(np.asarray(g_ep[0]), np.asarray(g_ref[0]), rtol=1e-4, atol=1e-6)
  for key in params:
    np.testing.assert_allclose(np.asarray(g_ep[1][key]), np.asarray(g_ref[1][key]), rtol=1e-4,
                               atol=1e-6, err_msg=key)
