"""LM training comparisons (experiments 2-4, notebook 02): configs from a preset, one run -> one compact
record, aggregation over seeds, and the plots.

Every run goes through the library's own entry point (`mhc_jax.train.train`) on the built-in corpus
(or a prepared TFDS dataset); the record keeps the paper's views from the run's `metrics.jsonl`:
validation loss, train loss and gradient-norm curves, single-layer and composite Amax gains over
training (whole depth) and over depth (per site, at the end), and the learned `H_res` (token mean over
one validation batch, per site). The model / optimisation sizes are the `lm_*` presets of
`mhc_jax.configs.experiments`.
"""
from __future__ import annotations

import dataclasses
import math
import os
import pathlib
import shutil
import time
from typing import Any

import numpy as np

from mhc_jax.analysis import mean_std
from mhc_jax.tools import results

KIND_COLORS = {"residual": "tab:gray", "hc": "tab:red", "mhc": "tab:blue", "mhc_lite": "tab:green"}
KINDS = ("residual", "hc", "mhc", "mhc_lite")


def preset(name_or_cfg, steps: int = 0):
  """A preset by name (e.g. `lm_compare`) or a RunConfig as is; `steps` > 0 overrides train.steps."""
  from mhc_jax.configs import get_preset
  cfg = get_preset(name_or_cfg) if isinstance(name_or_cfg, str) else name_or_cfg
  if steps:
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, steps=steps))
  return cfg


def scale(cfg) -> dict[str, Any]:
  """The size every compared run of an experiment shares (saved with the results; a saved run is
  reused only at the same scale)."""
  m, d, t = cfg.model, cfg.data, cfg.train
  return {"d_model": m.d_model, "n_layers": m.n_layers, "n_heads": m.n_heads, "seq_len": d.seq_len,
          "batch_size": d.batch_size, "steps": t.steps, "lr": t.lr, "warmup_steps": t.warmup_steps,
          "eval_every": t.eval_every, "eval_batches": t.eval_batches, "log_every": t.log_every,
          "clip_norm": t.clip_norm}


def describe(cfg) -> str:
  s = scale(cfg)
  return (f"d_model={s['d_model']}, {s['n_layers']} layers ({2 * s['n_layers']} connection sites), "
          f"{s['n_heads']} heads, seq {s['seq_len']}, batch {s['batch_size']}, {s['steps']} steps "
          f"({s['steps'] * s['batch_size'] * s['seq_len'] / 1e6:.2f}M tokens), AdamW lr {s['lr']:g} "
          f"cosine, warmup {s['warmup_steps']}, clip {s['clip_norm']:g}")


def data_config(base, data: str = "stdlib", data_dir: str = ""):
  """The preset's data section on `stdlib` (built-in corpus) or `tfds:NAME` (a prepared TFDS dataset
  under `data_dir`), same sequence length and batch."""
  if data == "stdlib":
    return dataclasses.replace(base, source="stdlib")
  if data.startswith("tfds:"):
    from mhc_jax.config import DataConfig
    return DataConfig(source="tfds", tfds_name=data[5:], data_dir=data_dir, seq_len=base.seq_len,
                      batch_size=base.batch_size)
  from mhc_jax.config import ConfigError
  raise ConfigError(f"--data={data!r} is not allowed: 'stdlib' or 'tfds:NAME' (e.g. tfds:lm1b)")


def make_config(kind: str, base, *, seed: int = 0, n: int = 4, sinkhorn_iters: int = 20,
                init: str = "hc_like", dynamic: bool = True, data=None, lr: float | None = None):
  """The RunConfig of one compared run: preset `base` (name or RunConfig) with this connection, seed
  (and data, learning rate). `kind="residual"` forces n = 1."""
  base = preset(base)
  conn = dataclasses.replace(base.model.connection, kind=kind, n_streams=1 if kind == "residual" else n,
                             sinkhorn_iters=sinkhorn_iters, init=init, dynamic=dynamic)
  train = dataclasses.replace(base.train, seed=seed, lr=lr or base.train.lr)
  return dataclasses.replace(base, model=dataclasses.replace(base.model, connection=conn),
                             data=data or base.data, train=train)


