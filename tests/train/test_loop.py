"""End-to-end training on a tiny generated corpus (in-process): the loss falls, run-dir layout,
checkpoint/eval/sample/plot commands, corrupt-checkpoint skipping, NaN stop, run-dir refusals."""
import glob
import json
import os
import shutil

import pytest

from mhc_jax import cli
from mhc_jax.config import ConfigError
from mhc_jax.train import TrainingDiverged, train
from mhc_jax.train.loop import open_data
from mhc_jax.train.metrics import read_jsonl
from tests.train.helpers import tiny_args, tiny_config

pytestmark = pytest.mark.slow


def _losses(run_dir, kind="train"):
  return {r["step"]: r["loss"] for r in read_jsonl(os.path.join(run_dir, "metrics.jsonl"))
          if r["kind"] == kind}


def _ckpt_steps(run_dir):
  return sorted(int(n) for n in os.listdir(os.path.join(run_dir, "checkpoints")) if n.isdigit())


@pytest.fixture(scope="module")
def run(corpus, tmp_path_factory):
  """A finished 20-step tiny run with checkpoints at 5, 10, 15, 20."""
  d = str(tmp_path_factory.mktemp("runs") / "base")
  cfg = tiny_config(*corpus, "train.keep=10")
  result = train(cfg, d, progress=False)
  cli.finish(result)          # `mhc-jax train` writes sample.txt and plot.png after the run
  return d, cfg, result


def test_tiny_run_trains_and_writes_its_layout(run):
  d, cfg, summary = run
  losses = _losses(d)
  assert sorted(losses) == list(range(1, 21))
  first, last = losses[1], sum(losses[s] for s in (18, 19, 20)) / 3
  assert last < first - 1.0, (first, last)
  ev = _losses(d, "eval")
  assert sorted(ev) == [0, 10, 20] and ev[20] < ev[0] - 1.0
  for name in ("config.json", "eval.json", "sample.txt", "plot.png"):
    assert os.path.getsize(os.path.join(d, name)) > 0, name
  assert glob.glob(os.path.join(d, "tb", "events.out.tfevents.*"))
  assert _ckpt_steps(d) == [5, 10, 15, 20]
  with open(os.path.join(d, "config.json")) as f:
    assert json.load(f)["model"]["connection"]["kind"] == "mhc"
  recs = read_jsonl(os.path.join(d, "metrics.jsonl"))
  diag = [r for r in recs if r["kind"] == "diag"]
  assert [r["step"] for r in diag] == [0, 10, 20]
  assert len(diag[0]["gain/composite_fwd_max/sites"]) == cfg.model.n_sites
  tr = [r for r in recs if r["kind"] == "train"][-1]
  for key in ("lr", "grad_norm", "grad_norm_layers", "tokens_per_s", "step_time_s", "bits_per_byte",
              "perplexity"):
    assert key in tr, key
  assert summary.eval["loss"] == pytest.approx(ev[20])
  assert summary.step == 20 and summary.trainer.step_count == 20     # the final state, in memory
  _, _, evals = open_data(cfg)
  assert summary.trainer.evaluate(evals)["loss"] == pytest.approx(ev[20], rel=1e-5)
  with open(os.path.join(d, "sample.txt")) as f:
    assert f.read().startswith(cfg.train.sample_prompt)


def test_eval_sample_and_plot_commands(run, capsys, tmp_path):
  d, cfg, summary = run
  assert cli.main(["eval", "--run-dir", d]) == 0
  out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert out["step"] == 20
  assert out["loss"] == pytest.approx(summary.eval["loss"], rel=1e-5)
  assert cli.main(["eval", "--run-dir", d, "--step", "5", "--split", "train", "--batches", "1"]) == 0
  assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["step"] == 5
  assert cli.main(["sample", "--run-dir", d, "--prompt", "def f", "--tokens", "8",
                   "--temperature", "0"]) == 0
  text = capsys.readouterr().out
  assert text.startswith("def f") and len(text.rstrip("\n")) >= len("def f")
  png = str(tmp_path / "two.png")
  assert cli.main(["plot", d, d, "--out", png]) == 0 and os.path.getsize(png) > 0
  assert cli.main(["eval", "--run-dir", d, "--step", "7"]) == 2
  assert "--step=7" in capsys.readouterr().err


def test_corrupt_latest_checkpoint_is_skipped_and_resume_repeats_the_losses(run, tmp_path, capsys):
  d0, cfg, _ = run
  d = str(tmp_path / "copy")
  shutil.copytree(d0, d)
  # Corrupt step 20: garble every file of its saved state.
  for root, _, files in os.walk(os.path.join(d, "checkpoints", "20", "state")):
    for name in files:
      with open(os.path.join(root, name), "wb") as f:
        f.write(b"\x00garbage")
  # And make step 15 incomplete (its state item is gone).
  shutil.rmtree(os.path.join(d, "checkpoints", "15", "state"))
  train(tiny_config(*cfg_paths(cfg), "train.keep=10"), d, resume=True, progress=False)
  out = capsys.readouterr().out
  assert "checkpoint step 20 is unusable" in out and "checkpoint step 15 is unusable" in out
  assert "resumed from step 10" in out
  before, after = _losses(d0), _losses(d)
  assert sorted(after) == list(range(1, 21))
  for s in range(11, 21):
    assert after[s] == before[s], (s, after[s], before[s])    # bit-identical continuation
  assert os.path.isdir(os.path.join(d, "checkpoints", "20.corrupt"))
  assert 20 in _ckpt_steps(d)


def cfg_paths(cfg):
  return cfg.data.path, cfg.data.data_dir


def test_nan_stops_cleanly_without_checkpointing_the_bad_state(corpus, tmp_path, capsys):
  d = str(tmp_path / "nan")
  rc = cli.main(["train", *tiny_args(*corpus, "train.inject_nan_at_step=7", "train.eval_every=0",
                                     "train.sample_tokens=0"), "--run-dir", d, "--no-progress"])
  err = capsys.readouterr().err.strip().splitlines()
  assert rc == 3
  assert err[-1].startswith("error: training diverged: loss is nan") and "step 7" in err[-1]
  assert "last checkpoint: step 5" in err[-1]
  assert _ckpt_steps(d) == [5]
  assert max(_losses(d)) < 7               # the NaN step was never logged as a train record


def test_run_dir_rules(run, corpus, tmp_path):
  d, cfg, _ = run
  before = sorted(os.listdir(d))
  other = tiny_config(*corpus, "train.keep=10", "model.d_model=64", "model.n_heads=4")
  with pytest.raises(ConfigError, match="different config.*model.d_model"):
    train(other, d, progress=False)
  with pytest.raises(ConfigError, match="already holds this run"):
    train(cfg, d, progress=False)
  with pytest.raises(ConfigError, match="only train.\\* and mesh.\\* may change"):
    train(other, d, resume=True, progress=False)
  with pytest.raises(ConfigError, match="not allowed together"):
    train(cfg, d, resume=True, force=True, progress=False)
  with pytest.raises(ConfigError, match="holds no run to resume"):
    train(cfg, str(tmp_path / "empty"), resume=True, progress=False)
  stray = tmp_path / "stray"
  stray.mkdir()
  (stray / "notes.txt").write_text("mine")
  with pytest.raises(ConfigError, match="not empty and holds no config.json"):
    train(cfg, str(stray), progress=False)
  assert sorted(os.listdir(d)) == before
  assert not (tmp_path / "empty").exists()
