"""`--force` deletes only what training wrote, checks before deleting, never follows a symlink out of
the run directory (cases 3 and 8); a sample prompt that is not UTF-8 still gives every output (5)."""
import os
import shutil

from tests.faults.conftest import assert_clean, cli, ckpt_steps, train_args


def test_force_keeps_the_users_files_and_lists_them(corpus, run_copy):
  run = run_copy
  for rel in ("notes.txt", "checkpoints/mine.txt", "tb/mine.txt"):
    with open(os.path.join(run, rel), "w") as f:
      f.write("mine")
  os.makedirs(os.path.join(run, "checkpoints", "other_tool"))
  res = cli(train_args(corpus, run, "train.checkpoint_every=3", "train.eval_every=0",
                       "train.sample_tokens=4", steps=3, extra=("--force",))
            + [b"--set", b"train.sample_prompt=\xff\xfe"])     # a prompt that is not UTF-8 (case 5)
  last = assert_clean(res, 0, "--force kept 4 file(s)")
  for name in ("sample.txt", "plot.png", "eval.json"):
    assert os.path.getsize(os.path.join(run, name)) > 0, name
  assert "checkpoints/mine.txt" in last and "tb/mine.txt" in last and "notes.txt" in last
  for rel in ("notes.txt", "checkpoints/mine.txt", "tb/mine.txt", "checkpoints/other_tool"):
    assert os.path.exists(os.path.join(run, rel)), rel
  assert ckpt_steps(run) == [3]                         # the old 5 and 10 are gone
  assert len([n for n in os.listdir(os.path.join(run, "tb")) if n.startswith("events")]) == 1


def test_force_refuses_a_symlinked_checkpoint_folder_before_deleting_anything(corpus, run_copy,
                                                                             tmp_path):
  run = run_copy
  elsewhere = tmp_path / "other_disk"
  shutil.move(os.path.join(run, "checkpoints"), elsewhere)
  os.symlink(elsewhere, os.path.join(run, "checkpoints"))
  before = sorted(os.listdir(run))
  res = cli(train_args(corpus, run, steps=3, extra=("--force",)))
  last = assert_clean(res, 2, "symlink")
  assert "nothing outside the run directory" in last
  assert sorted(os.listdir(run)) == before and sorted(os.listdir(elsewhere)) == ["10", "5"]
  res = cli(train_args(corpus, run, steps=10, extra=("--resume",)))   # still resumable
  assert_clean(res, 0)
  assert "nothing to do" in res.stdout


def test_force_on_a_directory_that_is_not_a_run_is_refused(corpus, tmp_path):
  d = tmp_path / "mine"
  d.mkdir()
  (d / "metrics.jsonl").write_text("my own notes\n")
  for force in ((), ("--force",)):
    res = cli(train_args(corpus, d, steps=3, extra=force))
    last = assert_clean(res, 2, "not a run directory")
    assert "--force" not in last
  assert os.listdir(d) == ["metrics.jsonl"]
