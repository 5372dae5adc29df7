"""Sources: tfds by name (mock_data), and each bad input as one clear ConfigError line."""
import os

import numpy as np
import pytest
import tensorflow_datasets as tfds

from mhc_jax.config import ConfigError
from mhc_jax.data import DataConfig, make_eval_batches, make_tokenizer, make_train_iterator
from tests.data.helpers import write_corpus


@pytest.mark.parametrize("name", ["lm1b", "tiny_shakespeare"])
def test_tfds_by_name_with_mock_data(tmp_path, name):
  cfg = DataConfig(source="tfds", tfds_name=name, data_dir=str(tmp_path), seq_len=16, batch_size=4)
  with tfds.testing.mock_data(num_examples=40):
    it = make_train_iterator(cfg)
    batches = [next(it) for _ in range(5)]
    evals = make_eval_batches(cfg, 2)
    state = it.get_state()
    want = next(it)
    fresh = make_train_iterator(cfg)
    fresh.set_state(state)
    np.testing.assert_array_equal(next(fresh)["inputs"], want["inputs"])
  for b in batches + evals:
    assert b["inputs"].shape == (4, 16) and b["inputs"].dtype == np.int32
    np.testing.assert_array_equal(b["inputs"][:, 1:], b["targets"][:, :-1])
  assert make_tokenizer(cfg).decode(batches[0]["inputs"][0]).strip()  # mock text is printable


def _error(cfg, what="train"):
  with pytest.raises(ConfigError) as e:
    if what == "train":
      make_train_iterator(cfg)
    else:
      make_eval_batches(cfg, 1)
  msg = str(e.value)
  assert "\n" not in msg, msg
  return msg


def test_missing_data_directory(tmp_path):
  cache = tmp_path / "cache"
  msg = _error(DataConfig(source="files", path=str(tmp_path / "nope"), data_dir=str(cache)))
  assert msg.startswith(f"data.path='{tmp_path}/nope' is not allowed") and "no such directory" in msg
  msg = _error(DataConfig(source="files", path=str(tmp_path / "*.txt"), data_dir=str(cache)))
  assert msg.startswith("data.path=") and "matched no files" in msg
  assert not cache.exists()  # nothing half-written


def test_empty_corpus(tmp_path):
  (tmp_path / "c" / "sub").mkdir(parents=True)
  (tmp_path / "c" / "empty.txt").write_text("")
  (tmp_path / "c" / "sub" / "blob.bin").write_bytes(b"\x00\x01\x02binary")
  (tmp_path / "c" / ".hidden").write_text("not read")
  cache = tmp_path / "cache"
  msg = _error(DataConfig(source="files", path=str(tmp_path / "c"), data_dir=str(cache)))
  assert msg.startswith(f"data.path='{tmp_path}/c'") and "empty corpus" in msg
  assert not cache.exists()


def test_seq_len_longer_than_the_data(tmp_path):
  write_corpus(tmp_path / "c", n_files=4, lines=2)  # 4 files of ~52 bytes: 3 train, 1 validation
  base = dict(source="files", path=str(tmp_path / "c"), data_dir=str(tmp_path / "cache"))
  msg = _error(DataConfig(**base, seq_len=400))
  assert msg.startswith("data.seq_len=400 is not allowed: at most ") and "train split has" in msg
  have = int(msg.split("split has ")[1].split()[0])
  assert have == sum(len(t.encode()) + 1 for t in ["file 000 line 00: \nfile 000 line 01: xyz\n"] * 3)
  next(make_train_iterator(DataConfig(**base, seq_len=have - 1, batch_size=1)))  # the limit works
  msg = _error(DataConfig(**base, seq_len=100), what="eval")
  assert msg.startswith("data.seq_len=100 is not allowed") and "validation split" in msg
  with pytest.raises(ConfigError, match="process 1's shard of 2"):
    make_train_iterator(DataConfig(**base, seq_len=80, batch_size=2), process_index=1, process_count=2)


def test_unknown_source_and_tokenizer(tmp_path):
  with pytest.raises(ConfigError, match=r"^data.source='hf' is not allowed: choose one of 'stdlib'"):
    DataConfig(source="hf")
  with pytest.raises(ConfigError, match=r"^data.tokenizer='bpe' is not allowed"):
    DataConfig(tokenizer="bpe")
  write_corpus(tmp_path / "c", n_files=3)
  msg = _error(DataConfig(source="files", path=str(tmp_path / "c"), data_dir=str(tmp_path / "x"),
                          tokenizer=str(tmp_path / "missing.model")))
  assert msg.startswith("data.tokenizer=") and "existing SentencePiece .model" in msg


