"""Shared plumbing of the LM training experiments (items 2-4): configs as code, one run -> one compact
record, aggregation over seeds, and the plots.

Every run goes through the library's own entry point (`mhc_jax.train.train`) on the built-in corpus
(or a prepared TFDS dataset); the record keeps the paper's views from the run's `metrics.jsonl`:
validation loss, train loss and gradient-norm curves, single-layer and composite Amax gains over
training (whole depth) and over depth (per site, at the end), and the learned `H_res` (token mean over
one validation batch, per site).
"""
from __future__ import annotations

import dataclasses
import math
import os
import shutil
import time
from typing import Any

import numpy as np

from experiments import common
from mhc_jax.analysis import mean_std

SCRATCH = common.RESULTS_DIR / "_scratch" / "runs"
KIND_COLORS = {"residual": "tab:gray", "hc": "tab:red", "mhc": "tab:blue", "mhc_lite": "tab:green"}


@dataclasses.dataclass(frozen=True)
class Scale:
  """Model / optimisation size of one experiment (every compared run uses the same one)."""
  d_model: int = 64
  n_layers: int = 4
  n_heads: int = 4
  seq_len: int = 64
  batch_size: int = 8
  steps: int = 600
  lr: float = 3e-3
  warmup_steps: int = 30
  eval_every: int = 100
  eval_batches: int = 4
  log_every: int = 10
  clip_norm: float = 1.0

  def describe(self) -> str:
    return (f"d_model={self.d_model}, {self.n_layers} layers ({2 * self.n_layers} connection sites), "
            f"{self.n_heads} heads, seq {self.seq_len}, batch {self.batch_size}, {self.steps} steps "
            f"({self.steps * self.batch_size * self.seq_len / 1e6:.2f}M tokens), AdamW lr {self.lr:g} "
            f"cosine, warmup {self.warmup_steps}, clip {self.clip_norm:g}")


SMOKE_SCALE = Scale(d_model=32, n_layers=2, n_heads=2, seq_len=32, batch_size=8, steps=12,
                    warmup_steps=2, eval_every=6, eval_batches=1, log_every=2)


def data_config(data: str = "stdlib", data_dir: str = "", seq_len: int = 64, batch_size: int = 8,
                smoke: bool = False):
  """`stdlib` (built-in corpus) or `tfds:NAME` (a prepared TFDS dataset under `data_dir`)."""
  from mhc_jax.data.config import DataConfig
  if data == "stdlib":
    return DataConfig(source="stdlib", seq_len=seq_len, batch_size=batch_size,
                      max_files=60 if smoke else 0)
  if data.startswith("tfds:"):
    return DataConfig(source="tfds", tfds_name=data[5:], data_dir=data_dir, seq_len=seq_len,
                      batch_size=batch_size)
  from mhc_jax.config import ConfigError
  raise ConfigError(f"--data={data!r} is not allowed: 'stdlib' or 'tfds:NAME' (e.g. tfds:lm1b)")


def make_config(kind: str, *, scale: Scale, seed: int = 0, n: int = 4, sinkhorn_iters: int = 20,
                init: str = "hc_like", dynamic: bool = True, data=None, lr: float | None = None):
  """The RunConfig of one compared run. `kind="residual"` forces n = 1."""
  from mhc_jax.config import ConnectionConfig, ModelConfig
  from mhc_jax.sharding import MeshConfig
  from mhc_jax.train import RunConfig, TrainConfig
  n = 1 if kind == "residual" else n
  conn = ConnectionConfig(kind=kind, n_streams=n, sinkhorn_iters=sinkhorn_iters, init=init,
                          dynamic=dynamic)
  model = ModelConfig(vocab_size=256, d_model=scale.d_model, n_layers=scale.n_layers,
                      n_heads=scale.n_heads, max_seq_len=scale.seq_len, dtype="float32",
                      connection=conn)
  data = data or data_config(seq_len=scale.seq_len, batch_size=scale.batch_size)
  train = TrainConfig(steps=scale.steps, lr=lr or scale.lr, schedule="cosine",
                      warmup_steps=scale.warmup_steps, clip_norm=scale.clip_norm,
                      eval_every=scale.eval_every, eval_batches=scale.eval_batches,
                      log_every=scale.log_every, checkpoint_every=0, keep=1, seed=seed,
                      sample_tokens=0)
  return RunConfig(model=model, data=data, train=train, mesh=MeshConfig(strategy="dp"))


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
  return out


def learned_h_res(run_dir: str, batch_index: int = 0):
  """Token-mean `H_res [S, n, n]` of the final checkpoint on one validation batch (None: residual)."""
  import jax
  import jax.numpy as jnp
  from mhc_jax.model import LM, collect_mappings
  from mhc_jax.train import load_checkpoint
  from mhc_jax.train.loop import _to_device, open_data
  cfg, state, _, setup = load_checkpoint(run_dir)
  if cfg.model.connection.kind == "residual":
    return None
  _, _, evals = open_data(cfg)
  batch = _to_device(evals[batch_index], setup)
  with setup.context():
    def f(params, tokens):
      _, st = LM(cfg.model).apply({"params": params}, tokens, mutable=["intermediates"])
      return jnp.mean(collect_mappings(st["intermediates"], cfg.model)["h_res"], axis=(1, 2))
    h = jax.jit(f)(state.params, batch["inputs"])
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
  from mhc_jax.train import TrainingDiverged, train
  from mhc_jax.train.config import to_dict
  if os.path.isdir(run_dir):
    shutil.rmtree(run_dir)
  t0, c0 = time.time(), time.process_time()
  diverged = None
  try:
    train(cfg, run_dir, progress=False, final_outputs=False)
  except TrainingDiverged as e:
    diverged = str(e)
  rec = {"config": to_dict(cfg), "diverged": diverged, **read_record(run_dir)}
  rec["wall_s"] = round(time.time() - t0, 1)
  rec["cpu_s"] = round(time.process_time() - c0, 1)
  rec["final_val_loss"] = rec["eval_loss"][-1] if rec["eval_loss"] and not diverged else float("nan")
  rec["max_loss_spike"] = max_spike(rec["train_loss"]) if not diverged else math.inf
  rec["max_grad_norm"] = max(rec["grad_norm"]) if rec["grad_norm"] else float("nan")
  rec["h_res_mean"] = learned_h_res(run_dir) if heatmap and not diverged else None
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
  fig, axes = common.new_figure(2, 3, figsize=(16, 8.5))
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


def plot_heatmaps(named: dict[str, list], title: str, max_sites: int = 8):
  """Rows: runs; columns: sites. Token-mean learned H_res (diverging colours, signed for HC)."""
  named = {k: np.asarray(v) for k, v in named.items() if v is not None}
  if not named:
    return None
  n_sites = min(max_sites, min(v.shape[0] for v in named.values()))
  fig, axes = common.new_figure(len(named), n_sites, figsize=(1.8 * n_sites + 1, 1.9 * len(named)),
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
