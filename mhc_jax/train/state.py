"""Train state, born sharded under a mesh.

`make_setup(run_cfg)` is the seam that decides mesh + logical rules, builds the optimizer and traces the
abstract state once; `create_state` builds the state directly in its target shardings:
  jax.eval_shape(init) -> logical specs (nn.get_partition_spec) -> NamedShardings (logical rules)
  -> jax.jit(init, out_shardings=...)
Optimizer-state shardings come from `optax.tree_map_params` (jax_practice.md 3.2): moments are sharded
like their params, counts replicated.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding

from mhc_jax import kernels
from mhc_jax import sharding as shd
from mhc_jax.config import BATCH_AXES, RunConfig, compute_dtype, fail
from mhc_jax.model import LM, MOE_STATE
from mhc_jax.train.optimizer import make_optimizer


# Trace model code under `jax.set_mesh` + logical rules, so its activation constraints take effect.
# (False: rules only; state and batches are still placed by the jits' in/out shardings.)
TRACE_UNDER_MESH = True


@flax.struct.dataclass
class TrainState:
  """`step` = optimizer updates done. `moe_state`: the MoE layers' balance biases (the model's
  `moe_state` collection; updated by the step's balancing rule, never by the optimizer); `{}` for
  a dense model."""
  step: jax.Array
  params: Any
  opt_state: Any
  moe_state: Any = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class MeshSetup:
  """Everything a run derives once from its config: mesh, rules, optimizer, state and batch
  shardings, and the abstract state (ShapeDtypeStructs with shardings: the restore target)."""
  mesh: Mesh
  mesh_cfg: Any
  rules: list
  tx: optax.GradientTransformation
  state_shardings: Any      # TrainState of NamedShardings
  batch_sharding: NamedSharding
  target: Any               # TrainState of ShapeDtypeStructs (unboxed params)

  def context(self):
    """Trace / run the model inside this: logical axis rules, plus `jax.set_mesh` when
    `TRACE_UNDER_MESH` (then the model's activation constraints take effect)."""
    if TRACE_UNDER_MESH:
      return shd.sharding_context(self.mesh, self.mesh_cfg)
    return nn.logical_axis_rules(self.rules)


def setup_mesh(cfg: RunConfig, devices=None) -> tuple[Mesh, list]:
  """Mesh and logical rules for this run (the one place a strategy is turned into shardings)."""
  mesh = shd.make_mesh(cfg.mesh, devices)
  shd.check_experts(cfg.model, mesh)
  data_shards = math.prod(mesh.shape[a] for a in BATCH_AXES)
  if cfg.data.batch_size % data_shards:
    fail("data.batch_size", cfg.data.batch_size,
             f"must be divisible by the {data_shards} batch shards of mesh {dict(mesh.shape)}")
  micro = cfg.data.batch_size // cfg.train.grad_accum
  if micro % data_shards:
    fail("train.grad_accum", cfg.train.grad_accum,
             f"micro-batch {micro} must be divisible by the {data_shards} batch shards")
  with jax.set_mesh(mesh):   # the connection's kernels can run on this platform, shape and dtype
    kernels.check_site(cfg.model.connection, cfg.model.d_model, compute_dtype(cfg.model.dtype))
  return mesh, shd.logical_rules(cfg.mesh)


def _init_fn(cfg: RunConfig, tx):
  model = LM(cfg.model)

  def init(seed_key):
    init_key, _ = jax.random.split(seed_key)
    tokens = jnp.zeros((1, cfg.data.seq_len), jnp.int32)
    variables = model.init(init_key, tokens)
    params = variables["params"]
    unboxed = nn.meta.unbox(params)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(unboxed),
                      moe_state=variables.get(MOE_STATE, {}))
  return init


def abstract_state(cfg: RunConfig, tx: optax.GradientTransformation):
  """Boxed abstract state (params keep their logical names)."""
  return jax.eval_shape(_init_fn(cfg, tx), jax.random.PRNGKey(cfg.train.seed))


def state_shardings(cfg: RunConfig, mesh: Mesh, tx: optax.GradientTransformation, abstract):
  """TrainState of NamedShardings for the boxed `abstract` state (params via logical rules, opt
  state via tree_map_params)."""
  params_sh = shd.param_shardings(abstract.params, mesh, cfg.mesh)
  opt_sh = shd.opt_state_shardings(tx, abstract.opt_state, params_sh, mesh)
  moe_sh = shd.param_shardings(abstract.moe_state, mesh, cfg.mesh)
  return TrainState(step=shd.replicated(mesh), params=params_sh, opt_state=opt_sh, moe_state=moe_sh)


def make_setup(cfg: RunConfig, devices=None) -> MeshSetup:
  """Mesh, optimizer, one abstract trace of the state, and the shardings derived from them."""
  mesh, rules = setup_mesh(cfg, devices)
  tx = make_optimizer(cfg.train)
  abstract = abstract_state(cfg, tx)
  shardings = state_shardings(cfg, mesh, tx, abstract)
  abstract = abstract.replace(params=nn.meta.unbox(abstract.params),
                              moe_state=nn.meta.unbox(abstract.moe_state))
  target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        abstract, shardings)
  return MeshSetup(mesh=mesh, mesh_cfg=cfg.mesh, rules=rules, tx=tx, state_shardings=shardings,
                   batch_sharding=shd.batch_sharding(mesh, cfg.mesh), target=target)


def create_state(cfg: RunConfig, setup: MeshSetup) -> TrainState:
  """Fresh state, created directly in `setup.state_shardings` (never materialised unsharded)."""
  init = _init_fn(cfg, setup.tx)

  def unboxed_init(key):
    s = init(key)
    return s.replace(params=nn.meta.unbox(s.params), moe_state=nn.meta.unbox(s.moe_state))
  with setup.context():
    return jax.jit(unboxed_init, out_shardings=setup.state_shardings)(
        jax.random.PRNGKey(cfg.train.seed))


def n_params(params) -> int:
  return sum(int(x.size) for x in jax.tree.leaves(params))


__all__ = ["TrainState", "MeshSetup", "setup_mesh", "make_setup", "create_state", "abstract_state",
           "state_shardings", "n_params"]
