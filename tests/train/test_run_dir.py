"""Run-directory rules in-process: the lock, `--force`'s clearing, failing saves (fast unit checks;
`tests/faults/` drives the same paths through the CLI)."""
import os
import threading

import jax.numpy as jnp
import pytest

from mhc_jax.checkpoint import Checkpointer, SaveFailed
from mhc_jax.config import ConfigError
from mhc_jax.train import run_dir as rd


def test_lock_is_exclusive_and_names_the_holder(tmp_path):
  d = str(tmp_path / "run")
  lock = rd.RunLock(d)
  assert rd.lock_holder(d) and f"pid {os.getpid()}" in rd.lock_holder(d)
  with pytest.raises(ConfigError, match=f"pid {os.getpid()}"):
    rd.RunLock(d)
  lock.release()
  assert rd.lock_holder(d) is None and open(os.path.join(d, rd.LOCK)).read() == ""
  rd.RunLock(d).release()


def test_clear_removes_only_what_training_writes(tmp_path):
  d = tmp_path / "run"
  for rel in ("config.json", "metrics.jsonl", "plot.png", "notes.txt", "tb/events.out.tfevents.1",
              "tb/mine.txt", "checkpoints/5/state/x", "checkpoints/7.corrupt/x",
              "checkpoints/9.orbax-checkpoint-tmp/x", "checkpoints/keep.txt"):
    (d / rel).parent.mkdir(parents=True, exist_ok=True)
    (d / rel).write_text("x")
  kept = rd.clear(str(d))
  assert sorted(kept) == ["checkpoints/keep.txt", "notes.txt", "tb/mine.txt"]
  left = sorted(str(p.relative_to(d)) for p in d.rglob("*") if p.is_file())
  assert left == ["checkpoints/keep.txt", "notes.txt", "tb/mine.txt"]


def test_failed_background_write_surfaces_at_the_next_poll(tmp_path, monkeypatch):
  ckpt = Checkpointer(str(tmp_path / "ck"), keep=2, save_timeout_s=30)
  state = {"w": jnp.ones((4,))}
  ckpt.save(1, state, wait=True)
  assert ckpt.steps() == [1]

  real = ckpt._mngr.wait_until_finished

  def broken():                                   # the background write of step 2 fails
    real()
    if threading.current_thread().name == "mhc-save-finish":
      raise OSError(28, "No space left on device")
  monkeypatch.setattr(ckpt._mngr, "wait_until_finished", broken)
  ckpt.save(2, state)
  with pytest.raises(SaveFailed, match="step 2 failed: OSError"):
    ckpt.wait()
  assert ckpt.broken and not [n for n in os.listdir(ckpt.directory) if "tmp" in n]
  ckpt.close()                                      # returns at once after a failure
