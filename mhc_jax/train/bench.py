"""Cost of one train step of a preset, mHC vs a plain residual side by side (CPU time and wall time).

    python -m mhc_jax.train.bench [--preset default] [--steps 10] [--out experiments/results/train_step_cost.json]

CPU time (`time.process_time`) is reported beside wall time because the machines this runs on are
often shared; the load average is saved with the figures.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import time

import jax
import jax.numpy as jnp

from mhc_jax.configs import get_preset
from mhc_jax.train.config import apply_overrides
from mhc_jax.train.state import create_state, make_setup, n_params
from mhc_jax.train.step import make_train_step


def measure(cfg, steps: int) -> dict:
  setup = make_setup(cfg)
  state = create_state(cfg, setup)
  shape = (cfg.data.batch_size, cfg.data.seq_len)
  batch = {"inputs": jnp.zeros(shape, jnp.int32), "targets": jnp.ones(shape, jnp.int32)}
  with setup.context():
    fn = jax.jit(make_train_step(cfg), donate_argnums=0)
    c0, w0 = time.process_time(), time.perf_counter()
    compiled = fn.lower(state, batch).compile()
    compile_cpu, compile_wall = time.process_time() - c0, time.perf_counter() - w0
    state, m = compiled(state, batch)
    jax.block_until_ready(m)
    c0, w0 = time.process_time(), time.perf_counter()
    for _ in range(steps):
      state, m = compiled(state, batch)
    jax.block_until_ready(m)
  return {"kind": cfg.model.connection.kind, "n_streams": cfg.model.connection.n_streams,
          "params": n_params(state.params), "compile_cpu_s": compile_cpu,
          "compile_wall_s": compile_wall, "step_cpu_s": (time.process_time() - c0) / steps,
          "step_wall_s": (time.perf_counter() - w0) / steps}


def main(argv=None):
  p = argparse.ArgumentParser()
  p.add_argument("--preset", default="default")
  p.add_argument("--steps", type=int, default=10)
  p.add_argument("--out", default="experiments/results/train_step_cost.json")
  args = p.parse_args(argv)
  base = get_preset(args.preset)
  rows = [measure(base, args.steps),
          measure(apply_overrides(base, ["model.connection.kind=residual",
                                         "model.connection.n_streams=1"]), args.steps)]
  out = {"what": f"train step of preset {args.preset!r}: mHC vs residual, same shapes",
         "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
         "jax": jax.__version__, "device": str(jax.devices()[0].device_kind),
         "backend": jax.default_backend(), "cpu_count": os.cpu_count(), "machine": platform.machine(),
         "load_average": os.getloadavg(), "batch": base.data.batch_size, "seq_len": base.data.seq_len,
         "d_model": base.model.d_model, "n_layers": base.model.n_layers, "results": rows,
         "mhc_over_residual_step_cpu": rows[0]["step_cpu_s"] / rows[1]["step_cpu_s"]}
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  with open(args.out, "w") as f:
    json.dump(out, f, indent=2)
  print(json.dumps(out, indent=2))


if __name__ == "__main__":
  main()
