"""Meshes, one logical-rules table per strategy, and the shardings of parameters, optimizer state and
batches derived from it.

Mesh axes are `("data", "expert", "fsdp", "tensor")`, always all four (size 1 where unused), built with
explicit `AxisType.Auto` (GSPMD + logical constraints). The model names only logical axes
(`batch, length, streams, embed, heads, kv, mlp, vocab, layers, experts` and the connection
parameters' `mhc_*` names, which stay replicated); a strategy is just a rules table. B = the batch
axes (data, expert, fsdp): tokens are split over the expert ranks like data parallelism.

  strategy  batch  params                                                  typical shape
  dp        B      replicated                                              (N, 1, 1)
  fsdp      B      embed -> B (ZeRO-3)                                     (1, N, 1)
  tp        B      heads, mlp, vocab -> tensor (Megatron)                  (1, 1, N)
  fsdp_tp   B      embed -> B; heads, mlp, vocab -> tensor                 (1, X, Y)
  hsdp      B      embed -> fsdp, replicated over data (DCN x ICI)         (slices, N/slices, 1)
  ep        B      experts -> expert, the rest replicated (dp-like)        (N, 1, 1), expert = N

Every strategy maps `experts -> expert` (size 1 unless `MeshConfig.expert` / "ep" asks for more), ahead
of the embed rules: an expert weight `[E, C, F]` is split over `expert` on E and, under fsdp, keeps
`embed -> (data, fsdp)` (the second embed rule, taken when `expert` is already used); dense weights
take `embed -> (data, expert, fsdp)`. Under an expert axis > 1 the MoE layer dispatches tokens to
the expert ranks inside `shard_map` (`mhc_jax.ops.moe_ep`).

Residual-stream sharding (`[B, T, n, C]`, the state that grows with n), over `tensor`:
  replicated  streams are whole on every tensor shard (plain TP: all-reduce after each branch);
  feature     C -> tensor: the stream mix is local, the mHC projection needs partial
              `x_flat @ phi` and the sum of squares psum-ed (n^2 + 2n + 1 floats per token);
  sequence    T -> tensor (Megatron sequence parallelism: gathered before attention/MLP).
Flax resolves rules in order and uses each mesh axis at most once per array (a tuple rule applies only
when all its axes are free), so the model-parallel rules (heads, mlp, vocab) come before the stream
rules: a weight `[embed, heads, kv]` stays head-sharded while activations `[B, T, n, C]` become
feature-sharded.
"""
from __future__ import annotations

import contextlib
from typing import Any, Sequence

import flax.linen as nn
import jax
import numpy as np
import optax
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from mhc_jax.config import BATCH_AXES, LOGICAL_AXES, MESH_AXES, MeshConfig, fail


def _n_slices(devices) -> int:
  return len({getattr(d, "slice_index", 0) for d in devices})


