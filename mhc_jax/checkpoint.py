"""Orbax checkpoints behind one small wrapper (V0 `CheckpointManager`; the one file to move to V1).

Each checkpoint `<dir>/<step>/` holds three items:
  state  the `TrainState` (params, optimizer state, step, RNG) via `StandardSave`;
  data   the Grain iterator state (`grain.checkpoint.CheckpointSave`), so the next batch is exact;
  meta   the run config and a few facts as JSON.
Saves are async (the loop keeps training while the write finishes); `wait()` before exit.
`restore_latest` walks the steps newest first; a checkpoint that is incomplete or fails to restore is
moved aside to `<step>.corrupt` with a warning and the previous good one is used.
"""
from __future__ import annotations

import logging
import os
import shutil
import time
from typing import Any

import orbax.checkpoint as ocp

log = logging.getLogger("mhc_jax.checkpoint")

_REQUIRED = ("state", "meta")


class Checkpointer:
  """`save(step, state, data_iter, meta)`, `restore_latest(target, data_iter)`, `wait()`, `close()`."""

  def __init__(self, directory: str, keep: int = 3, async_save: bool = True):
    self.directory = os.path.abspath(directory)
    self._keep = keep
    self._async = async_save
    self._mngr = self._open()

  def _open(self):
    options = ocp.CheckpointManagerOptions(max_to_keep=self._keep, create=True,
                                           enable_async_checkpointing=self._async)
    return ocp.CheckpointManager(self.directory, options=options)

  # -- save ---------------------------------------------------------------------------------------
  def save(self, step: int, state, data_iter=None, meta: dict | None = None, wait: bool = False):
    """Start saving `state` (and the data iterator) as checkpoint `step`; returns immediately."""
    import grain
    items = {"state": ocp.args.StandardSave(state),
             "meta": ocp.args.JsonSave(dict(meta or {}, step=int(step), time=time.time()))}
    if data_iter is not None:
      items["data"] = grain.checkpoint.CheckpointSave(data_iter)
    self._mngr.save(int(step), args=ocp.args.Composite(**items), force=True)
    if wait:
      self.wait()

  def wait(self):
    self._mngr.wait_until_finished()

  def close(self):
    self._mngr.wait_until_finished()
    self._mngr.close()

  # -- restore ------------------------------------------------------------------------------------
  def steps(self) -> list[int]:
    return sorted(self._mngr.all_steps())

  def latest_step(self) -> int | None:
    return self._mngr.latest_step()

  def _complete(self, step: int) -> bool:
    d = os.path.join(self.directory, str(step))
    return all(os.path.isdir(os.path.join(d, item)) for item in _REQUIRED)

  def _quarantine(self, step: int, why: str):
    src = os.path.join(self.directory, str(step))
    dst = f"{src}.corrupt"
    n = 1
    while os.path.exists(dst):
      dst, n = f"{src}.corrupt{n}", n + 1
    log.warning("checkpoint %s is unusable (%s); moved to %s, trying the previous one", src, why, dst)
    print(f"warning: checkpoint step {step} is unusable ({why}); moved aside to {dst}", flush=True)
    try:
      shutil.move(src, dst)
    except OSError:   # pragma: no cover - read-only storage: leave it, just skip it
      pass
    self._mngr.reload()

  def restore(self, step: int, target, data_iter=None) -> tuple[Any, dict]:
    """Restore checkpoint `step` into `target` (ShapeDtypeStructs with shardings); the data iterator is
    restored in place. Returns `(state, meta)`."""
    import grain
    items = {"state": ocp.args.StandardRestore(target), "meta": ocp.args.JsonRestore()}
    has_data = os.path.isdir(os.path.join(self.directory, str(step), "data"))
    if data_iter is not None and has_data:
      items["data"] = grain.checkpoint.CheckpointRestore(data_iter)
    out = self._mngr.restore(int(step), args=ocp.args.Composite(**items))
    return out["state"], dict(out["meta"] or {})

  def restore_latest(self, target, data_iter=None, quarantine: bool = True
                     ) -> tuple[Any, dict, int] | None:
    """Newest restorable checkpoint as `(state, meta, step)`, or None when there is none.

    Unusable ones are skipped with a warning; with `quarantine` (training) they are also moved aside
    so the resumed run can write that step again."""
    _check_target(target)   # a bad restore target is a config error, never a corrupt checkpoint
    skip = self._quarantine if quarantine else self._warn
    for step in reversed(self.steps()):
      if not self._complete(step):
        skip(step, "incomplete: missing " + "/".join(_REQUIRED))
        continue
      try:
        state, meta = self.restore(step, target, data_iter)
      except Exception as e:  # noqa: BLE001 - any read/parse failure means: skip this one
        skip(step, f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}")
        continue
      return state, meta, step
    return None

  def _warn(self, step: int, why: str):
    log.warning("checkpoint step %d is unusable (%s); trying the previous one", step, why)
    print(f"warning: checkpoint step {step} is unusable ({why}); skipped", flush=True)


def _check_target(target) -> None:
  """Raise `ConfigError` when a target sharding cannot hold its array (e.g. a mesh axis that does not
  divide the heads), so that `restore_latest` never mistakes a bad mesh for a corrupt checkpoint."""
  import jax
  from mhc_jax.config import ConfigError
  for path, leaf in jax.tree_util.tree_flatten_with_path(target)[0]:
    sharding = getattr(leaf, "sharding", None)
    if sharding is None or not hasattr(leaf, "shape"):
      continue
    try:
      sharding.shard_shape(tuple(leaf.shape))
    except ValueError as e:
      raise ConfigError(f"mesh={getattr(sharding, 'spec', sharding)} is not allowed for "
                        f"{jax.tree_util.keystr(path)} of shape {tuple(leaf.shape)}: {e}") from None
