"""`mhc-jax compare-sharding`: compile the train step under each strategy and compare the cost.

For one model config, each row (connection kind x strategy x residual-stream sharding) compiles the
real training step (`mhc_jax.train.step.make_train_step`, born-sharded state, donated) and records
  * per-device memory from `compiled.memory_analysis()` (arguments, outputs, temporaries, total);
  * FLOPs and bytes accessed from `compiled.cost_analysis()` (per device, as XLA reports them);
  * count and per-device bytes of each collective kind parsed from the compiled HLO, with the trip
    counts of the enclosing while loops applied (a scanned layer stack runs its body L times);
  * when the devices are real (CPU fake devices included): the loss after `--steps` steps on a fixed
    batch (all strategies must agree) and the measured step time / tokens per second.
Devices: the local ones (`JAX_NUM_CPU_DEVICES=8` for fake CPU devices, or `--cpu-devices 8`), or a TPU
topology compiled ahead of time through libtpu (`--topology v5e:2x4`, the `tpu-aot` extra), or N
abstract NVIDIA H100 / H200 through JAX's CUDA plugin (`--topology h100:8`, the `gpu-aot` extra).
Output: a console table, `<out>.json` and `<out>.png` (bar charts, `mhc_jax.tools.plots`).
Collectives and the cost model: `mhc_jax.tools.hlo`; presets: `mhc_jax.configs.sharding`.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import re
import sys
import time
from typing import Any

from mhc_jax.config import (DEFAULT_SHAPES, STRATEGIES, STREAM_SHARDINGS, ConfigError,
                            ConnectionConfig, MeshConfig, fail)
from mhc_jax.tools.args import config_parser
from mhc_jax.tools.hlo import collective_stats, cpu_cost_model

MiB = 2 ** 20
PRESETS = {"small": "sharding_small", "1b": "sharding_1b",   # --preset -> mhc_jax.configs name
           "paper_3b": "paper_3b", "paper_9b": "paper_9b", "paper_27b": "paper_27b",
           "moe_small": "moe_small"}
NOTES = ("memory per device from memory_analysis (CPU buffer assignment differs from TPU/GPU); "
         "flops / bytes accessed from cost_analysis as XLA reports them, which counts a while-loop "
         "body once (a scanned layer stack contributes one layer): compare rows, not absolutes; "
         "collectives: HLO collective instructions (one per channel) weighted by loop trip counts, "
         "bytes = size of each collective's result buffer; step times on fake CPU devices are not "
         "hardware timings")

# ---------------------------------------------------------------------------------------------
# Rows.

@dataclasses.dataclass(frozen=True)
class Row:
  name: str
  connection: str            # "residual" or e.g. "mhc4"
  mesh: MeshConfig


def _conn_label(conn: ConnectionConfig) -> str:
  return "residual" if conn.kind == "residual" else f"{conn.kind}{conn.n_streams}"


def _shape_for(strategy: str, shapes: dict[str, tuple], n_devices: int) -> tuple:
  if strategy in shapes:
    return shapes[strategy]
  if strategy == "hsdp":          # single slice: show it as 2 "DCN" replicas x ICI fsdp
    return (2, -1, 1) if n_devices % 2 == 0 and n_devices > 2 else (1, -1, 1)
  return DEFAULT_SHAPES[strategy]


def make_rows(connections, strategies, stream_shardings, shapes, n_devices) -> list[Row]:
  """Every connection under every strategy (streams replicated over `tensor`); then, for multi-stream
  connections, each extra stream sharding under the strategies whose `tensor` axis is > 1."""
  rows = []
  for conn in connections:
    label = _conn_label(conn)
    for s in strategies:
      shape = _shape_for(s, shapes, n_devices)
      mesh = MeshConfig(s, shape, "replicated")
      rows.append(Row(f"{label}/{s}", label, mesh))
      if conn.kind == "residual":
        continue
      tensor = mesh.resolved_shape(n_devices)[2]
      for ss in stream_shardings:
        if ss != "replicated" and tensor > 1:
          rows.append(Row(f"{label}/{s}/{ss}", label, MeshConfig(s, shape, ss)))
  return rows


# ---------------------------------------------------------------------------------------------
# Compile and run one row.

def _run_config(base, conn: ConnectionConfig, mesh: MeshConfig):
  model = dataclasses.replace(base.model, connection=conn,
                              collapse="sum" if conn.kind == "residual" else base.model.collapse)
  return dataclasses.replace(base, model=model, mesh=mesh)


def lower_step(cfg, devices):
  """`(lowered, mesh, n_params)`: the train step for `cfg` lowered on `devices` (real or compile-only:
  TPU topologies, abstract H100s) under the strategy's mesh and logical rules (`Trainer.lower`)."""
  from mhc_jax.train.state import n_params
  from mhc_jax.train.trainer import Trainer
  trainer = Trainer(cfg, devices)
  return trainer.lower(), trainer.setup.mesh, n_params(trainer.setup.target.params)


