"""Weight-only post-training quantisation (qwix) of trained runs, and inference on the result.

    from mhc_jax.quant import QuantSpec, quantize_run, load_quantized, quantized_generate
    quantize_run("runs/r", "runs/r-int8", QuantSpec("int8"))
    cfg, spec, qparams, meta = load_quantized("runs/r-int8")

CLI: `mhc-jax quantize --run-dir R --mode int8|int4 [--group-size 128] --out Q`; then
`mhc-jax sample --run-dir Q`, `mhc-jax eval --run-dir Q`. With `--max-memory SIZE` (run dirs and
quantised dirs) the layers that do not fit stream from disk: `mhc_jax.quant.stream`.
"""
from __future__ import annotations

import dataclasses
import os

import flax.linen as nn
import jax

from mhc_jax.quant.core import (QuantSpec, abstract_qparams, check_spec, dequantize_params,
                                quantize_params, quantized_kernel_bytes, quantized_lm, rules,
                                tree_bytes)
from mhc_jax.quant.infer import (evaluate_quantized, quantized_eval, quantized_generate,
                                 quantized_logits, quantized_sample)
from mhc_jax.quant.io import (check_out, dir_bytes, is_quantized_dir, load_moe_state, load_quantized,
                              save_quantized)
from mhc_jax.train import run_dir as rd
from mhc_jax.train.loop import load_checkpoint


def quantize_run(run_dir: str, out: str, spec: QuantSpec, *, step: int | None = None,
                 kv_cache: str | None = None) -> dict:
  """Quantise the checkpoint of `run_dir` (newest, or `step`) and write it to `out`; returns the
  byte counts (weights in memory: float32 vs quantised; checkpoint directories on disk).
  `kv_cache`: "int8" makes the quantised model decode with an int8 KV cache (`model.kv_cache`)."""
  check_out(out)
  check_spec(spec, rd.read_config(run_dir).model)
  trainer = load_checkpoint(run_dir, step)
  cfg, step = trainer.cfg, trainer.step_count
  if kv_cache is not None:
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, kv_cache=kv_cache))
  params = jax.device_get(trainer.state.params)
  moe_state = nn.meta.unbox(jax.device_get(trainer.state.moe_state))
  qparams = quantize_params(cfg.model, params, spec)
  qk, fk = quantized_kernel_bytes(qparams)
  info = {"source_run_dir": os.path.abspath(run_dir), "step": int(step),
          "kv_cache": cfg.model.kv_cache,
          "float32_weight_bytes": tree_bytes(params), "quantized_weight_bytes": tree_bytes(qparams),
          "quantized_kernels_bytes": qk, "quantized_kernels_float32_bytes": fk}
  save_quantized(out, cfg, spec, qparams, info, moe_state=moe_state)
  src = os.path.join(run_dir, "checkpoints", str(step), "state")
  info.update(out=os.path.abspath(out), mode=spec.mode, group_size=spec.group_size,
              disk_bytes=dir_bytes(os.path.join(out, "params")))
  if os.path.isdir(src):
    info["source_state_disk_bytes"] = dir_bytes(src)   # params + optimizer state
  info["memory_ratio"] = info["quantized_weight_bytes"] / info["float32_weight_bytes"]
  return info


__all__ = ["QuantSpec", "abstract_qparams", "check_spec", "dequantize_params", "quantize_params",
           "quantized_kernel_bytes", "quantized_lm", "rules", "tree_bytes", "evaluate_quantized",
           "quantized_eval", "quantized_generate", "quantized_logits", "quantized_sample",
           "dir_bytes", "is_quantized_dir", "load_moe_state", "load_quantized", "save_quantized", "quantize_run"]
