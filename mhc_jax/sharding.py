"""Meshes, one logical-rules table per strategy, and `shard_map` helpers for kernels.

Mesh axes are `("data", "fsdp", "tensor")`, always all three (size 1 where unused), built with explicit
`AxisType.Auto` (GSPMD + logical constraints). The model names only logical axes
(`batch, length, streams, embed, heads, kv, mlp, vocab, layers` and the connection parameters'
`mhc_*` names, which stay replicated); a strategy is just a rules table:

  strategy  batch            params                                   typical shape
  dp        (data, fsdp)     replicated                               (N, 1, 1)
  fsdp      (data, fsdp)     embed -> (data, fsdp)       (ZeRO-3)     (1, N, 1)
  tp        (data, fsdp)     heads, mlp, vocab -> tensor (Megatron)   (1, 1, N)
  fsdp_tp   (data, fsdp)     embed -> (data, fsdp); heads, mlp, vocab -> tensor   (1, X, Y)
  hsdp      (data, fsdp)     embed -> fsdp, replicated over data (DCN x ICI)      (slices, N/slices, 1)

Residual-stream sharding (`[B, T, n, C]`, the state that grows with n), over `tensor`:
  replicated  streams are whole on every tensor shard (plain TP: all-reduce after each branch);
  feature     C -> tensor: the stream mix is local, the mHC projection needs partial
              `x_flat @ phi` and the sum of squares psum-ed (n^2 + 2n + 1 floats per token);
  sequence    T -> tensor (Megatron sequence parallelism: gathered before attention/MLP).
Flax resolves rules in order and uses each mesh axis at most once per array, so the model-parallel rules
(heads, mlp, vocab) come before the stream rules: a weight `[embed, heads, kv]` stays head-sharded while
activations `[B, T, n, C]` become feature-sharded.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import os
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from mhc_jax.config import ConfigError, check_choice, fail
from mhc_jax.ops.mappings import mhc_mappings

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")
STRATEGIES = ("dp", "fsdp", "tp", "fsdp_tp", "hsdp")
STREAM_SHARDINGS = ("replicated", "feature", "sequence")
LOGICAL_AXES = ("batch", "length", "streams", "embed", "heads", "kv", "mlp", "vocab", "layers",
                "mhc_in", "mhc_out", "mhc_streams", "mhc_streams_in", "mhc_gates")

# Default mesh shape per strategy when `MeshConfig.shape` is None; -1 takes the remaining devices.
DEFAULT_SHAPES = {"dp": (-1, 1, 1), "fsdp": (1, -1, 1), "tp": (1, 1, -1), "fsdp_tp": (1, -1, 2),
                  "hsdp": (-2, -1, 1)}   # -2: the number of slices (1 on a single slice / CPU)


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  """Device mesh over `("data", "fsdp", "tensor")` and the strategy that maps logical axes onto it.

  shape: sizes of (data, fsdp, tensor), one -1 allowed; None takes `DEFAULT_SHAPES[strategy]`.
  stream_sharding: how the mHC residual streams `[B, T, n, C]` sit on the `tensor` axis.
  """
  strategy: str = "dp"
  shape: tuple[int, ...] | None = None
  stream_sharding: str = "replicated"

  def __post_init__(self):
    check_choice("mesh.strategy", self.strategy, STRATEGIES)
    check_choice("mesh.stream_sharding", self.stream_sharding, STREAM_SHARDINGS)
    if self.shape is None:
      return
    shape = self.shape
    if isinstance(shape, list):
      object.__setattr__(self, "shape", tuple(shape))
      shape = self.shape
    if (not isinstance(shape, tuple) or len(shape) != len(MESH_AXES)
        or any(isinstance(s, bool) or not isinstance(s, int) for s in shape)):
      fail("mesh.shape", shape, f"a tuple of {len(MESH_AXES)} integers for {MESH_AXES}")
    if any(s == 0 or s < -1 for s in shape):
      fail("mesh.shape", shape, "positive sizes, with at most one -1")
    if sum(s == -1 for s in shape) > 1:
      fail("mesh.shape", shape, "at most one -1")

  def resolved_shape(self, n_devices: int, n_slices: int = 1) -> tuple[int, int, int]:
    """Concrete (data, fsdp, tensor) sizes for `n_devices`; ConfigError when they do not fit."""
    shape = list(self.shape if self.shape is not None else DEFAULT_SHAPES[self.strategy])
    shape = [n_slices if s == -2 else s for s in shape]
    known = math.prod(s for s in shape if s != -1)
    if -1 in shape:
      if n_devices % known:
        fail("mesh.shape", tuple(self.shape or shape),
             f"the fixed sizes multiply to {known}, which does not divide {n_devices} devices")
      shape[shape.index(-1)] = n_devices // known
    elif known != n_devices:
      fail("mesh.shape", tuple(shape),
           f"sizes must multiply to the {n_devices} devices (got {known}); use -1 for one axis")
    return tuple(shape)


def _n_slices(devices) -> int:
  return len({getattr(d, "slice_index", 0) for d in devices})


def make_mesh(mesh_cfg: MeshConfig, devices: Sequence[Any] | None = None) -> Mesh:
  """Mesh over `("data", "fsdp", "tensor")` with explicit `AxisType.Auto` axes.

  `devices`: defaults to `jax.devices()`; TPU topology descriptions (ahead-of-time) also work. For
  `hsdp` on several slices the data axis spans slices (DCN) and fsdp/tensor stay inside one (ICI).
  """
  devices = list(jax.devices() if devices is None else devices)
  n_slices = _n_slices(devices)
  shape = mesh_cfg.resolved_shape(len(devices), n_slices)
  axis_types = (AxisType.Auto,) * len(MESH_AXES)
  if n_slices > 1:
    from jax.experimental import mesh_utils
    if shape[0] % n_slices:
      fail("mesh.shape", shape, f"the data axis must be a multiple of the {n_slices} slices")
    ici = (shape[0] // n_slices, shape[1], shape[2])
    dev_array = mesh_utils.create_hybrid_device_mesh(ici, (n_slices, 1, 1), devices)
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
  if s in ("fsdp", "fsdp_tp"):
    rules += [("embed", BATCH_AXES)]
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
  import flax.linen as nn
  return nn.logical_to_mesh_axes(tuple(names), logical_rules(mesh_cfg))


def batch_sharding(mesh: Mesh, mesh_cfg: MeshConfig) -> NamedSharding:
  """Sharding of a `[B, T]` token batch: rows over (data, fsdp), time whole (per-process loading)."""
  del mesh_cfg  # every strategy splits the batch over the same axes
  return NamedSharding(mesh, P(BATCH_AXES, None))


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
  import flax.linen as nn
  with jax.set_mesh(mesh), nn.logical_axis_rules(logical_rules(mesh_cfg)):
    yield


def param_shardings(abstract_params: Any, mesh: Mesh, mesh_cfg: MeshConfig) -> Any:
  """NamedShardings for a (boxed, e.g. from `jax.eval_shape(model.init, ...)`) variable tree."""
  import flax.linen as nn
  return nn.logical_to_mesh_sharding(nn.get_partition_spec(abstract_params), mesh,
                                     logical_rules(mesh_cfg))


def opt_state_shardings(tx, abstract_opt_state: Any, params_shardings: Any, mesh: Mesh) -> Any:
  """Optimizer-state shardings derived from the params' (moments sharded like params, rest replicated).

  `jax.jit(tx.init)` would leave the moments replicated (jax_practice.md 3.2), so derive them.
  """
  import optax
  return optax.tree_map_params(tx, lambda _, s: s, abstract_opt_state, params_shardings,
                               transform_non_params=lambda _: replicated(mesh),
                               is_leaf=lambda x: isinstance(x, NamedSharding))


def kernel_shard_map(fn: Callable, mesh: Mesh, in_specs, out_specs) -> Callable:
  """`jax.shard_map(fn, ...)` with `check_vma=False` (Pallas calls carry no varying-axis info)."""
  return jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)


def stream_specs(mesh_cfg: MeshConfig) -> dict[str, P]:
  """PartitionSpecs for kernel operands: `x [B,T,n,C]`, `y/u [B,T,C]`, `h [B,T,n]`, `h_res [B,T,n,n]`."""
  x = logical_spec(("batch", "length", "streams", "embed"), mesh_cfg)
  y = logical_spec(("batch", "length", "embed"), mesh_cfg)
  h = P(*x[:2], None)
  return {"x": x, "y": y, "h": h, "h_res": P(*x[:2], None, None)}


def mhc_mappings_shard_map(mesh: Mesh, mesh_cfg: MeshConfig, **kwargs) -> Callable:
  """`(x_BTnC, params) -> (h_pre, h_post, h_res)` as one shard_map over the strategy's stream layout.

  With `stream_sharding="feature"` the projection is psum-ed over `tensor`; otherwise the math is local.
  Keyword arguments go to the mapping (`sinkhorn_iters`, `sinkhorn_eps`, `norm_eps`, `pre_eps`).
  """
  specs = stream_specs(mesh_cfg)
  axis = "tensor" if mesh_cfg.stream_sharding == "feature" else None
  body = lambda x, p: mhc_mappings(x, p, axis=axis, **kwargs)  # noqa: E731
  p_specs = {"phi": P(), "b": P(), "alpha": P()}
  return kernel_shard_map(body, mesh, (specs["x"], p_specs),
                          (specs["h"], specs["h"], specs["h_res"]))


# ---------------------------------------------------------------------------------------------
# Multi-host.

def distributed_requested(coordinator_address: str | None = None) -> bool:
  """True when flags or the environment ask for `jax.distributed.initialize()`.

  Explicit coordinator (argument or `JAX_COORDINATOR_ADDRESS`), a multi-task SLURM job, a
  multi-worker Cloud TPU VM slice (`TPU_WORKER_HOSTNAMES` with more than one host), or
  Open MPI / k8s with more than one process.
  """
  env = os.environ
  if coordinator_address or env.get("JAX_COORDINATOR_ADDRESS"):
    return True
  if int(env.get("SLURM_NTASKS", env.get("SLURM_NPROCS", "1")) or 1) > 1:
    return True
  if len([h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]) > 1:
    return True
  if int(env.get("OMPI_COMM_WORLD_SIZE", "1") or 1) > 1:
    return True
  return False


def maybe_initialize_distributed(coordinator_address: str | None = None,
                                 num_processes: int | None = None, process_id: int | None = None,
                                 local_device_ids: Sequence[int] | None = None) -> bool:
  """Call `jax.distributed.initialize` (once, before any device use) when asked; return whether it ran.

  With explicit arguments they are passed through; otherwise jax auto-detects Cloud TPU / SLURM /
  Open MPI / k8s.
  """
  if not distributed_requested(coordinator_address):
    return False
  if jax.distributed.is_initialized():
    return True
  kwargs = {}
  if coordinator_address:
    kwargs = dict(coordinator_address=coordinator_address, num_processes=num_processes,
                  process_id=process_id)
    if num_processes is None or process_id is None:
      raise ConfigError("distributed: --coordinator-address needs --num-processes and --process-id")
  if local_device_ids is not None:
    kwargs["local_device_ids"] = list(local_device_ids)
  jax.distributed.initialize(**kwargs)
  return True


def is_main_process() -> bool:
  """Log, plot and write run files only here (process 0)."""
  return jax.process_index() == 0


def process_batch_slice(global_batch: int) -> slice:
  """Rows of the global batch this process loads (contiguous, `global_batch / process_count` each)."""
  count, index = jax.process_count(), jax.process_index()
  if global_batch % count:
    fail("train.batch_size", global_batch, f"must be divisible by the {count} processes")
  per = global_batch // count
  return slice(index * per, (index + 1) * per)


def global_batch_array(local_batch: np.ndarray, mesh: Mesh, mesh_cfg: MeshConfig) -> jax.Array:
  """Global `[B, T]` array from this process's rows (`make_array_from_process_local_data`)."""
  sharding = batch_sharding(mesh, mesh_cfg)
  global_shape = (local_batch.shape[0] * jax.process_count(), *local_batch.shape[1:])
  return jax.make_array_from_process_local_data(sharding, local_batch, global_shape)