def compile_row(cfg, devices, steps: int = 0, real: bool = True) -> dict[str, Any]:
  """Compile (and, on real devices, run `steps` steps of) the train step for `cfg` on `devices`."""
  import numpy as np
  from mhc_jax.train.state import n_params as count
  from mhc_jax.train.trainer import Trainer

  t0 = time.perf_counter()
  trainer = Trainer(cfg, devices)
  lowered, mesh, n_params = trainer.lower(), trainer.setup.mesh, count(trainer.setup.target.params)
  b, t = cfg.data.batch_size, cfg.data.seq_len
  compiled = lowered.compile()
  compile_s = time.perf_counter() - t0
  mem = compiled.memory_analysis()
  cost = cpu_cost_model(compiled)
  out = {
      "mesh_shape": dict(mesh.shape),
      "n_params": n_params,
      "compile_s": round(compile_s, 2),
      "memory_mib": {
          "arguments": mem.argument_size_in_bytes / MiB,
          "outputs": mem.output_size_in_bytes / MiB,
          "aliased": mem.alias_size_in_bytes / MiB,
          "temporaries": mem.temp_size_in_bytes / MiB,
          "total": (mem.argument_size_in_bytes + mem.output_size_in_bytes
                    - mem.alias_size_in_bytes + mem.temp_size_in_bytes) / MiB,
      },
      "flops": float(cost.get("flops", float("nan"))),
      "bytes_accessed": float(cost.get("bytes accessed", float("nan"))),
      "collectives": collective_stats(compiled.as_text()),
  }
  out["collective_mib"] = sum(v["bytes"] for v in out["collectives"].values()) / MiB
  out["collectives_trip_weighted"] = True
  if real and steps > 0:
    state = trainer.init()
    rng = np.random.default_rng(cfg.data.seed)
    seq = rng.integers(0, cfg.model.vocab_size, (b, t + 1), dtype=np.int32)
    batch = trainer.to_device({"inputs": seq[:, :-1], "targets": seq[:, 1:]})
    losses, times = [], []
    for _ in range(steps):
      t1 = time.perf_counter()
      with trainer.context():
        state, metrics = compiled(state, batch)
      losses.append(float(metrics["loss"]))     # blocks until the step is done
      times.append(time.perf_counter() - t1)
    out["losses"] = losses
    timed = times[1:] or times
    out["step_ms"] = 1e3 * float(np.median(timed))
    out["tokens_per_s"] = b * t / float(np.median(timed))
  return out


# ---------------------------------------------------------------------------------------------
# CLI.

def preset(name: str):
  """The run config of `--preset NAME`: `small` (CPU-sized, seconds per row), `1b` (~1.0B-parameter
  mHC LM for ahead-of-time compiles), the paper's MoE models `paper_3b|9b|27b` (Table 5, ahead of
  time) or `moe_small` (CPU); presets of `mhc_jax.configs`."""
  from mhc_jax.configs import get_preset
  if name not in PRESETS:
    raise ConfigError(f"--preset {name!r} is not allowed: choose one of "
                      + ", ".join(repr(p) for p in PRESETS))
  return get_preset(PRESETS[name])


def _parse_shapes(items: list[str]) -> dict[str, tuple]:
  shapes = {}
  for item in items:
    if "=" not in item:
      fail("--shape", item, "strategy=data,fsdp,tensor, e.g. fsdp_tp=1,4,2")
    s, v = item.split("=", 1)
    if s not in STRATEGIES:
      fail("--shape", item, "a strategy among " + ", ".join(STRATEGIES))
    try:
      shapes[s] = tuple(int(x) for x in v.split(","))
    except ValueError:
      fail("--shape", item, "integers, e.g. fsdp_tp=1,4,2")
    MeshConfig(s, shapes[s])
  return shapes


