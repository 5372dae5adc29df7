"""Checkpoint saves that cannot be written end the run at once with exit 4 and one line; the previous
checkpoint stays restorable and no partial folder is left (issue 17, cases 1 and 4)."""
import signal
import subprocess
import time

import pytest

from tests.faults.conftest import (assert_clean, cli, ckpt_steps, finish, immutable, kill, start,
                                   tmp_dirs, train_args, wait_for)


def _resume_nothing_to_do(corpus, run_dir, steps):
  """`--resume` with train.steps at the reached step: restores the newest checkpoint, trains nothing."""
  res = cli(train_args(corpus, run_dir, steps=steps, extra=("--resume",)))
  assert_clean(res, 0)
  assert "nothing to do" in res.stdout, res.stdout[-2000:]
  return res


def test_unwritable_checkpoint_folder_between_saves_exits_4_at_once(corpus, tmp_path):
  run = tmp_path / "run"
  proc = start(train_args(corpus, run, "train.checkpoint_every=40", "train.eval_every=0",
                          "train.sample_tokens=0", "train.log_every=10", steps=100000))
  ckpts = run / "checkpoints"
  try:
    wait_for(lambda: (ckpts / "40").is_dir(), proc, what="the first checkpoint")
    if not immutable(ckpts, True):
      pytest.skip("chattr +i is not available here (the disk-full case covers the same path)")
    t0 = time.time()
    res = finish(proc, timeout=60)
  finally:
    immutable(ckpts, False)
    kill(proc)
  assert time.time() - t0 < 30
  last = assert_clean(res, 4)
  assert last.startswith("error: ") and str(ckpts) in last, last
  assert ckpt_steps(run)[0] == 40
  steps = ckpt_steps(run)[-1]
  res = _resume_nothing_to_do(corpus, run, steps)      # the kept checkpoint restores
  assert not tmp_dirs(run)


def test_full_disk_before_a_save_exits_4_and_keeps_the_last_checkpoint(corpus, tmp_path):
  run = tmp_path / "run"
  res = cli(train_args(corpus, run, "train.checkpoint_every=5", "train.eval_every=0",
                       "train.sample_tokens=0", steps=20), fault="disk-full", timeout=120)
  last = assert_clean(res, 4, "not enough free space")
  assert "checkpoint" in last
  assert ckpt_steps(run) == [5] and not tmp_dirs(run)


@pytest.mark.slow
def test_save_that_never_returns_hits_the_deadline(corpus, tmp_path):
  run = tmp_path / "run"
  t0 = time.time()
  res = cli(train_args(corpus, run, "train.checkpoint_every=5", "train.eval_every=0",
                       "train.sample_tokens=0", "train.save_timeout_s=3", steps=20),
            fault="hang-save", timeout=120)
  assert time.time() - t0 < 90
  assert_clean(res, 4, "did not finish within 3 s", "train.save_timeout_s")
  assert ckpt_steps(run) == [5] and not tmp_dirs(run)


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_inside_a_stuck_save_exits_within_the_stop_timeout(corpus, tmp_path, sig):
  run = tmp_path / "run"
  proc = start(train_args(corpus, run, "train.checkpoint_every=5", "train.eval_every=0",
                          "train.sample_tokens=0", "train.stop_timeout_s=3", "train.log_every=1",
                          steps=100000), fault="hang-save")
  try:
    wait_for(lambda: (run / "checkpoints" / "5").is_dir(), proc, what="the first checkpoint")
    time.sleep(1.0)                       # the second save (step 10) is now stuck
    t0 = time.time()
    proc.send_signal(sig)
    res = finish(proc, timeout=60)
  finally:
    kill(proc)
  assert time.time() - t0 < 20
  last = assert_clean(res, 128 + sig, f"stopped by {sig.name}", "no new checkpoint")
  assert "last checkpoint: step 5" in last and "--resume" in last
  assert ckpt_steps(run) == [5] and not tmp_dirs(run)
  assert not (run / ".lock").read_text()            # released on the way out


def test_tmpfs_full_disk_is_one_line_when_mounting_is_possible(corpus, tmp_path):
  disk = tmp_path / "disk"
  disk.mkdir()
  if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(disk)],
                    capture_output=True).returncode:
    pytest.skip("cannot mount a tmpfs here (test_full_disk_before_a_save covers the path)")
  try:
    run = disk / "run"
    filler = disk / "filler"
    with open(filler, "wb") as f:                        # full before the run starts
      try:
        while True:
          f.write(b"\0" * 65536)
      except OSError:
        pass
    args = train_args(corpus, run, "train.checkpoint_every=5", "train.eval_every=0",
                      "train.sample_tokens=0", "train.keep=10", steps=200)
    assert_clean(cli(args, timeout=180), 4, "No space left")
    assert not run.exists()                              # no config.json.tmp, no empty run dir
    filler.unlink()
    res = cli(args, timeout=180)                         # fills up while training
    assert_clean(res, 4)
    assert ckpt_steps(run) and not tmp_dirs(run)
  finally:
    subprocess.run(["umount", str(disk)], capture_output=True)