def _f(v):
  """Metric value as float (the writer stores non-finite numbers as strings)."""
  try:
    return float(v)
  except (TypeError, ValueError):
    return float("nan")


def read_record(run_dir: str) -> dict[str, Any]:
  """Curves from `metrics.jsonl`: train loss / grad norm, eval loss, diagnostics over training and
  the per-site diagnostics of the last diag record."""
  from mhc_jax.train.metrics import read_jsonl
  recs = read_jsonl(os.path.join(run_dir, "metrics.jsonl"))
  tr = [r for r in recs if r["kind"] == "train"]
  ev = [r for r in recs if r["kind"] == "eval"]
  dg = [r for r in recs if r["kind"] == "diag"]
  out = {"train_step": [r["step"] for r in tr], "train_loss": [_f(r["loss"]) for r in tr],
         "grad_norm": [_f(r["grad_norm"]) for r in tr],
         "eval_step": [r["step"] for r in ev], "eval_loss": [_f(r["loss"]) for r in ev]}
  keys = ("gain/fwd_max", "gain/bwd_max", "gain/fwd_mean", "gain/bwd_mean",
          "gain/composite_fwd_max", "gain/composite_bwd_max", "gain/composite_fwd_mean",
          "gain/composite_bwd_mean", "sinkhorn/col_err_max")
  out["diag_step"] = [r["step"] for r in dg]
  for k in keys:
    out[k] = [_f(r.get(k)) for r in dg]
  out["sites"] = {k: [_f(x) for x in dg[-1].get(k + "/sites", [])] for k in keys} if dg else {}
  for k in MOE_KEYS:      # MoE models: per MoE layer lists at each logged step
    if tr and k in tr[-1]:
      out[k] = [[_f(x) for x in r[k]] if isinstance(r[k], list) else _f(r[k]) for r in tr]
  return out


MOE_KEYS = ("moe/load_cv", "moe/load_max", "moe/load_min", "moe/router_entropy", "moe/bias_norm")


def learned_h_res(trainer, batch_index: int = 0):
  """Token-mean `H_res [S, n, n]` of a `Trainer`'s state (e.g. `train(...).trainer`, the final state)
  on one validation batch (None: residual)."""
  import jax
  import jax.numpy as jnp
  from mhc_jax.data import make_eval_batches
  from mhc_jax.model import LM, collect_mappings
  from mhc_jax.train.step import model_variables
  cfg = trainer.cfg
  if cfg.model.connection.kind == "residual":
    return None
  evals = make_eval_batches(cfg.data, cfg.train.eval_batches, process_index=jax.process_index(),
                            process_count=jax.process_count())
  batch = trainer.to_device(evals[batch_index])
  with trainer.context():
    def f(params, moe_state, tokens):
      _, st = LM(cfg.model).apply(model_variables(params, moe_state), tokens,
                                  mutable=["intermediates"])
      return jnp.mean(collect_mappings(st["intermediates"], cfg.model)["h_res"], axis=(1, 2))
    h = jax.jit(f)(trainer.state.params, trainer.state.moe_state, batch["inputs"])
  return np.asarray(jax.device_get(h), np.float64).tolist()


def max_spike(losses) -> float:
  """Largest rise of the train loss above its running minimum (0 for a monotone curve)."""
  best, spike = math.inf, 0.0
  for v in losses:
    if not math.isfinite(v):
      return math.inf
    best = min(best, v)
    spike = max(spike, v - best)
  return spike