def test_tfds_dataset_not_prepared(tmp_path):
  msg = _error(DataConfig(source="tfds", tfds_name="tiny_shakespeare", data_dir=str(tmp_path)))
  assert msg.startswith("data.tfds_name='tiny_shakespeare': dataset not prepared under")
  assert "nothing is downloaded" in msg
  msg = _error(DataConfig(source="tfds", tfds_name="lm1b", data_dir=str(tmp_path / "none")))
  assert msg.startswith(f"data.data_dir='{tmp_path}/none' is not allowed") and "no such" in msg
  msg = _error(DataConfig(source="tfds", tfds_name="no_such_dataset_xyz", data_dir=str(tmp_path)))
  assert msg.startswith("data.tfds_name='no_such_dataset_xyz' is not allowed")
  assert not os.listdir(tmp_path)


def test_tfds_wrong_text_key(tmp_path):
  cfg = DataConfig(source="tfds", tfds_name="lm1b", data_dir=str(tmp_path), text_key="sentence")
  with tfds.testing.mock_data(num_examples=5):
    msg = _error(cfg)
  assert msg.startswith("data.text_key='sentence' is not allowed") and "'text'" in msg


def test_batch_not_divisible_by_processes_and_empty_validation(tmp_path):
  write_corpus(tmp_path / "c", n_files=1)
  base = dict(source="files", path=str(tmp_path / "c"), data_dir=str(tmp_path / "cache"), seq_len=8)
  with pytest.raises(ConfigError, match=r"^data.batch_size=5 is not allowed: a multiple of the "
                                        r"process count \(2\)"):
    make_train_iterator(DataConfig(**base, batch_size=5), process_index=0, process_count=2)
  msg = _error(DataConfig(**base), what="eval")
  assert msg.startswith("data.val_fraction=0.05 is not allowed") and "1 file(s)" in msg


def test_data_dir_that_is_a_file(tmp_path):
  write_corpus(tmp_path / "c", n_files=3)
  (tmp_path / "file").write_text("x")
  msg = _error(DataConfig(source="files", path=str(tmp_path / "c"), data_dir=str(tmp_path / "file")))
  assert msg.startswith(f"data.data_dir='{tmp_path}/file' is not allowed: a writable directory")


def test_bad_process_and_batch_counts(tmp_path):
  write_corpus(tmp_path / "c", n_files=4)
  cfg = DataConfig(source="files", path=str(tmp_path / "c"), data_dir=str(tmp_path / "x"),
                   seq_len=8, batch_size=4, val_fraction=0.25)
  for kwargs, start in [(dict(process_index=2, process_count=2), "process_index=2 is not allowed"),
                        (dict(process_index=0, process_count=0), "process_count=0 is not allowed")]:
    with pytest.raises(ConfigError, match="^" + start):
      make_train_iterator(cfg, **kwargs)
  with pytest.raises(ConfigError, match="^num_batches=0 is not allowed"):
    make_eval_batches(cfg, 0)


def test_tfds_by_name_reads_a_really_prepared_dataset(tmp_path):
  """No mocks: a dataset prepared in ArrayRecord under data_dir (here by our own builder) is read by
  name, its splits found, and its feature names checked."""
  from mhc_jax.data import corpus, sources, text_builder
  write_corpus(tmp_path / "c", n_files=8, lines=40)
  local = DataConfig(source="files", path=str(tmp_path / "c"), data_dir=str(tmp_path / "cache"),
                     val_fraction=0.25, seq_len=32, batch_size=2)
  data_dir = text_builder.prepare_local_text(corpus.list_corpus_files(local), str(tmp_path / "cache"),
                                             0.25)
  cfg = DataConfig(source="tfds", tfds_name=text_builder.BUILDER_NAME, data_dir=data_dir,
                   seq_len=32, batch_size=2)
  for split in ("train", "validation"):
    assert len(sources.open_split(cfg, split)) == len(sources.open_split(local, split))
  np.testing.assert_array_equal(make_eval_batches(cfg, 3)[2]["inputs"],
                                make_eval_batches(local, 3)[2]["inputs"])
  assert next(make_train_iterator(cfg))["inputs"].shape == (2, 32)
  msg = _error(DataConfig(**{**vars(cfg), "text_key": "body"}))
  assert msg.startswith("data.text_key='body' is not allowed") and "'path'" in msg
  one = DataConfig(source="files", path=str(tmp_path / "c"), data_dir=str(tmp_path / "cache2"))
  train_only = text_builder.prepare_local_text(corpus.list_corpus_files(one), str(tmp_path / "cache2"),
                                               0.0)
  msg = _error(DataConfig(**{**vars(cfg), "data_dir": train_only}), what="eval")
  assert msg.startswith("data.tfds_name='mhc_local_text' is not allowed") and "['train']" in msg
