"""ESTIMATE (no GPU measured): paper-ideal bytes vs compiled bytes accessed, and the HBM-bound times.

    JAX_PLATFORMS=cpu python -m mhc_jax.tools.estimate --kernels experiments/results/h100_aot_<date>.json
        [--step-layers]  [--out experiments/results/h100_estimate_<date>.json]

kernels: for each compiled kernel program of a `gpu_aot` sweep (1 device), the ideal HBM bytes of
  paper Table 2 counting (`mhc_jax.tools.bench_kernels.ideal_bytes`: each stream element read or written
  once, coefficients float32) against the compiled program's bytes accessed (XLA's CPU cost model
  over the optimized H100 module: a Pallas kernel counts its operands and results once, XLA fusions
  likewise), and the time each implies at H100 (3.35 TB/s) and H200 (4.8 TB/s) HBM bandwidth.
  `ideal / compiled` is the fraction of the HBM roofline the program can reach if it runs at
  bandwidth: the estimate behind the issue's "pre >= 70%, post >= 80%" targets.
step (--step-layers): the train step at d_model 2048, seq 2048 (1 H100, B 2, bf16, remat none,
  layers unrolled), residual vs mHC n=4 (kernels), compiled with 1 and 2 layers; bytes accessed
  per layer = the difference, extrapolated to 20 layers (the `1b` preset) as a + 20 b. The ideal
  residual-stream bytes per layer are Table 2's: residual 2C read + C write per sublayer and pass;
  mHC the fused pre + post kernels' (`ideal_bytes("connection", ...)`), two sublayers per layer.
All of it is an estimate: bytes / bandwidth is a lower bound on time, and the cost model is not a
profiler.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import sys
import time

BW = {"h100": 3.35e12, "h200": 4.8e12}
_MODE = {"pre_fwd": ("pre", "fwd"), "pre_bwd": ("pre", "fwd+bwd"),
         "post_fwd": ("post", "fwd"), "post_bwd": ("post", "fwd+bwd")}


def kernel_rows(items: list[dict]) -> list[dict]:
  import jax.numpy as jnp

  from mhc_jax.tools.bench_kernels import ideal_bytes
  rows = []
  for it in items:
    if it.get("kind") != "kernel" or it.get("devices") != 1 or it.get("status") != "ok":
      continue
    op, mode = _MODE[it["program"]]
    s = jnp.dtype(it["dtype"]).itemsize
    ideal = ideal_bytes(op, mode, it["n"], it["C"], s) * it["tokens"]
    cost = it.get("cost") or {}
    compiled = cost.get("bytes_accessed")
    if "pallas_bytes" not in cost:
      # records written before the kernels' own bytes were added: a forward program is the one
      # kernel, whose bytes are its arguments + results; other programs are left out
      mem = it.get("memory") or {}
      compiled = (mem["argument_bytes"] + mem["output_bytes"]
                  if it["program"].endswith("_fwd") and mem else None)
    row = {"program": it["program"], "n": it["n"], "C": it["C"], "dtype": it["dtype"],
           "tokens": it["tokens"], "ideal_bytes": ideal, "compiled_bytes": compiled,
           "roofline_fraction": (ideal / compiled) if compiled else None,
           # the Pallas kernels alone (the program also holds the test loss's XLA ops)
           "kernel_bytes": cost.get("pallas_bytes", compiled if it["program"].endswith("_fwd")
                                    else None),
           "spill": bool(any(k.get("stack_bytes") or k.get("local_bytes")
                             for k in it.get("kernels", []) if k["kernel"].endswith("_body")))}
    row["kernel_roofline_fraction"] = ideal / row["kernel_bytes"] if row["kernel_bytes"] else None
    for gpu, bw in BW.items():
      row[f"ideal_us_{gpu}"] = 1e6 * ideal / bw
      row[f"kernel_us_{gpu}"] = 1e6 * row["kernel_bytes"] / bw if row["kernel_bytes"] else None
      row[f"compiled_us_{gpu}"] = 1e6 * compiled / bw if compiled else None
    rows.append(row)
  return rows


def _step_bytes(n_streams: int, layers: int, implementation: str) -> dict:
  from mhc_jax.config import ConnectionConfig, ModelConfig
  from mhc_jax.config import DataConfig
  from mhc_jax.config import MeshConfig
  from mhc_jax.tools.compare_sharding import lower_step
  from mhc_jax.tools import h100
  from mhc_jax.config import RunConfig, TrainConfig
  kind = "residual" if n_streams == 1 else "mhc"
  conn = ConnectionConfig(kind=kind, n_streams=n_streams, implementation=implementation)
  model = ModelConfig(vocab_size=256, d_model=2048, n_layers=layers, n_heads=16, max_seq_len=2048,
                      dtype="bfloat16", remat="none", scan_layers=False, connection=conn,
                      collapse="sum" if kind == "residual" else ModelConfig.collapse)
  cfg = RunConfig(model=model, data=DataConfig(seq_len=2048, batch_size=2),
                  train=TrainConfig(steps=1, lr=1e-3, warmup_steps=0), mesh=MeshConfig("dp"))
  t0 = time.perf_counter()
  lowered, _, n_params = lower_step(cfg, h100.devices(1))
  compiled = lowered.compile()
  cost = h100.cost(compiled)
  return {"n_streams": n_streams, "layers": layers, "bytes_accessed": cost["bytes_accessed"],
          "flops": cost["flops"], "memory": h100.memory(compiled), "n_params": n_params,
          "compile_s": round(time.perf_counter() - t0, 1)}


def step_rows(implementation: str = "pallas", log=print) -> dict:
  import jax.numpy as jnp

  from mhc_jax.tools.bench_kernels import ideal_bytes
  c, tokens, full_layers, s = 2048, 2 * 2048, 20, jnp.dtype(jnp.bfloat16).itemsize
  out = {"shape": {"d_model": c, "seq_len": 2048, "batch": 2, "tokens": tokens, "dtype": "bfloat16",
                   "remat": "none", "extrapolated_layers": full_layers, "implementation":
                   implementation}, "compiles": [], "rows": []}
  for ns in (1, 4):
    per = {}
    for layers in (1, 2):
      rec = _step_bytes(ns, layers, implementation if ns > 1 else "xla")
      log(f"  step n={ns} L={layers}: {rec['bytes_accessed'] / 1e9:.2f} GB ({rec['compile_s']}s)")
      out["compiles"].append(rec)
      per[layers] = rec["bytes_accessed"]
    per_layer = per[2] - per[1]
    base = per[1] - per_layer
    total = base + full_layers * per_layer
    # ideal residual-stream bytes per layer (two sublayers), forward + backward
    if ns == 1:
      ideal_layer = 2 * 2 * (3 * c * s) * tokens     # Table 2 residual: 2C read + C write, x2 passes
    else:
      ideal_layer = 2 * ideal_bytes("connection", "fwd+bwd", ns, c, s) * tokens
    row = {"kind": "residual" if ns == 1 else f"mhc{ns}", "compiled_bytes_per_layer": per_layer,
           "compiled_bytes_outside_layers": base, "compiled_bytes_step": total,
           "ideal_stream_bytes_per_layer": ideal_layer,
           "ideal_stream_bytes_step": full_layers * ideal_layer}
    for gpu, bw in BW.items():
      row[f"compiled_step_ms_{gpu}"] = 1e3 * total / bw
      row[f"ideal_stream_ms_{gpu}"] = 1e3 * full_layers * ideal_layer / bw
    out["rows"].append(row)
  res, mhc = out["rows"]
  out["mhc_minus_residual"] = {
      "compiled_bytes_step": mhc["compiled_bytes_step"] - res["compiled_bytes_step"],
      "ideal_stream_bytes_step": mhc["ideal_stream_bytes_step"] - res["ideal_stream_bytes_step"],
      **{f"compiled_ms_{g}": mhc[f"compiled_step_ms_{g}"] - res[f"compiled_step_ms_{g}"]
         for g in BW},
      **{f"ideal_ms_{g}": mhc[f"ideal_stream_ms_{g}"] - res[f"ideal_stream_ms_{g}"] for g in BW},
      "compiled_bytes_ratio": mhc["compiled_bytes_step"] / res["compiled_bytes_step"]}
  return out


def main(argv: list[str] | None = None) -> int:
  ap = argparse.ArgumentParser(prog="python -m mhc_jax.tools.estimate",
                               description=__doc__.split("\n")[0])
  ap.add_argument("--kernels", nargs="*", default=[], help="gpu_aot result JSON files")
  ap.add_argument("--step-layers", action="store_true", help="compile the 1- and 2-layer steps")
  ap.add_argument("--implementation", default="pallas")
  ap.add_argument("--out", default=None)
  args = ap.parse_args(argv)
  import jax
  now = datetime.datetime.now(datetime.timezone.utc)
  items = []
  for path in args.kernels:
    with open(path) as f:
      items += json.load(f)["items"]
  result = {"meta": {"label": "ESTIMATE: no GPU was measured; bytes from the paper's Table 2 "
                              "counting and from XLA's cost model of the H100-compiled programs",
                     "jax_version": jax.__version__, "date": now.isoformat(timespec="seconds"),
                     "command": "JAX_PLATFORMS=cpu python -m mhc_jax.tools.estimate "
                                + " ".join(argv or sys.argv[1:]),
                     "hbm_bytes_per_s": BW, "sources": [os.path.basename(p) for p in args.kernels]},
            "kernels": kernel_rows(items)}
  if args.step_layers:
    result["step"] = step_rows(args.implementation)
  out = args.out or os.path.join("experiments", "results", f"h100_estimate_{now:%Y%m%d}.json")
  os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
  with open(out, "w") as f:
    json.dump(result, f, indent=1)
  for r in result["kernels"]:
    print(f"{r['program']:8s} n={r['n']} C={r['C']:5d} {r['dtype']:8s} ideal "
          f"{r['ideal_bytes'] / 1e6:8.1f} MB compiled {(r['compiled_bytes'] or 0) / 1e6:8.1f} MB "
          f"roofline {r['roofline_fraction'] or 0:5.2f} kernels-only {r['kernel_roofline_fraction'] or 0:5.2f}"
          f"  H100 {r['ideal_us_h100']:7.1f} us / H200 {r['ideal_us_h200']:7.1f} us ideal")
  print(f"saved {out}")
  return 0


if __name__ == "__main__":
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  sys.exit(main())
