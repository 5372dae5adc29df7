"""Experiment 3: a stress setting where instability can show at small scale.

A deep, narrow model (d_model 32, 8 layers = 16 connection sites) at a high learning rate (2e-2) with
no gradient clipping (presets `lm_stress` / `lm_stress_smoke`). Question: does HC's composite gain blow
up or its loss spike where mHC stays stable? Residual baseline for reference.

    python -m experiments.stress            # residual x1 seed, hc / mhc x2 seeds
    python -m experiments.stress --smoke

Writes `experiments/results/stress{,_smoke}.json`, `.png`, `_heatmaps.png`.
"""
from __future__ import annotations

import argparse

from experiments import common
from mhc_jax.tools import lm_runs

PLAN = (("residual", (0,)), ("hc", (0, 1)), ("mhc", (0, 1)))


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--smoke", action="store_true")
  ap.add_argument("--out", default=None)
  args = ap.parse_args(argv)
  smoke = common.smoke_from_env(args.smoke)
  stem = "stress_smoke" if smoke else "stress"
  plan = (("hc", (0,)),) if smoke else PLAN
  out = common.out_dir(args.out)
  result = lm_runs.compare(plan, "lm_stress_smoke" if smoke else "lm_stress", smoke=smoke, out=out,
                           stem=stem, scratch=common.SCRATCH, report_spikes=True)
  lm_runs.save_figures(result, out, stem)
  lm_runs.print_table(result)
  return result


if __name__ == "__main__":
  main()
