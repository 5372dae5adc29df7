"""Experiment 1: signal propagation without training (the "telephone game").

Products of per-layer mixing matrices across depth 1..128 for unconstrained HC-style matrices,
Sinkhorn-projected matrices at {0, 1, 3, 5, 10, 20} iterations and mHC-lite (n = 4); forward and
backward Amax gains of the composite versus depth (mHC paper Sec. 3.1 / Fig. 3(b)). The runs and plots:
`mhc_jax.tools.telephone`; families and maths: `mhc_jax.analysis.propagation`.

    python -m experiments.telephone            # full: depth 128, 1024 tokens per config (~1 min CPU)
    python -m experiments.telephone --smoke    # depth 32, 64 tokens (seconds)

Writes `experiments/results/telephone{,_smoke}.json` and `.png`.
"""
from __future__ import annotations

import argparse

from experiments import common
from mhc_jax.tools.telephone import plot, plot_convergence, run


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--smoke", action="store_true", help="small size for tests (seconds)")
  ap.add_argument("--out", default=None, help="output folder (default experiments/results)")
  ap.add_argument("--seed", type=int, default=0)
  args = ap.parse_args(argv)
  smoke = common.smoke_from_env(args.smoke)
  result = run(smoke=smoke, seed=args.seed)
  d = common.out_dir(args.out)
  stem = "telephone_smoke" if smoke else "telephone"
  common.save_json(result, d / f"{stem}.json")
  common.save_figure(plot(result), d / f"{stem}.png")
  common.save_figure(plot_convergence(result), d / f"{stem}_convergence.png")
  for name, s in result["series"].items():
    print(f"{name:24s} depth {result['depth']}: fwd mean 10^{s['forward']['log10_mean'][-1]:8.3f} "
          f"max 10^{s['forward']['log10_max'][-1]:8.3f} | bwd mean 10^{s['backward']['log10_mean'][-1]:8.3f}"
          f" max 10^{s['backward']['log10_max'][-1]:8.3f}")
  print(f"wrote {d / stem}.json/.png in {result['seconds']} s")
  return result


if __name__ == "__main__":
  main()
