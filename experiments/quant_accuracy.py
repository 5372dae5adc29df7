"""The accuracy cost of weight-only quantisation (qwix int8 per channel, int4 group-wise) for an mHC
LM and its residual twin, on a CPU.

Trains both with the library's `train()` on the built-in corpus (same data, steps, width), quantises
each checkpoint to int8 and int4 (`mhc_jax.quant`), and measures on the same validation batches:
loss and bits per byte, next-token (argmax) agreement with the float32 model, weight bytes in memory
and the checkpoint on disk, and greedy-decoding tokens/s on this CPU (float vs quantised, side by
side in one process). One JSON table and one plot under `experiments/results/`.

    python -m experiments.quant_accuracy            # ~2 x 2 min of training on 2 CPU cores
    python -m experiments.quant_accuracy --smoke    # seconds; checks the plumbing
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time

import numpy as np

from experiments import common
from mhc_jax.tools import lm_runs

MODES = (("int8", 128), ("int4", 128), ("int4", 32))
SMOKE_MODES = (("int8", 128), ("int4", 16))


def _decode_tps(fn, n_new: int, repeats: int = 3) -> float:
  fn()                                    # compile
  best = float("inf")
  for _ in range(repeats):
    t0 = time.perf_counter()
    fn()
    best = min(best, time.perf_counter() - t0)
  return n_new / best


def measure(trainer, kind: str, eval_batches: int, n_new: int, work: str,
            modes=MODES) -> list[dict]:
  """The float model of `trainer` (its final state) against its quantised versions."""
  import jax
  import jax.numpy as jnp
  import orbax.checkpoint as ocp

  from mhc_jax.data import make_eval_batches, make_tokenizer
  from mhc_jax.model import LM
  from mhc_jax.quant import (QuantSpec, dir_bytes, evaluate_quantized, quantize_params,
                             quantized_kernel_bytes,
                             quantized_generate, quantized_logits, save_quantized, tree_bytes)
  from mhc_jax.sample import generate
  from mhc_jax.train.trainer import count_bytes
  cfg, step = trainer.cfg, trainer.step_count
  mcfg = cfg.model
  params = jax.device_get(trainer.state.params)
  host = make_eval_batches(cfg.data, eval_batches)
  n_bytes = count_bytes(make_tokenizer(cfg.data), host)
  fwd = jax.jit(lambda p, t: LM(mcfg).apply({"params": p}, t))
  ref_logits = [np.asarray(fwd(params, jnp.asarray(b["inputs"]))) for b in host]
  tot = sum(float(np.sum(jax.nn.logsumexp(lg, -1) - np.take_along_axis(lg, b["targets"][..., None], -1)[..., 0]))
            for lg, b in zip(ref_logits, host))
  ntok = sum(b["targets"].size for b in host)
  f_bytes = tree_bytes(params)
  fdir = os.path.join(work, f"{kind}_float")
  ck = ocp.StandardCheckpointer()
  ck.save(os.path.abspath(fdir), params)
  ck.wait_until_finished()
  ck.close()
  f_disk = dir_bytes(fdir)
  prompt = np.asarray(host[0]["inputs"][0, :8])
  tps_f = _decode_tps(lambda: generate(mcfg, params, prompt, max_new_tokens=n_new, temperature=0),
                      n_new)
  rows = [{"model": kind, "precision": "float32", "group_size": None, "step": step,
           "val_loss": tot / ntok, "bits_per_byte": tot / np.log(2) / n_bytes,
           "agreement": 1.0, "weight_bytes": f_bytes, "memory_ratio": 1.0,
           "projection_memory_ratio": 1.0, "disk_bytes": f_disk,
           "disk_ratio": 1.0, "decode_tokens_per_s": tps_f, "decode_speed_ratio": 1.0}]
  for mode, g in modes:
    spec = QuantSpec(mode, g)
    qp = quantize_params(mcfg, params, spec)
    res = evaluate_quantized(mcfg, spec, qp, host, n_bytes)
    agree = np.mean(np.concatenate([
        (np.asarray(quantized_logits(qp, jnp.asarray(b["inputs"]), cfg=mcfg, spec=spec)).argmax(-1)
         == lg.argmax(-1)).ravel() for lg, b in zip(ref_logits, host)]))
    qdir = os.path.join(work, f"{kind}_{mode}_g{g}")
    save_quantized(qdir, cfg, spec, qp, {"step": step})
    q_disk = dir_bytes(os.path.join(qdir, "params"))
    tps = _decode_tps(lambda: quantized_generate(mcfg, spec, qp, prompt, max_new_tokens=n_new,
                                                 temperature=0), n_new)
    qb = tree_bytes(qp)
    kq, kf = quantized_kernel_bytes(qp)
    rows.append({"model": kind, "precision": mode, "group_size": g if mode == "int4" else None,
                 "step": step, "val_loss": res["loss"], "bits_per_byte": res["bits_per_byte"],
                 "agreement": float(agree), "weight_bytes": qb, "memory_ratio": qb / f_bytes,
                 "projection_memory_ratio": kq / kf,
                 "disk_bytes": q_disk, "disk_ratio": q_disk / f_disk, "decode_tokens_per_s": tps,
                 "decode_speed_ratio": tps / tps_f})
  base = rows[0]["val_loss"]
  for r in rows:
    r["loss_increase_pct"] = 100.0 * (r["val_loss"] - base) / base
  return rows


def plot(rows: list[dict], path):
  fig, axes = common.new_figure(1, 3, figsize=(13, 3.8))
  labels = [f"{r['precision']}" + (f" g{r['group_size']}" if r["group_size"] else "")
            for r in rows if r["model"] == "mhc"]
  x = np.arange(len(labels))
  for i, kind in enumerate(("residual", "mhc")):
    rs = [r for r in rows if r["model"] == kind]
    color = "tab:gray" if kind == "residual" else "tab:blue"
    axes[0].bar(x + (i - 0.5) * 0.38, [r["loss_increase_pct"] for r in rs], 0.38, label=kind,
                color=color)
    axes[1].bar(x + (i - 0.5) * 0.38, [100 * r["agreement"] for r in rs], 0.38, label=kind,
                color=color)
    axes[2].bar(x + (i - 0.5) * 0.38, [r["memory_ratio"] for r in rs], 0.38, label=kind,
                color=color)
  axes[0].set_ylabel("validation loss increase vs float32 (%)")
  axes[1].set_ylabel("next-token agreement with float32 (%)")
  axes[1].set_ylim(min(90, min(100 * r["agreement"] for r in rows) - 2), 100.5)
  axes[2].set_ylabel("weight memory / float32")
  for a in axes:
    a.set_xticks(x, labels)
    a.legend(fontsize=8)
  axes[0].set_title("accuracy cost")
  axes[1].set_title("argmax agreement")
  axes[2].set_title("memory (embedding stays float32)")
  common.save_figure(fig, path)


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--smoke", action="store_true")
  ap.add_argument("--steps", type=int, default=None)
  ap.add_argument("--eval-batches", type=int, default=16)
  ap.add_argument("--new-tokens", type=int, default=48)
  ap.add_argument("--out", default=None, help="results directory (default experiments/results)")
  args = ap.parse_args(argv)
  smoke = common.smoke_from_env(args.smoke)
  base = lm_runs.preset("lm_smoke" if smoke else "lm_quant", steps=args.steps or 0)
  from mhc_jax.train import train
  modes = SMOKE_MODES if smoke else MODES
  work = tempfile.mkdtemp(prefix="quant_acc_")
  rows, train_s = [], {}
  try:
    for kind in ("residual", "mhc"):
      cfg = lm_runs.make_config(kind, base)
      rd = str(common.SCRATCH / f"quant_{kind}")
      shutil.rmtree(rd, ignore_errors=True)
      t0 = time.perf_counter()
      result = train(cfg, rd, progress=False)
      train_s[kind] = time.perf_counter() - t0
      rows += measure(result.trainer, kind, 2 if smoke else args.eval_batches,
                      8 if smoke else args.new_tokens, work, modes)
  finally:
    shutil.rmtree(work, ignore_errors=True)
  out = common.out_dir(args.out)
  name = "quant_accuracy_smoke" if smoke else "quant_accuracy"
  verdict = {}
  for mode, g in modes:
    get = lambda k: next(r for r in rows if r["model"] == k and r["precision"] == mode  # noqa: E731
                         and (r["group_size"] in (None, g)))
    verdict[f"{mode}_g{g}" if mode == "int4" else mode] = {
        "loss_increase_pct": {"residual": get("residual")["loss_increase_pct"],
                              "mhc": get("mhc")["loss_increase_pct"]},
        "agreement": {"residual": get("residual")["agreement"], "mhc": get("mhc")["agreement"]}}
  res = {"experiment": "quant_accuracy", "command": "python -m experiments.quant_accuracy "
         + " ".join(sys.argv[1:] if argv is None else argv), **common.metadata(),
         "scale": lm_runs.describe(base),
         "shapes": {"d_model": base.model.d_model, "n_layers": base.model.n_layers,
                    "n_heads": base.model.n_heads, "seq_len": base.data.seq_len,
                    "mhc_streams": 4, "vocab": 256},
         "eval_batches": 2 if smoke else args.eval_batches, "train_seconds": train_s,
         "quantised": "attention q/k/v/out (nn.Einsum) and MLP wi_0/wi_1/wo (nn.Dense) kernels; "
                      "embedding (tied head), norms and all connection parameters float32",
         "rows": rows, "mhc_vs_residual": verdict}
  common.save_json(res, out / f"{name}.json")
  plot(rows, out / f"{name}.png")
  hdr = f"{'model':9s} {'prec':9s} {'loss':>7s} {'d%':>7s} {'bpb':>6s} {'agree':>6s} {'mem':>5s} {'proj':>5s} {'disk':>5s} {'tok/s':>7s}"
  print(hdr)
  for r in rows:
    p = r["precision"] + (f" g{r['group_size']}" if r["group_size"] else "")
    print(f"{r['model']:9s} {p:9s} {r['val_loss']:7.4f} {r['loss_increase_pct']:7.3f} "
          f"{r['bits_per_byte']:6.3f} {r['agreement']:6.3f} {r['memory_ratio']:5.3f} "
          f"{r['projection_memory_ratio']:5.3f} "
          f"{r['disk_ratio']:5.3f} {r['decode_tokens_per_s']:7.1f}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
