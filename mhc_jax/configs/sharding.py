"""Presets of the sharding comparison (`mhc-jax compare-sharding --preset small|1b`).

  sharding_small  CPU-sized mHC LM (seconds per compiled row; fake CPU devices)
  sharding_1b     ~1.0B-parameter mHC LM for ahead-of-time compiles (TPU topologies, abstract H100s):
                  20 x (4 d^2 attention + 3 d ff SwiGLU) with d=2048, ff=5504: 1.01e9 parameters
"""
from __future__ import annotations

from mhc_jax.config import (ConnectionConfig, DataConfig, MeshConfig, ModelConfig, RunConfig,
                            TrainConfig)


def _run(model: ModelConfig, data: DataConfig) -> RunConfig:
  return RunConfig(model=model, data=data, train=TrainConfig(steps=100, lr=1e-3, warmup_steps=0),
                   mesh=MeshConfig())


def sharding_small() -> RunConfig:
  model = ModelConfig(vocab_size=256, d_model=64, n_layers=2, n_heads=8, max_seq_len=64,
                      dtype="float32", connection=ConnectionConfig(kind="mhc", n_streams=4))
  return _run(model, DataConfig(seq_len=64, batch_size=16))


def sharding_1b() -> RunConfig:
  model = ModelConfig(vocab_size=256, d_model=2048, n_layers=20, n_heads=16, max_seq_len=2048,
                      dtype="bfloat16", remat="full",
                      connection=ConnectionConfig(kind="mhc", n_streams=4))
  return _run(model, DataConfig(seq_len=2048, batch_size=16))


PRESETS = {"sharding_small": sharding_small, "sharding_1b": sharding_1b}
