"""MoE micro-benchmark: grouped (`lax.ragged_dot`), tiled (block-sparse) and dense-masked experts.

    JAX_PLATFORMS=cpu python -m mhc_jax.tools.bench_moe [--tokens 512] [--c 128] [--f 64]
        [--experts 16] [--top-k 2] [--tile 64] [--iters 20]
        [--out experiments/results/moe_grouped_vs_dense_cpu.json]

All programs are `mhc_jax.ops.moe.moe_ffn` (routing, gates, combine identical; no shared experts so
only the routed part is compared), jitted, timed forward and forward+backward (gradients w.r.t. x
and every weight). `ragged` computes T·k expert rows, `tiled` at most T·k + E·(m−1) (each expert's
rows padded to tiles of m = `--tile`), `dense` all T·E rows masked, so the ideal FLOP ratio
dense/ragged is E/k. The programs are timed interleaved (one call of each per round), median of
`--iters` rounds, compile excluded, with wall time and CPU time (`time.process_time`, all threads)
and the load average, since the machine may be shared. Quote the ratios, not the absolute times: CPU
times say nothing about an accelerator, where ragged_dot lowers to a grouped-GEMM kernel. On CPU XLA
expands ragged_dot into E masked copies of the rows (k times the dense FLOPs), so dense beats it
there; `tiled` is plain gathers and one batched dot per weight.
"""
from __future__ import annotations

import argparse
import os
import pathlib
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from mhc_jax.ops.moe import TILE, moe_ffn
from mhc_jax.tools.results import metadata, save_json

DEFAULT_OUT = "experiments/results/moe_grouped_vs_dense_cpu.json"


def make_inputs(T, C, F, E, seed=0):
  rng = np.random.default_rng(seed)
  p = {"router": rng.normal(0, C ** -0.5, (C, E)), "gate": rng.normal(0, C ** -0.5, (E, C, F)),
       "up": rng.normal(0, C ** -0.5, (E, C, F)), "down": rng.normal(0, F ** -0.5, (E, F, C)),
       "bias": np.zeros(E)}
  params = {k: jnp.asarray(v, jnp.float32) for k, v in p.items()}
  return jnp.asarray(rng.normal(size=(T, C)), jnp.float32), params


IMPLS = ("ragged", "tiled", "dense")


def programs(top_k, tile=TILE):
  out = {}
  for impl in IMPLS:
    def fwd(x, p, impl=impl):
      return moe_ffn(x, p, top_k=top_k, implementation=impl, tile=tile)[0]

    def loss(x, p, impl=impl):
      return jnp.sum(moe_ffn(x, p, top_k=top_k, implementation=impl, tile=tile)[0] ** 2)

    out[(impl, "fwd")] = jax.jit(fwd)
    out[(impl, "fwd_bwd")] = jax.jit(jax.grad(loss, argnums=(0, 1)))
  return out


def run(T, C, F, E, top_k, iters, tile=TILE):
  x, params = make_inputs(T, C, F, E)
  progs = programs(top_k, tile)
  compile_s = {}
  for key, fn in progs.items():
    t0 = time.perf_counter()
    jax.block_until_ready(fn(x, params))
    compile_s["/".join(key)] = time.perf_counter() - t0
    jax.block_until_ready(fn(x, params))                  # one warm call
  # same answer from all (checked once, outside the timing)
  ref = progs[("dense", "fwd")](x, params)
  diffs = {impl: float(jnp.max(jnp.abs(progs[(impl, "fwd")](x, params) - ref))) for impl in IMPLS}
  wall = {k: [] for k in progs}
  cpu = {k: [] for k in progs}
  load_before = os.getloadavg()
  for _ in range(iters):
    for key, fn in progs.items():                          # interleaved rounds
      t0, c0 = time.perf_counter(), time.process_time()
      jax.block_until_ready(fn(x, params))
      wall[key].append(time.perf_counter() - t0)
      cpu[key].append(time.process_time() - c0)
  rows = {}
  for mode in ("fwd", "fwd_bwd"):
    w = {impl: statistics.median(wall[(impl, mode)]) for impl in IMPLS}
    c = {impl: statistics.median(cpu[(impl, mode)]) for impl in IMPLS}
    rows[mode] = {**{f"{i}_wall_s": w[i] for i in IMPLS}, **{f"{i}_cpu_s": c[i] for i in IMPLS}}
    for num, den in (("dense", "ragged"), ("dense", "tiled"), ("ragged", "tiled")):
      rows[mode][f"{num}_over_{den}_wall"] = w[num] / w[den]
      rows[mode][f"{num}_over_{den}_cpu"] = c[num] / c[den]
  return {"modes": rows, "compile_s": compile_s, "max_abs_diff_fwd": max(diffs.values()),
          "max_abs_diff_fwd_vs_dense": diffs,
          "loadavg_before": list(load_before), "loadavg_after": list(os.getloadavg())}


