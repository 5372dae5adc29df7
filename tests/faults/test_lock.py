"""One writer per run directory (case 2): a second `train` is refused naming the holder, `eval` keeps
working while the run writes, SIGTERM saves and exits, and a lock left by a dead process is taken
over with a warning."""
import json
import os
import signal
import socket

from tests.faults.conftest import (assert_clean, cli, ckpt_steps, finish, kill, records, start,
                                   train_args, wait_for)


def test_second_writer_is_refused_and_eval_works_meanwhile(corpus, tmp_path):
  run = tmp_path / "run"
  args = train_args(corpus, run, "train.checkpoint_every=5", "train.eval_every=0",
                    "train.sample_tokens=0", "train.log_every=1", steps=100000)
  proc = start(args)
  try:
    wait_for(lambda: (run / "checkpoints" / "5").is_dir(), proc, what="the first checkpoint")
    second = cli(args)
    last = assert_clean(second, 2, f"pid {proc.pid}", f"host {socket.gethostname()}")
    assert "training process is writing it" in last
    ev = cli(["eval", "--run-dir", str(run), "--batches", "1"])
    assert_clean(ev, 0)
    assert json.loads(ev.stdout.strip().splitlines()[-1])["step"] >= 5
    proc.send_signal(signal.SIGTERM)
    res = finish(proc, timeout=60)
  finally:
    kill(proc)
  last = assert_clean(res, 128 + signal.SIGTERM, "stopped by SIGTERM", "checkpoint saved")
  assert f"--run-dir {run} --resume" in last
  recs = [(r["step"], r["kind"]) for r in records(run)]
  assert len(recs) == len(set(recs))                   # no duplicated records
  assert len(os.listdir(run / "tb")) == 1

  # A lock file naming a dead process of this host: taken over with a warning.
  reached = ckpt_steps(run)[-1]
  (run / ".lock").write_text(json.dumps({"host": socket.gethostname(), "pid": 2**22 + 7,
                                         "started": "earlier"}))
  res = cli(train_args(corpus, run, steps=reached, extra=("--resume",)))
  assert_clean(res, 0, "took over the lock", f"pid {2**22 + 7}")
  assert "nothing to do" in res.stdout
