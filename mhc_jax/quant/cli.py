"""`mhc-jax quantize --run-dir R --mode int8|int4 [--group-size 128] [--head] [--kv-cache int8]
--out Q [--step N]`

Writes a weight-only quantised Orbax checkpoint of run `R` to `Q` (see `mhc_jax.quant.io`) and prints
one JSON line: the weight bytes in memory and on disk, float32 vs quantised. `mhc-jax sample` and
`mhc-jax eval` accept `--run-dir Q` (dispatched to `run_loaded`), and `--max-memory SIZE` for run
dirs and quantised dirs alike (`run_budgeted`, `mhc_jax.quant.stream`). Bad input is one line naming the
field, exit status 2, nothing written. As in `mhc_jax.cli`, the heavy imports sit inside the
handlers so that argument errors answer before JAX loads.
"""
from __future__ import annotations

import json
import os
import re
import sys

from mhc_jax.config import ConfigError


_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(text) -> int:
  """`2GB`, `512MB`, `1.5GiB`, `1000000` -> bytes; ConfigError naming `--max-memory` otherwise."""
  m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(text))
  unit = m and m.group(2).upper()
  if not m or unit not in _UNITS:
    raise ConfigError(f"--max-memory={text!r} is not allowed: a size such as 2GB, 512MB, 1.5GiB")
  n = int(float(m.group(1)) * _UNITS[unit])
  if n <= 0:
    raise ConfigError(f"--max-memory={text!r} is not allowed: a size > 0")
  return n


def add_max_memory(parser):
  """`--max-memory SIZE` of `mhc-jax sample` / `mhc-jax eval` (`mhc_jax.quant.stream`)."""
  parser.add_argument("--max-memory", default=None, metavar="SIZE",
                      help="memory budget for the weights, KV cache and activations, e.g. 2GB, "
                      "512MB, 1.5GiB: layers that do not fit are streamed from disk")


def add_parser(subparsers):
  q = subparsers.add_parser("quantize", help="weight-only int8/int4 quantisation (qwix) of a run's "
                            "checkpoint, written as an Orbax checkpoint that sample/eval load")
  q.add_argument("--run-dir", required=True, help="trained run directory")
  q.add_argument("--step", type=int, default=None, help="checkpoint step (default: newest)")
  q.add_argument("--mode", required=True, help="int8 (per channel) or int4 (group-wise)")
  q.add_argument("--group-size", type=int, default=128,
                 help="int4: rows per scale along the contraction (must divide the widths)")
  q.add_argument("--head", action="store_true", help="also quantise an untied lm_head")
  q.add_argument("--kv-cache", default="float",
                 help="decode KV cache of the quantised model: float (default) or int8 (one scale "
                 "per cached key/value vector; multi-head attention only)")
  q.add_argument("--out", required=True, help="new directory for the quantised checkpoint")
  return q


def is_quantized_dir(path) -> bool:
  return bool(path) and os.path.isfile(os.path.join(path, "quant.json"))


def _validate(args):
  from mhc_jax.quant.core import QuantSpec
  spec = QuantSpec(mode=args.mode, group_size=args.group_size, head=bool(args.head))
  if args.kv_cache not in ("float", "int8"):
    raise ConfigError(f"--kv-cache={args.kv_cache!r} is not allowed: choose one of 'float', 'int8'")
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
  model = rd.read_config(args.run_dir).model
  check_spec(spec, model)
  if args.kv_cache == "int8" and model.mla is not None:
    raise ConfigError("--kv-cache='int8' is not allowed: the model uses MLA (model.mla), whose "
                      "latent cache stays float")
  from mhc_jax.quant import quantize_run
  info = quantize_run(args.run_dir, args.out, spec, step=args.step, kv_cache=args.kv_cache)
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


def run_budgeted(args) -> int:
  """`mhc-jax eval|sample --max-memory SIZE` for a run dir or a quantised dir (the command's
  argument checks have run); the report (mode, tokens/s, peak RSS) goes to stderr for `sample`."""
  budget = parse_size(args.max_memory)
  from mhc_jax.quant.infer import budgeted_eval, budgeted_sample
  if args.command == "eval":
    print(json.dumps(budgeted_eval(args.run_dir, budget, step=args.step, batches=args.batches,
                                   split=args.split)))
    return 0
  texts, report = budgeted_sample(args.run_dir, budget, args.prompt, step=args.step,
                                  tokens=args.tokens, temperature=args.temperature,
                                  top_k=args.top_k, seed=args.seed, num=args.num)
  for t in texts:
    print(t)
    if args.num > 1:
      print("-" * 60)
  mib = 2**20
  print(f"{report['mode']}: {report['tokens_per_s']:.1f} tokens/s, peak RSS "
        f"{report['peak_rss_bytes'] / mib:.0f}MiB, {report['bytes_read_per_token'] / mib:.1f}MiB "
        f"read per token (weights {report['weight_bytes'] / 2**20:.1f}MiB)", file=sys.stderr)
  if "expert_bytes_read_per_token" in report:
    print(f"routed experts: {report['expert_bytes_read_per_token'] / mib:.2f}MiB read per token, "
          f"{report['expert_hits']} cache hits, {report['expert_misses']} misses "
          f"(cache: {report['expert_cache']} experts)", file=sys.stderr)
  return 0
