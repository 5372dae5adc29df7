"""Resuming: a checkpoint of another model is a one-line mismatch, not corruption (case 9); a corrupt
one is moved aside with one line and no asyncio noise (case 26); torn metrics lines (case 19), a
partial first window (case 10), fewer steps than reached (case 22), a stop before the first step
(case 20) and changed training data (case 24)."""
import json
import os
import signal

import pytest

from tests.faults.conftest import (assert_clean, cli, ckpt_steps, finish, kill, records, start,
                                   train_args, wait_for)
from tests.train.helpers import write_corpus


def test_checkpoints_of_another_model_are_a_mismatch_not_corruption(corpus, run_copy):
  run = run_copy
  path = os.path.join(run, "config.json")
  with open(path) as f:
    cfg = json.load(f)
  cfg["model"].update(d_model=64, n_heads=4)
  with open(path, "w") as f:
    json.dump(cfg, f)
  for args in (train_args(corpus, run, "model.d_model=64", "model.n_heads=4", steps=20,
                          extra=("--resume",)),
               ["eval", "--run-dir", run]):
    res = cli(args)
    last = assert_clean(res, 2, "checkpoint step 10")
    assert "different model.d_model, model.n_heads" in last, last
  assert sorted(os.listdir(os.path.join(run, "checkpoints"))) == ["10", "5"]


def test_corrupt_checkpoint_is_one_line_and_torn_metrics_are_skipped(corpus, run_copy, tmp_path):
  run = run_copy
  for root, _, files in os.walk(os.path.join(run, "checkpoints", "10", "state")):
    for name in files:
      with open(os.path.join(root, name), "wb") as f:
        f.write(b"\x00garbage")
  with open(os.path.join(run, "metrics.jsonl"), "ab") as f:
    f.write(b'{"step": 11, "kind": "tra\xff')                 # a torn, non-UTF-8 last line
  res = cli(train_args(corpus, run, "train.log_every=4", steps=10, extra=("--resume",)))
  assert_clean(res, 0)
  for noise in ("never retrieved", "Event loop is closed", "Traceback"):
    assert noise not in res.stdout + res.stderr
  warnings = [l for l in res.stdout.splitlines() if l.startswith("warning: checkpoint")]
  assert len(warnings) == 1 and "step 10 is unusable" in warnings[0], res.stdout[-2000:]
  assert "resumed from step 5" in res.stdout
  assert os.path.isdir(os.path.join(run, "checkpoints", "10.corrupt")) and 10 in ckpt_steps(run)
  train = [r for r in records(run) if r["kind"] == "train" and r["step"] > 5]
  assert [(r["step"], r["window_steps"]) for r in train] == [(8, 3), (10, 2)]   # marked windows
  png = str(tmp_path / "p.png")
  assert_clean(cli(["plot", run, "--out", png]), 0)
  assert os.path.getsize(png) > 0


def test_resume_with_fewer_steps_than_reached_changes_nothing(corpus, run_copy):
  run = run_copy
  before = {n: open(os.path.join(run, n), "rb").read() for n in ("config.json", "metrics.jsonl")}
  res = cli(train_args(corpus, run, steps=7, extra=("--resume",)))
  assert_clean(res, 0)
  assert "nothing to do" in res.stdout and "step 10" in res.stdout
  for name, data in before.items():
    assert open(os.path.join(run, name), "rb").read() == data, name


@pytest.mark.slow
def test_stop_before_the_first_step_can_be_resumed(corpus, tmp_path):
  run = tmp_path / "run"
  args = train_args(corpus, run, "train.eval_every=0", "train.sample_tokens=0", steps=3)
  proc = start(args)
  try:
    wait_for(lambda: (run / "config.json").exists(), proc, what="config.json")
    proc.send_signal(signal.SIGTERM)
    res = finish(proc, timeout=60)
  finally:
    kill(proc)
  assert_clean(res, 128 + signal.SIGTERM, "stopped by SIGTERM")
  assert not ckpt_steps(run)
  res = cli(args + ["--resume"])
  assert_clean(res, 0)
  assert ckpt_steps(run) == [3]


@pytest.mark.slow
def test_changed_corpus_is_refused_on_resume_unless_allowed(tmp_path):
  text = write_corpus(str(tmp_path / "text"))
  corpus = (text, str(tmp_path / "cache"))
  run = tmp_path / "run"
  assert_clean(cli(train_args(corpus, run, "train.eval_every=0", "train.sample_tokens=0",
                              steps=5)), 0)
  with open(os.path.join(text, "f00.txt"), "a") as f:
    f.write("an edit after the run\n")
  res = cli(train_args(corpus, run, steps=6, extra=("--resume",)))
  last = assert_clean(res, 2, "training data changed")
  assert "--allow-data-change" in last and ckpt_steps(run) == [5]
  res = cli(train_args(corpus, run, steps=6, extra=("--resume", "--allow-data-change")))
  assert_clean(res, 0)
  assert "continuing on the new data" in res.stdout and ckpt_steps(run) == [5, 6]