def _parser() -> argparse.ArgumentParser:
  p = config_parser("mhc-jax compare-sharding", __doc__, preset="small",
                    preset_help="small (CPU) or 1b (TPU ahead-of-time)",
                    set_help="RunConfig override, e.g. model.d_model=128 or data.batch_size=32")
  p.add_argument("--strategies", default=",".join(STRATEGIES))
  p.add_argument("--stream-shardings", default=",".join(STREAM_SHARDINGS),
                 help="residual-stream layouts to add as rows for multi-stream models")
  p.add_argument("--n-streams", type=int, default=4, help="mHC streams (compared with residual)")
  p.add_argument("--connections", default="residual,mhc", help="kinds compared at the same width")
  p.add_argument("--shape", action="append", default=[], metavar="STRATEGY=D,F,T",
                 help="mesh shape for a strategy (default: all devices on its axis)")
  p.add_argument("--topology", default=None,
                 help="topology for ahead-of-time compilation: TPU, e.g. v5e:2x4 (needs libtpu), "
                      "or h100:8 / h200:8 (gpu-aot extra, JAX_PLATFORMS=cpu)")
  p.add_argument("--cpu-devices", type=int, default=None,
                 help="fake CPU devices (set before jax starts; same as JAX_NUM_CPU_DEVICES)")
  p.add_argument("--steps", type=int, default=3, help="train steps per row on real devices")
  p.add_argument("--out", default=None, help="output prefix (default experiments/results/"
                                            "sharding_<devices>)")
  p.add_argument("--rows", default=None,
                 help="only these rows, in this order (names as in the table, e.g. mhc4/fsdp)")
  p.add_argument("--no-plot", action="store_true")
  p.add_argument("--merge", nargs="+", default=None, metavar="JSON",
                 help="combine saved results (e.g. partial runs of one config) into --out")
  p.add_argument("--note", default=None, help="with --merge: a sentence appended to the notes")
  return p


def topology_devices(name: str):
  """Compile-only devices for topology `name`: TPU (e.g. `v5e:2x4`) through libtpu, or NVIDIA H100 /
  H200 (`h100:8`, `h200:1`: one host of N GPUs) through JAX's CUDA plugin (the `gpu-aot` extra;
  run with JAX_PLATFORMS=cpu so the plugin does not probe for a driver)."""
  gpu = re.fullmatch(r"(h100|h200)(?::(\d+))?", name.strip().lower())
  if gpu:
    try:
      from mhc_jax.tools import h100
      return h100.devices(int(gpu.group(2) or 1), gpu.group(1))
    except Exception as e:  # noqa: BLE001 - plugin missing: one clear line
      raise ConfigError(f"--topology={name!r} is not allowed: cannot build it ({type(e).__name__}: "
                        f"{str(e).splitlines()[0][:200] if str(e) else ''}); install the gpu-aot "
                        "extra and run with JAX_PLATFORMS=cpu") from e
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")   # other processes may hold libtpu's lock
  os.environ.setdefault("TPU_ACCELERATOR_TYPE", "")
  from jax.experimental import topologies
  m = re.fullmatch(r"(v[0-9a-z]+(?: lite)?):(\d+)x(\d+)(?:x(\d+))?", name)
  if not m:
    fail("--topology", name, "a TPU topology such as v5e:2x4, v4:2x2x2, v5p:2x2x2, or h100:8 / h200:8")
  dims = [int(d) for d in m.groups()[1:] if d]
  host = tuple(min(d, 2) for d in dims) + (1,) * (3 - len(dims))
  try:
    return topologies.get_topology_desc(platform="tpu", topology_name=name,
                                        chip_config_name="default", chips_per_host_bounds=host,
                                        num_slices=1).devices
  except Exception as e:  # noqa: BLE001 - libtpu missing or unknown topology: one clear line
    raise ConfigError(f"--topology={name!r} is not allowed: cannot build it ({type(e).__name__}: "
                      f"{str(e).splitlines()[0][:200]}); install the tpu-aot extra (libtpu)") from e