def run_one(cfg, run_dir: str, *, heatmap: bool = True) -> dict[str, Any]:
  """Train `cfg` in `run_dir` (overwritten) and return its compact record."""
  from mhc_jax.config import to_dict
  from mhc_jax.train import TrainingDiverged, train
  if os.path.isdir(run_dir):
    shutil.rmtree(run_dir)
  t0, c0 = time.time(), time.process_time()
  diverged = result = None
  try:
    result = train(cfg, run_dir, progress=False)
  except TrainingDiverged as e:
    diverged = str(e)
  rec = {"config": to_dict(cfg), "diverged": diverged, **read_record(run_dir)}
  rec["wall_s"] = round(time.time() - t0, 1)
  rec["cpu_s"] = round(time.process_time() - c0, 1)
  rec["final_val_loss"] = rec["eval_loss"][-1] if rec["eval_loss"] and not diverged else float("nan")
  rec["max_loss_spike"] = max_spike(rec["train_loss"]) if not diverged else math.inf
  rec["max_grad_norm"] = max(rec["grad_norm"]) if rec["grad_norm"] else float("nan")
  rec["h_res_mean"] = learned_h_res(result.trainer) if heatmap and not diverged else None
  return rec


def aggregate(records: list[dict], key: str = "final_val_loss") -> dict[str, float]:
  vals = [r[key] for r in records]
  m, s = mean_std(vals)
  return {"mean": m, "std": s, "values": vals, "n_seeds": len(vals)}


def final(records: list[dict], key: str) -> list[float]:
  """Last value of a diag curve per record (NaN when missing)."""
  return [r[key][-1] if r.get(key) else float("nan") for r in records]


def _band(ax, xs, ys_list, color, label, log=False):
  n = min(len(y) for y in ys_list)
  y = np.array([np.asarray(v[:n], float) for v in ys_list])
  if log:
    y = np.log10(np.maximum(y, 1e-12))
  m, s = np.nanmean(y, 0), (np.nanstd(y, 0, ddof=1) if len(y) > 1 else np.zeros(n))
  ax.plot(xs[:n], m, color=color, label=label)
  ax.fill_between(xs[:n], m - s, m + s, color=color, alpha=0.2)


def plot_groups(groups: dict[str, list[dict]], title: str, colors: dict[str, str] | None = None):
  """2 x 3 panels: eval loss, train loss, grad norm; composite bwd/fwd gain (max over tokens) over
  training; composite gain over depth and single-layer gain per site at the end (seed mean)."""
  fig, axes = results.new_figure(2, 3, figsize=(16, 8.5))
  colors = colors or {}
  cycle = iter(["tab:blue", "tab:red", "tab:green", "tab:gray", "tab:purple", "tab:orange",
                "tab:brown", "tab:pink", "tab:olive", "tab:cyan"])
  for name, recs in groups.items():
    c = colors.get(name) or next(cycle)
    ok = [r for r in recs if not r["diverged"]] or recs
    _band(axes[0, 0], ok[0]["eval_step"], [r["eval_loss"] for r in ok], c, name)
    _band(axes[0, 1], ok[0]["train_step"], [r["train_loss"] for r in ok], c, name)
    _band(axes[0, 2], ok[0]["train_step"], [r["grad_norm"] for r in ok], c, name, log=True)
    if ok[0]["diag_step"]:
      _band(axes[1, 0], ok[0]["diag_step"], [r["gain/composite_bwd_max"] for r in ok], c,
            name + " bwd", log=True)
      axes[1, 0].plot(ok[0]["diag_step"], np.log10(np.nanmean(
          [r["gain/composite_fwd_max"][:len(ok[0]["diag_step"])] for r in ok], 0)), color=c, ls=":")
      sites = [r["sites"].get("gain/composite_bwd_max", []) for r in ok if r["sites"]]
      if sites and sites[0]:
        s_idx = np.arange(len(sites[0]))
        _band(axes[1, 1], s_idx, sites, c, name + " bwd", log=True)
        axes[1, 1].plot(s_idx, np.log10(np.nanmean([r["sites"]["gain/composite_fwd_max"] for r in ok],
                                                   0)), color=c, ls=":")
        _band(axes[1, 2], s_idx, [r["sites"]["gain/bwd_max"] for r in ok], c, name + " bwd", log=True)
        axes[1, 2].plot(s_idx, np.log10(np.nanmean([r["sites"]["gain/fwd_max"] for r in ok], 0)),
                        color=c, ls=":")
  titles = [("validation loss (nats/byte)", "step"), ("train loss", "step"),
            ("log10 global grad norm", "step"),
            ("log10 composite Amax gain, whole depth\n(max over tokens; solid bwd, dotted fwd)", "step"),
            ("log10 composite gain H_{S-1}..H_l at the end\n(Fig. 3b view; solid bwd, dotted fwd)",
             "site l (attn_0, mlp_0, attn_1, ...)"),
            ("log10 single-layer gain at the end\n(Fig. 3a view; solid bwd, dotted fwd)", "site")]
  for ax, (t, xl) in zip(axes.flat, titles):
    ax.set_title(t, fontsize=9)
    ax.set_xlabel(xl)
    ax.legend(fontsize=7)
  fig.suptitle(title, fontsize=10)
  return fig


