"""The Grain pipeline: packing against a NumPy oracle, seeding, state round trips, sharding, stdlib."""
import json

import numpy as np
import pytest

from mhc_jax.data import DataConfig, make_eval_batches, make_tokenizer, make_train_iterator
from mhc_jax.data import corpus, text_builder
from tests.data.helpers import write_corpus


@pytest.fixture(scope="module")
def files_cfg(tmp_path_factory):
  root = tmp_path_factory.mktemp("corpus")
  write_corpus(root, n_files=24, lines=30)
  cache = tmp_path_factory.mktemp("cache")
  return DataConfig(source="files", path=str(root), data_dir=str(cache), seq_len=32, batch_size=4,
                    val_fraction=0.25)


def _split_texts(cfg, split):
  files = corpus.list_corpus_files(cfg)
  train, val = text_builder.split_by_file(files, cfg.val_fraction)
  return [open(p).read() for _, p in (train if split == "train" else val)]


def test_eval_batches_are_concatenate_and_split(files_cfg):
  """Oracle: the validation files in order, each + EOS, concatenated (wrapping around) and cut
  into windows of seq_len + 1; inputs = window[:-1], targets = window[1:]."""
  cfg, n = files_cfg, 7
  tok = make_tokenizer(cfg)
  texts = _split_texts(cfg, "validation")
  stream = np.concatenate([np.append(np.frombuffer(t.encode(), np.uint8), 0) for t in texts])
  T, B = cfg.seq_len, cfg.batch_size
  need = n * B * (T + 1)
  stream = np.tile(stream, -(-need // len(stream)))[:need].astype(np.int64)
  windows = stream.reshape(n, B, T + 1)
  batches = make_eval_batches(cfg, n)
  assert len(batches) == n
  for got, w in zip(batches, windows):
    assert got["inputs"].dtype == np.int32 and got["inputs"].shape == (B, T)
    np.testing.assert_array_equal(got["inputs"], w[:, :-1])
    np.testing.assert_array_equal(got["targets"], w[:, 1:])
  assert make_eval_batches(cfg, n)[3]["inputs"].tobytes() == batches[3]["inputs"].tobytes()
  assert "file" in tok.decode(batches[0]["inputs"][0])


def _take(it, n):
  return [next(it) for _ in range(n)]


def _stack(batches):
  return np.stack([b["inputs"] for b in batches])


def test_train_batches_are_shifted_windows_of_the_train_split(files_cfg):
  cfg = files_cfg
  batches = _take(make_train_iterator(cfg), 40)  # several epochs of this small split
  train_text = "\0".join(_split_texts(cfg, "train")) + "\0"
  val_lines = {l for t in _split_texts(cfg, "validation") for l in t.splitlines()}
  seen = set()
  for b in batches:
    assert b["inputs"].shape == (cfg.batch_size, cfg.seq_len) and b["targets"].dtype == np.int32
    np.testing.assert_array_equal(b["inputs"][:, 1:], b["targets"][:, :-1])
    for row_in, row_tg in zip(b["inputs"], b["targets"]):
      window = bytes(np.append(row_in, row_tg[-1]).astype(np.uint8)).decode()
      for piece in window.split("\0"):  # each piece between separators is text of one train file
        assert piece in train_text
        seen.update(l for l in piece.splitlines()[1:-1])
  assert not (seen & val_lines)


def test_seed_controls_order(files_cfg):
  a = _stack(_take(make_train_iterator(files_cfg), 5))
  b = _stack(_take(make_train_iterator(files_cfg), 5))
  c = _stack(_take(make_train_iterator(DataConfig(**{**vars(files_cfg), "seed": 1})), 5))
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)


@pytest.mark.parametrize("k", [0, 3, 37])
def test_state_round_trip_gives_identical_next_batches(files_cfg, k):
  it = make_train_iterator(files_cfg)
  _take(it, k)
  state = it.get_state()
  want = _stack(_take(it, 140))  # crosses a shuffle-window boundary (512 windows = 128 batches)
  fresh = make_train_iterator(files_cfg)
  fresh.set_state(state)
  np.testing.assert_array_equal(_stack(_take(fresh, 140)), want)


@pytest.mark.parametrize("k", [11, 130, 300])
def test_json_round_trip_of_state(files_cfg, k):
  """The state survives JSON (as Orbax stores it), including across shuffle-window boundaries."""
  it = make_train_iterator(files_cfg)
  _take(it, k)
  state = json.loads(json.dumps(it.get_state()))
  want = _stack(_take(it, 6))
  fresh = make_train_iterator(files_cfg)
  fresh.set_state(state)
  np.testing.assert_array_equal(_stack(_take(fresh, 6)), want)


def test_orbax_checkpoint_of_iterator(files_cfg, tmp_path):
  grain = pytest.importorskip("grain")
  ocp = pytest.importorskip("orbax.checkpoint")
  it = make_train_iterator(files_cfg)
  _take(it, 11)
  with ocp.CheckpointManager(tmp_path / "ckpt") as mngr:
    mngr.save(11, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
    mngr.wait_until_finished()
  want = _stack(_take(it, 10))
  fresh = make_train_iterator(files_cfg)
  with ocp.CheckpointManager(tmp_path / "ckpt") as mngr:
    mngr.restore(11, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(fresh)))
  np.testing.assert_array_equal(_stack(_take(fresh, 10)), want)


def _file_ids(batches):
  """Which generated files (by their 'file NNN' marker) the batches' bytes came from."""
  ids = set()
  for b in batches:
    for row in b["inputs"]:
      text = bytes(row.astype(np.uint8)).decode(errors="replace")
      ids.update(int(text[i + 5:i + 8]) for i in range(len(text) - 8) if text.startswith("file ", i)
                 and text[i + 5:i + 8].isdigit())
  return ids


def test_process_shards_are_disjoint(files_cfg):
  cfg = DataConfig(**{**vars(files_cfg), "batch_size": 6})
  shards = [_take(make_train_iterator(cfg, process_index=p, process_count=3), 30) for p in range(3)]
  ids = [_file_ids(s) for s in shards]
  for s in shards:
    assert s[0]["inputs"].shape == (2, cfg.seq_len)
  assert all(ids) and not (ids[0] & ids[1]) and not (ids[0] & ids[2]) and not (ids[1] & ids[2])
  n_train = len(_split_texts(cfg, "train"))
  assert len(ids[0] | ids[1] | ids[2]) == n_train  # together they cover the train split
  evals = [make_eval_batches(cfg, 3, process_index=p, process_count=2) for p in range(2)]
  assert not (_file_ids(evals[0]) & _file_ids(evals[1]))


def test_stdlib_corpus_small(tmp_path):
  cfg = DataConfig(max_files=6, seq_len=64, batch_size=2, data_dir=str(tmp_path), val_fraction=0.34)
  b = next(make_train_iterator(cfg))
  assert b["inputs"].shape == (2, 64)
  text = make_tokenizer(cfg).decode(make_eval_batches(cfg, 1)[0]["inputs"][0])
  assert text.isprintable() or "\n" in text


def test_full_stdlib_corpus_builds_and_splits_by_file(tmp_path):
  """The default corpus: every non-empty stdlib `.py` file (no site-packages), ~5% of files held out."""
  import os
  from mhc_jax.data import sources
  cfg = DataConfig(data_dir=str(tmp_path), seq_len=128, batch_size=2)
  files = corpus.list_corpus_files(cfg)
  root = corpus.stdlib_dir()
  want = sorted(os.path.relpath(os.path.join(d, f), root) for d, dirs, fs in os.walk(root)
                if "site-packages" not in d and "__pycache__" not in d
                for f in fs if f.endswith(".py") and os.path.getsize(os.path.join(d, f)) > 0)
  assert [r for r, _ in files] == want and len(files) > 500
  train, val = sources.open_split(cfg, "train"), sources.open_split(cfg, "validation")
  train_paths = {ex["path"] for ex in train}
  val_paths = {ex["path"] for ex in val}
  assert not train_paths & val_paths and len(train_paths) + len(val_paths) == len(files)
  assert len(val_paths) == round(0.05 * len(files))
  b = next(make_train_iterator(cfg))
  assert b["inputs"].shape == (2, 128) and b"\n" in b["inputs"].astype(np.uint8).tobytes()
