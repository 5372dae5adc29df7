"""One process of the multi-host test (run as a script): train, save, restore under another strategy.

    python mp_worker.py PROCESS_ID NUM_PROCESSES PORT WORKDIR STRATEGY_A STRATEGY_B

Every process runs the same program (SPMD). The global batch is fixed (so the loss must fall);
each process feeds only its rows (`process_batch_slice`) through `make_array_from_process_local_data`.
Steps 1-3 run under STRATEGY_A, the state is saved (a collective Orbax save), restored onto a mesh of
STRATEGY_B and steps 4-5 continue there. Process 0 writes `WORKDIR/losses.json`.
"""
import json
import os
import sys

pid, nproc, port, workdir, strat_a, strat_b = sys.argv[1:7]
pid, nproc = int(pid), int(nproc)

import jax  # noqa: E402

from mhc_jax import distributed  # noqa: E402

if nproc > 1:
  assert distributed.maybe_initialize_distributed(f"127.0.0.1:{port}", nproc, pid)
assert jax.process_count() == nproc and jax.process_index() == pid

import numpy as np  # noqa: E402

from mhc_jax.checkpoint import Checkpointer  # noqa: E402
from mhc_jax.config import (ConnectionConfig, DataConfig, MeshConfig, ModelConfig,  # noqa: E402
                            RunConfig, TrainConfig)
from mhc_jax.train.state import create_state, make_setup  # noqa: E402
from mhc_jax.train.step import make_train_step  # noqa: E402

B, T = 8, 16


def mesh_cfg(spec):
  name, _, shape = spec.partition(":")
  return MeshConfig(name, tuple(int(s) for s in shape.split(",")) if shape else None)


def run_cfg(spec):
  model = ModelConfig(vocab_size=256, d_model=32, n_layers=2, n_heads=4, d_ff=64, max_seq_len=T,
                      dtype="float32",
                      connection=ConnectionConfig(kind="mhc", n_streams=4, sinkhorn_iters=4))
  return RunConfig(model=model, data=DataConfig(seq_len=T, batch_size=B),
                   train=TrainConfig(steps=5, lr=1e-2, warmup_steps=0), mesh=mesh_cfg(spec))


def batch_for(step, setup):
  del step   # one fixed batch: the loss must fall (memorisation), whatever the layout
  seq = np.random.default_rng(100).integers(0, 256, (B, T + 1), dtype=np.int32)
  rows = distributed.process_batch_slice(B)
  return {"inputs": distributed.global_batch_array(seq[rows, :-1], setup.mesh, setup.mesh_cfg),
          "targets": distributed.global_batch_array(seq[rows, 1:], setup.mesh, setup.mesh_cfg)}


def stepper(cfg, setup):
  b = setup.batch_sharding
  fn = jax.jit(make_train_step(cfg), in_shardings=(setup.state_shardings, {"inputs": b, "targets": b}),
               out_shardings=(setup.state_shardings, None), donate_argnums=0)

  def step(state, batch):
    with setup.context():
      return fn(state, batch)
  return step


os.makedirs(workdir, exist_ok=True)
losses = []
cfg = run_cfg(strat_a)
setup = make_setup(cfg)
state = create_state(cfg, setup)
step = stepper(cfg, setup)
for s in range(1, 4):
  state, metrics = step(state, batch_for(s, setup))
  losses.append(float(metrics["loss"]))

ckpt = Checkpointer(os.path.join(workdir, "ckpt"), keep=2)
ckpt.save(3, state, meta={"strategy": strat_a}, wait=True)     # every process takes part
del state

cfg_b = run_cfg(strat_b)
setup_b = make_setup(cfg_b)
got = ckpt.restore_latest(setup_b.target)
assert got is not None and got[2] == 3
state = jax.jit(lambda s: s, out_shardings=setup_b.state_shardings)(got[0])
assert int(state.step) == 3
step_b = stepper(cfg_b, setup_b)
for s in range(4, 6):
  state, metrics = step_b(state, batch_for(s, setup_b))
  losses.append(float(metrics["loss"]))
ckpt.close()

if distributed.is_main_process():
  with open(os.path.join(workdir, "losses.json"), "w") as f:
    json.dump({"losses": losses, "processes": jax.process_count(), "devices": jax.device_count(),
               "mesh_a": dict(setup.mesh.shape), "mesh_b": dict(setup_b.mesh.shape)}, f)
print(f"process {pid}: done {losses}", flush=True)
