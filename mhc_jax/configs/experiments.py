"""Presets of the LM experiments (`experiments/`, notebook 02): the model and optimisation size every
compared run of one experiment shares; `mhc_jax.tools.lm_runs.make_config` sets the connection kind,
seed and ablated knobs on top.

  lm_compare      experiment 2: d_model 64, 4 layers, seq 64, batch 8, 600 steps (AdamW 3e-3 cosine)
  lm_ablations    experiment 4: lm_compare with 300 steps, warmup 20
  lm_stress       experiment 3: deep, narrow (d 32, 8 layers), lr 2e-2, no gradient clipping
  lm_quant        the quantisation experiment: d_model 128, 300 steps
  lm_smoke        the smoke size of experiments 2 and 4 (tests, notebooks): seconds per run
  lm_stress_smoke the smoke size of experiment 3
Every one: byte vocabulary (256), float32, the built-in stdlib corpus, mHC n=4 (Sinkhorn 20, hc_like
init), no checkpoints and no samples (runs are read back from their metrics).
"""
from __future__ import annotations

from mhc_jax.config import (ConnectionConfig, DataConfig, MeshConfig, ModelConfig, RunConfig,
                            TrainConfig)


def _lm(*, d_model: int = 64, n_layers: int = 4, n_heads: int = 4, seq_len: int = 64,
        batch_size: int = 8, max_files: int = 0, steps: int = 600, lr: float = 3e-3,
        warmup_steps: int = 30, eval_every: int = 100, eval_batches: int = 4, log_every: int = 10,
        clip_norm: float = 1.0) -> RunConfig:
  model = ModelConfig(vocab_size=256, d_model=d_model, n_layers=n_layers, n_heads=n_heads,
                      max_seq_len=seq_len, dtype="float32",
                      connection=ConnectionConfig(kind="mhc", n_streams=4))
  data = DataConfig(source="stdlib", seq_len=seq_len, batch_size=batch_size, max_files=max_files)
  train = TrainConfig(steps=steps, lr=lr, schedule="cosine", warmup_steps=warmup_steps,
                      clip_norm=clip_norm, eval_every=eval_every, eval_batches=eval_batches,
                      log_every=log_every, checkpoint_every=0, keep=1, seed=0, sample_tokens=0)
  return RunConfig(model=model, data=data, train=train, mesh=MeshConfig(strategy="dp"))


_SMOKE = dict(d_model=32, n_layers=2, n_heads=2, seq_len=32, batch_size=8, max_files=60, steps=12,
              warmup_steps=2, eval_every=6, eval_batches=1, log_every=2)


def lm_compare() -> RunConfig:
  return _lm()


def lm_ablations() -> RunConfig:
  return _lm(steps=300, warmup_steps=20)


def lm_stress() -> RunConfig:
  return _lm(d_model=32, n_layers=8, n_heads=2, steps=150, lr=2e-2, warmup_steps=10, eval_every=50,
             log_every=5, clip_norm=0.0)


def lm_quant() -> RunConfig:
  return _lm(d_model=128, steps=300, eval_every=150, log_every=25)


def lm_smoke() -> RunConfig:
  return _lm(**_SMOKE)


def lm_stress_smoke() -> RunConfig:
  return _lm(**dict(_SMOKE, n_layers=3, lr=2e-2, clip_norm=0.0))


PRESETS = {"lm_compare": lm_compare, "lm_ablations": lm_ablations, "lm_stress": lm_stress,
           "lm_quant": lm_quant, "lm_smoke": lm_smoke, "lm_stress_smoke": lm_stress_smoke}
