"""Golden one-step values: a fixed tiny model and batch, one optimizer step per connection kind.

The loss and gradient norm of the first step and the loss after it are compared with
tests/golden/one_step.json. A change that is *meant* to change the numbers (new init, another loss,
different defaults) updates them with

    MHC_JAX_UPDATE_GOLDEN=1 .venv/bin/python -m pytest tests/test_golden.py

and says why in its commit message; any other change must leave them as they are.
"""
import json
import os

import jax
import numpy as np
import pytest

from mhc_jax.config import (ConnectionConfig, DataConfig, MeshConfig, ModelConfig, RunConfig,
                            TrainConfig)
from mhc_jax.train import Trainer

GOLDEN = os.path.join(os.path.dirname(__file__), "golden", "one_step.json")
UPDATE = os.environ.get("MHC_JAX_UPDATE_GOLDEN") == "1"
CONNECTIONS = {"residual": dict(kind="residual", n_streams=1), "hc": dict(kind="hc", n_streams=4),
               "mhc": dict(kind="mhc", n_streams=4), "mhc_lite": dict(kind="mhc_lite", n_streams=3)}


def _config(conn: dict) -> RunConfig:
  model = ModelConfig(vocab_size=256, d_model=32, n_layers=2, n_heads=2, max_seq_len=16,
                      dtype="float32", connection=ConnectionConfig(sinkhorn_iters=5, **conn))
  return RunConfig(model=model, data=DataConfig(source="files", path="unused", seq_len=16,
                                                batch_size=4),
                   train=TrainConfig(steps=10, lr=1e-2, warmup_steps=0, seed=7),
                   mesh=MeshConfig(strategy="dp", shape=(1, 1, 1)))


def _one_step(name: str) -> dict[str, float]:
  cfg = _config(CONNECTIONS[name])
  trainer = Trainer(cfg, devices=jax.devices()[:1])
  trainer.init()
  tokens = np.random.default_rng(0).integers(1, 256, size=(4, 17), dtype=np.int32)
  batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}
  m = jax.device_get(trainer.step(batch))
  after = trainer.evaluate([batch])["loss"]
  return {"loss": float(m["loss"]), "grad_norm": float(m["grad_norm"]), "loss_after": after}


@pytest.fixture(scope="module")
def golden():
  if UPDATE:
    return {}
  with open(GOLDEN) as f:
    return json.load(f)


@pytest.mark.parametrize("name", list(CONNECTIONS))
def test_one_step_matches_golden(name, golden):
  got = _one_step(name)
  if UPDATE:
    stored = json.load(open(GOLDEN)) if os.path.exists(GOLDEN) else {}
    stored[name] = got
    os.makedirs(os.path.dirname(GOLDEN), exist_ok=True)
    with open(GOLDEN, "w") as f:
      json.dump(stored, f, indent=2, sort_keys=True)
      f.write("\n")
    pytest.skip(f"golden values of {name!r} written to {GOLDEN}")
  want = golden[name]
  for key, value in want.items():
    assert got[key] == pytest.approx(value, rel=2e-5), (
        f"{name}: {key} = {got[key]!r}, golden {value!r}. If this change is meant to alter the "
        "numbers, update them with MHC_JAX_UPDATE_GOLDEN=1 .venv/bin/python -m pytest "
        "tests/test_golden.py and say why in the commit message.")
  assert got["loss_after"] < got["loss"]    # the step descended
