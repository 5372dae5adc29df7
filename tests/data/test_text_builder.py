"""The TF-free local-text builder: pieces, file-level split, ArrayRecord round trip, cache, races."""
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow_datasets as tfds

from mhc_jax.data import corpus, text_builder
from mhc_jax.config import DataConfig
from tests.data.helpers import write_corpus


def test_split_pieces_cuts_at_line_ends():
  text = "".join(f"line {i} " + "é" * (i % 7) + "\n" for i in range(200)) + "no newline"
  pieces = text_builder.split_pieces(text, limit=100)
  assert "".join(pieces) == text
  assert all(len(p.encode()) <= 100 for p in pieces)
  assert all(p.endswith("\n") for p in pieces[:-1])
  assert text_builder.split_pieces("short\n", limit=100) == ["short\n"]
  long_line = "x" * 250
  assert text_builder.split_pieces("a\n" + long_line + "\nb\n", limit=100) == ["a\n", long_line + "\n", "b\n"]


def test_split_by_file_is_deterministic_and_by_file():
  files = [(f"d/f{i}.py", f"/abs/d/f{i}.py") for i in range(40)]
  train, val = text_builder.split_by_file(files, 0.1)
  assert len(val) == 4 and len(train) == 36
  assert sorted(train + val) == sorted(files)
  assert train == [f for f in files if f in train]  # input order kept
  assert text_builder.split_by_file(list(reversed(files)), 0.1)[1] == list(reversed(val))
  assert len(text_builder.split_by_file(files[:3], 0.05)[1]) == 1  # at least one file
  assert text_builder.split_by_file(files[:1], 0.5) == (files[:1], [])  # one file: no validation
  assert text_builder.split_by_file(files, 0.0)[1] == []


def _read(data_dir, split):
  src = tfds.data_source(text_builder.BUILDER_NAME, split=split, data_dir=data_dir, download=False)
  return [(ex["path"].decode(), ex["text"].decode()) for ex in src]


def test_build_round_trip_and_cache(tmp_path):
  root = tmp_path / "corpus"
  rels = write_corpus(root, n_files=10, lines=300)  # ~9 KB files, cut into pieces of <= 32 KiB
  (root / "big.txt").write_text("".join(f"big line {i}\n" for i in range(8000)))  # ~100 KB: 4 pieces
  cfg = DataConfig(source="files", path=str(root), data_dir=str(tmp_path / "cache"), val_fraction=0.2)
  files = corpus.list_corpus_files(cfg)
  assert [r for r, _ in files] == sorted(rels + ["big.txt"])
  data_dir = text_builder.prepare_local_text(files, cfg.resolved_data_dir(), cfg.val_fraction)
  train, val = _read(data_dir, "train"), _read(data_dir, "validation")
  want_train, want_val = text_builder.split_by_file(files, 0.2)
  for got, want in ((train, want_train), (val, want_val)):
    assert [p for p, _ in got] == [r for r, _ in want for _ in
                                   text_builder.split_pieces(open(os.path.join(root, r)).read())]
    for rel, _ in want:  # the pieces of each file concatenate to the file, in order
      assert "".join(t for p, t in got if p == rel) == (root / rel).read_text()
  assert len(val) >= 2 and {p for p, _ in train}.isdisjoint({p for p, _ in val})
  # cached: the same directory, nothing rebuilt; no temporary directories left behind
  info = os.path.join(data_dir, text_builder.BUILDER_NAME, "1.0.0", "dataset_info.json")
  mtime = os.stat(info).st_mtime_ns
  assert text_builder.prepare_local_text(files, cfg.resolved_data_dir(), 0.2) == data_dir
  assert os.stat(info).st_mtime_ns == mtime
  assert os.listdir(os.path.dirname(data_dir)) == [os.path.basename(data_dir)]
  # content-keyed: an edited file gives a new build
  (root / rels[0]).write_text("changed\n")
  files2 = corpus.list_corpus_files(cfg)
  assert text_builder.prepare_local_text(files2, cfg.resolved_data_dir(), 0.2) != data_dir


