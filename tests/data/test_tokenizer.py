"""Tokenizers: byte ids are the UTF-8 bytes; SentencePiece round-trips; bad names are refused."""
import numpy as np
import pytest

from mhc_jax.config import ConfigError
from mhc_jax.data import DataConfig, make_tokenizer


def test_byte_tokenizer_is_utf8():
  tok = make_tokenizer(DataConfig())
  text = "def f(x):\n  return 'héllo ∑ 🙂'\n"
  ids = tok.encode(text)
  assert ids.dtype == np.int32 and tok.vocab_size == 256
  np.testing.assert_array_equal(ids, np.array(list(text.encode("utf-8")), dtype=np.int32))
  np.testing.assert_array_equal(tok.encode(text.encode("utf-8")), ids)  # bytes in, same ids
  assert tok.decode(ids) == text
  assert tok.decode(np.append(ids, tok.eos_id)) == text  # the separator is dropped
  assert tok.eos_id not in ids


def test_sentencepiece_model_file(tmp_path):
  spm = pytest.importorskip("sentencepiece")
  corpus = tmp_path / "corpus.txt"
  rng = np.random.default_rng(0)
  words = ["alpha", "beta", "gamma", "delta", "stream", "mixing", "sinkhorn", "matrix"]
  corpus.write_text("\n".join(" ".join(rng.choice(words, 8)) for _ in range(300)))
  prefix = tmp_path / "sp"
  spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(prefix), vocab_size=40,
                                 model_type="bpe", minloglevel=2)
  tok = make_tokenizer(DataConfig(tokenizer=str(prefix) + ".model"))
  assert tok.vocab_size == 40 and tok.eos_id == 2
  text = "gamma stream mixing beta"
  ids = tok.encode(text)
  assert ids.dtype == np.int32 and ids.max() < 40 and 0 < len(ids) < len(text)
  assert tok.decode(ids) == text
  assert tok.decode(tok.encode(text.encode())) == text
  assert tok.num_bytes(np.append(ids, tok.eos_id)) == len(text.encode())


def test_missing_or_bad_model_file(tmp_path):
  with pytest.raises(ConfigError, match=r"^data.tokenizer='.*nope.model' is not allowed"):
    make_tokenizer(DataConfig(tokenizer=str(tmp_path / "nope.model")))
  bad = tmp_path / "bad.model"
  bad.write_bytes(b"not a model")
  with pytest.raises(ConfigError, match=r"^data.tokenizer="):
    make_tokenizer(DataConfig(tokenizer=str(bad)))


def test_num_bytes_counts_text_bytes():
  tok = make_tokenizer(DataConfig())
  ids = np.concatenate([tok.encode("héllo"), [tok.eos_id], tok.encode("ab")])
  assert tok.num_bytes(ids) == len("héllo".encode()) + 2 == 8
  assert tok.num_bytes(ids.reshape(1, -1)) == 8
