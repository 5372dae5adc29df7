"""Kernel benchmark: `mhc-jax bench kernels [--full] [--c ...] [--tokens ...] [--impl ...]`.

For each C and token count (n streams, bf16 by default) it times, forward and forward+backward,
  pre         fused mappings + u         (`kernels.mhc_pre`)
  post        x_next = H_res x + H_post y (`kernels.stream_post`)
  connection  pre -> y = u -> post        (the branch is the identity: stream ops only)
  sinkhorn    the XLA Sinkhorn alone on [T, n, n], token-major vs token-minor layout
for each implementation (`xla`, and `pallas` on TPU/GPU; interpret mode is never timed), and reports
the ideal bytes moved (paper Table 2 counting: each stream element read or written once, mapping
coefficients in float32), achieved bytes/s, the fraction of the device's peak memory bandwidth
(when known) and the speedup of pallas over xla from the same run. Saves JSON to
`experiments/results/kernels_<device>_<date>.json` with device, jax version, shapes and date.
On CPU the default grid is reduced (`--full` for the issue's grid); absolute CPU times mean little.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from mhc_jax import ops
from mhc_jax.kernels.api import mhc_pre, platform_backend, stream_post, unsupported

FULL_C = (1024, 2048, 4096, 7168)
FULL_TOKENS = (8192, 32768)
# Peak HBM bandwidth, bytes/s, by device_kind prefix (vendor data sheets).
PEAK_BW = {"NVIDIA H100": 3.35e12, "NVIDIA H200": 4.8e12, "NVIDIA A100": 2.0e12,
           "TPU v4": 1.2e12, "TPU v5 lite": 8.19e11, "TPU v5e": 8.19e11, "TPU v5p": 2.765e12,
           "TPU v5": 2.765e12, "TPU v6 lite": 1.64e12, "TPU v6e": 1.64e12, "TPU7x": 7.37e12}


def peak_bandwidth(kind: str) -> float | None:
  for prefix in sorted(PEAK_BW, key=len, reverse=True):
    if kind.startswith(prefix):
      return PEAK_BW[prefix]
  return None


def ideal_bytes(op: str, mode: str, n: int, c: int, s: int) -> int:
  """Per-token ideal HBM bytes; s = stream itemsize, coefficients float32 (Table 2 counting)."""
  h = 4 * (n * n + 2 * n)
  pre_f = (n * c + c) * s + h                       # read x, write u and H
  post_f = (n * c + c + n * c) * s + h              # read x, y, H; write x_next
  pre_b = (n * c + c + n * c) * s + h               # read x, du, dH; write dx
  post_b = (3 * n * c + 2 * c) * s + 2 * h          # read x, y, g, H; write dx, dy, dH
  fwd = {"pre": pre_f, "post": post_f, "connection": pre_f + post_f}[op]
  bwd = {"pre": pre_b, "post": post_b, "connection": pre_b + post_b}[op]
  return fwd if mode == "fwd" else fwd + bwd


def _time(fn, args, iters: int, warmup: int = 2) -> float:
  """Median seconds per call of a jitted fn (compile excluded)."""
  out = fn(*args)
  jax.block_until_ready(out)
  for _ in range(warmup - 1):
    jax.block_until_ready(fn(*args))
  times = []
  for _ in range(iters):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def _programs(impl: str, iters_sk: int):
  kw = dict(sinkhorn_iters=iters_sk, implementation=impl)

  def pre(x, p):
    return mhc_pre(x, p, **kw)

  def post(x, y, h_res, h_post):
    return stream_post(x, y, h_res, h_post, implementation=impl)

  def conn(x, p):
    u, _, h_post, h_res = mhc_pre(x, p, **kw)
    return stream_post(x, u, h_res, h_post, implementation=impl)

  def with_bwd(f):
    def g(*args):
      out, pull = jax.vjp(f, *args)
      return pull(jax.tree.map(jnp.ones_like, out))
    return g

  return {"pre": (pre, with_bwd(pre)), "post": (post, with_bwd(post)),
          "connection": (conn, with_bwd(conn))}


def run(c_list, t_list, n: int, dtype, impls, iters: int, sinkhorn_iters: int, log=print):
  rng = np.random.default_rng(0)
  dev = jax.devices()[0]
  peak = peak_bandwidth(dev.device_kind)
  s = jnp.dtype(dtype).itemsize
  rows = []
  for c in c_list:
    for t in t_list:
      w = ops.mhc_width(n)
      x = jnp.asarray(rng.standard_normal((t, n, c)), dtype)
      y = jnp.asarray(rng.standard_normal((t, c)), dtype)
      p = {"phi": jnp.asarray(rng.standard_normal((n * c, w)) * 0.02, jnp.float32),
           "b": jnp.zeros((w,), jnp.float32), "alpha": jnp.full((3,), 0.01, jnp.float32)}
      h_res = jnp.full((t, n, n), 1.0 / n, jnp.float32)
      h_post = jnp.ones((t, n), jnp.float32)
      args = {"pre": (x, p), "post": (x, y, h_res, h_post), "connection": (x, p)}
      times = {}
      for impl in impls:
        if impl == "pallas" and unsupported(platform_backend(), x):
          log(f"  skip pallas C={c}: {unsupported(platform_backend(), x)}")
          continue
        for op, (f_fwd, f_both) in _programs(impl, sinkhorn_iters).items():
          for mode, f in (("fwd", f_fwd), ("fwd+bwd", f_both)):
            sec = _time(jax.jit(f), args[op], iters)
            nbytes = ideal_bytes(op, mode, n, c, s) * t
            row = dict(op=op, mode=mode, impl=impl, C=c, tokens=t, n=n, dtype=jnp.dtype(dtype).name,
                       seconds=sec, ideal_bytes=nbytes, bytes_per_s=nbytes / sec,
                       frac_peak_bw=(nbytes / sec / peak) if peak else None)
            times[(op, mode, impl)] = sec
            rows.append(row)
            frac = f"{row['frac_peak_bw']:.2f} of peak" if peak else "peak unknown"
            log(f"  {op:10s} {mode:7s} {impl:6s} C={c:5d} T={t:6d}  {sec * 1e3:9.3f} ms  "
                f"{row['bytes_per_s'] / 1e9:8.1f} GB/s  {frac}")
      for row in rows:
        key = (row["op"], row["mode"], "xla")
        if row["impl"] == "pallas" and row["C"] == c and row["tokens"] == t and key in times:
          row["speedup_vs_xla"] = times[key] / row["seconds"]
      # The XLA Sinkhorn alone, both layouts, side by side.
      logits = jnp.asarray(rng.standard_normal((t, n, n)), jnp.float32)
      for layout in ("token_major", "token_minor"):
        f = lambda l, layout=layout: ops.sinkhorn(l, iters=sinkhorn_iters, layout=layout)  # noqa
        for mode, g in (("fwd", f), ("fwd+bwd", lambda l, f=f: jax.grad(
            lambda a: jnp.sum(jnp.sin(f(a))))(l))):
          sec = _time(jax.jit(g), (logits,), iters)
          rows.append(dict(op="sinkhorn", mode=mode, impl="xla", layout=layout, C=c, tokens=t, n=n,
                           dtype="float32", seconds=sec))
          log(f"  sinkhorn   {mode:7s} {layout:11s} T={t:6d}  {sec * 1e3:9.3f} ms")
  return rows


def main(argv: list[str] | None = None) -> int:
  ap = argparse.ArgumentParser(prog="mhc-jax bench kernels", description=__doc__.split("\n")[0])
  ap.add_argument("--full", action="store_true", help="the issue's grid even on CPU")
  ap.add_argument("--c", type=int, nargs="+", help="feature sizes C")
  ap.add_argument("--tokens", type=int, nargs="+", help="token counts")
  ap.add_argument("--n", type=int, default=4)
  ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
  ap.add_argument("--impl", nargs="+", choices=("xla", "pallas"), help="default: xla (+ pallas on TPU/GPU)")
  ap.add_argument("--iters", type=int, default=10, help="timed calls per measurement (median)")
  ap.add_argument("--sinkhorn-iters", type=int, default=20)
  ap.add_argument("--out", default=None, help="JSON path (default experiments/results/kernels_<device>_<date>.json)")
  args = ap.parse_args(argv)
  backend = platform_backend()
  accel = backend is not None
  c_list = args.c or (FULL_C if (accel or args.full) else (1024,))
  t_list = args.tokens or (FULL_TOKENS if (accel or args.full) else (2048,))
  impls = args.impl or (["xla", "pallas"] if accel else ["xla"])
  if "pallas" in impls and not accel:
    print("bench kernels: --impl pallas needs a TPU or GPU (interpret mode is not timed)",
          file=sys.stderr)
    return 2
  dev = jax.devices()[0]
  print(f"bench kernels on {dev.platform}:{dev.device_kind}  jax {jax.__version__}  "
        f"n={args.n} dtype={args.dtype} C={list(c_list)} tokens={list(t_list)} impl={impls}")
  rows = run(c_list, t_list, args.n, jnp.dtype(args.dtype), impls, args.iters,
             args.sinkhorn_iters)
  now = datetime.datetime.now(datetime.timezone.utc)
  kind = dev.device_kind.replace(" ", "_")
  out = args.out or os.path.join("experiments", "results",
                                 f"kernels_{dev.platform}_{kind}_{now:%Y%m%d}.json")
  os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
  meta = dict(device=f"{dev.platform}:{dev.device_kind}", device_count=jax.device_count(),
              jax_version=jax.__version__, jaxlib_version=jax.lib.__version__ if hasattr(
                  jax.lib, "__version__") else None, python=platform.python_version(),
              date=now.isoformat(timespec="seconds"), n=args.n, dtype=args.dtype,
              C=list(c_list), tokens=list(t_list), implementations=impls,
              sinkhorn_iters=args.sinkhorn_iters, iters=args.iters,
              peak_bw_bytes_per_s=peak_bandwidth(dev.device_kind),
              bytes_counting="paper Table 2: each stream element once, coefficients float32")
  with open(out, "w") as f:
    json.dump({"meta": meta, "rows": rows}, f, indent=1)
  print(f"saved {out}")
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
