"""Plots: the curves of training runs and the sharding comparison's bar charts.

  plot_runs      `mhc-jax plot RUN_DIR ... --out plot.png` (and `plot.png` at the end of `mhc-jax
                 train`): train loss (and eval loss, dashed) vs step; composite Amax gain over depth
                 (forward and backward, max over validation tokens) vs step, log scale; gradient
                 norm vs step; for MoE runs also the expert balance: coefficient of variation of
                 the experts' token shares (worst MoE layer) and the largest share, vs step
  plot_sharding  `mhc-jax compare-sharding`: memory, collective bytes and FLOPs per row

matplotlib is imported inside each function, not at the top: it is heavy (about a second to import)
and an optional path (only plotting needs it).
"""
from __future__ import annotations

import os

from mhc_jax.config import ConfigError
from mhc_jax.train.metrics import read_jsonl


def _series(records, kind, key):
  pts = [(r["step"], r[key]) for r in records
         if r.get("kind") == kind and isinstance(r.get(key), (int, float))]
  return [p[0] for p in pts], [p[1] for p in pts]


SUFFIXES = (".png", ".pdf", ".svg")


def check_out(out: str) -> str:
  """`--out` as a writable image path: an existing directory or a trailing `/` gets `plot.png`."""
  from mhc_jax import paths
  if out.endswith(os.sep) or os.path.isdir(out):
    out = os.path.join(out, "plot.png")
  return paths.check_file("--out", out, SUFFIXES)


def _records(d: str) -> list[dict]:
  """The metric records of a run directory (or of a `metrics.jsonl` file); at least one."""
  path = os.path.join(d, "metrics.jsonl") if os.path.isdir(d) else d
  if not os.path.isfile(path):
    raise ConfigError(f"plot: {d!r} is not allowed: no metrics.jsonl there (not a run directory)")
  recs = read_jsonl(path)
  if not recs:
    raise ConfigError(f"plot: {d!r} is not allowed: {path} holds no metric records")
  return recs


def plot_runs(run_dirs: list[str], out: str, labels: list[str] | None = None) -> str:
  """Draw the runs' curves into `out` (PNG); returns its path."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  runs = [_records(d) for d in run_dirs]
  labels = labels or [os.path.basename(os.path.normpath(d)) for d in run_dirs]
  moe = any(isinstance(r.get("moe/load_cv"), list) for rec in runs for r in rec)
  fig, axes = plt.subplots(1, 4 if moe else 3, figsize=(20 if moe else 15, 4.2))
  for rec, label in zip(runs, labels):
    x, y = _series(rec, "train", "loss")
    line, = axes[0].plot(x, y, label=f"{label} train", lw=1.2)
    x, y = _series(rec, "eval", "loss")
    if x:
      axes[0].plot(x, y, "--o", ms=3, color=line.get_color(), label=f"{label} eval")
    for key, style in (("gain/composite_fwd_max", "-"), ("gain/composite_bwd_max", ":")):
      x, y = _series(rec, "diag", key)
      if x:
        axes[1].plot(x, y, style, marker=".", color=line.get_color(),
                     label=f"{label} {'fwd' if 'fwd' in key else 'bwd'}")
    x, y = _series(rec, "train", "grad_norm")
    axes[2].plot(x, y, color=line.get_color(), lw=1, label=label)
    if moe:
      for key, style in (("moe/load_cv", "-"), ("moe/load_max", ":")):
        pts = [(r["step"], max(r[key])) for r in rec
               if r.get("kind") == "train" and isinstance(r.get(key), list) and r[key]]
        if pts:
          axes[3].plot(*zip(*pts), style, color=line.get_color(),
                       label=f"{label} {'CV' if key.endswith('cv') else 'max share'}")
  axes[0].set(title="loss (nats/token)", xlabel="step")
  axes[1].set(title="composite Amax gain over depth (max over tokens)", xlabel="step", yscale="log")
  axes[2].set(title="gradient norm (before clipping)", xlabel="step", yscale="log")
  if moe:
    axes[3].set(title="expert load: CV of token shares, largest share (worst MoE layer)",
                xlabel="step")
  for ax in axes:
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
      ax.legend(fontsize=7)
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  fig.savefig(out, dpi=110)
  plt.close(fig)
  return out



def plot_sharding(result: dict, path: str) -> None:
  """Bar charts of a `compare-sharding` result (`rows` without errors) into `path`."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  rows = [r for r in result["rows"] if "error" not in r]
  if not rows:
    return
  names = [r["name"] for r in rows]
  panels = [
      ("argument MiB / device", [r["memory_mib"]["arguments"] for r in rows]),
      ("temporary MiB / device", [r["memory_mib"]["temporaries"] for r in rows]),
      ("collective MiB / device / step", [r["collective_mib"] for r in rows]),
      ("GFLOP / device / step", [r["flops"] / 1e9 for r in rows]),
  ]
  fig, axes = plt.subplots(len(panels), 1, figsize=(max(8, 0.55 * len(rows) + 3), 11),
                           sharex=True)
  colors = ["tab:gray" if r["connection"] == "residual" else "tab:blue" for r in rows]
  for ax, (title, vals) in zip(axes, panels):
    ax.bar(range(len(rows)), vals, color=colors)
    ax.set_ylabel(title, fontsize=8)
    ax.grid(axis="y", alpha=0.3)
  axes[-1].set_xticks(range(len(rows)), names, rotation=60, ha="right", fontsize=7)
  fig.suptitle(f"{result['title']}  (gray: residual, blue: mHC)", fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