def make_mesh(mesh_cfg: MeshConfig, devices: Sequence[Any] | None = None) -> Mesh:
  """Mesh over `MESH_AXES` = (data, expert, fsdp, tensor) with explicit `AxisType.Auto` axes.

  `devices`: defaults to `jax.devices()`; TPU topology descriptions (ahead-of-time) also work. For
  `hsdp` on several slices the data axis spans slices (DCN) and expert/fsdp/tensor stay inside one
  (ICI).
  """
  devices = list(jax.devices() if devices is None else devices)
  n_slices = _n_slices(devices)
  shape = mesh_cfg.mesh_shape(len(devices), n_slices)
  axis_types = (AxisType.Auto,) * len(MESH_AXES)
  if n_slices > 1:
    if shape[0] % n_slices:
      fail("mesh.shape", mesh_cfg.resolved_shape(len(devices), n_slices),
           f"the data axis (data / expert = {shape[0]}) must be a multiple of the {n_slices} slices")
    ici = (shape[0] // n_slices, *shape[1:])
    dev_array = mesh_utils.create_hybrid_device_mesh(ici, (n_slices, 1, 1, 1), devices)
    return Mesh(dev_array, MESH_AXES, axis_types=axis_types)
  try:
    return jax.make_mesh(shape, MESH_AXES, axis_types=axis_types, devices=devices)
  except Exception:  # noqa: BLE001 - e.g. device kinds without a physical-topology model
    return Mesh(np.asarray(devices, dtype=object).reshape(shape), MESH_AXES, axis_types=axis_types)


def logical_rules(mesh_cfg: MeshConfig) -> list[tuple[str, Any]]:
  """Flax logical-axis rules for the strategy, in priority order (first free mesh axis wins)."""
  s = mesh_cfg.strategy
  rules: list[tuple[str, Any]] = [("batch", BATCH_AXES)]
  if s in ("tp", "fsdp_tp"):
    rules += [("heads", "tensor"), ("mlp", "tensor"), ("vocab", "tensor")]
  rules += [("experts", "expert")]
  if s in ("fsdp", "fsdp_tp"):
    rules += [("embed", BATCH_AXES), ("embed", ("data", "fsdp"))]   # the second: expert weights
  elif s == "hsdp":
    rules += [("embed", "fsdp")]
  if mesh_cfg.stream_sharding == "feature":
    rules += [("embed", "tensor")]
  elif mesh_cfg.stream_sharding == "sequence":
    rules += [("length", "tensor")]
  assigned = {name for name, _ in rules}
  rules += [(name, None) for name in LOGICAL_AXES if name not in assigned]
  return rules


def logical_spec(names: Sequence[str | None], mesh_cfg: MeshConfig) -> P:
  """PartitionSpec of an array with logical axis `names` under the strategy's rules."""
  return nn.logical_to_mesh_axes(tuple(names), logical_rules(mesh_cfg))


def batch_sharding(mesh: Mesh, mesh_cfg: MeshConfig) -> NamedSharding:
  """Sharding of a `[B, T]` token batch: rows over BATCH_AXES, time whole (per-process loading)."""
  del mesh_cfg  # every strategy splits the batch over the same axes
  return NamedSharding(mesh, P(BATCH_AXES, None))


def expert_size(mesh) -> int:
  """Size of the mesh's `expert` axis (1 when absent or no mesh)."""
  if mesh is None or getattr(mesh, "empty", False) or "expert" not in mesh.axis_names:
    return 1
  return dict(zip(mesh.axis_names, mesh.axis_sizes))["expert"]


def check_experts(model_cfg, mesh) -> None:
  """ConfigError unless `model.moe.n_routed` splits evenly over the mesh's expert ranks (call it
  where the run's mesh is set up; no-op for dense models)."""
  moe = getattr(model_cfg, "moe", None)
  ep = expert_size(mesh)
  if moe is not None and moe.n_routed % ep:
    fail("model.moe.n_routed", moe.n_routed, f"must be divisible by the mesh's expert size {ep}")


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


@contextlib.contextmanager
def sharding_context(mesh: Mesh, mesh_cfg: MeshConfig):
  """`jax.set_mesh(mesh)` + `nn.logical_axis_rules(rules)`: trace/apply the model inside this.

  Activations are constrained by the model's logical names, and the connection kernels run inside
  `shard_map` over the same layout. Create parameters through `jax.jit(init, out_shardings=...)`
  (`param_shardings`). Pitfall: `jax.jit` caches traces per function and the Flax rules are not
  part of the key, so jit a fresh function (e.g. `make_train_step(cfg)`) per strategy rather than
  re-tracing one under new rules.
  """
  with jax.set_mesh(mesh), nn.logical_axis_rules(logical_rules(mesh_cfg)):
    yield


def param_shardings(abstract_params: Any, mesh: Mesh, mesh_cfg: MeshConfig) -> Any:
  """NamedShardings for a (boxed, e.g. from `jax.eval_shape(model.init, ...)`) variable tree."""
  return nn.logical_to_mesh_sharding(nn.get_partition_spec(abstract_params), mesh,
                                     logical_rules(mesh_cfg))


def opt_state_shardings(tx, abstract_opt_state: Any, params_shardings: Any, mesh: Mesh) -> Any:
  """Optimizer-state shardings derived from the params' (moments sharded like params, rest replicated).

  `jax.jit(tx.init)` would leave the moments replicated (jax_practice.md 3.2), so derive them.
  """
  return optax.tree_map_params(tx, lambda _, s: s, abstract_opt_state, params_shardings,
                               transform_non_params=lambda _: replicated(mesh),
                               is_leaf=lambda x: isinstance(x, NamedSharding))
