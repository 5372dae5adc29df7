"""Experiment 2: residual vs HC vs mHC vs mHC-lite LM training, same model / steps / tokens / seeds.

n = 4 streams for HC / mHC / mHC-lite (n = 1 for the residual baseline); the built-in corpus (Python
standard library source, byte tokens) or any prepared TFDS dataset (`--data tfds:NAME --data-dir D`).
Reports final validation loss mean +- std over seeds, loss / grad-norm curves, single-layer and
composite Amax gains over training and over depth, learned H_res heatmaps.

    python -m experiments.lm_compare                  # 4 kinds x 3 seeds at lm_common.Scale()
    python -m experiments.lm_compare --smoke          # 2 kinds x 1 seed, a few steps (tests)

Writes `experiments/results/lm_compare{,_smoke}.json`, `.png` and `_heatmaps.png` (run dirs under
`experiments/results/_scratch/runs/`, git-ignored).
"""
from __future__ import annotations

import argparse
import dataclasses

from experiments import common
from experiments import lm_common as lc

KINDS = ("residual", "hc", "mhc", "mhc_lite")


def run(kinds=KINDS, seeds=(0, 1, 2), scale: lc.Scale = lc.Scale(), data: str = "stdlib",
        data_dir: str = "", smoke: bool = False, out=None, stem: str = "lm_compare") -> dict:
  dcfg = lc.data_config(data, data_dir, scale.seq_len, scale.batch_size, smoke=smoke)
  result = {"experiment": stem, "smoke": smoke, "scale": dataclasses.asdict(scale),
            "scale_text": scale.describe(), "data": data, "n_streams": 4, "seeds": list(seeds),
            "runs": {}, **common.metadata()}
  d = common.out_dir(out)
  for kind in kinds:
    for seed in seeds:
      cfg = lc.make_config(kind, scale=scale, seed=seed, data=dcfg)
      rec = lc.run_one(cfg, str(lc.SCRATCH / stem / f"{kind}_s{seed}"))
      result["runs"].setdefault(kind, []).append(rec)
      print(f"{kind} seed {seed}: val loss {rec['final_val_loss']:.4f} "
            f"({rec['wall_s']} s wall, {rec['cpu_s']} s cpu)", flush=True)
      result["summary"] = summarize(result["runs"])
      common.save_json(result, d / f"{stem}.json")      # partial results survive an interruption
  return result


def summarize(runs: dict) -> dict:
  out = {}
  for kind, recs in runs.items():
    row = {"final_val_loss": lc.aggregate(recs), "max_grad_norm": lc.aggregate(recs, "max_grad_norm"),
           "max_loss_spike": lc.aggregate(recs, "max_loss_spike"),
           "diverged": sum(bool(r["diverged"]) for r in recs),
           "cpu_s": sum(r["cpu_s"] for r in recs)}
    if recs[0]["diag_step"]:
      for k in ("gain/composite_fwd_max", "gain/composite_bwd_max", "gain/bwd_max",
                "gain/composite_bwd_mean"):
        vals = lc.final(recs, k)
        row[k] = {"mean": sum(vals) / len(vals), "max": max(vals), "values": vals}
        peak = [max(r[k]) for r in recs]
        row[k + "_peak_over_training"] = {"max": max(peak), "values": peak}
    out[kind] = row
  if "residual" in out:
    base = out["residual"]["final_val_loss"]["mean"]
    for row in out.values():
      row["delta_vs_residual"] = row["final_val_loss"]["mean"] - base
  return out


def save_figures(result: dict, out=None, stem: str = "lm_compare"):
  d = common.out_dir(out)
  fig = lc.plot_groups(result["runs"], f"{stem}: {result['scale_text']}; seeds {result['seeds']} "
                       "(bands: +-1 std over seeds)", lc.KIND_COLORS)
  common.save_figure(fig, d / f"{stem}.png")
  heat = lc.plot_heatmaps({k: v[0]["h_res_mean"] for k, v in result["runs"].items()},
                          f"learned H_res (token mean over one validation batch), seed "
                          f"{result['seeds'][0]}, after {result['scale']['steps']} steps")
  if heat is not None:
    common.save_figure(heat, d / f"{stem}_heatmaps.png")


def print_table(result: dict):
  print(f"{'kind':10s} {'val loss (mean +- std)':>24s} {'vs residual':>12s} {'composite bwd gain (end)':>26s}")
  for kind, row in result["summary"].items():
    v = row["final_val_loss"]
    g = row.get("gain/composite_bwd_max", {}).get("mean", float("nan"))
    print(f"{kind:10s} {v['mean']:>14.4f} +- {v['std']:.4f} {row.get('delta_vs_residual', 0):>+12.4f} "
          f"{g:>26.4g}")


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--smoke", action="store_true")
  ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
  ap.add_argument("--kinds", nargs="+", default=list(KINDS), choices=KINDS)
  ap.add_argument("--steps", type=int, default=0, help="override the number of steps")
  ap.add_argument("--data", default="stdlib", help="'stdlib' or 'tfds:NAME'")
  ap.add_argument("--data-dir", default="", help="TFDS data_dir for --data tfds:NAME")
  ap.add_argument("--out", default=None)
  args = ap.parse_args(argv)
  smoke = common.smoke_from_env(args.smoke)
  scale = lc.SMOKE_SCALE if smoke else lc.Scale()
  if args.steps:
    scale = dataclasses.replace(scale, steps=args.steps)
  kinds, seeds = (("residual", "mhc"), (0,)) if smoke else (tuple(args.kinds), tuple(args.seeds))
  stem = "lm_compare_smoke" if smoke else "lm_compare"
  result = run(kinds, seeds, scale, args.data, args.data_dir, smoke, args.out, stem)
  save_figures(result, args.out, stem)
  print_table(result)
  return result


if __name__ == "__main__":
  main()