def _fmt_table(rows: list[dict]) -> str:
  head = (f"{'row':<28} {'mesh':<9} {'args':>8} {'temp':>8} {'total':>8} {'GFLOP':>9} "
          f"{'AR':>5} {'AG':>5} {'RS':>5} {'A2A':>4} {'CP':>4} {'comm MiB':>9} {'loss':>9}"
          f" {'ms/step':>8}")
  lines = [head, "-" * len(head)]
  for r in rows:
    if "error" in r:
      lines.append(f"{r['name']:<28} {'x'.join(map(str, r['shape'])):<9} error: {r['error'][:80]}")
      continue
    m, c = r["memory_mib"], r["collectives"]
    loss = f"{r['losses'][-1]:.5f}" if r.get("losses") else "-"
    ms = f"{r['step_ms']:.1f}" if r.get("step_ms") else "-"
    lines.append(
        f"{r['name']:<28} {'x'.join(map(str, r['shape'])):<9} {m['arguments']:8.1f} "
        f"{m['temporaries']:8.1f} {m['total']:8.1f} {r['flops'] / 1e9:9.2f} "
        f"{c['all-reduce']['count']:5d} {c['all-gather']['count']:5d} "
        f"{c['reduce-scatter']['count']:5d} {c['all-to-all']['count']:4d} "
        f"{c['collective-permute']['count']:4d} {r['collective_mib']:9.1f} {loss:>9} {ms:>8}")
  lines.append("memory in MiB per device; collectives: executions per step (while trip counts "
               "applied); comm MiB = per-device bytes of all collectives per step")
  return "\n".join(lines)


