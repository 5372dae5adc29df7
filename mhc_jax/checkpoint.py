"""Orbax checkpoints behind one small wrapper (V0 `CheckpointManager`; the one file to move to V1).

Each checkpoint `<dir>/<step>/` holds three items:
  state  the `TrainState` (params, optimizer state, step, RNG) via `StandardSave`;
  data   the Grain iterator state (`grain.checkpoint.CheckpointSave`), so the next batch is exact;
  meta   the run config and a few facts as JSON.
Saves are async (the loop keeps training while the write finishes); `wait()` before exit.

Saves fail fast: before each save the folder must take a probe file and hold free space for one more
checkpoint; the blocking part of a save and its background write each have a deadline
(`save_timeout_s`), and an error in the background write is noticed at the next `poll()`. Any of these
raises `SaveFailed` after removing the partial `<step>.orbax-checkpoint-tmp`; earlier checkpoints are
untouched.

`restore_latest` walks the steps newest first. A checkpoint whose stored config does not match
(`check_meta` raises `ConfigError`) stops the walk with that one line, nothing moved. One that is
incomplete or fails to restore is moved aside to `<step>.corrupt` with a one-line warning and the
previous good one is used.
"""
from __future__ import annotations

import contextlib
import errno
import gc
import json
import logging
import os
import shutil
import socket
import threading
import time
from typing import Any, Callable

import grain
import jax
import orbax.checkpoint as ocp

from mhc_jax.config import ConfigError

log = logging.getLogger("mhc_jax.checkpoint")

_REQUIRED = ("state", "meta")
TMP_SUFFIX = ".orbax-checkpoint-tmp"
_POLL_S = 0.05


class SaveFailed(RuntimeError):
  """A checkpoint could not be written (in time); the previous checkpoints are kept."""


def _first_line(e: BaseException) -> str:
  text = str(e).strip()
  return f"{type(e).__name__}: {text.splitlines()[0][:200]}" if text else type(e).__name__


def _run_with_deadline(fn: Callable[[], Any], timeout_s: float, what: str):
  """`fn()` on a daemon thread; the caller waits at most `timeout_s` (signal handlers still run)."""
  box: dict = {}

  def target():
    try:
      box["out"] = fn()
    except BaseException as e:  # noqa: BLE001 - re-raised on the caller's thread
      box["err"] = e

  th = threading.Thread(target=target, name=f"mhc-{what}", daemon=True)
  th.start()
  deadline = time.monotonic() + timeout_s
  while th.is_alive():
    if time.monotonic() > deadline:
      raise SaveFailed(f"{what} did not finish within {timeout_s:g} s (train.save_timeout_s)")
    th.join(_POLL_S)
  if "err" in box:
    raise SaveFailed(f"{what} failed: {_first_line(box['err'])}") from None
  return box.get("out")


def dir_size(path: str) -> int:
  """Bytes of the regular files under `path` (0 when it does not exist)."""
  total = 0
  for root, _, files in os.walk(path):
    for name in files:
      with contextlib.suppress(OSError):
        total += os.lstat(os.path.join(root, name)).st_size
  return total