def add_distributed_args(parser) -> None:
  """`--coordinator-address HOST:PORT --num-processes N --process-id I` (else the environment:
  `JAX_COORDINATOR_ADDRESS` + `JAX_NUM_PROCESSES` + `JAX_PROCESS_ID`, SLURM, Cloud TPU, Open MPI)."""
  g = parser.add_argument_group("multi-host (jax.distributed)")
  g.add_argument("--coordinator-address", default=None, help="process 0's HOST:PORT")
  g.add_argument("--num-processes", type=int, default=None)
  g.add_argument("--process-id", type=int, default=None)


def initialize_from_args(args) -> bool:
  """`maybe_initialize_distributed` from parsed `add_distributed_args` flags or the environment."""
  env = os.environ
  addr = getattr(args, "coordinator_address", None)
  nproc = getattr(args, "num_processes", None)
  pid = getattr(args, "process_id", None)
  if addr is None and env.get("JAX_COORDINATOR_ADDRESS") and env.get("JAX_NUM_PROCESSES"):
    addr = env["JAX_COORDINATOR_ADDRESS"]
    nproc = int(env["JAX_NUM_PROCESSES"])
    pid = int(env.get("JAX_PROCESS_ID", "-1"))
  if addr is not None:
    if nproc is None or pid is None or not 0 <= pid < nproc:
      raise ConfigError(f"--process-id={pid!r} is not allowed: with --coordinator-address give "
                        "--num-processes N and --process-id in [0, N)")
  return maybe_initialize_distributed(addr, nproc, pid)
