"""Experiment 6: the paper's setting at CPU scale: a DeepSeek-V3-style MoE + MLA LM (`moe_small`)
with a residual, HC or mHC connection (n = 4), same model / steps / tokens / seeds.

Reports final validation loss mean +- std over seeds, loss curves, composite Amax gains over training,
and the expert load balance over training (coefficient of variation of the experts' token shares and
the largest share, worst MoE layer) under auxiliary-loss-free balancing. Runs, records and plots:
`mhc_jax.tools.lm_runs`; sizes: the `moe_small` preset (`mhc_jax.configs.paper`).

    python -m experiments.moe_compare                 # 3 kinds x 3 seeds at preset moe_small
    python -m experiments.moe_compare --steps 150     # shorter runs
    python -m experiments.moe_compare --smoke         # mHC, 1 seed, a few steps (tests)

Writes `experiments/results/moe_compare{,_smoke}.json`, `.png`, `_balance.png`, `_heatmaps.png`.
"""
from __future__ import annotations

import argparse
import dataclasses

from experiments import common
from mhc_jax.config import DataConfig, MLAConfig, MoEConfig
from mhc_jax.tools import lm_runs

KINDS = ("residual", "hc", "mhc")


def smoke_config():
  """moe_small shrunk to seconds per run (the test of this script)."""
  cfg = lm_runs.preset("moe_small")
  model = dataclasses.replace(cfg.model, d_model=32, n_layers=2, n_heads=2, max_seq_len=32,
                              dtype="float32", mla=MLAConfig(kv_rank=8, rope_dim=4, nope_dim=8, v_dim=8),
                              moe=MoEConfig(n_routed=4, n_shared=1, top_k=2, d_expert=16))
  train = dataclasses.replace(cfg.train, steps=12, warmup_steps=2, eval_every=6, eval_batches=1,
                              log_every=2, checkpoint_every=0, sample_tokens=0)
  data = DataConfig(source="stdlib", seq_len=32, batch_size=8, max_files=60)
  return dataclasses.replace(cfg, model=model, train=train, data=data)


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--smoke", action="store_true")
  ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
  ap.add_argument("--kinds", nargs="+", default=list(KINDS), choices=lm_runs.KINDS)
  ap.add_argument("--steps", type=int, default=0, help="override the number of steps")
  ap.add_argument("--out", default=None)
  args = ap.parse_args(argv)
  smoke = common.smoke_from_env(args.smoke)
  if smoke:
    base, kinds, seeds = smoke_config(), ("mhc",), (0,)
  else:
    base, kinds, seeds = lm_runs.preset("moe_small", steps=args.steps), tuple(args.kinds), tuple(args.seeds)
  base = dataclasses.replace(base, train=dataclasses.replace(base.train, checkpoint_every=0,
                                                             sample_tokens=0))
  stem = "moe_compare_smoke" if smoke else "moe_compare"
  out = common.out_dir(args.out)
  result = lm_runs.compare([(k, seeds) for k in kinds], base, "stdlib", "", smoke, out, stem,
                           scratch=common.SCRATCH)
  lm_runs.save_figures(result, out, stem)
  lm_runs.print_table(result)
  return result


if __name__ == "__main__":
  main()
