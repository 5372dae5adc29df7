"""Every path, number and prompt checked before any work: one line, exit 2, nothing written
(cases 5-7, 11-18, 21, 23, 25)."""
import os
import shlex
import shutil
import time

import pytest

from mhc_jax.train.loop import resume_command
from tests.faults.conftest import (assert_clean, cli, env, finish, immutable, kill, start,
                                   train_args, wait_for)


def _bad_train(corpus, tmp_path):
  f = tmp_path / "a_file"
  f.write_text("x")
  return [
      (["--run-dir", "/proc/mhc_run"], "/proc"),
      (["--run-dir", str(f / "run")], "is a file, not a directory"),
      (["--run-dir", str(tmp_path / ("x" * 300))], "longer than 255 bytes"),
      (["--set", "data.batch_size=10000000"], "data.batch_size"),
      (["--set", "data.val_fraction=0"], "data.val_fraction"),
      (["--set", "train.sample_prompt=" + "def f():" * 5], "train.sample_prompt"),
      (["--set", "train.seed=" + str(2**70)], "train.seed"),
  ]


def test_bad_train_inputs_are_one_line_before_any_write(corpus, tmp_path):
  for extra, word in _bad_train(corpus, tmp_path):
    run = tmp_path / "run"
    args = train_args(corpus, run, steps=3)
    if extra[0] == "--run-dir":
      args[args.index("--run-dir") + 1] = extra[1]
    else:
      args += extra
    res = cli(args, timeout=120)
    last = assert_clean(res, 2, word)
    assert last.startswith("error: "), last
    assert not run.exists(), extra


def test_bad_sample_eval_plot_numbers_and_paths(base_run, tmp_path):
  cases = [
      (["sample", "--run-dir", base_run, "--temperature", "nan"], "--temperature=nan"),
      (["sample", "--run-dir", base_run, "--temperature", "inf"], "--temperature=inf"),
      (["sample", "--run-dir", base_run, "--seed", str(2**70)], "--seed"),
      (["sample", "--run-dir", base_run, "--seed", "-1"], "--seed=-1"),
      (["eval", "--run-dir", base_run, "--batches", "0"], "--batches=0"),
      (["plot", "/etc/passwd", "--out", str(tmp_path / "p.png")], "no metric records"),
      (["plot", base_run, "--out", "/proc/p.png"], "--out"),
      (["plot", base_run, "--out", str(tmp_path / "p.txt")], ".png"),
      (["bench", "step", "--out", "/proc/b.json"], "--out"),
      (["compare-sharding", "--out", "/proc/cs"], "--out"),
      (["compare-sharding", "--merge", "/etc/hostname", "--out", str(tmp_path / "m")], "--merge"),
      (["compare-sharding", "--strategies", ","], "--strategies"),
      (["compare-sharding", "--steps", "-1"], "--steps=-1"),
      (["compare-sharding", "--cpu-devices", "-4"], "--cpu-devices=-4"),
      (["compare-sharding", "--no-plot", "--out", str(tmp_path / "cs")], "pass --cpu-devices 8"),
  ]
  for argv, word in cases:
    res = cli(argv, timeout=120)
    assert_clean(res, 2, word)
  assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("platform", ["tpu", "cuda"])
def test_missing_accelerator_is_one_line(base_run, platform):
  res = cli(["eval", "--run-dir", base_run], env=dict(env(), JAX_PLATFORMS=platform), timeout=120)
  last = assert_clean(res, 2, f"JAX_PLATFORMS='{platform}'")
  assert "cpu" in last


def test_sample_defaults_fit_the_model_and_prompts_may_be_any_bytes(base_run, tmp_path):
  res = cli(["sample", "--run-dir", base_run])              # 200 tokens would not fit in 32
  assert_clean(res, 0)
  res = cli([b"sample", b"--run-dir", os.fsencode(base_run), b"--prompt", b"\xff\xfe",
             b"--tokens", b"4"])
  assert_clean(res, 0)
  assert res.stdout.startswith("\ufffd\ufffd")
  res = cli(["sample", "--run-dir", base_run, "--prompt", "x" * 40])
  assert_clean(res, 2, "--prompt", "model.max_seq_len=32")
  out = tmp_path / "dir"
  out.mkdir()
  assert_clean(cli(["plot", base_run, "--out", str(out) + "/"]), 0)
  assert os.listdir(out) == ["plot.png"]


def test_read_only_run_dir_on_resume(corpus, run_copy):
  if not immutable(run_copy, True):
    pytest.skip("chattr +i is not available here")
  try:
    res = cli(train_args(corpus, run_copy, steps=20, extra=("--resume",)))
  finally:
    immutable(run_copy, False)
  assert_clean(res, 2, "is not writable")


def test_resume_command_is_shell_quoted():
  d = "/tmp/my runs/$HOME's"
  cmd = resume_command(d)
  assert shlex.split(cmd) == ["mhc-jax", "train", "--run-dir", d, "--resume"]


@pytest.mark.slow
def test_run_dir_deleted_while_training_stops_with_exit_4(corpus, tmp_path):
  run = tmp_path / "run"
  proc = start(train_args(corpus, run, "train.checkpoint_every=50", "train.eval_every=0",
                          "train.sample_tokens=0", "train.log_every=1", steps=100000))
  try:
    wait_for(lambda: (run / "metrics.jsonl").exists() and os.path.getsize(run / "metrics.jsonl"),
             proc, what="the first metrics")
    os.rename(run, tmp_path / "moved")
    shutil.rmtree(tmp_path / "moved")
    t0 = time.time()
    res = finish(proc, timeout=60)
  finally:
    kill(proc)
  assert time.time() - t0 < 20
  last = assert_clean(res, 4, "was deleted or replaced")
  assert "--resume" not in last
