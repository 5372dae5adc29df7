"""Training: optimizer, sharded train state, pure steps, the `Trainer`, the run loop, metrics, run
directories.

    from mhc_jax.train import train
    result = train(cfg, "runs/x")       # cfg: mhc_jax.config.RunConfig, e.g. mhc_jax.configs.get_preset
    result.trainer.evaluate(batches)    # the final state stays in memory: result.state
"""
from mhc_jax.train.loop import Interrupted, RunResult, TrainingDiverged, load_checkpoint, train
from mhc_jax.train.trainer import Trainer

__all__ = ["train", "Trainer", "RunResult", "load_checkpoint", "TrainingDiverged", "Interrupted"]