def main(argv=None):
  ap = argparse.ArgumentParser(prog="python -m mhc_jax.tools.bench_moe", description=__doc__.split("\n")[0])
  ap.add_argument("--tokens", type=int, default=512)
  ap.add_argument("--c", type=int, default=128)
  ap.add_argument("--f", type=int, default=64)
  ap.add_argument("--experts", type=int, default=16)
  ap.add_argument("--top-k", type=int, default=2)
  ap.add_argument("--tile", type=int, default=TILE, help="rows per tile of the tiled program")
  ap.add_argument("--iters", type=int, default=20)
  ap.add_argument("--out", default=None, help=f"JSON path (default {DEFAULT_OUT} on CPU, "
                  "experiments/results/moe_grouped_vs_dense_<backend>.json elsewhere; '-' = none)")
  a = ap.parse_args(argv)
  res = run(a.tokens, a.c, a.f, a.experts, a.top_k, a.iters, a.tile)
  meta = metadata()
  record = {
      **meta,
      "command": " ".join(["python -m mhc_jax.tools.bench_moe"] + list(sys.argv[1:] if argv is None else argv)),
      "shapes": {"tokens": a.tokens, "C": a.c, "F": a.f, "experts": a.experts, "top_k": a.top_k,
                 "n_shared": 0, "dtype": "float32", "iters": a.iters, "tile": a.tile},
      "ideal_flop_ratio_dense_over_ragged": a.experts / a.top_k,
      **res,
      "note": ("Medians of interleaved jitted calls on this machine. CPU times are NOT accelerator "
               "times, and the machine may be shared (see loadavg). On CPU (jax 0.12) XLA has no "
               "grouped-GEMM kernel: it expands ragged_dot into a masked [E, T*k, C] operand "
               "contracted as one [T*k, E*C] x [E*C, F] dot (see the compiled HLO), i.e. E times a "
               "plain dot over the T*k rows = k times the dense-masked FLOPs, so ragged losing here "
               "(dense/ragged < 1) is expected and says nothing about GPU/TPU, where ragged_dot "
               "lowers to a grouped matmul. `tiled` pads each expert's sorted rows to tiles of "
               "`tile` rows and runs one batched [N, tile, C] x [N, C, F] dot per weight with "
               "W[tile_expert] (at most T*k + E*(tile-1) rows): the CPU default (implementation="
               "'auto'); dense/tiled > 1 means it beats the dense-masked reference. Quote the "
               "ratios from this one run only; measure on an "
               "accelerator before drawing conclusions for training.") if meta["backend"] == "cpu" else
              "Medians of interleaved jitted calls; ratios measured side by side in this run.",
  }
  for mode, row in res["modes"].items():
    times = "  ".join(f"{i} {row[f'{i}_wall_s'] * 1e3:7.2f} ms" for i in IMPLS)
    print(f"{mode:8s} {times}  dense/ragged wall {row['dense_over_ragged_wall']:.2f}x cpu "
          f"{row['dense_over_ragged_cpu']:.2f}x  dense/tiled wall {row['dense_over_tiled_wall']:.2f}x "
          f"cpu {row['dense_over_tiled_cpu']:.2f}x")
  print(f"ideal FLOP ratio E/k = {a.experts / a.top_k:.1f}; max |impl - dense| = {res['max_abs_diff_fwd']:.2e}")
  out = a.out or (DEFAULT_OUT if meta["backend"] == "cpu"
                  else f"experiments/results/moe_grouped_vs_dense_{meta['backend']}.json")
  if out != "-":
    path = pathlib.Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_json(record, path)
    print(f"saved {path}")
  return record


if __name__ == "__main__":
  main()
