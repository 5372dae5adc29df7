"""Fault-injection suite: the real `python -m mhc_jax` CLI in subprocesses with short timeouts.

Every case asserts the exit status, at most two lines on stderr (no traceback) and what is on disk
afterwards. `driver.py` runs the same CLI with one fault installed (a save that hangs, a full disk)
where the machine cannot produce the fault for real.
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from tests.train.helpers import write_corpus

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TIMEOUT = 240


_JAX_CACHE: dict = {}


def env() -> dict:
  """The subprocesses' environment: one CPU device, and a compilation cache shared by the suite
  (the tiny model's compiles are most of a run's time)."""
  out = dict(os.environ, JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES="1", PYTHONPATH=REPO,
             PYTHONUNBUFFERED="1")
  if "dir" in _JAX_CACHE:
    out.update(JAX_COMPILATION_CACHE_DIR=_JAX_CACHE["dir"], JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
  return out


@pytest.fixture(scope="session", autouse=True)
def _jax_cache(tmp_path_factory):
  _JAX_CACHE["dir"] = str(tmp_path_factory.mktemp("jax_cache"))
  yield
  _JAX_CACHE.clear()


def train_args(corpus, run_dir, *overrides, steps=10, extra=()):
  """A `tiny` run on the suite's corpus; no progress bar."""
  text, cache = corpus
  out = ["train", "--preset", "tiny", "--set", f"data.path={text}", "--set", f"data.data_dir={cache}",
         "--set", f"train.steps={steps}", "--run-dir", str(run_dir), "--no-progress", *extra]
  for o in overrides:
    out += ["--set", o]
  return out


def _cmd(args, fault=None):
  if fault:
    return [sys.executable, "-m", "tests.faults.driver", fault, *args]
  return [sys.executable, "-m", "mhc_jax", *args]


def cli(args, timeout=TIMEOUT, fault=None, **kw) -> subprocess.CompletedProcess:
  return subprocess.run(_cmd(args, fault), cwd=REPO, env=kw.pop("env", env()), capture_output=True,
                        text=True, errors="replace", timeout=timeout, **kw)


def start(args, fault=None) -> subprocess.Popen:
  return subprocess.Popen(_cmd(args, fault), cwd=REPO, env=env(), stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, errors="replace")


def finish(proc, timeout=TIMEOUT) -> subprocess.CompletedProcess:
  out, err = proc.communicate(timeout=timeout)
  return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def wait_for(pred, proc=None, timeout=TIMEOUT, what="condition"):
  """Poll `pred()` until true; fail early if `proc` exits first."""
  deadline = time.time() + timeout
  while time.time() < deadline:
    if pred():
      return
    if proc is not None and proc.poll() is not None:
      out, err = proc.communicate()
      pytest.fail(f"process exited ({proc.returncode}) before {what}:\n{out[-2000:]}\n{err[-2000:]}")
    time.sleep(0.05)
  pytest.fail(f"timed out waiting for {what}")


def stderr_lines(res) -> list[str]:
  """Lines of stderr apart from the informational corpus-build lines."""
  return [l for l in res.stderr.strip().splitlines() if l.strip() and not l.startswith("mhc_jax.data:")]


def assert_clean(res, code: int, *words: str) -> str:
  """Exit status `code`, at most two stderr lines, no traceback; returns the last stderr line."""
  lines = stderr_lines(res)
  assert res.returncode == code, (res.returncode, res.stdout[-2000:], res.stderr[-3000:])
  assert "Traceback" not in res.stderr and "Traceback" not in res.stdout, res.stderr[-3000:]
  assert len(lines) <= 2, lines[:10]
  last = lines[-1] if lines else ""
  for w in words:
    assert w in res.stderr, (w, res.stderr[-2000:])
  return last


def ckpt_steps(run_dir) -> list[int]:
  d = os.path.join(run_dir, "checkpoints")
  return sorted(int(n) for n in os.listdir(d) if n.isdigit()) if os.path.isdir(d) else []


def tmp_dirs(run_dir) -> list[str]:
  d = os.path.join(run_dir, "checkpoints")
  return [n for n in os.listdir(d) if "tmp" in n] if os.path.isdir(d) else []


def records(run_dir) -> list[dict]:
  with open(os.path.join(run_dir, "metrics.jsonl")) as f:
    return [json.loads(l) for l in f if l.strip()]


def immutable(path, on: bool) -> bool:
  """`chattr +i/-i` (works for root, unlike chmod); False when the file system refuses."""
  if shutil.which("chattr") is None:
    return False
  return subprocess.run(["chattr", "+i" if on else "-i", str(path)], capture_output=True).returncode == 0


def kill(proc):
  if proc.poll() is None:
    proc.send_signal(signal.SIGKILL)
    proc.communicate()


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
  root = tmp_path_factory.mktemp("faults_corpus")
  return write_corpus(str(root / "text")), str(root / "cache")


@pytest.fixture(scope="session")
def base_run(corpus, tmp_path_factory):
  """A finished 10-step tiny run with checkpoints at 5 and 10 (copy it before changing it)."""
  d = tmp_path_factory.mktemp("faults_base") / "run"
  res = cli(train_args(corpus, d, "train.checkpoint_every=5", "train.eval_every=5",
                       "train.sample_tokens=0"))
  assert res.returncode == 0, res.stderr[-3000:]
  assert ckpt_steps(d) == [5, 10]
  return str(d)


@pytest.fixture
def run_copy(base_run, tmp_path):
  d = tmp_path / "run"
  shutil.copytree(base_run, d)
  return str(d)
