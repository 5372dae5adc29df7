"""Run directory layout, the rules for reusing one, and its lock.

    <run_dir>/.lock              held (flock) by the training process: host, pid, start time
    <run_dir>/config.json        the RunConfig (also stored in every checkpoint's `meta`)
    <run_dir>/metrics.jsonl      train / eval / diag records
    <run_dir>/tb/                TensorBoard event files
    <run_dir>/checkpoints/<step>/{state,data,meta}   Orbax checkpoints (keep-N)
    <run_dir>/eval.json          final evaluation
    <run_dir>/sample.txt         generated text at the end of training
    <run_dir>/plot.png           loss and gain curves

Reuse: an existing run directory is refused unless `--resume` (continue from its newest checkpoint, or
from step 0 when it holds none yet; the config may differ only in `train.*` and `mesh.*`, e.g. more
steps or another strategy) or `--force` (delete the files this layout names and start over; anything
else is kept and listed). Nothing is written before the config, the data and the paths are valid.
One training process writes a run directory at a time: a second one is refused, naming the holder.
"""
from __future__ import annotations

import datetime
import fcntl
import json
import os
import re
import shutil
import socket
import sys

from mhc_jax import paths
from mhc_jax.config import ConfigError
from mhc_jax import config as cfgs

CONFIG = "config.json"
METRICS = "metrics.jsonl"
CHECKPOINTS = "checkpoints"
TB = "tb"
LOCK = ".lock"
EVAL = "eval.json"          # written by the loop at the end of a run
SAMPLE = "sample.txt"       # written by `mhc-jax train` after the run
PLOT = "plot.png"
OWNED_FILES = (CONFIG, CONFIG + ".tmp", METRICS, METRICS + ".tmp", EVAL, SAMPLE, PLOT)
RESUMABLE_SECTIONS = ("train.", "mesh.")
_OWNED_IN = {TB: re.compile(r"events\.out\.tfevents\..*"),
             CHECKPOINTS: re.compile(r"\d+(\.corrupt\d*|\.orbax-checkpoint-tmp.*)?|\.write-probe-.+")}


def read_config(run_dir: str) -> cfgs.RunConfig:
  path = os.path.join(run_dir, CONFIG)
  if not os.path.isfile(path):
    raise ConfigError(f"--run-dir {run_dir!r} is not allowed: it holds no {CONFIG} (not a run directory)")
  try:
    with open(path, encoding="utf-8") as f:
      d = json.load(f)
  except (OSError, ValueError) as e:
    raise ConfigError(f"{path}: unreadable run config ({e})") from None
  return cfgs.run_config_from_dict(d)


def write_config(run_dir: str, cfg: cfgs.RunConfig):
  """Atomic write (temp file + rename); a failed write leaves no temp file behind."""
  path = os.path.join(run_dir, CONFIG)
  try:
    with open(path + ".tmp", "w", encoding="utf-8") as f:
      f.write(cfgs.to_json(cfg) + "\n")
    os.replace(path + ".tmp", path)
  except OSError:
    if os.path.exists(path + ".tmp"):
      os.remove(path + ".tmp")
    raise


def checkpoint_steps(run_dir: str) -> list[int]:
  d = os.path.join(run_dir, CHECKPOINTS)
  return sorted(int(n) for n in os.listdir(d) if n.isdigit()) if os.path.isdir(d) else []


def _entries(run_dir: str) -> list[str]:
  """The directory's entries apart from the lock file."""
  return [n for n in os.listdir(run_dir) if n != LOCK] if os.path.isdir(run_dir) else []


def check_run_dir(run_dir: str, cfg: cfgs.RunConfig, *, resume: bool, force: bool) -> str:
  """Decide what to do with `run_dir` without touching it: "fresh", "resume" or "force".

  Raises ConfigError (one line) when the directory may not be used as asked.
  """
  if resume and force:
    raise ConfigError("--resume and --force are not allowed together: resume continues a run, "
                      "force deletes it")
  paths.check_dir("--run-dir", run_dir)
  holder = lock_holder(run_dir)
  if holder:
    raise ConfigError(f"--run-dir {run_dir!r} is not allowed: a training process is writing it "
                      f"({holder}); wait for it to finish or stop it first")
  entries = _entries(run_dir)
  if not entries:
    if resume:
      raise ConfigError(f"--resume is not allowed: {run_dir!r} holds no run to resume")
    return "fresh"
  if CONFIG not in entries:
    raise ConfigError(f"--run-dir {run_dir!r} is not allowed: it is not empty and holds no {CONFIG} "
                      "(not a run directory); choose a new or empty directory")
  if force:
    _check_force(run_dir)
    return "force"
  old = read_config(run_dir)
  changed = cfgs.diff(old, cfg)
  if resume:
    fixed = [k for k in changed if not k.startswith(RESUMABLE_SECTIONS)]
    if fixed:
      raise ConfigError(f"--resume is not allowed: {run_dir!r} was trained with a different "
                        f"{', '.join(fixed)}; only train.* and mesh.* may change on resume "
                        "(use another --run-dir or --force)")
    return "resume"
  if changed:
    raise ConfigError(f"--run-dir {run_dir!r} is not allowed: it holds a run with a different config "
                      f"({', '.join(changed[:6])}{', ...' if len(changed) > 6 else ''}); "
                      "pass --resume to continue it or --force to start over")
  raise ConfigError(f"--run-dir {run_dir!r} is not allowed: it already holds this run; "
                    "pass --resume to continue it or --force to start over")


