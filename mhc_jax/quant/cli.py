"""`mhc-jax quantize --run-dir R --mode int8|int4 [--group-size 128] [--head] --out Q [--step N]`

Writes a weight-only quantised Orbax checkpoint of run `R` to `Q` (see `mhc_jax.quant.io`) and prints
one JSON line: the weight bytes in memory and on disk, float32 vs quantised. `mhc-jax sample` and
`mhc-jax eval` accept `--run-dir Q` (dispatched to `run_loaded`). Bad input is one line naming the
field, exit status 2, nothing written. As in `mhc_jax.cli`, the heavy imports sit inside the
handlers so that argument errors answer before JAX loads.
"""
from __future__ import annotations

import json
import os

from mhc_jax.config import ConfigError


def add_parser(subparsers):
  q = subparsers.add_parser("quantize", help="weight-only int8/int4 quantisation (qwix) of a run's "
                            "checkpoint, written as an Orbax checkpoint that sample/eval load")
  q.add_argument("--run-dir", required=True, help="trained run directory")
  q.add_argument("--step", type=int, default=None, help="checkpoint step (default: newest)")
  q.add_argument("--mode", required=True, help="int8 (per channel) or int4 (group-wise)")
  q.add_argument("--group-size", type=int, default=128,
                 help="int4: rows per scale along the contraction (must divide the widths)")
  q.add_argument("--head", action="store_true", help="also quantise an untied lm_head")
  q.add_argument("--out", required=True, help="new directory for the quantised checkpoint")
  return q


def is_quantized_dir(path) -> bool:
  return bool(path) and os.path.isfile(os.path.join(path, "quant.json"))


def _validate(args):
  from mhc_jax.quant.core import QuantSpec
  spec = QuantSpec(mode=args.mode, group_size=args.group_size, head=bool(args.head))
  if not os.path.isdir(args.run_dir):
    raise ConfigError(f"--run-dir {args.run_dir!r} is not allowed: no such directory")
  from mhc_jax.quant.io import check_out
  check_out(args.out)
  return spec


def run(args) -> int:
  """Handler of `mhc-jax quantize` (ConfigError propagates: the caller prints it, exit 2)."""
  spec = _validate(args)       # cheap checks before loading anything
  from mhc_jax.train import run_dir as rd
  from mhc_jax.quant.core import check_spec
  check_spec(spec, rd.read_config(args.run_dir).model)
  from mhc_jax.quant import quantize_run
  info = quantize_run(args.run_dir, args.out, spec, step=args.step)
  print(json.dumps(info))
  return 0


def run_loaded(args) -> int:
  """`mhc-jax eval|sample --run-dir Q` for a quantised checkpoint directory `Q` (the command's
  argument checks have run: `mhc_jax.cli._check_loaded_args`)."""
  if getattr(args, "step", None) is not None:
    raise ConfigError(f"--step={args.step} is not allowed: {args.run_dir!r} is a quantised "
                      f"checkpoint with one step")
  from mhc_jax.quant.infer import quantized_eval, quantized_sample
  if args.command == "eval":
    print(json.dumps(quantized_eval(args.run_dir, batches=args.batches, split=args.split)))
    return 0
  texts = quantized_sample(args.run_dir, args.prompt, tokens=args.tokens,
                           temperature=args.temperature, top_k=args.top_k, seed=args.seed,
                           num=args.num)
  for t in texts:
    print(t)
    if args.num > 1:
      print("-" * 60)
  return 0
