"""CPU/GPU timing of one connection sublayer, forward + backward, identity branch.

    python -m experiments.bench_connection [--batch 4 --seq 512 --width 512 --streams 4 --repeats 20]

Times `residual` (n = 1) and `mhc` (n = 4) side by side in one process, alternating calls, and saves
the medians and their ratio to `experiments/results/connection_<device>.json`.
"""
from __future__ import annotations

import argparse
import datetime
import json
import pathlib
import platform
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mhc_jax.config import ConnectionConfig
from mhc_jax.layers.connection import Connection

RESULTS = pathlib.Path(__file__).resolve().parent / "results"


def _step_fn(cfg: ConnectionConfig, x):
  module = Connection(cfg)
  params = module.init(jax.random.PRNGKey(0), x, lambda u: u)

  @jax.jit
  def fwd_bwd(params, x, ct):
    out, vjp = jax.vjp(lambda p, x: module.apply(p, x, lambda u: u), params, x)
    return out, vjp(ct)

  return lambda: fwd_bwd(params, x, jnp.ones_like(x) * 0.5 + x)


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--batch", type=int, default=4)
  ap.add_argument("--seq", type=int, default=512)
  ap.add_argument("--width", type=int, default=512)
  ap.add_argument("--streams", type=int, default=4)
  ap.add_argument("--repeats", type=int, default=20)
  ap.add_argument("--out", default="")
  args = ap.parse_args(argv)
  key = jax.random.PRNGKey(1)
  cases = {
      "residual": (ConnectionConfig(kind="residual", n_streams=1),
                   jax.random.normal(key, (args.batch, args.seq, 1, args.width))),
      "mhc": (ConnectionConfig(kind="mhc", n_streams=args.streams),
              jax.random.normal(key, (args.batch, args.seq, args.streams, args.width))),
  }
  fns = {k: _step_fn(cfg, x) for k, (cfg, x) in cases.items()}
  for f in fns.values():
    jax.block_until_ready(f())   # compile + warm up
  times = {k: [] for k in fns}
  for _ in range(args.repeats):
    for k, f in fns.items():      # alternate, so slow drifts hit both
      t0 = time.perf_counter()
      jax.block_until_ready(f())
      times[k].append(time.perf_counter() - t0)
  med = {k: float(np.median(v)) for k, v in times.items()}
  dev = jax.devices()[0]
  result = {
      "what": "one connection sublayer forward+backward, identity branch, float32",
      "device": f"{dev.platform}:{getattr(dev, 'device_kind', '')}", "host": platform.processor() or platform.machine(),
      "jax": jax.__version__, "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
      "shape": {"batch": args.batch, "seq": args.seq, "width": args.width, "streams": args.streams},
      "repeats": args.repeats, "median_s": med,
      "ratio_mhc_over_residual": med["mhc"] / med["residual"],
  }
  out = pathlib.Path(args.out) if args.out else RESULTS / f"connection_{dev.platform}.json"
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps(result, indent=2) + "\n")
  print(f"residual {med['residual'] * 1e3:.1f} ms | mhc n={args.streams} {med['mhc'] * 1e3:.1f} ms | "
        f"ratio {result['ratio_mhc_over_residual']:.2f}x  -> {out}")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