def test_damaged_cache_entry_is_replaced(tmp_path):
  write_corpus(tmp_path / "c", n_files=4)
  cfg = DataConfig(source="files", path=str(tmp_path / "c"), data_dir=str(tmp_path / "cache"))
  files = corpus.list_corpus_files(cfg)
  key = text_builder.corpus_key(files, cfg.val_fraction)
  damaged = tmp_path / "cache" / "local_text" / key / text_builder.BUILDER_NAME
  damaged.mkdir(parents=True)
  (damaged / "junk").write_text("half-written")
  data_dir = text_builder.prepare_local_text(files, cfg.resolved_data_dir(), cfg.val_fraction)
  assert len(_read(data_dir, "train")) + len(_read(data_dir, "validation")) == 4
  assert not (damaged / "junk").exists()


_WORKER = """
import sys
import numpy as np
from mhc_jax.data import DataConfig, make_train_iterator
from mhc_jax.data import sources
index, out = int(sys.argv[3]), sys.argv[4]
cfg = DataConfig(source="files", path=sys.argv[1], data_dir=sys.argv[2], seq_len=64, batch_size=4)
it = make_train_iterator(cfg, process_index=index, process_count=2)
np.save(out, np.stack([next(it)["inputs"] for _ in range(30)]))
print(list(sources._prepared.values())[0])
"""


@pytest.mark.slow
@pytest.mark.multiprocess
def test_two_processes_race_the_build_and_read_disjoint_shards(tmp_path):
  """Two real processes (process_index 0 and 1 of 2) start on an empty cache at once: both use the
  one complete build, nothing is left over, and their batches come from disjoint files."""
  from tests.data.test_pipeline import _file_ids
  write_corpus(tmp_path / "c", n_files=30, lines=200)
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  procs = [subprocess.Popen([sys.executable, "-c", _WORKER, str(tmp_path / "c"),
                             str(tmp_path / "cache"), str(i), str(tmp_path / f"b{i}.npy")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            cwd=repo)
           for i in range(2)]
  outs = [p.communicate(timeout=120) for p in procs]
  assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outs]
  dirs = {o[0].strip().splitlines()[-1] for o in outs}
  assert len(dirs) == 1
  (data_dir,) = dirs
  assert os.listdir(tmp_path / "cache" / "local_text") == [os.path.basename(data_dir)]
  assert len(_read(data_dir, "train")) + len(_read(data_dir, "validation")) == 30
  ids = [_file_ids([{"inputs": b} for b in np.load(tmp_path / f"b{i}.npy")]) for i in range(2)]
  assert ids[0] and ids[1] and not (ids[0] & ids[1])


def test_lost_rename_race_keeps_the_winner(tmp_path, monkeypatch):
  """A builder that finds the entry already renamed into place discards its own copy."""
  write_corpus(tmp_path / "c", n_files=5)
  cfg = DataConfig(source="files", path=str(tmp_path / "c"), data_dir=str(tmp_path / "cache"))
  files = corpus.list_corpus_files(cfg)
  winner = text_builder.prepare_local_text(files, cfg.resolved_data_dir(), cfg.val_fraction)
  info = os.path.join(winner, text_builder.BUILDER_NAME, "1.0.0", "dataset_info.json")
  mtime = os.stat(info).st_mtime_ns
  real, calls = text_builder._complete, []

  def not_yet_on_first_look(path):
    calls.append(path)
    return False if len(calls) == 1 else real(path)

  monkeypatch.setattr(text_builder, "_complete", not_yet_on_first_look)
  assert text_builder.prepare_local_text(files, cfg.resolved_data_dir(), cfg.val_fraction) == winner
  assert len(calls) == 2 and os.stat(info).st_mtime_ns == mtime
  assert os.listdir(tmp_path / "cache" / "local_text") == [os.path.basename(winner)]
