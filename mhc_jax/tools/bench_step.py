"""`mhc-jax bench step`: time the real train step for each connection kind and recompute policy.

    mhc-jax bench step [--preset default] [--set model.d_model=2048 ...] [--kinds residual,hc,mhc,mhc_lite]
                       [--remat none,full,dots,mhc_paper] [--n-streams 4] [--steps 10] [--warmup 2]
                       [--no-interleave] [--out experiments/results/bench_step_<backend>.json]

Every (kind, remat) pair is the same model (width, depth, batch, sequence) as the preset; `residual`
uses n = 1, the others `--n-streams`. The measured function is `mhc_jax.train.step.make_train_step`
jitted exactly as the training loop does (donated state, sharded batch), on one device. After
`--warmup` untimed steps, `--steps` steps are timed one by one (`block_until_ready`); the median is
reported. With interleaving (default) the kinds of one remat policy take turns step by step, so the
overhead ratios are measured side by side under the same machine load.

Reported per pair: median step time and median CPU time per step (`time.process_time`, all threads
of this process: the figure to read on a shared machine, where wall time depends on the other load;
the load average is saved too), tokens/s, overhead vs `residual` (same policy) in %, memory
(`compiled.memory_analysis()`: temp = activations + workspace, argument, output; plus
`memory_stats()["peak_bytes_in_use"]` on GPU/TPU, which is the process peak so far), model FLOPs
per step and MFU against `DEVICE_PEAK_TFLOPS` (null where the device has no entry, e.g. CPU).
Model FLOPs (PaLM convention, remat recompute not counted): `6 * tokens * (P_matmul + V*C)` +
`12 * L * T * C * tokens` for attention, P_matmul = all parameters except the embedding table.

The cost of the `make train` step, mHC vs a plain residual of the same shapes (CPU time):
    mhc-jax bench step --kinds residual,mhc --remat none --out experiments/results/train_step_cost.json
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import statistics
import sys
import time

from mhc_jax.config import KINDS, REMAT, ConfigError
from mhc_jax.tools.args import config_parser

# Dense peak TFLOP/s per chip by compute dtype (vendor datasheets, no sparsity).
DEVICE_PEAK_TFLOPS = {
    "H100": {"bfloat16": 989.0, "float32": 67.0},     # SXM; tf32 would be 494.5
    "H200": {"bfloat16": 989.0, "float32": 67.0},
    "A100": {"bfloat16": 312.0, "float32": 19.5},
    "TPU v4": {"bfloat16": 275.0, "float32": 275.0 / 2},
    "TPU v5 lite": {"bfloat16": 197.0, "float32": 197.0 / 2},
    "TPU v5e": {"bfloat16": 197.0, "float32": 197.0 / 2},
    "TPU v5p": {"bfloat16": 459.0, "float32": 459.0 / 2},
    "TPU v6 lite": {"bfloat16": 918.0, "float32": 918.0 / 2},
    "TPU v6e": {"bfloat16": 918.0, "float32": 918.0 / 2},
}


def device_peak_tflops(device_kind: str, dtype_name: str) -> float | None:
  """Peak dense TFLOP/s for a `jax.Device.device_kind` and compute dtype; None if unknown (CPU)."""
  for key in sorted(DEVICE_PEAK_TFLOPS, key=len, reverse=True):
    if key.lower() in device_kind.lower():
      return DEVICE_PEAK_TFLOPS[key].get(dtype_name)
  return None


def model_flops_per_step(model_cfg, n_params_total: int, batch: int, seq: int) -> float:
  """PaLM-style model FLOPs of one train step (forward + backward, no recompute)."""
  c, v = model_cfg.d_model, model_cfg.vocab_size
  matmul_params = n_params_total - v * c + v * c     # embedding table out, LM-head matmul in
  if not model_cfg.tie_embeddings:
    matmul_params = n_params_total - v * c           # the untied head is already a parameter
  tokens = batch * seq
  return 6.0 * tokens * matmul_params + 12.0 * model_cfg.n_layers * seq * c * tokens


def _parse_list(text: str, allowed, field: str) -> list[str]:
  items = [s.strip() for s in text.split(",") if s.strip()]
  if not items:
    raise ConfigError(f"{field}={text!r} is not allowed: a comma-separated list of "
                      + ", ".join(allowed))
  for it in items:
    if it not in allowed:
      raise ConfigError(f"{field}={it!r} is not allowed: choose from " + ", ".join(allowed))
  return items


def _parser() -> argparse.ArgumentParser:
  p = config_parser("mhc-jax bench step", __doc__, preset="default",
                    preset_help="run preset giving the model and batch shape",
                    set_help="override a field, e.g. model.d_model=2048 (repeatable)")
  p.add_argument("--kinds", default="residual,hc,mhc,mhc_lite")
  p.add_argument("--remat", default="none,mhc_paper", help="comma list of " + ", ".join(REMAT))
  p.add_argument("--n-streams", type=int, default=4, help="streams for hc / mhc / mhc_lite")
  p.add_argument("--steps", type=int, default=10, help="timed steps (median reported)")
  p.add_argument("--warmup", type=int, default=2, help="untimed steps after compilation")
  p.add_argument("--remat-groups", default="0",
                 help="remat=mhc_paper only: comma list of model.remat_group values (0 = Eq. 20)")
  p.add_argument("--memory-only", action="store_true",
                 help="compile and report memory/FLOPs only (no timed steps)")
  p.add_argument("--no-interleave", action="store_true",
                 help="time each pair on its own (less memory: one state alive at a time)")
  p.add_argument("--out", default=None,
                 help="JSON path (default experiments/results/bench_step_<backend>.json; '-' = none)")
  return p


@dataclasses.dataclass
class _Case:
  kind: str
  remat: str
  cfg: object
  step: object = None
  state: object = None
  batch: object = None
  times: list = dataclasses.field(default_factory=list)
  cpu_times: list = dataclasses.field(default_factory=list)
  row: dict = dataclasses.field(default_factory=dict)


def _case_config(base, kind: str, remat: str, n_streams: int, group: int = 0):
  conn = dataclasses.replace(base.model.connection, kind=kind,
                             n_streams=1 if kind == "residual" else n_streams)
  collapse = "sum" if kind == "residual" else base.model.collapse
  model = dataclasses.replace(base.model, remat=remat, collapse=collapse, connection=conn,
                              remat_group=group)
  return dataclasses.replace(base, model=model)


def _prepare(case: _Case, device) -> None:
  """Build state and batch on `device`, compile the train step, fill memory/FLOP fields."""
  import jax
  import numpy as np
  from mhc_jax.config import compute_dtype
  from mhc_jax.remat import mhc_paper_group
  from mhc_jax.train.state import create_state, make_setup, n_params
  from mhc_jax.train.step import make_train_step

  cfg = case.cfg
  setup = make_setup(cfg, devices=[device])
  state = create_state(cfg, setup)
  b, t = cfg.data.batch_size, cfg.data.seq_len
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, cfg.model.vocab_size, (b, t + 1), dtype=np.int32)
  batch = {"inputs": jax.device_put(tokens[:, :-1], setup.batch_sharding),
           "targets": jax.device_put(tokens[:, 1:], setup.batch_sharding)}
  batch_sh = {"inputs": setup.batch_sharding, "targets": setup.batch_sharding}
  with setup.context():
    step = jax.jit(make_train_step(cfg, setup.tx), in_shardings=(setup.state_shardings, batch_sh),
                   out_shardings=(setup.state_shardings, None), donate_argnums=0)
    t0, c0 = time.perf_counter(), time.process_time()
    compiled = step.lower(state, batch).compile()
    compile_s, compile_cpu_s = time.perf_counter() - t0, time.process_time() - c0
  mem = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else {}
  params = n_params(state.params)
  dtype_name = np.dtype(compute_dtype(cfg.model.dtype)).name
  case.step, case.state, case.batch = compiled, state, batch
  case.row = {
      "kind": case.kind, "remat": case.remat, "n_streams": cfg.model.connection.n,
      "remat_group": (cfg.model.remat_group or mhc_paper_group(cfg.model.connection.n,
                                                               cfg.model.n_layers))
                     if case.remat == "mhc_paper" else None,
      "params": params, "compute_dtype": dtype_name, "compile_s": round(compile_s, 3),
      "compile_cpu_s": round(compile_cpu_s, 3),
      "temp_bytes": int(mem.temp_size_in_bytes) if mem else None,
      "argument_bytes": int(mem.argument_size_in_bytes) if mem else None,
      "output_bytes": int(mem.output_size_in_bytes) if mem else None,
      "model_flops": model_flops_per_step(cfg.model, params, b, t),
      "xla_flops": float(cost.get("flops", 0.0)) if cost else None,
  }


def _one_step(case: _Case) -> tuple[float, float]:
  """(wall, CPU) seconds of one step."""
  import jax
  t0, c0 = time.perf_counter(), time.process_time()
  case.state, metrics = case.step(case.state, case.batch)
  jax.block_until_ready((case.state, metrics))
  return time.perf_counter() - t0, time.process_time() - c0


def _finish(case: _Case, device, tokens: int) -> None:
  med = statistics.median(case.times) if case.times else None
  row = case.row
  row["step_time_s"] = med
  row["step_times_s"] = [round(x, 6) for x in case.times]
  row["step_cpu_s"] = statistics.median(case.cpu_times) if case.cpu_times else None
  row["tokens_per_s"] = tokens / med if med else None
  stats = device.memory_stats() if hasattr(device, "memory_stats") else None
  row["peak_bytes_in_use"] = int(stats["peak_bytes_in_use"]) if stats else None
  row["memory_source"] = "memory_stats+memory_analysis" if stats else "memory_analysis"
  peak = device_peak_tflops(device.device_kind, row["compute_dtype"])
  row["device_peak_tflops"] = peak
  row["mfu"] = (row["model_flops"] / med / (peak * 1e12)) if peak and med else None
  case.step = case.state = case.batch = None      # free device memory


def run(argv: list[str] | None = None) -> dict:
  """Parse `argv`, run the benchmark, return the result dict (also written to `--out`)."""
  args = _parser().parse_args(argv)
  kinds = _parse_list(args.kinds, KINDS, "--kinds")
  remats = _parse_list(args.remat, REMAT, "--remat")
  for name in ("steps", "n_streams"):
    if getattr(args, name) < 1:
      raise ConfigError(f"--{name.replace('_', '-')}={getattr(args, name)} is not allowed: "
                        "an integer >= 1")
  if args.warmup < 0:
    raise ConfigError(f"--warmup={args.warmup} is not allowed: an integer >= 0")
  import jax
  out = args.out
  if out is None:
    out = os.path.join("experiments", "results", f"bench_step_{jax.default_backend()}.json")
  if out != "-":
    from mhc_jax import paths
    out = paths.check_file("--out", out, (".json",))   # before the work, not after it
  from mhc_jax.config import apply_overrides
  from mhc_jax.configs import get_preset
  base = apply_overrides(get_preset(args.preset), args.overrides)
  try:
    groups_arg = [int(g) for g in args.remat_groups.split(",")]
  except ValueError:
    groups_arg = [-1]
  if any(g < 0 or g > base.model.n_layers for g in groups_arg):
    raise ConfigError(f"--remat-groups={args.remat_groups!r} is not allowed: comma list of integers "
                      f"in [0, model.n_layers={base.model.n_layers}]")
  cases = [_Case(k, r, _case_config(base, k, r, args.n_streams, g)) for r in remats
           for g in (groups_arg if r == "mhc_paper" else [0]) for k in kinds]

  device = jax.devices()[0]
  tokens = base.data.batch_size * base.data.seq_len
  keys = list(dict.fromkeys((c.remat, c.cfg.model.remat_group) for c in cases))
  groups = [[c for c in cases if (c.remat, c.cfg.model.remat_group) == k] for k in keys]
  if args.no_interleave:
    groups = [[c] for c in cases]
  for group in groups:
    for c in group:
      print(f"bench step: compiling {c.kind} / remat={c.remat}", file=sys.stderr, flush=True)
      _prepare(c, device)
      for _ in range(0 if args.memory_only else args.warmup):
        _one_step(c)
    for _ in range(0 if args.memory_only else args.steps):       # alternate the pairs of a group step by step
      for c in group:
        wall, cpu = _one_step(c)
        c.times.append(wall)
        c.cpu_times.append(cpu)
    for c in group:
      _finish(c, device, tokens)

  rows = [c.row for c in cases]
  for row in rows:
    ref = next((r for r in rows if r["kind"] == "residual" and r["remat"] == row["remat"]
                and r["remat_group"] == row["remat_group"]), None)
    row["overhead_vs_residual_pct"] = (
        100.0 * (row["step_time_s"] / ref["step_time_s"] - 1.0)
        if ref and row["step_time_s"] else None)
    row["temp_bytes_vs_residual_pct"] = (
        100.0 * (row["temp_bytes"] / ref["temp_bytes"] - 1.0)
        if ref and ref["temp_bytes"] and row["temp_bytes"] is not None else None)
  import flax
  m = base.model
  result = {
      "benchmark": "bench_step",
      "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      "device": str(device), "device_kind": device.device_kind, "backend": jax.default_backend(),
      "devices_used": 1, "jax": jax.__version__, "flax": flax.__version__,
      "python": platform.python_version(), "cpu_count": os.cpu_count(),
      "machine": platform.machine(), "load_average": list(os.getloadavg()),
      "preset": args.preset, "overrides": args.overrides,
      "shapes": {"batch": base.data.batch_size, "seq_len": base.data.seq_len,
                 "d_model": m.d_model, "n_layers": m.n_layers, "n_heads": m.n_heads,
                 "d_ff": m.ff_dim, "vocab_size": m.vocab_size, "n_streams": args.n_streams,
                 "dtype": m.dtype, "scan_layers": m.scan_layers,
                 "implementation": m.connection.implementation},
      "steps": 0 if args.memory_only else args.steps, "warmup": args.warmup, "interleaved": not args.no_interleave,
      "results": rows,
  }
  if out != "-":
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    with open(out, "w") as f:
      json.dump(result, f, indent=1)
    result["out"] = out
  return result


def format_table(result: dict) -> str:
  head = (f"{'remat':<10} {'g':>2} {'kind':<9} {'n':>2} {'step ms':>9} {'cpu ms':>9} {'tok/s':>10} "
          f"{'ovh %':>7} "
          f"{'temp MiB':>9} {'temp %':>7} {'MFU':>6}")
  lines = [f"{result['device_kind']} ({result['backend']}), jax {result['jax']}, "
           f"shapes {result['shapes']}", head]
  fmt = lambda v, f: "-" if v is None else format(v, f)   # noqa: E731
  for r in result["results"]:
    lines.append(f"{r['remat']:<10} {fmt(r['remat_group'], '>2')} {r['kind']:<9} {r['n_streams']:>2} "
                 f"{fmt(r['step_time_s'] and 1e3 * r['step_time_s'], '>9.2f')} "
                 f"{fmt(r['step_cpu_s'] and 1e3 * r['step_cpu_s'], '>9.2f')} "
                 f"{fmt(r['tokens_per_s'], '>10.0f')} "
                 f"{fmt(r['overhead_vs_residual_pct'], '>7.1f')} "
                 f"{fmt(r['temp_bytes'] and r['temp_bytes'] / 2**20, '>9.2f')} "
                 f"{fmt(r['temp_bytes_vs_residual_pct'], '>7.1f')} {fmt(r['mfu'], '>6.3f')}")
  return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
  result = run(argv)
  print(format_table(result))
  if "out" in result:
    print(f"saved {result['out']}")
  return 0


if __name__ == "__main__":
  try:
    sys.exit(main())
  except ConfigError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
