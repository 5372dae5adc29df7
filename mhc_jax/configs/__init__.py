"""Named run presets: plain functions returning a `RunConfig`.

  default  the `make train` job: a small 4-stream mHC LM on the built-in stdlib corpus, ~5 min on 2 CPU cores
  smoke    a one-minute end-to-end check of the same path (fewer files and steps)
  tiny     for tests: a very small model; point `data.path` at a few text files
"""
from __future__ import annotations

import dataclasses

from mhc_jax.config import (ConfigError, ConnectionConfig, DataConfig, MeshConfig, ModelConfig,
                            RunConfig, TrainConfig)


def default() -> RunConfig:
  # ~1M params; one step (16 x 128 tokens) costs ~0.7 s of CPU time on a 2-core machine
  # (experiments/results/train_step_cost.json), so 300 steps (<= 3.5 min even single-threaded) fit the
  # ~5 minute budget with imports, corpus build, compilation, evals, sampling and the plot.
  model = ModelConfig(vocab_size=256, d_model=128, n_layers=4, n_heads=4, max_seq_len=256,
                      dtype="auto", connection=ConnectionConfig(kind="mhc", n_streams=4))
  data = DataConfig(source="stdlib", seq_len=128, batch_size=16)
  train = TrainConfig(steps=300, lr=3e-3, schedule="cosine", warmup_steps=30, weight_decay=0.1,
                      eval_every=150, eval_batches=8, log_every=10, checkpoint_every=150, keep=2,
                      sample_tokens=250)
  return RunConfig(model=model, data=data, train=train, mesh=MeshConfig(strategy="dp"))


def smoke() -> RunConfig:
  cfg = default()
  model = dataclasses.replace(cfg.model, n_layers=2, max_seq_len=128)
  return RunConfig(model=model, data=DataConfig(source="stdlib", seq_len=64, batch_size=8,
                                                max_files=40),
                   train=TrainConfig(steps=40, lr=3e-3, warmup_steps=5, eval_every=20,
                                     eval_batches=2, log_every=5, checkpoint_every=20, keep=2,
                                     sample_tokens=64),
                   mesh=cfg.mesh)


def tiny() -> RunConfig:
  model = ModelConfig(vocab_size=256, d_model=32, n_layers=2, n_heads=2, max_seq_len=32,
                      dtype="float32", connection=ConnectionConfig(kind="mhc", n_streams=4,
                                                                   sinkhorn_iters=5))
  data = DataConfig(source="files", path="data", seq_len=16, batch_size=16, val_fraction=0.2)
  train = TrainConfig(steps=20, lr=1e-2, warmup_steps=2, eval_every=10, eval_batches=2,
                      log_every=1, checkpoint_every=5, keep=3, sample_tokens=16)
  return RunConfig(model=model, data=data, train=train, mesh=MeshConfig(strategy="dp"))


PRESETS = {"default": default, "smoke": smoke, "tiny": tiny}
# The tools' and experiments' presets: sharding_small / sharding_1b (`compare-sharding`), lm_* (LM
# experiments), paper_* and moe_small (the mHC paper's MoE models); see those modules.
from mhc_jax.configs import (experiments as _experiments, paper as _paper,  # noqa: E402
                             sharding as _sharding)

PRESETS.update(_sharding.PRESETS)
PRESETS.update(_experiments.PRESETS)
PRESETS.update(_paper.PRESETS)


def get_preset(name: str) -> RunConfig:
  if name not in PRESETS:
    raise ConfigError(f"--preset {name!r} is not allowed: choose one of "
                      + ", ".join(repr(p) for p in PRESETS))
  return PRESETS[name]()
