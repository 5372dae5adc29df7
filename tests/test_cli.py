"""`mhc-jax` command line: each bad input gives one clear line and a non-zero exit, nothing written;
SIGTERM to a real training subprocess saves a checkpoint and the resumed run repeats the losses of an
uninterrupted one exactly (the issue's "2k steps" scaled down to 150 tiny steps)."""
import os
import signal
import subprocess
import sys
import time

import pytest

from mhc_jax import cli
from mhc_jax.train import train
from mhc_jax.train.metrics import read_jsonl
from tests.train.helpers import tiny_args, tiny_config, write_corpus

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  root = tmp_path_factory.mktemp("cli_corpus")
  return write_corpus(str(root / "text")), str(root / "cache")


def _run_cli(argv, capsys):
  """Exit code and the `error:` lines of stderr (informational lines, e.g. a corpus build, aside)."""
  rc = cli.main(argv)
  err = [l for l in capsys.readouterr().err.strip().splitlines() if not l.startswith("mhc_jax.data:")]
  return rc, err


@pytest.mark.parametrize("extra, words", [
    (["--preset", "nope"], ["--preset 'nope'", "default"]),
    (["--preset", "tiny", "--set", "model.widht=3"], ["widht", "unknown key"]),
    (["--preset", "tiny", "--set", "train.steps=ten"], ["train.steps", "'ten'", "integer"]),
    (["--preset", "tiny", "--set", "model.connection.kind=lstm"], ["connection.kind", "'lstm'"]),
    (["--preset", "tiny", "--set", "data.path=/no/such/dir"], ["data.path", "/no/such/dir"]),
])
def test_bad_config_input_is_one_line_and_writes_nothing(extra, words, tmp_path, capsys):
  run_dir = tmp_path / "run"
  rc, err = _run_cli(["train", *extra, "--run-dir", str(run_dir)], capsys)
  assert rc == 2
  assert len(err) == 1 and err[0].startswith("error: "), err
  for w in words:
    assert w in err[0], (w, err)
  assert not run_dir.exists()


def test_empty_corpus_and_seq_len_longer_than_data(tmp_path, capsys):
  empty = tmp_path / "empty"
  empty.mkdir()
  (empty / "a.txt").write_text("")
  (empty / "b.txt").write_text("")
  cache = str(tmp_path / "cache")
  rc, err = _run_cli(["train", *tiny_args(str(empty), cache), "--run-dir", str(tmp_path / "r1")],
                     capsys)
  assert rc == 2 and len(err) == 1 and "empty corpus" in err[0], err
  small = tmp_path / "small"
  small.mkdir()
  for i in range(5):
    (small / f"{i}.txt").write_text("ab\n")
  rc, err = _run_cli(["train", *tiny_args(str(small), cache), "--run-dir", str(tmp_path / "r2")],
                     capsys)
  assert rc == 2 and len(err) == 1 and "data.seq_len" in err[0], err
  assert not (tmp_path / "r1").exists() and not (tmp_path / "r2").exists()


def test_run_dir_with_a_different_config_is_refused(corpus, tmp_path, capsys):
  d = tmp_path / "run"
  d.mkdir()
  from mhc_jax.train import run_dir as rd
  rd.write_config(str(d), tiny_config(*corpus, "train.steps=7"))
  before = (d / "config.json").read_text()
  rc, err = _run_cli(["train", *tiny_args(*corpus), "--run-dir", str(d)], capsys)
  assert rc == 2 and len(err) == 1 and "different config (train.steps)" in err[0], err
  assert "--resume" in err[0] and "--force" in err[0]
  assert sorted(os.listdir(d)) == ["config.json"] and (d / "config.json").read_text() == before


def test_resume_without_run_dir_and_missing_tool_modules(capsys):
  rc, err = _run_cli(["train", "--resume"], capsys)
  assert rc == 2 and "--resume needs --run-dir" in err[0]
  for argv, name in ((["bench", "kernels"], "mhc_jax.tools.bench_kernels"),
                     (["compare-sharding"], "mhc_jax.tools.compare_sharding")):
    try:
      __import__(name)
    except ModuleNotFoundError:
      rc, err = _run_cli(argv, capsys)
      assert rc == 2 and "not available" in err[0], err


def test_show_config_and_module_entry_point(capsys):
  assert cli.main(["show-config", "--preset", "tiny", "--set", "train.steps=3"]) == 0
  assert '"steps": 3' in capsys.readouterr().out
  out = subprocess.run([sys.executable, "-m", "mhc_jax", "--help"], capture_output=True, text=True,
                       cwd=REPO, timeout=120)
  assert out.returncode == 0 and "train" in out.stdout and "sample" in out.stdout
  assert "exit status:" in out.stdout and "4         a checkpoint save" in out.stdout


def _train_losses(run_dir):
  return {r["step"]: r["loss"] for r in read_jsonl(os.path.join(run_dir, "metrics.jsonl"))
          if r["kind"] == "train"}


@pytest.mark.slow
def test_sigterm_saves_and_resume_gives_identical_losses(corpus, tmp_path):
  steps = 150
  over = (f"train.steps={steps}", "train.warmup_steps=10", "train.eval_every=0",
          "train.checkpoint_every=0", "train.sample_tokens=0", "train.log_every=1")
  ref = str(tmp_path / "straight")
  train(tiny_config(*corpus, *over), ref, progress=False)
  straight = _train_losses(ref)
  assert sorted(straight) == list(range(1, steps + 1))

  run = str(tmp_path / "killed")
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
  proc = subprocess.Popen([sys.executable, "-m", "mhc_jax", "train", *tiny_args(*corpus, *over),
                           "--run-dir", run, "--no-progress"], cwd=REPO, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  metrics = os.path.join(run, "metrics.jsonl")
  deadline = time.time() + 300
  while time.time() < deadline and proc.poll() is None:
    if os.path.exists(metrics) and any(r["kind"] == "train" and r["step"] >= 3
                                       for r in read_jsonl(metrics)):
      break
    time.sleep(0.05)
  assert proc.poll() is None, proc.communicate()[0][-3000:]
  proc.send_signal(signal.SIGTERM)
  out = proc.communicate(timeout=300)[0]
  assert proc.returncode == 128 + signal.SIGTERM, out[-3000:]
  assert "stopped by SIGTERM at step" in out and "checkpoint saved" in out
  ckpts = sorted(int(n) for n in os.listdir(os.path.join(run, "checkpoints")) if n.isdigit())
  assert len(ckpts) == 1 and 3 <= ckpts[0] < steps
  assert max(_train_losses(run)) <= ckpts[0]

  train(tiny_config(*corpus, *over), run, resume=True, progress=False)
  resumed = _train_losses(run)
  assert sorted(resumed) == list(range(1, steps + 1))
  diffs = [s for s in resumed if resumed[s] != straight[s]]
  assert not diffs, [(s, resumed[s], straight[s]) for s in diffs[:5]]
