"""`make bench-gpu`: every GPU figure the project wants, in one JSON, on one H100 / H200.

    PYTHONPATH=. python3 -m mhc_jax.tools.bench_gpu [--budget-s 450] [--sections kernels,step,peers]
                                                    [--out experiments/results/bench_gpu_<date>.json]
    ... --smoke      tiny shapes (the CPU test of this plumbing; absolute figures mean nothing)

Uses the JAX already installed (no venv, no pip: e.g. jax 0.11.2 with the CUDA 13 plugin) and the
project's own timing code:
  kernels  `mhc_jax.tools.bench_kernels.run`: pre, post, whole connection; forward and forward+backward;
           xla vs pallas; ideal bytes (paper Table 2), bytes/s, fraction of peak HBM bandwidth,
           pallas speedup over xla from the same run. One (C, tokens) point at a time, most wanted first.
  step     `mhc_jax.tools.bench_step.run`: d_model 2048, seq 2048, residual vs mHC n=4 (kernels: the
           configured implementation, `auto` by default), remat `none` and `mhc_paper`: step time,
           tokens/s, overhead %, temp / peak memory, MFU. Residual and mHC interleaved step by step.
  peers    the PyPI `hyper-connections` mHC module (experiments/peers/torch_peer.py) on the GPU,
           when `torch` and `hyper_connections` import in this Python; else skipped with the reason.
Each section has a share of `--budget-s` (default 450 s: the whole run stays under 8 minutes with
start-up); an item that would start after its section's deadline is skipped and listed. The JSON is
rewritten after every item, so an interrupted run keeps what it measured ("complete": false).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time
import traceback

SECTIONS = ("kernels", "step", "peers")
SHARE = {"kernels": 0.40, "step": 0.50, "peers": 0.10}
# (C, tokens) kernel points, most wanted first (issue 12 sizes); n = 4, bf16.
KERNEL_POINTS = ((4096, 16384), (7168, 16384), (1024, 32768), (2048, 16384))
SMOKE_KERNEL_POINTS = ((128, 32),)
STEP_SETS = ["model.d_model=2048", "model.n_heads=16", "model.max_seq_len=2048",
             "data.seq_len=2048", "model.n_layers=8", "data.batch_size=8", "model.dtype=bfloat16"]
SMOKE_STEP_SETS = ["model.d_model=32", "model.n_heads=2", "model.max_seq_len=16", "data.seq_len=16",
                   "model.n_layers=2", "data.batch_size=2", "model.dtype=float32"]


class Recorder:
  """The result dict, written to `path` after every change."""

  def __init__(self, path: str, meta: dict):
    self.path = path
    self.data = {"meta": meta, "sections": {}, "complete": False}
    self.write()

  def section(self, name: str) -> dict:
    return self.data["sections"].setdefault(name, {"status": "running", "items": [],
                                                   "skipped": []})

  def write(self):
    if self.path == "-":
      return
    os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
    tmp = self.path + ".tmp"
    with open(tmp, "w") as f:
      json.dump(self.data, f, indent=1, default=str)
    os.replace(tmp, self.path)


def _err(e: BaseException) -> str:
  return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:500]


def kernels_section(rec: Recorder, deadline: float, smoke: bool, log) -> None:
  import jax.numpy as jnp

  from mhc_jax.tools import bench_kernels as bench
  from mhc_jax.kernels.api import platform_backend
  sec = rec.section("kernels")
  backend = platform_backend()
  impls = ["xla"] + (["pallas"] if backend else [])
  sec["implementations"] = impls
  if not backend:
    sec["note"] = "no GPU/TPU backend: pallas not timed (interpret mode is never timed)"
  points = SMOKE_KERNEL_POINTS if smoke else KERNEL_POINTS
  for c, t in points:
    if time.monotonic() > deadline:
      sec["skipped"].append({"C": c, "tokens": t, "why": "section time budget spent"})
      continue
    t0 = time.monotonic()
    try:
      rows = bench.run([c], [t], 4, jnp.bfloat16, impls, 2 if smoke else 20,
                       2 if smoke else 20, log=log)
      sec["items"].append({"C": c, "tokens": t, "n": 4, "dtype": "bfloat16",
                           "seconds": round(time.monotonic() - t0, 1), "rows": rows})
    except Exception as e:  # noqa: BLE001 - keep the other points
      sec["items"].append({"C": c, "tokens": t, "error": _err(e)})
      log(traceback.format_exc())
    rec.write()
  sec["status"] = "done"


def step_section(rec: Recorder, deadline: float, smoke: bool, log, implementation: str) -> None:
  from mhc_jax.tools import bench_step
  sec = rec.section("step")
  sets = (SMOKE_STEP_SETS if smoke else STEP_SETS) + [
      f"model.connection.implementation={implementation}"]
  sec["overrides"] = sets
  steps, warmup = ("1", "0") if smoke else ("10", "2")
  for remat in ("none",) if smoke else ("none", "mhc_paper"):
    if time.monotonic() > deadline:
      sec["skipped"].append({"remat": remat, "why": "section time budget spent"})
      continue
    argv = ["--preset", "default", "--kinds", "residual,mhc", "--n-streams", "4", "--remat", remat,
            "--steps", steps, "--warmup", warmup, "--out", "-"]
    for s in sets:
      argv += ["--set", s]
    t0 = time.monotonic()
    try:
      result = bench_step.run(argv)
      log(bench_step.format_table(result))
      sec["items"].append({"remat": remat, "seconds": round(time.monotonic() - t0, 1),
                           "result": result})
    except Exception as e:  # noqa: BLE001 - e.g. out of memory at remat=none: keep mhc_paper
      sec["items"].append({"remat": remat, "error": _err(e)})
      log(traceback.format_exc())
    rec.write()
  sec["status"] = "done"


def peers_section(rec: Recorder, deadline: float, smoke: bool, log) -> None:
  """The torch peer's own `setup` (experiments/peers/torch_peer.py) on the GPU, in this process."""
  sec = rec.section("peers")
  try:
    import torch
  except Exception as e:  # noqa: BLE001
    sec.update(status="skipped", why=f"torch not importable: {_err(e)}")
    return
  try:
    from experiments.peers import torch_peer
  except Exception as e:  # noqa: BLE001 - hyper_connections missing
    sec.update(status="skipped", why=f"experiments.peers.torch_peer not importable: {_err(e)}")
    return
  cuda = torch.cuda.is_available()
  sec["torch"] = torch.__version__
  sec["device"] = torch.cuda.get_device_name(0) if cuda else "cpu"
  if cuda:
    torch.set_default_device("cuda")
  sync = torch.cuda.synchronize if cuda else (lambda: None)
  shapes = [(2, 16, 64)] if smoke else [(4, 2048, 2048), (8, 1024, 4096)]
  for b, t, c in shapes:
    for n in (1, 4):
      for branch in ("identity",):
        if time.monotonic() > deadline:
          sec["skipped"].append({"B": b, "T": t, "C": c, "n": n, "why": "section time budget spent"})
          continue
        try:
          fn = torch_peer.setup({"B": b, "T": t, "C": c, "n": n, "branch": branch, "mode": "eager",
                                 "warmup": 2})
          times = []
          for _ in range(3 if smoke else 20):
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            times.append(time.perf_counter() - t0)
          times.sort()
          sec["items"].append({"B": b, "T": t, "C": c, "n": n, "branch": branch, "mode": "eager",
                               "fwd_bwd_s_median": times[len(times) // 2]})
        except Exception as e:  # noqa: BLE001
          sec["items"].append({"B": b, "T": t, "C": c, "n": n, "error": _err(e)})
        rec.write()
  sec["status"] = "done"


def main(argv: list[str] | None = None) -> int:
  ap = argparse.ArgumentParser(prog="python -m mhc_jax.tools.bench_gpu",
                               description=__doc__.split("\n")[0])
  ap.add_argument("--smoke", action="store_true", help="tiny shapes (CPU test of the plumbing)")
  ap.add_argument("--budget-s", type=float, default=450.0, help="total time for all sections")
  ap.add_argument("--sections", default=",".join(SECTIONS))
  ap.add_argument("--implementation", default="auto",
                  help="model.connection.implementation for the step section (auto | pallas | xla)")
  ap.add_argument("--out", default=None,
                  help="JSON path (default experiments/results/bench_gpu_<date>.json; '-' = none)")
  args = ap.parse_args(argv)
  sections = [s.strip() for s in args.sections.split(",") if s.strip()]
  for s in sections:
    if s not in SECTIONS:
      print(f"error: --sections={s!r} is not allowed: choose from {', '.join(SECTIONS)}",
            file=sys.stderr)
      return 2
  if args.budget_s <= 0:
    print(f"error: --budget-s={args.budget_s} is not allowed: a positive number", file=sys.stderr)
    return 2
  start = time.monotonic()

  def log(msg):
    print(f"[{time.monotonic() - start:6.1f}s] {msg}", file=sys.stderr, flush=True)

  import jax
  now = datetime.datetime.now(datetime.timezone.utc)
  out = args.out or os.path.join("experiments", "results", f"bench_gpu_{now:%Y%m%d}.json")
  dev = jax.devices()[0]
  meta = {"benchmark": "bench_gpu", "date": now.isoformat(timespec="seconds"),
          "command": "python -m mhc_jax.tools.bench_gpu " + " ".join(argv or sys.argv[1:]),
          "device": f"{dev.platform}:{dev.device_kind}", "device_count": jax.device_count(),
          "jax_version": jax.__version__, "python": platform.python_version(),
          "smoke": args.smoke, "budget_s": args.budget_s, "sections": sections,
          "notes": "kernels: ideal bytes per paper Table 2 (each stream element once, coefficients "
                   "float32); step: bench step rows (MFU null where the device has no peak entry)"}
  try:
    from mhc_jax.tools.bench_kernels import peak_bandwidth
    meta["peak_bw_bytes_per_s"] = peak_bandwidth(dev.device_kind)
  except Exception:  # noqa: BLE001
    pass
  rec = Recorder(out, meta)
  log(f"bench-gpu on {meta['device']}, jax {jax.__version__}; writing {out}")
  for name in sections:
    elapsed = time.monotonic() - start
    left = args.budget_s - elapsed
    # A section gets its share of what is left, in proportion to the sections still to run.
    todo = sections[sections.index(name):]
    budget = left * SHARE[name] / sum(SHARE[s] for s in todo) if left > 0 else 0.0
    if budget < 1.0:
      rec.section(name).update(status="skipped", why="total time budget spent")
      rec.write()
      continue
    log(f"section {name}: budget {budget:.0f}s")
    deadline = time.monotonic() + budget
    try:
      if name == "kernels":
        kernels_section(rec, deadline, args.smoke, log)
      elif name == "step":
        step_section(rec, deadline, args.smoke, log, args.implementation)
      else:
        peers_section(rec, deadline, args.smoke, log)
    except Exception as e:  # noqa: BLE001 - a broken section must not lose the others
      rec.section(name).update(status="error", error=_err(e))
      log(traceback.format_exc())
    rec.section(name)["seconds"] = round(time.monotonic() - deadline + budget, 1)
    rec.write()
  rec.data["complete"] = True
  rec.data["meta"]["total_s"] = round(time.monotonic() - start, 1)
  rec.write()
  log(f"saved {out}" if out != "-" else "done")
  return 0


if __name__ == "__main__":
  sys.exit(main())