class Checkpointer:
  """`save(step, state, data_iter, meta)`, `poll()`, `wait()`, `restore_latest(target, data_iter)`,
  `close()`."""

  def __init__(self, directory: str, keep: int = 3, async_save: bool = True,
               save_timeout_s: float = 300.0):
    self.directory = os.path.abspath(directory)
    self._keep = keep
    self._async = async_save
    self.save_timeout_s = float(save_timeout_s)
    self._mngr = self._open()
    self._pending: tuple[int, float, threading.Thread, dict] | None = None
    self.broken = False

  def _open(self):
    options = ocp.CheckpointManagerOptions(max_to_keep=self._keep, create=True,
                                           enable_async_checkpointing=self._async)
    return ocp.CheckpointManager(self.directory, options=options)

  # -- save ---------------------------------------------------------------------------------------
  def preflight(self):
    """Raise `SaveFailed` unless the folder takes a new file and has room for one more checkpoint."""
    probe = os.path.join(self.directory, f".write-probe-{socket.gethostname()}-{os.getpid()}")
    try:
      if not os.path.isdir(self.directory):
        raise FileNotFoundError(errno.ENOENT, "the checkpoint folder is gone", self.directory)
      with open(probe, "wb") as f:
        f.write(b"0")
      os.remove(probe)
    except OSError as e:
      with contextlib.suppress(OSError):
        os.remove(probe)
      raise SaveFailed(f"cannot write to {self.directory} "
                       f"({e.strerror or type(e).__name__})") from None
    latest = self.latest_step()
    need = dir_size(os.path.join(self.directory, str(latest))) if latest is not None else 0
    st = os.statvfs(self.directory)
    free = st.f_bavail * st.f_frsize
    if need and free < need * 1.1:
      raise SaveFailed(f"not enough free space in {self.directory}: {free} bytes free, the last "
                       f"checkpoint took {need} bytes")

  def save(self, step: int, state, data_iter=None, meta: dict | None = None, wait: bool = False):
    """Start saving `state` (and the data iterator) as checkpoint `step`; returns once the state is
    copied off the devices. Raises `SaveFailed` (partial folder removed)."""
    self.wait()
    self.preflight()
    items = {"state": ocp.args.StandardSave(state),
             "meta": ocp.args.JsonSave(dict(meta or {}, step=int(step), time=time.time()))}
    if data_iter is not None:
      items["data"] = grain.checkpoint.CheckpointSave(data_iter)
    args = ocp.args.Composite(**items)
    t0 = time.monotonic()
    try:
      _run_with_deadline(lambda: self._mngr.save(int(step), args=args, force=True),
                         self.save_timeout_s, f"checkpoint save of step {step}")
    except SaveFailed:
      self._fail(step)
      raise
    box: dict = {}

    def finish():
      try:
        self._mngr.wait_until_finished()
      except BaseException as e:  # noqa: BLE001 - reported by poll()/wait() on the main thread
        box["err"] = e

    th = threading.Thread(target=finish, name="mhc-save-finish", daemon=True)
    th.start()
    self._pending = (int(step), t0, th, box)
    if wait:
      self.wait()

  def poll(self):
    """Raise `SaveFailed` now if the background write failed or ran past its deadline."""
    if self._pending is None:
      return
    step, t0, th, box = self._pending
    if th.is_alive():
      if time.monotonic() - t0 > self.save_timeout_s:
        self._fail(step)
        raise SaveFailed(f"checkpoint save of step {step} did not finish within "
                         f"{self.save_timeout_s:g} s (train.save_timeout_s)")
      return
    self._pending = None
    if "err" in box:
      self._fail(step)
      raise SaveFailed(f"checkpoint save of step {step} failed: {_first_line(box['err'])}")
    if not os.path.isdir(os.path.join(self.directory, str(step))):
      self._fail(step)
      raise SaveFailed(f"checkpoint save of step {step} failed: {self.directory}/{step} is missing")

  def wait(self):
    """Block until the pending save is written (or raise `SaveFailed`)."""
    while self._pending is not None:
      self.poll()
      if self._pending is not None:
        self._pending[2].join(_POLL_S)

  def _fail(self, step: int):
    self.broken = True
    self._pending = None
    self.remove_partial()

  def remove_partial(self):
    """Delete the `*.orbax-checkpoint-tmp` folders a failed or cut-short save left behind."""
    with contextlib.suppress(OSError):
      for name in os.listdir(self.directory):
        if name.endswith(TMP_SUFFIX):
          shutil.rmtree(os.path.join(self.directory, name), ignore_errors=True)

  def close(self):
    """Wait for the pending save and release Orbax; after a failed save, release nothing that
    could block (the process is about to exit)."""
    if self.broken:
      return
    try:
      self.wait()
    finally:
      if not self.broken:
        self._mngr.close()

  # -- restore ------------------------------------------------------------------------------------
  def steps(self) -> list[int]:
    return sorted(self._mngr.all_steps())

  def latest_step(self) -> int | None:
    steps = self.steps()
    return steps[-1] if steps else None

  def _complete(self, step: int) -> bool:
    d = os.path.join(self.directory, str(step))
    return all(os.path.isdir(os.path.join(d, item)) for item in _REQUIRED)

  def read_meta(self, step: int) -> dict | None:
    """The `meta` JSON stored with checkpoint `step`, or None when unreadable."""
    try:
      with open(os.path.join(self.directory, str(step), "meta", "metadata"), encoding="utf-8") as f:
        meta = json.load(f)
    except (OSError, ValueError):
      return None
    return meta if isinstance(meta, dict) else None

  def _quarantine(self, step: int, why: str):
    src = os.path.join(self.directory, str(step))
    dst = f"{src}.corrupt"
    n = 1
    while os.path.exists(dst):
      dst, n = f"{src}.corrupt{n}", n + 1
    log.info("checkpoint %s is unusable (%s); moved to %s", src, why, dst)
    print(f"warning: checkpoint step {step} is unusable ({why}); moved aside to {dst}", flush=True)
    try:
      shutil.move(src, dst)
    except OSError:   # pragma: no cover - read-only storage: leave it, just skip it
      pass
    self._mngr.reload()

  def restore(self, step: int, target, data_iter=None) -> tuple[Any, dict]:
    """Restore checkpoint `step` into `target` (ShapeDtypeStructs with shardings); the data iterator is
    restored in place. Returns `(state, meta)`."""
    items = {"state": ocp.args.StandardRestore(target), "meta": ocp.args.JsonRestore()}
    has_data = os.path.isdir(os.path.join(self.directory, str(step), "data"))
    if data_iter is not None and has_data:
      items["data"] = grain.checkpoint.CheckpointRestore(data_iter)
    with quiet_async_noise():
      out = self._mngr.restore(int(step), args=ocp.args.Composite(**items))
    return out["state"], dict(out["meta"] or {})

  def restore_latest(self, target, data_iter=None, quarantine: bool = True,
                     check_meta: Callable[[int, dict], None] | None = None
                     ) -> tuple[Any, dict, int] | None:
    """Newest restorable checkpoint as `(state, meta, step)`, or None when there is none.

    `check_meta(step, meta)` raises `ConfigError` for a checkpoint of another run (e.g. another model
    shape): that error propagates and nothing is moved. Unusable ones are skipped with a warning;
    with `quarantine` (training) they are also moved aside so the resumed run can write that step
    again."""
    _check_target(target)   # a bad restore target is a config error, never a corrupt checkpoint
    skip = self._quarantine if quarantine else self._warn
    for step in reversed(self.steps()):
      if not self._complete(step):
        skip(step, "incomplete: missing " + "/".join(_REQUIRED))
        continue
      meta = self.read_meta(step)
      if meta is None:
        skip(step, "its meta item is unreadable")
        continue
      if check_meta is not None:
        check_meta(step, meta)
      try:
        state, meta = self.restore(step, target, data_iter)
      except Exception as e:  # noqa: BLE001 - any read/parse failure means: skip this one
        skip(step, _first_line(e))
        continue
      return state, meta, step
    return None

  def _warn(self, step: int, why: str):
    log.info("checkpoint step %d is unusable (%s)", step, why)
    print(f"warning: checkpoint step {step} is unusable ({why}); skipped", flush=True)


class _DropAll(logging.Filter):
  def filter(self, record):
    return False


@contextlib.contextmanager
def quiet_async_noise():
  """Silence asyncio's "exception was never retrieved" / "Event loop is closed" reports that
  TensorStore futures of a failed read produce (the caller reports the failure in one line)."""
  logger, drop = logging.getLogger("asyncio"), _DropAll()
  logger.addFilter(drop)
  try:
    yield
  finally:
    gc.collect()          # let abandoned futures report now, while the filter holds
    logger.removeFilter(drop)


def _check_target(target) -> None:
  """Raise `ConfigError` when a target sharding cannot hold its array (e.g. a mesh axis that does not
  divide the heads), so that `restore_latest` never mistakes a bad mesh for a corrupt checkpoint."""
  for path, leaf in jax.tree_util.tree_flatten_with_path(target)[0]:
    sharding = getattr(leaf, "sharding", None)
    if sharding is None or not hasattr(leaf, "shape"):
      continue
    try:
      sharding.shard_shape(tuple(leaf.shape))
    except ValueError as e:
      raise ConfigError(f"mesh={getattr(sharding, 'spec', sharding)} is not allowed for "
                        f"{jax.tree_util.keystr(path)} of shape {tuple(leaf.shape)}: {e}") from None
