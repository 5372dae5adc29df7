"""Experiment 4: ablations of mHC, one seed each, at the main comparison's model with half its steps
(preset `lm_ablations`, 300 steps: the CPU budget of this project did not allow more).

  n_streams       mHC with n in {1, 2, 4, 8}
  sinkhorn_iters  mHC with t in {1, 5, 20}
  init            mHC init preset in {hc_like, uniform, identity}
  hc_dynamic      HC static (theta fixed at 0) vs dynamic

The n=4 / t=20 / hc_like mHC point and dynamic HC are taken from the seed-0 runs of `lm_compare.json`
only when that file was made at the same scale; otherwise they are run here.

    python -m experiments.ablations
    python -m experiments.ablations --smoke

Writes `experiments/results/ablations{,_smoke}.json` and `.png`.
"""
from __future__ import annotations

import argparse
import json

from experiments import common
from mhc_jax.tools import lm_runs

GROUPS = {   # most informative first: the JSON is saved after every run
    "init": [("mhc n=4", dict(kind="mhc")), ("mhc init=uniform", dict(kind="mhc", init="uniform")),
             ("mhc init=identity", dict(kind="mhc", init="identity"))],
    "hc_dynamic": [("hc static", dict(kind="hc", dynamic=False)), ("hc dynamic", dict(kind="hc"))],
    "sinkhorn_iters": [("mhc t=1", dict(kind="mhc", sinkhorn_iters=1)),
                       ("mhc t=5", dict(kind="mhc", sinkhorn_iters=5)),
                       ("mhc n=4", dict(kind="mhc"))],
    "n_streams": [("mhc n=1", dict(kind="mhc", n=1)), ("mhc n=2", dict(kind="mhc", n=2)),
                  ("mhc n=4", dict(kind="mhc", n=4)), ("mhc n=8", dict(kind="mhc", n=8))],
}
REUSE = {"mhc n=4": "mhc", "hc dynamic": "hc"}


def _reusable(out, base, seed: int) -> dict:
  path = common.out_dir(out) / "lm_compare.json"
  if not path.exists():
    return {}
  prev = json.loads(path.read_text())
  if prev.get("scale") != lm_runs.scale(base) or prev.get("smoke"):
    return {}
  found = {}
  for name, kind in REUSE.items():
    for r in prev["runs"].get(kind, []):
      if r["config"]["train"]["seed"] == seed:
        found[name] = r
  return found


def run(groups=GROUPS, base="lm_ablations", seed: int = 0, smoke=False, out=None,
        stem="ablations") -> dict:
  base = lm_runs.preset(base)
  result = {"experiment": stem, "smoke": smoke, "scale": lm_runs.scale(base),
            "scale_text": lm_runs.describe(base), "seed": seed, "groups": {g: [n for n, _ in v]
                                                                     for g, v in groups.items()},
            "runs": {}, "reused_from_lm_compare": [], **common.metadata()}
  reuse = {} if smoke else _reusable(out, base, seed)
  d = common.out_dir(out)
  for members in groups.values():
    for name, kw in members:
      if name in result["runs"]:
        continue
      if name in reuse:
        rec = reuse[name]
        result["reused_from_lm_compare"].append(name)
      else:
        kw = dict(kw)
        rec = lm_runs.run_one(lm_runs.make_config(kw.pop("kind"), base, seed=seed, **kw),
                              str(common.SCRATCH / stem / name.replace(" ", "_").replace("=", "")),
                              heatmap=False)
      result["runs"][name] = rec
      print(f"{name}: val loss {rec['final_val_loss']:.4f} ({rec['wall_s']} s wall, {rec['cpu_s']} s cpu)",
            flush=True)
      result["summary"] = {k: {"final_val_loss": r["final_val_loss"], "max_grad_norm": r["max_grad_norm"],
                               "composite_bwd_max_end": (r["gain/composite_bwd_max"] or [float("nan")])[-1],
                               "diverged": bool(r["diverged"]), "cpu_s": r["cpu_s"]}
                           for k, r in result["runs"].items()}
      common.save_json(result, d / f"{stem}.json")
  return result


def plot(result: dict):
  groups = result["groups"]
  fig, axes = common.new_figure(1, len(groups), figsize=(4.5 * len(groups), 4), squeeze=False)
  for ax, (g, names) in zip(axes[0], groups.items()):
    for name in names:
      r = result["runs"].get(name)
      if r:
        ax.plot(r["eval_step"], r["eval_loss"], marker="o", ms=3,
                label=f"{name}: {r['final_val_loss']:.4f}")
    ax.set_title(f"{g} (seed {result['seed']})", fontsize=9)
    ax.set_xlabel("step")
    ax.set_ylabel("validation loss")
    lo = min((min(result["runs"][n]["eval_loss"]) for n in names if n in result["runs"]), default=0)
    ax.set_ylim(lo - 0.05, lo + 0.6)
    ax.legend(fontsize=7)
  fig.suptitle(result["scale_text"], fontsize=9)
  return fig


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--smoke", action="store_true")
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--out", default=None)
  args = ap.parse_args(argv)
  smoke = common.smoke_from_env(args.smoke)
  stem = "ablations_smoke" if smoke else "ablations"
  groups = {"n_streams": [("mhc n=2", dict(kind="mhc", n=2))],
            "hc_dynamic": [("hc static", dict(kind="hc", dynamic=False))]} if smoke else GROUPS
  result = run(groups, "lm_smoke" if smoke else "lm_ablations", args.seed, smoke, args.out, stem)
  common.save_figure(plot(result), common.out_dir(args.out) / f"{stem}.png")
  for k, v in result["summary"].items():
    print(f"{k:20s} val loss {v['final_val_loss']:.4f}  composite bwd gain {v['composite_bwd_max_end']:.4g}")
  return result


if __name__ == "__main__":
  main()
