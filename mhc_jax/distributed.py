"""Multi-host start-up and per-process batches: `jax.distributed.initialize` when the flags or the
environment ask for it, and the global `[B, T]` batch built from each process's rows."""
from __future__ import annotations

import os
from typing import Sequence

import jax
import numpy as np
from jax.sharding import Mesh

from mhc_jax.config import ConfigError, MeshConfig, fail
from mhc_jax.sharding import batch_sharding


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