def plot_moe_balance(groups: dict[str, list[dict]], title: str):
  """Per kind: the coefficient of variation of the experts' token shares (worst MoE layer) and the
  largest share, over training (bands over seeds)."""
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
  for kind, recs in groups.items():
    color = KIND_COLORS.get(kind)
    for ax, key in zip(axes, ("moe/load_cv", "moe/load_max")):
      _band(ax, recs[0]["train_step"], [[max(v) for v in r[key]] for r in recs], color, kind)
      ax.set_title(key + " (max over MoE layers)")
      ax.set_xlabel("step")
  axes[0].legend()
  fig.suptitle(title)
  fig.tight_layout()
  return fig


def plot_heatmaps(named: dict[str, list], title: str, max_sites: int = 8):
  """Rows: runs; columns: sites. Token-mean learned H_res (diverging colours, signed for HC)."""
  named = {k: np.asarray(v) for k, v in named.items() if v is not None}
  if not named:
    return None
  n_sites = min(max_sites, min(v.shape[0] for v in named.values()))
  fig, axes = results.new_figure(len(named), n_sites, figsize=(1.8 * n_sites + 1, 1.9 * len(named)),
                                squeeze=False)
  for r, (name, h) in enumerate(named.items()):
    for s in range(n_sites):
      ax = axes[r, s]
      lim = max(1.0, float(np.abs(h[s]).max()))
      ax.imshow(h[s], cmap="RdBu_r", vmin=-lim, vmax=lim)
      for (i, j), v in np.ndenumerate(h[s]):
        ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=5)
      ax.set_xticks([])
      ax.set_yticks([])
      if r == 0:
        ax.set_title(f"site {s}", fontsize=8)
      if s == 0:
        ax.set_ylabel(name, fontsize=8)
  fig.suptitle(title, fontsize=10)
  return fig


# Comparisons: every kind x seed at one preset.

