"""CPU/GPU timing of one connection sublayer, forward + backward, identity branch.

    python -m experiments.bench_connection [--batch 4 --seq 512 --width 512 --streams 4 --repeats 20]

Times `residual` (n = 1), `mhc` (n = 4) and mHC variants (Sinkhorn t = 1, linear eps = 1e-6 form,
mHC-lite, dynamic HC) side by side in one process, alternating calls, and saves the medians and the
ratios to residual in `experiments/results/connection_<device>.json`.
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

  ct = 0.5 + x   # a fixed, non-uniform cotangent, built once outside the timed call
  return lambda: fwd_bwd(params, x, ct)


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
  b, t, c, n = args.batch, args.seq, args.width, args.streams
  x1 = jax.random.normal(key, (b, t, 1, c))
  xn = jax.random.normal(key, (b, t, n, c))
  cases = {
      "residual": (ConnectionConfig(kind="residual", n_streams=1), x1),
      "mhc": (ConnectionConfig(kind="mhc", n_streams=n), xn),
      "mhc_sinkhorn1": (ConnectionConfig(kind="mhc", n_streams=n, sinkhorn_iters=1), xn),
      "mhc_eps1e-6": (ConnectionConfig(kind="mhc", n_streams=n, sinkhorn_eps=1e-6), xn),
      "mhc_lite": (ConnectionConfig(kind="mhc_lite", n_streams=n), xn),
      "hc": (ConnectionConfig(kind="hc", n_streams=n), xn),
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
      "ratio_to_residual": {k: v / med["residual"] for k, v in med.items()},
  }
  out = pathlib.Path(args.out) if args.out else RESULTS / f"connection_{dev.platform}.json"
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps(result, indent=2) + "\n")
  print(" | ".join(f"{k} {v * 1e3:.1f} ms" for k, v in med.items()) + f"  -> {out}")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