def run(args, partial_path: str | None = None) -> dict:
  import jax
  from mhc_jax.config import apply_overrides
  base = apply_overrides(preset(args.preset), args.overrides)
  if args.topology:
    devices, real = topology_devices(args.topology), False
    where = f"{'gpu' if devices[0].platform == 'gpu' else 'tpu'}-aot {args.topology}"
  else:
    devices, real = jax.devices(), True
    where = f"{len(devices)}x {devices[0].platform}"
  n = len(devices)
  strategies = [s.strip() for s in args.strategies.split(",") if s.strip()]
  for s in strategies:
    if s not in STRATEGIES:
      fail("--strategies", s, "choose among " + ", ".join(STRATEGIES))
  streams = [s.strip() for s in args.stream_shardings.split(",") if s.strip()]
  for s in streams:
    if s not in STREAM_SHARDINGS:
      fail("--stream-shardings", s, "choose among " + ", ".join(STREAM_SHARDINGS))
  conns = []
  for kind in [k.strip() for k in args.connections.split(",") if k.strip()]:
    if kind == "residual":
      conns.append(ConnectionConfig(kind="residual", n_streams=1))
    else:
      conns.append(dataclasses.replace(base.model.connection, kind=kind, n_streams=args.n_streams))
  shapes = _parse_shapes(args.shape)
  rows = make_rows(conns, strategies, streams, shapes, n)
  if args.rows:
    wanted = [r.strip() for r in args.rows.split(",") if r.strip()]
    names = {r.name: r for r in rows}
    for w in wanted:
      if w not in names:
        fail("--rows", w, "a row name among " + ", ".join(names))
    rows = [names[w] for w in wanted]
  by_label = {_conn_label(c): c for c in conns}
  results = []
  m = base.model
  header = {
      "title": f"{where}: d={m.d_model} L={m.n_layers} B={base.data.batch_size} "
               f"T={base.data.seq_len} {m.dtype}",
      "device": where, "device_kind": devices[0].device_kind, "n_devices": n,
      "jax_version": jax.__version__, "date": datetime.datetime.now(datetime.UTC).isoformat(),
      "config": json.loads(json.dumps(dataclasses.asdict(base))),
      "steps": args.steps if real else 0,
      "notes": NOTES,
  }
  for row in rows:
    cfg = _run_config(base, by_label[row.connection], row.mesh)
    rec = {"name": row.name, "connection": row.connection, "strategy": row.mesh.strategy,
           "stream_sharding": row.mesh.stream_sharding,
           "shape": list(row.mesh.resolved_shape(n))}
    try:
      rec.update(compile_row(cfg, devices, steps=args.steps, real=real))
    except ConfigError:
      raise
    except Exception as e:  # noqa: BLE001 - e.g. a TPU out-of-memory at compile time: keep going
      rec["error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:400]
    print(f"  compiled {row.name}: " + ("error" if "error" in rec else
                                       f"{rec['compile_s']:.1f}s"), file=sys.stderr, flush=True)
    results.append(rec)
    if partial_path:                      # long AOT runs: keep what is done so far
      with open(partial_path, "w") as f:
        json.dump(dict(header, rows=results, partial=True), f, indent=1)
  return dict(header, loss_max_abs_diff_across_strategies=_loss_agreement(results, by_label),
              rows=results)


def _loss_agreement(rows: list[dict], labels) -> dict[str, float]:
  """Per connection label: max |loss difference| across its rows (all strategies must agree)."""
  agree = {}
  for label in labels:
    losses = [r["losses"] for r in rows if r["connection"] == label and r.get("losses")]
    if len(losses) > 1:
      agree[label] = max(abs(a - b) for l in losses for a, b in zip(l, losses[0]))
  return agree


def merge(paths: list[str], note: str | None = None) -> dict:
  """Rows of several saved results of the same model config and devices, first file's header."""
  results = []
  for path in paths:
    with open(path) as f:
      results.append(json.load(f))
  head = {k: v for k, v in results[0].items() if k not in ("rows", "partial")}
  for path, r in zip(paths, results):
    if r["config"]["model"] != head["config"]["model"] or r["device"] != head["device"]:
      fail("--merge", path, "results of the same model config and devices")
  rows, seen = [], set()
  for r in results:
    for row in r["rows"]:
      if row["name"] not in seen:
        seen.add(row["name"])
        rows.append(row)
  head["merged_from"] = [os.path.basename(p) for p in paths]
  head["notes"] = NOTES + (f"; {note}" if note else "")
  head["rows"] = rows
  head["loss_max_abs_diff_across_strategies"] = _loss_agreement(
      rows, {r["connection"] for r in rows})
  return head


def _check_args(args):
  """Every flag checked before any work (one line, exit 2), so a long run never fails at its end."""
  from mhc_jax import paths
  if args.steps < 0:
    fail("--steps", args.steps, "an integer >= 0")
  if args.cpu_devices is not None and args.cpu_devices < 1:
    fail("--cpu-devices", args.cpu_devices, "an integer >= 1")
  if not args.merge:
    strategies = [s.strip() for s in args.strategies.split(",") if s.strip()]
    if not strategies:
      fail("--strategies", args.strategies, "a comma-separated list of " + ", ".join(STRATEGIES))
  if args.out:
    paths.check_file("--out", args.out + ".json", (".json",))
  for path in args.merge or ():
    try:
      with open(path) as f:
        r = json.load(f)
    except (OSError, ValueError) as e:
      fail("--merge", path, f"a readable results JSON file ({type(e).__name__})")
    ok = (isinstance(r, dict) and isinstance(r.get("rows"), list) and "device" in r
          and isinstance(r.get("config"), dict) and "model" in r["config"]
          and all(isinstance(row, dict) and "name" in row and "connection" in row for row in r["rows"]))
    if not ok:
      fail("--merge", path, "a results file written by compare-sharding (config, device, rows)")


def main(argv: list[str] | None = None) -> int:
  args = _parser().parse_args(argv)
  _check_args(args)
  from mhc_jax.tools import h100
  if args.topology and h100.parse_topology(args.topology):
    h100.set_compile_only_flags()
  if args.cpu_devices:
    import jax
    try:
      jax.config.update("jax_num_cpu_devices", args.cpu_devices)
    except Exception:  # noqa: BLE001 - backend already started
      print(f"warning: --cpu-devices ignored (jax already has {jax.device_count()} devices); set "
            "JAX_NUM_CPU_DEVICES before starting", file=sys.stderr)
  out = args.out
  if out:
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
  if args.merge:
    if not out:
      fail("--out", out, "a path prefix when --merge is given")
    result = merge(args.merge, args.note)
  else:
    try:
      result = run(args, partial_path=out + ".partial.json" if out else None)
    except ConfigError as e:
      import jax
      if args.topology or jax.device_count() > 1:
        raise
      raise ConfigError(f"{e} (this process has one device: pass --cpu-devices 8 for fake CPU "
                        "devices, or --topology for a TPU ahead-of-time compile)") from None
  print(_fmt_table(result["rows"]))
  if result["loss_max_abs_diff_across_strategies"]:
    print("loss after the last step, max |difference| across strategies: " + ", ".join(
        f"{k} {v:.2e}" for k, v in result["loss_max_abs_diff_across_strategies"].items()))
  out = out or os.path.join("experiments", "results",
                            "sharding_" + re.sub(r"[^\w]+", "_", result["device"]).strip("_"))
  os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
  with open(out + ".json", "w") as f:
    json.dump(result, f, indent=1)
  if os.path.exists(out + ".partial.json"):
    os.remove(out + ".partial.json")
  if not args.no_plot:
    from mhc_jax.tools.plots import plot_sharding
    plot_sharding(result, out + ".png")
  print(f"saved {out}.json" + ("" if args.no_plot else f" and {out}.png"))
  return 0


if __name__ == "__main__":
  sys.exit(main())
