"""Expert parallelism: `moe_ffn_ep` under `shard_map` (expert axis 8, and data 2 × expert 4), the MoE
layer under expert × fsdp (× tensor) meshes, the `expert` mesh config and its errors, and one train
step of a small MoE LM under expert 4 × fsdp 2 against one device."""
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


LAYER_CFG = MoEConfig(n_routed=8, n_shared=1, top_k=2, d_expert=4, seq_aux_weight=0.01)
LAYER = MoE(LAYER_CFG, init_std=0.3, out_std=0.3)
X = jnp.asarray(np.random.default_rng(2).normal(size=(8, 3, 8)), jnp.float32)   # B = 8 devices
BOXED = LAYER.init(jax.random.key(0), X)


def _layer_loss(variables, x):
  y, stats = LAYER.clone(with_stats=True).apply(variables, x)
  return jnp.sum(y ** 2) + stats["seq_aux_loss"], stats["counts"]


@pytest.mark.parametrize("mesh_cfg, sizes, gate_spec", [
    (MeshConfig("fsdp", (4, 2, 1), expert=4), (1, 4, 2, 1), P("expert", ("data", "fsdp"), None)),
    (MeshConfig("fsdp_tp", (2, 2, 2), expert=2), (1, 2, 2, 2), P("expert", ("data", "fsdp"), "tensor")),
])
def test_layer_expert_parallel_matches_no_mesh(mesh_cfg, sizes, gate_spec):
  mesh = S.make_mesh(mesh_cfg)
  assert dict(mesh.shape) == dict(zip(("data", "expert", "fsdp", "tensor"), sizes))
  v_sh = S.param_shardings(BOXED, mesh, mesh_cfg)
  assert v_sh["params"]["gate"].spec == gate_spec
  assert v_sh["params"]["router"].spec == P(("data", "expert", "fsdp"), None)
  x_sh = jax.sharding.NamedSharding(mesh, P(S.BATCH_AXES, None, None))
  fn = jax.value_and_grad(_layer_loss, has_aux=True)
  with S.sharding_context(mesh, mesh_cfg):
    assert "all_to_all" in str(jax.make_jaxpr(fn)(BOXED, X))      # the EP path is taken
    (loss, counts), grads = jax.jit(fn, in_shardings=(v_sh, x_sh))(BOXED, X)
  (want_loss, want_counts), want_grads = jax.jit(fn)(BOXED, X)
  assert "all_to_all" not in str(jax.make_jaxpr(fn)(BOXED, X))
  np.testing.assert_allclose(float(loss), float(want_loss), rtol=1e-5)
  np.testing.assert_array_equal(np.asarray(counts), np.asarray(want_counts))
  for (path, g), w in zip(jax.tree_util.tree_leaves_with_path(nn.unbox(grads["params"])),
                          jax.tree.leaves(nn.unbox(want_grads["params"]))):
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-4, atol=1e-6, err_msg=str(path))


def test_expert_config_errors():
  with pytest.raises(ConfigError, match=r"^mesh\.expert=3 .*divide"):
    MeshConfig("dp", (8, 1, 1), expert=3)
  with pytest.raises(ConfigError, match=r"^mesh\.expert=3 .*divide"):
    S.make_mesh(MeshConfig("dp", (-1, 2, 1), expert=3))
  with pytest.raises(ConfigError, match=r"^mesh\.expert=-1 "):
    MeshConfig("ep", expert=-1)
  from mhc_jax.config import ModelConfig
  model = dataclasses.replace(ModelConfig(), moe=MoEConfig(n_routed=6, top_k=2, d_expert=4))
  mesh = S.make_mesh(MeshConfig("ep", (4, 2, 1)))                 # expert 4, fsdp 2
  with pytest.raises(ConfigError, match=r"^model\.moe\.n_routed=6 .*expert size 4"):
    S.check_experts(model, mesh)
  S.check_experts(dataclasses.replace(model, moe=MoEConfig(n_routed=8, top_k=2, d_expert=4)), mesh)
  S.check_experts(ModelConfig(), mesh)                             # dense: nothing to split


