"""Training: optimizer, sharded train state, pure steps, the loop, metrics, run directories.

    from mhc_jax.train import train
    train(cfg, "runs/x")          # cfg: mhc_jax.config.RunConfig, e.g. mhc_jax.configs.get_preset
"""
from mhc_jax.train.loop import Interrupted, TrainingDiverged, load_checkpoint, train

__all__ = ["train", "load_checkpoint", "TrainingDiverged", "Interrupted"]