# -- --force ----------------------------------------------------------------------------------------
def _check_force(run_dir: str):
  """Refuse `--force` (before anything is deleted) where it would have to follow a symlink out of the
  run directory or delete something it cannot."""
  for name in (TB, CHECKPOINTS):
    p = os.path.join(run_dir, name)
    if os.path.islink(p):
      raise ConfigError(f"--force is not allowed: {p} is a symlink to {os.path.realpath(p)} and "
                        "--force deletes nothing outside the run directory; empty that folder "
                        "yourself, or use another --run-dir")
    if os.path.isdir(p):
      paths.check_dir("--force", p)
  paths.check_dir("--force", run_dir)


def _owned(run_dir: str) -> tuple[list[str], list[str]]:
  """(paths this layout wrote, relative names of everything else) in `run_dir`."""
  mine, kept = [], []
  for name in _entries(run_dir):
    p = os.path.join(run_dir, name)
    if name in OWNED_FILES and not os.path.isdir(p):
      mine.append(p)
    elif name in _OWNED_IN and os.path.isdir(p) and not os.path.islink(p):
      for sub in os.listdir(p):
        if _OWNED_IN[name].fullmatch(sub):
          mine.append(os.path.join(p, sub))
        else:
          kept.append(f"{name}/{sub}")
    else:
      kept.append(name)
  return mine, kept


def clear(run_dir: str) -> list[str]:
  """Delete what this layout wrote (step folders, metrics, event files, outputs, config), never
  following a symlink; returns the names of the other files, which are kept (and warned about)."""
  mine, kept = _owned(run_dir)
  for p in mine:
    if os.path.isdir(p) and not os.path.islink(p):
      shutil.rmtree(p)
    else:
      os.remove(p)
  for name in (TB, CHECKPOINTS):
    p = os.path.join(run_dir, name)
    if os.path.isdir(p) and not os.path.islink(p) and not os.listdir(p):
      os.rmdir(p)
  if kept:
    print(f"warning: --force kept {len(kept)} file(s) it did not write: "
          + ", ".join(sorted(kept)[:8]) + (", ..." if len(kept) > 8 else ""), file=sys.stderr,
          flush=True)
  return kept


# -- lock -------------------------------------------------------------------------------------------
def _read_holder(fd: int) -> dict:
  try:
    return json.loads(os.pread(fd, 4096, 0).decode("utf-8") or "{}")
  except (OSError, ValueError):
    return {}


def _describe(h: dict) -> str:
  return f"host {h.get('host', '?')}, pid {h.get('pid', '?')}, since {h.get('started', '?')}"


def lock_holder(run_dir: str) -> str | None:
  """"host H, pid P, since T" when another process holds `run_dir`'s lock, else None (a probe that
  writes nothing)."""
  path = os.path.join(run_dir, LOCK)
  try:
    fd = os.open(path, os.O_RDONLY)
  except OSError:
    return None
  try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except BlockingIOError:
    return _describe(_read_holder(fd))
  finally:
    os.close(fd)
  return None


class RunLock:
  """Exclusive `flock` on `<run_dir>/.lock` (creating the directory); `release()` on every exit.

  The kernel drops the lock when its process dies, so a lock left by a dead process on this host is
  free and taken over with a warning; one that names another host is refused (on shared storage its
  holder may still be running there)."""

  def __init__(self, run_dir: str):
    self.path = os.path.join(run_dir, LOCK)
    self.created_dir = not os.path.isdir(run_dir)
    os.makedirs(run_dir, exist_ok=True)
    self._fd: int | None = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      holder = _describe(_read_holder(self._fd))
      self._close()
      raise ConfigError(f"--run-dir {run_dir!r} is not allowed: a training process is writing it "
                        f"({holder}); wait for it to finish or stop it first") from None
    old, host = _read_holder(self._fd), socket.gethostname()
    if old and old.get("host") != host:
      self.release()
      raise ConfigError(f"--run-dir {run_dir!r} is not allowed: its lock names another machine "
                        f"({_describe(old)}); if that run is over, delete {self.path}")
    if old:
      print(f"warning: took over the lock of a process that is gone ({_describe(old)})",
            file=sys.stderr, flush=True)
    me = {"host": host, "pid": os.getpid(),
          "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    try:
      os.ftruncate(self._fd, 0)
      os.pwrite(self._fd, json.dumps(me).encode(), 0)
    except OSError:
      self.remove()
      raise

  def remove(self):
    """Release, and delete the lock file and the run directory if this lock created it and it holds
    nothing else (a start that failed on a full or broken disk leaves nothing behind)."""
    self.release()
    run_dir = os.path.dirname(self.path)
    if self.created_dir and not _entries(run_dir):
      for p, rm in ((self.path, os.remove), (run_dir, os.rmdir)):
        try:
          rm(p)
        except OSError:
          pass

  def _close(self):
    if self._fd is not None:
      os.close(self._fd)
      self._fd = None

  def release(self):
    """Empty the lock file and unlock (idempotent; safe on the way out of any exit path)."""
    if self._fd is None:
      return
    try:
      os.ftruncate(self._fd, 0)
    except OSError:
      pass
    self._close()
