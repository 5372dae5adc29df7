"""`Trainer`: one run's sharded state and its jitted steps, built once from a `RunConfig`.

    trainer = Trainer(cfg)                       # mesh, optimizer, abstract state, three jits
    trainer.init()                               # fresh state, born sharded (or trainer.restore(...))
    metrics = trainer.step(host_batch)           # {"loss", "grad_norm", ...} as device arrays
    trainer.evaluate(host_batches)               # {"loss", "perplexity", "tokens"[, "bits_per_byte"]}
    trainer.save(checkpointer, step, data_iter, meta)  # Orbax

Every step function is jitted once with the state's target shardings; the state is donated.
"""
from __future__ import annotations

from typing import Any

import jax
import numpy as np

from mhc_jax import distributed
from mhc_jax.config import RunConfig
from mhc_jax.train.state import MeshSetup, TrainState, create_state, make_setup
from mhc_jax.train.step import eval_summary, make_diagnostics, make_eval_step, make_train_step


class Trainer:
  """State + jitted train / eval / diagnostics steps of one `RunConfig` on one mesh."""

  def __init__(self, cfg: RunConfig, devices=None, setup: MeshSetup | None = None):
    self.cfg = cfg
    self.setup = make_setup(cfg, devices) if setup is None else setup
    s = self.setup
    batch_sh = {"inputs": s.batch_sharding, "targets": s.batch_sharding}
    self._train_step = jax.jit(make_train_step(cfg, s.tx), in_shardings=(s.state_shardings, batch_sh),
                               out_shardings=(s.state_shardings, None), donate_argnums=0)
    model_sh = (s.state_shardings.params, batch_sh, s.state_shardings.moe_state)
    self._eval_step = jax.jit(make_eval_step(cfg), in_shardings=model_sh)
    diag = make_diagnostics(cfg)
    self._diag = jax.jit(diag, in_shardings=model_sh) if diag is not None else None
    self.state: TrainState | None = None

  @property
  def step_count(self) -> int:
    """Optimizer updates applied to `state`."""
    return int(self.state.step)

  def context(self):
    """Mesh + logical rules: run model code that is not one of the jitted steps inside this."""
    return self.setup.context()

  def init(self) -> TrainState:
    """A fresh state from `cfg.train.seed`, created directly in its shardings."""
    self.state = create_state(self.cfg, self.setup)
    return self.state

  def restore(self, checkpointer, data_iter=None, **kwargs) -> int | None:
    """The newest good checkpoint of `checkpointer` (see `Checkpointer.restore_latest`); its step,
    or None (state unchanged) when there is none."""
    got = checkpointer.restore_latest(self.setup.target, data_iter, **kwargs)
    if got is None:
      return None
    state, _, step = got
    self.set_state(state)
    return step

  def set_state(self, state: TrainState):
    # Orbax-restored buffers may not be donatable: re-materialise them through an identity jit.
    self.state = jax.jit(lambda x: x, out_shardings=self.setup.state_shardings)(state)

  def lower(self) -> jax.stages.Lowered:
    """The train step lowered for the abstract state and a `[batch_size, seq_len]` batch, without
    data or a state (ahead-of-time compiles: TPU topologies, abstract H100s)."""
    b, t = self.cfg.data.batch_size, self.cfg.data.seq_len
    batch = {k: jax.ShapeDtypeStruct((b, t), np.int32, sharding=self.setup.batch_sharding)
             for k in ("inputs", "targets")}
    with self.context():
      return self._train_step.lower(self.setup.target, batch)

  def to_device(self, batch: dict) -> dict:
    """A host batch (this process's rows) as global `[B, T]` arrays on the mesh."""
    return {k: distributed.global_batch_array(np.asarray(v, np.int32), self.setup.mesh,
                                              self.setup.mesh_cfg)
            for k, v in batch.items() if k in ("inputs", "targets")}

  def step(self, batch: dict) -> dict[str, jax.Array]:
    """One optimizer update on `batch` (host or device); returns its metrics, not yet fetched."""
    with self.context():
      self.state, metrics = self._train_step(self.state, self._device(batch))
    return metrics

  def evaluate(self, batches: list[dict], n_bytes: int | None = None) -> dict[str, float]:
    """Mean loss per token over `batches`; bits per byte = total nats / (ln 2 * n_bytes) when the
    text bytes the targets stand for are given (`count_bytes`)."""
    tot, n = 0.0, 0.0
    with self.context():
      for b in batches:
        out = self._eval_step(self.state.params, self._device(b), self.state.moe_state)
        tot += float(out["loss_sum"])
        n += float(out["tokens"])
    return eval_summary(tot, n, n_bytes * jax.process_count() if n_bytes else None)

  def diagnostics(self, batch: dict) -> dict[str, Any] | None:
    """Per-site gain magnitudes and Sinkhorn errors on `batch` (`make_diagnostics`); None for
    `kind="residual"`."""
    if self._diag is None:
      return None
    with self.context():
      return self._diag(self.state.params, self._device(batch), self.state.moe_state)

  def save(self, checkpointer, step: int, data_iter, meta: dict, wait: bool = False):
    """Checkpoint `state` (taken after `step` updates) and the data iterator's position."""
    checkpointer.save(step, self.state, data_iter, meta, wait=wait)

  def _device(self, batch: dict) -> dict:
    first = next(iter(batch.values()))
    return batch if isinstance(first, jax.Array) else self.to_device(batch)


def count_bytes(tokenizer, host_batches: list[dict]) -> int:
  """Text bytes the eval targets stand for (separators excluded): the bits-per-byte denominator."""
  return int(sum(tokenizer.num_bytes(np.asarray(b["targets"])) for b in host_batches))
