"""Experiment 2: residual vs HC vs mHC vs mHC-lite LM training, same model / steps / tokens / seeds.

n = 4 streams for HC / mHC / mHC-lite (n = 1 for the residual baseline); the built-in corpus (Python
standard library source, byte tokens) or any prepared TFDS dataset (`--data tfds:NAME --data-dir D`).
Reports final validation loss mean +- std over seeds, loss / grad-norm curves, single-layer and
composite Amax gains over training and over depth, learned H_res heatmaps. Runs, records and plots:
`mhc_jax.tools.lm_runs`; sizes: the `lm_compare` / `lm_smoke` presets (`mhc_jax.configs.experiments`).

    python -m experiments.lm_compare                  # 4 kinds x 3 seeds at preset lm_compare
    python -m experiments.lm_compare --smoke          # 2 kinds x 1 seed, a few steps (tests)

Writes `experiments/results/lm_compare{,_smoke}.json`, `.png` and `_heatmaps.png` (run dirs under
`experiments/results/_scratch/runs/`, git-ignored).
"""
from __future__ import annotations

import argparse

from experiments import common
from mhc_jax.tools import lm_runs
from mhc_jax.tools.lm_runs import KINDS


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
  base = lm_runs.preset("lm_smoke" if smoke else "lm_compare", steps=args.steps)
  kinds, seeds = (("residual", "mhc"), (0,)) if smoke else (tuple(args.kinds), tuple(args.seeds))
  stem = "lm_compare_smoke" if smoke else "lm_compare"
  out = common.out_dir(args.out)
  result = lm_runs.compare([(k, seeds) for k in kinds], base, args.data, args.data_dir, smoke,
                           out, stem, scratch=common.SCRATCH)
  lm_runs.save_figures(result, out, stem)
  lm_runs.print_table(result)
  return result


if __name__ == "__main__":
  main()