@pytest.mark.parametrize("cfg, want", [
    (MeshConfig("ep"), (1, 8, 1, 1)), (MeshConfig("dp"), (8, 1, 1, 1)),
    (MeshConfig("fsdp"), (1, 1, 8, 1)), (MeshConfig("tp"), (1, 1, 1, 8)),
    (MeshConfig("fsdp_tp"), (1, 1, 4, 2)), (MeshConfig("hsdp"), (1, 1, 8, 1)),
    (MeshConfig("fsdp_tp", (2, 2, 2), expert=2), (1, 2, 2, 2)),
    (MeshConfig("ep", (4, 2, 1)), (1, 4, 2, 1)), (MeshConfig("ep", (8, 1, 1), expert=2), (4, 2, 1, 1)),
])
def test_mesh_shapes(cfg, want):
  mesh = S.make_mesh(cfg)
  assert mesh.axis_names == ("data", "expert", "fsdp", "tensor")
  assert tuple(mesh.shape[a] for a in mesh.axis_names) == want
  assert cfg.resolved_shape(8) == (want[0] * want[1], want[2], want[3])   # shape stays 3-wide


def _moe_lm(mesh_cfg):
  from mhc_jax import configs
  from mhc_jax.config import ConnectionConfig
  base = configs.tiny()
  model = dataclasses.replace(base.model, n_layers=2, n_dense_layers=1,
                              connection=ConnectionConfig(kind="residual", n_streams=1),
                              moe=MoEConfig(n_routed=8, n_shared=1, top_k=2, d_expert=16,
                                            seq_aux_weight=0.01, bias_update_rate=0.01))
  data = dataclasses.replace(base.data, batch_size=8, seq_len=16)
  return dataclasses.replace(base, model=model, data=data, mesh=mesh_cfg)


@pytest.mark.slow
def test_train_step_ep_by_fsdp_matches_one_device(monkeypatch):
  """One `Trainer.step` of a small MoE LM: expert 4 × fsdp 2 on 8 devices = 1 device (loss, grad
  norm, the updated params and balance biases)."""
  from mhc_jax.layers import moe as moe_layer
  from mhc_jax.train.trainer import Trainer
  traced = []
  monkeypatch.setattr(moe_layer, "moe_ffn_ep",
                      lambda *a, **kw: traced.append(1) or moe_ffn_ep(*a, **kw))
  tokens = np.random.default_rng(3).integers(0, 256, size=(8, 17)).astype(np.int32)
  batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}
  out = {}
  for name, mesh_cfg, devices in [("one", MeshConfig("dp"), jax.devices()[:1]),
                                  ("ep", MeshConfig("fsdp", (4, 2, 1), expert=4), jax.devices())]:
    trainer = Trainer(_moe_lm(mesh_cfg), devices)
    if name == "ep":
      assert dict(trainer.setup.mesh.shape) == {"data": 1, "expert": 4, "fsdp": 2, "tensor": 1}
      S.check_experts(trainer.cfg.model, trainer.setup.mesh)
    trainer.init()
    metrics = trainer.step(batch)
    assert bool(traced) == (name == "ep")                            # the EP dispatch ran in the step
    out[name] = (jax.device_get(metrics), jax.device_get(trainer.state.params),
                 jax.device_get(trainer.state.moe_state))
  (m1, p1, s1), (m8, p8, s8) = out["one"], out["ep"]
  assert any("router" in jax.tree_util.keystr(k) for k, _ in jax.tree_util.tree_leaves_with_path(p1))
  np.testing.assert_allclose(float(m8["loss"]), float(m1["loss"]), rtol=1e-5)
  np.testing.assert_allclose(float(m8["grad_norm"]), float(m1["grad_norm"]), rtol=1e-4)
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(nn.unbox(p8)), jax.tree.leaves(nn.unbox(p1))):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5, err_msg=jax.tree_util.keystr(path))
  for a, b in zip(jax.tree.leaves(nn.unbox(s8)), jax.tree.leaves(nn.unbox(s1))):
    np.testing.assert_array_equal(a, b)
