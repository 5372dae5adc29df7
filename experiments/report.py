"""Markdown tables of the saved results (what experiments/README.md quotes).

    python -m experiments.report            # prints the tables of every results JSON present
"""
from __future__ import annotations

import json
import math

from experiments import common


def _fmt(v, digits=4):
  if v is None or (isinstance(v, float) and math.isnan(v)):
    return "–"
  if isinstance(v, float) and math.isinf(v):
    return "inf"
  return f"{v:.{digits}f}"


def _g(v):
  return "–" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.4g}"


def comparison_table(result: dict) -> str:
  """One row per kind: final validation loss mean ± std, delta vs residual, gains, stability."""
  lines = ["| kind | seeds | final val loss (mean ± std) | per seed | Δ vs residual | composite gain bwd / fwd, end (max over tokens, seed mean) | peak composite bwd gain during training | max single-layer bwd gain (end) | max grad norm | max loss spike | diverged |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
  for kind, row in result["summary"].items():
    v = row["final_val_loss"]
    per = ", ".join(_fmt(x, 3) for x in v["values"])
    cb = row.get("gain/composite_bwd_max", {}).get("mean")
    cf = row.get("gain/composite_fwd_max", {}).get("mean")
    peak = row.get("gain/composite_bwd_max_peak_over_training", {}).get("max")
    sb = row.get("gain/bwd_max", {}).get("mean")
    lines.append(
        f"| {kind} | {v['n_seeds']} | {_fmt(v['mean'])} ± {_fmt(v['std'])} | {per} | "
        f"{row.get('delta_vs_residual', 0):+.4f} | {_g(cb)} / {_g(cf)} | {_g(peak)} | {_g(sb)} | "
        f"{_g(row['max_grad_norm']['mean'])} (max {_g(max(row['max_grad_norm']['values']))}) | "
        f"{_fmt(row['max_loss_spike']['mean'], 3)} | {row['diverged']} |")
  return "\n".join(lines)


def ablation_table(result: dict) -> str:
  lines = ["| group | variant | final val loss | composite bwd gain (end) | max grad norm |",
           "|---|---|---|---|---|"]
  for g, names in result["groups"].items():
    for n in names:
      s = result["summary"].get(n)
      if s:
        lines.append(f"| {g} | {n} | {_fmt(s['final_val_loss'])} | {_g(s['composite_bwd_max_end'])} | "
                     f"{_g(s['max_grad_norm'])} |")
  return "\n".join(lines)


def cpu_minutes(*results) -> float:
  tot = 0.0
  for r in results:
    runs = r["runs"].values()
    for v in runs:
      for rec in (v if isinstance(v, list) else [v]):
        tot += rec["cpu_s"]
  return tot / 60


def main():
  d = common.RESULTS_DIR
  loaded = {}
  for stem in ("lm_compare", "stress", "ablations"):
    p = d / f"{stem}.json"
    if p.exists():
      loaded[stem] = json.loads(p.read_text())
  for stem, r in loaded.items():
    print(f"### {stem}: {r['scale_text']} ({r['device']}, jax {r['jax_version']}, {r['date_utc']})\n")
    print(ablation_table(r) if stem == "ablations" else comparison_table(r))
    print()
  if loaded:
    abl = loaded.get("ablations")
    reused = set(abl["reused_from_lm_compare"]) if abl else set()
    tot = sum(rec["cpu_s"] for stem, r in loaded.items() for name, v in r["runs"].items()
              for rec in (v if isinstance(v, list) else [v])
              if not (stem == "ablations" and name in reused))
    print(f"training CPU time of these runs: {tot / 60:.1f} CPU-minutes")


if __name__ == "__main__":
  main()
