"""The "telephone game" (experiment 1, notebook 01): signal propagation through products of random
per-layer mixing matrices, no training.

Products across depth 1..128 of unconstrained HC-style matrices, Sinkhorn-projected matrices at
{0, 1, 3, 5, 10, 20} iterations and mHC-lite (n = 4); forward and backward Amax gains of the composite
versus depth (mHC paper Sec. 3.1 / Fig. 3(b)), and Sinkhorn's convergence. Families and maths:
`mhc_jax.analysis.propagation`; the command is `python -m experiments.telephone`.
"""
from __future__ import annotations

import time

import numpy as np

from mhc_jax.analysis import propagation
from mhc_jax.tools import results

ITERS = (0, 1, 3, 5, 10, 20)
HC_SCALES = (0.05, 0.1, 0.2)
LOGIT_SCALES = (1.0, 4.0)
CONVERGENCE_ITERS = (1, 2, 3, 5, 10, 20, 50, 100)
CONVERGENCE_SCALES = (0.5, 1.0, 2.0, 4.0, 8.0)


def configs():
  """Every (name, family, scale, iters) run by the experiment."""
  out = [(f"hc sigma={s}", "hc", s, 0) for s in HC_SCALES]
  for s in LOGIT_SCALES:
    out += [(f"sinkhorn t={t} s={s:g}", "sinkhorn", s, t) for t in ITERS]
    out.append((f"mhc_lite s={s:g}", "mhc_lite", s, 0))
  return out


def run(smoke: bool = False, n: int = 4, seed: int = 0) -> dict:
  depth, tokens = (32, 64) if smoke else (128, 1024)
  t0 = time.time()
  series = {}
  for i, (name, family, scale, iters) in enumerate(configs()):
    h = propagation.mixing_matrices(family, n=n, depth=depth, tokens=tokens, scale=scale,
                                    iters=max(iters, 0), seed=seed + i)
    fwd, bwd = propagation.composite_gains_over_depth(h)
    single_f, single_b = propagation.composite_gains_over_depth(h[:1])
    series[name] = {"family": family, "scale": scale, "iters": iters,
                    "forward": propagation.gain_summary(fwd),
                    "backward": propagation.gain_summary(bwd),
                    "single_layer_log10_mean": {
                        "forward": propagation.gain_summary(single_f)["log10_mean"][0],
                        "backward": propagation.gain_summary(single_b)["log10_mean"][0]}}
  rng = np.random.default_rng(seed + 1000)
  logits = rng.standard_normal((4096 if not smoke else 256, n, n))
  convergence = {f"{s:g}": propagation.sinkhorn_errors(s * logits, CONVERGENCE_ITERS)
                 for s in CONVERGENCE_SCALES}
  return {"experiment": "telephone", "smoke": smoke, "n": n, "depth": depth, "tokens": tokens,
          "seed": seed, "series": series, "convergence": convergence,
          "seconds": round(time.time() - t0, 2), **results.metadata()}


def plot(result: dict):
  """2 x 3 panels: rows forward / backward; columns HC vs mHC vs mHC-lite, SK sweep at s=1, s=4."""
  fig, axes = results.new_figure(2, 3, figsize=(15, 8), sharex=True)
  depth = np.arange(1, result["depth"] + 1)
  series = result["series"]
  for row, direction in enumerate(("forward", "backward")):
    ax = axes[row, 0]
    for name, s in series.items():
      if s["family"] == "hc" or (s["family"] == "sinkhorn" and s["iters"] == 20) or \
          s["family"] == "mhc_lite":
        line, = ax.plot(depth, s[direction]["log10_mean"], label=name)
        ax.plot(depth, s[direction]["log10_max"], ls=":", color=line.get_color())
    ax.set_title(f"{direction}: HC vs mHC (t=20) vs mHC-lite\n(solid: token mean, dotted: max)")
    for col, scale in ((1, 1.0), (2, 4.0)):
      ax = axes[row, col]
      for name, s in series.items():
        if s["family"] == "sinkhorn" and s["scale"] == scale and s["iters"] > 0:
          line, = ax.plot(depth, s[direction]["log10_mean"], label=f"t={s['iters']}")
          ax.plot(depth, s[direction]["log10_max"], ls=":", color=line.get_color())
      ax.set_title(f"{direction}: Sinkhorn iterations, logit scale {scale:g}\n"
                   "(t=0, unnormalised exp, off the chart; see JSON)")
      ax.set_ylim(-0.05, 0.65)  # forward drift is float32 rounding (< 1e-5), bounded by log10(n)
  for ax in axes.flat:
    ax.set_ylabel("log10 Amax gain of composite")
    ax.axhline(0.0, color="k", lw=0.5)
    ax.legend(fontsize=7)
  for ax in axes[1]:
    ax.set_xlabel("depth (number of mixing matrices)")
  return fig


def plot_convergence(result: dict):
  fig, ax = results.new_figure(1, 1, figsize=(6, 4))
  for scale, c in result["convergence"].items():
    ax.semilogy(c["iters"], np.maximum(c["col_err"], 1e-16), marker="o", label=f"logit scale {scale}")
  ax.set_xscale("log")
  ax.set_xlabel("Sinkhorn iterations t")
  ax.set_ylabel("max |column sum - 1| (rows exact)")
  ax.set_title("Sinkhorn convergence, float32, n=%d" % result["n"])
  ax.legend(fontsize=8)
  return fig
