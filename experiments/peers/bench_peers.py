"""Peers side by side (issue 8 item 3): our mHC connection vs the PyPI `hyper-connections` mHC module.

    .venv/bin/python -m experiments.peers.bench_peers                # full CPU sizes
    .venv/bin/python -m experiments.peers.bench_peers --smoke        # CI size, eager only

For each shape, branch (identity, or a small transformer block: causal MHA + GELU MLP) and peer
mode (eager, torch.compile) it times forward+backward of `sum(out * cot)` w.r.t. the parameters and
the input, alternating one step of ours (jit) with one step of the peer (its own process, driven
over a pipe), and saves median times and the ratio peer/ours to `experiments/results/peers_*.json`.

Math differences (noted in the results): the peer normalises each stream separately (per-stream
RMSNorm with a learned gain) and projects per stream (`d -> n+1` per stream plus a shared `d -> 1`
for post) instead of the paper's flattened `nC -> n^2 + 2n`; its H_res is Sinkhorn(exp) with a
static identity bias added to 0.01-scaled dynamic logits, and it applies `H^T x`; ours is the
paper's (DESIGN.md). Ours also applies the sublayer RMSNorm to the branch input (part of our
Connection), the peer does not. Both do 20 Sinkhorn iterations in float32.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, ROOT)

from mhc_jax.config import ConnectionConfig  # noqa: E402
from mhc_jax.layers.connection import Connection  # noqa: E402
from tests.dsv4 import torch_env  # noqa: E402

FULL_SHAPES = [(4, 512, 512), (8, 1024, 1024)]
SMOKE_SHAPES = [(2, 32, 64)]


def block_params(key, c):
  k = jax.random.split(key, 4)
  init = lambda kk, i, o: jax.random.normal(kk, (i, o), jnp.float32) * i ** -0.5  # noqa: E731
  return {"qkv": init(k[0], c, 3 * c), "o": init(k[1], c, c), "up": init(k[2], c, 4 * c),
          "down": init(k[3], 4 * c, c)}


def block(p, x):
  """Causal MHA (head dim 64) then GELU MLP, the same branch as the peer's `Block`."""
  b, t, c = x.shape
  h = max(1, c // 64)
  q, k, v = jnp.split((x @ p["qkv"]).reshape(b, t, 3 * h, c // h), 3, axis=2)
  a = jax.nn.dot_product_attention(q, k, v, is_causal=True).reshape(b, t, c)
  x = a @ p["o"]
  return x + jax.nn.gelu(x @ p["up"], approximate=False) @ p["down"]


def make_ours(b, t, c, n, branch, iters=20):
  cc = (ConnectionConfig(kind="residual", n_streams=1) if n == 1 else
        ConnectionConfig(kind="mhc", n_streams=n, sinkhorn_iters=iters))
  conn = Connection(cc, 1e-6, jnp.float32)
  key = jax.random.PRNGKey(0)
  x = jax.random.normal(key, (b, t, n, c), jnp.float32)
  cot = jax.random.normal(jax.random.PRNGKey(1), (b, t, n, c), jnp.float32)
  params = conn.init(key, x, lambda v: v)["params"]
  bp = block_params(key, c) if branch == "block" else {}

  def loss(params, bp, x):
    fn = (lambda v: v) if branch == "identity" else (lambda v: block(bp, v))
    return jnp.sum(conn.apply({"params": params}, x, fn) * cot)

  step = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
  jax.block_until_ready(step(params, bp, x))        # compile + warm-up
  jax.block_until_ready(step(params, bp, x))

  def run():
    t0 = time.perf_counter()
    jax.block_until_ready(step(params, bp, x))
    return time.perf_counter() - t0
  return run


class Peer:
  def __init__(self, threads):
    py, msg = torch_env.ensure()
    if py is None:
      raise RuntimeError(msg)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    self.proc = subprocess.Popen([py, os.path.join(HERE, "torch_peer.py"), str(threads)],
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)

  def ask(self, **msg):
    self.proc.stdin.write(json.dumps(msg) + "\n")
    self.proc.stdin.flush()
    reply = json.loads(self.proc.stdout.readline())
    if not reply.get("ok"):
      raise RuntimeError(f"torch peer: {reply.get('error')}")
    return reply

  def close(self):
    try:
      self.proc.stdin.write(json.dumps({"cmd": "quit"}) + "\n")
      self.proc.stdin.flush()
    except (BrokenPipeError, OSError):
      pass
    self.proc.wait(timeout=60)


def run(shapes, branches, modes, rounds, n_streams=4, threads=2, iters=20, baseline=False, log=print):
  """`baseline`: also time the block with a plain residual (n = 1) on both sides, so the mHC
  overhead over the branch can be read per framework."""
  peer = Peer(threads)
  versions = peer.ask(cmd="versions")
  rows = []
  runs = [(s, br, n_streams) for s in shapes for br in branches]
  if baseline:
    runs += [(s, "block", 1) for s in shapes]
  try:
    for (b, t, c), branch, n in runs:
      ours = make_ours(b, t, c, n, branch, iters)
      for mode in modes:
        key = f"{b}-{t}-{c}-{n}-{branch}-{mode}"
        setup = peer.ask(cmd="setup", key=key, B=b, T=t, C=c, n=n, branch=branch, mode=mode,
                         iters=iters)["setup_s"]
        t_ours, t_peer = [], []
        for _ in range(rounds):                     # alternate, one step each
          t_ours.append(ours())
          t_peer.append(peer.ask(cmd="step", key=key)["s"])
        row = dict(B=b, T=t, C=c, n=n, branch=branch, peer_mode=mode, rounds=rounds,
                   ours_median_s=statistics.median(t_ours), peer_median_s=statistics.median(t_peer),
                   ours_s=t_ours, peer_s=t_peer, peer_setup_s=setup)
        row["ratio_peer_over_ours"] = row["peer_median_s"] / row["ours_median_s"]
        log(f"B={b} T={t} C={c} n={n} {branch:8s} peer {mode:7s}: "
            f"ours {row['ours_median_s']*1e3:9.2f} ms  peer {row['peer_median_s']*1e3:9.2f} ms  ratio {row['ratio_peer_over_ours']:.2f}x")
        rows.append(row)
  finally:
    peer.close()
  return {
      "benchmark": "peers: mHC connection forward+backward, ours (jax.jit) vs hyper-connections mHC",
      "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      "device": f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores visible, "
                f"{threads} torch threads; machine shared with other jobs)",
      "jax": jax.__version__, "jax_backend": jax.default_backend(), "peer_versions": versions,
      "n_streams": n_streams, "sinkhorn_iters": iters,
      "rows_with_n_1": "plain residual baseline x + branch(norm(x)) (ours) / x + branch(x) (peer), no mHC", "dtype": "float32",
      "method": "alternating single steps after 2 warm-up steps each; medians; ratio = peer / ours",
      "math_differences": __doc__.split("Math differences (noted in the results): ")[1].strip(),
      "rows": rows,
  }


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--smoke", action="store_true", help="tiny shape, eager only, 2 rounds")
  ap.add_argument("--rounds", type=int, default=5)
  ap.add_argument("--modes", default="eager,compile")
  ap.add_argument("--branches", default="identity,block")
  ap.add_argument("--threads", type=int, default=2)
  ap.add_argument("--baseline", action="store_true",
                  help="also time the block with a plain residual (n=1) on both sides")
  ap.add_argument("--shapes", default=None, help="e.g. 4x512x512,8x1024x1024 (BxTxC)")
  ap.add_argument("--out", default=None)
  args = ap.parse_args(argv)
  shapes = SMOKE_SHAPES if args.smoke else FULL_SHAPES
  if args.shapes:
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
  modes = ["eager"] if args.smoke else args.modes.split(",")
  rounds = 2 if args.smoke else args.rounds
  res = run(shapes, [b for b in args.branches.split(",") if b], modes, rounds, threads=args.threads,
            baseline=args.baseline)
  out = args.out or os.path.join(ROOT, "experiments", "results",
                                 "peers_smoke.json" if args.smoke else "peers_cpu.json")
  os.makedirs(os.path.dirname(out), exist_ok=True)
  with open(out, "w") as f:
    json.dump(res, f, indent=1)
  print("saved", out)
  return res


if __name__ == "__main__":
  main()