def compare(plan, base="lm_compare", data: str = "stdlib", data_dir: str = "", smoke: bool = False,
            out=".", stem: str = "lm_compare", scratch=None, report_spikes: bool = False) -> dict:
  """Train every (kind, seeds) of `plan` at preset `base`; the result (saved to `out/<stem>.json`
  after every run, so partial results survive an interruption) holds each run's record and a summary
  per kind. Run directories: `scratch/<stem>/<kind>_s<seed>` (default `out/_scratch/runs`)."""
  base = preset(base)
  dcfg = data_config(base.data, data, data_dir)
  result = {"experiment": stem, "smoke": smoke, "scale": scale(base),
            "scale_text": describe(base), "data": data, "n_streams": 4,
            "seeds": list(dict.fromkeys(s for _, seeds in plan for s in seeds)),
            "runs": {}, **results.metadata()}
  d = pathlib.Path(out)
  d.mkdir(parents=True, exist_ok=True)
  scratch = pathlib.Path(scratch) if scratch else d / "_scratch" / "runs"
  for kind, seeds in plan:
    for seed in seeds:
      cfg = make_config(kind, base, seed=seed, data=dcfg)
      rec = run_one(cfg, str(scratch / stem / f"{kind}_s{seed}"))
      result["runs"].setdefault(kind, []).append(rec)
      spikes = (f" diverged={bool(rec['diverged'])} max spike {rec['max_loss_spike']:.3f}"
                if report_spikes else "")
      print(f"{kind} seed {seed}: val loss {rec['final_val_loss']:.4f}{spikes} "
            f"({rec['wall_s']} s wall, {rec['cpu_s']} s cpu)", flush=True)
      result["summary"] = summarize(result["runs"])
      results.save_json(result, d / f"{stem}.json")
  return result


def summarize(runs: dict) -> dict:
  out = {}
  for kind, recs in runs.items():
    row = {"final_val_loss": aggregate(recs), "max_grad_norm": aggregate(recs, "max_grad_norm"),
           "max_loss_spike": aggregate(recs, "max_loss_spike"),
           "diverged": sum(bool(r["diverged"]) for r in recs),
           "cpu_s": sum(r["cpu_s"] for r in recs)}
    if recs[0]["diag_step"]:
      for k in ("gain/composite_fwd_max", "gain/composite_bwd_max", "gain/bwd_max",
                "gain/composite_bwd_mean"):
        vals = final(recs, k)
        row[k] = {"mean": sum(vals) / len(vals), "max": max(vals), "values": vals}
        peak = [max(r[k]) for r in recs]
        row[k + "_peak_over_training"] = {"max": max(peak), "values": peak}
    if "moe/load_cv" in recs[0]:   # expert balance at the end: worst MoE layer's load CV / max share
      for k in ("moe/load_cv", "moe/load_max"):
        vals = [max(r[k][-1]) for r in recs]
        row[k] = {"mean": sum(vals) / len(vals), "max": max(vals), "values": vals}
    out[kind] = row
  if "residual" in out:
    base = out["residual"]["final_val_loss"]["mean"]
    for row in out.values():
      row["delta_vs_residual"] = row["final_val_loss"]["mean"] - base
  return out


def save_figures(result: dict, out=".", stem: str = "lm_compare"):
  d = pathlib.Path(out)
  fig = plot_groups(result["runs"], f"{stem}: {result['scale_text']}; seeds {result['seeds']} "
                    "(bands: +-1 std over seeds)", KIND_COLORS)
  results.save_figure(fig, d / f"{stem}.png")
  if any("moe/load_cv" in v[0] for v in result["runs"].values()):
    results.save_figure(plot_moe_balance(result["runs"], f"{stem}: expert load over training"),
                        d / f"{stem}_balance.png")
  heat = plot_heatmaps({k: v[0]["h_res_mean"] for k, v in result["runs"].items()},
                       f"learned H_res (token mean over one validation batch), seed "
                       f"{result['seeds'][0]}, after {result['scale']['steps']} steps")
  if heat is not None:
    results.save_figure(heat, d / f"{stem}_heatmaps.png")


def print_table(result: dict):
  print(f"{'kind':10s} {'val loss (mean +- std)':>24s} {'vs residual':>12s} {'composite bwd gain (end)':>26s}")
  for kind, row in result["summary"].items():
    v = row["final_val_loss"]
    g = row.get("gain/composite_bwd_max", {}).get("mean", float("nan"))
    print(f"{kind:10s} {v['mean']:>14.4f} +- {v['std']:.4f} {row.get('delta_vs_residual', 0):>+12.4f} "
          f"{g:>26.4g}")
