"""Training: config, optimizer, sharded train state, pure steps, loop, metrics, run directories.

    from mhc_jax.train import RunConfig, train
    train(cfg, "runs/x")
"""
from mhc_jax.train.config import RunConfig, TrainConfig, apply_overrides
from mhc_jax.train.loop import Interrupted, TrainingDiverged, load_checkpoint, train

__all__ = ["RunConfig", "TrainConfig", "apply_overrides", "train", "load_checkpoint",
           "TrainingDiverged", "Interrupted"]
