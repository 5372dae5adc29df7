"""Experiment 3: a stress setting where instability can show at small scale.

A deep, narrow model (d_model 32, 8 layers = 16 connection sites) at a high learning rate (2e-2) with
no gradient clipping. Question: does HC's composite gain blow up or its loss spike where mHC stays
stable? Residual baseline for reference.

    python -m experiments.stress            # residual x1 seed, hc / mhc x2 seeds
    python -m experiments.stress --smoke

Writes `experiments/results/stress{,_smoke}.json`, `.png`, `_heatmaps.png`.
"""
from __future__ import annotations

import argparse
import dataclasses

from experiments import common
from experiments import lm_common as lc
from experiments.lm_compare import print_table, save_figures, summarize

STRESS_SCALE = lc.Scale(d_model=32, n_layers=8, n_heads=2, seq_len=64, batch_size=8, steps=150,
                        lr=2e-2, warmup_steps=10, eval_every=50, eval_batches=4, log_every=5,
                        clip_norm=0.0)
SMOKE = dataclasses.replace(lc.SMOKE_SCALE, n_layers=3, lr=2e-2, clip_norm=0.0)
PLAN = (("residual", (0,)), ("hc", (0, 1)), ("mhc", (0, 1)))


def run(plan=PLAN, scale=STRESS_SCALE, smoke=False, out=None, stem="stress") -> dict:
  dcfg = lc.data_config("stdlib", "", scale.seq_len, scale.batch_size, smoke=smoke)
  result = {"experiment": stem, "smoke": smoke, "scale": dataclasses.asdict(scale),
            "scale_text": scale.describe(), "data": "stdlib", "n_streams": 4,
            "seeds": sorted({s for _, ss in plan for s in ss}), "runs": {}, **common.metadata()}
  d = common.out_dir(out)
  for kind, seeds in plan:
    for seed in seeds:
      rec = lc.run_one(lc.make_config(kind, scale=scale, seed=seed, data=dcfg),
                       str(lc.SCRATCH / stem / f"{kind}_s{seed}"))
      result["runs"].setdefault(kind, []).append(rec)
      print(f"{kind} seed {seed}: val loss {rec['final_val_loss']:.4f} diverged={bool(rec['diverged'])} "
            f"max spike {rec['max_loss_spike']:.3f} ({rec['wall_s']} s wall, {rec['cpu_s']} s cpu)",
            flush=True)
      result["summary"] = summarize(result["runs"])
      common.save_json(result, d / f"{stem}.json")
  return result


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--smoke", action="store_true")
  ap.add_argument("--out", default=None)
  args = ap.parse_args(argv)
  smoke = common.smoke_from_env(args.smoke)
  stem = "stress_smoke" if smoke else "stress"
  plan = (("hc", (0,)),) if smoke else PLAN
  result = run(plan, SMOKE if smoke else STRESS_SCALE, smoke, args.out, stem)
  save_figures(result, args.out, stem)
  print_table(result)
  return result


if __name__ == "__main__":
  main()
