"""Tokenizers: bytes (default, vocab 256) or a SentencePiece model file.

Both expose `vocab_size`, `eos_id` (appended after every document before packing),
`encode(str | bytes) -> int32 [N]`, `decode(ids) -> str` and `num_bytes(ids)` (text bytes the ids
stand for, for bits per byte = total loss in nats / (ln 2 · num_bytes)).
"""
from __future__ import annotations

import os

import numpy as np
import sentencepiece as spm

from mhc_jax.config import fail


class Tokenizer:
  """Interface: `vocab_size`, `eos_id`, `encode`, `decode`."""
  vocab_size: int
  eos_id: int

  def encode(self, text) -> np.ndarray:
    raise NotImplementedError

  def decode(self, ids) -> str:
    raise NotImplementedError

  def num_bytes(self, ids) -> int:
    """UTF-8 bytes of text that `ids` stand for (separators excluded): the bits-per-byte denominator."""
    ids = np.asarray(ids).reshape(-1)
    return len(self.decode(ids[ids != self.eos_id]).encode("utf-8"))


class ByteTokenizer(Tokenizer):
  """UTF-8 bytes as ids 0..255. Byte 0 (NUL, absent from text) separates documents."""
  vocab_size = 256
  eos_id = 0

  def encode(self, text) -> np.ndarray:
    """UTF-8 bytes of `text`; bytes that are not UTF-8 (a command-line argument in another encoding
    arrives as surrogate escapes) are kept as the raw bytes they stand for."""
    data = text.encode("utf-8", "surrogateescape") if isinstance(text, str) else bytes(text)
    return np.frombuffer(data, dtype=np.uint8).astype(np.int32)

  def decode(self, ids) -> str:
    ids = np.asarray(ids).reshape(-1)
    return bytes(int(i) for i in ids if 0 < i < 256).decode("utf-8", errors="replace")

  def num_bytes(self, ids) -> int:
    return int(np.count_nonzero(np.asarray(ids) != self.eos_id))


class SentencePieceTokenizer(Tokenizer):
  """A SentencePiece `.model` file; `eos_id` is the model's EOS (or id 0 if it has none)."""

  def __init__(self, model_path: str):
    self.path = model_path
    self._sp = spm.SentencePieceProcessor(model_file=model_path)
    self.vocab_size = int(self._sp.get_piece_size())
    eos = int(self._sp.eos_id())
    self.eos_id = eos if eos >= 0 else 0

  def encode(self, text) -> np.ndarray:
    if isinstance(text, str):
      text = text.encode("utf-8", "surrogateescape")
    text = bytes(text).decode("utf-8", errors="replace")
    return np.asarray(self._sp.encode(text), dtype=np.int32)

  def decode(self, ids) -> str:
    return self._sp.decode([int(i) for i in np.asarray(ids).reshape(-1)])


def make_tokenizer(cfg) -> Tokenizer:
  """`cfg.tokenizer`: "byte" or a path to an existing SentencePiece `.model` file."""
  name = cfg.tokenizer
  if name == "byte":
    return ByteTokenizer()
  path = os.path.expanduser(name)
  if not name.endswith(".model") or not os.path.isfile(path):
    fail("data.tokenizer", name, "'byte' or a path to an existing SentencePiece .model file")
  try:
    return SentencePieceTokenizer(path)
  except ImportError:
    fail("data.tokenizer", name, "SentencePiece models need `pip install sentencepiece`")
  except (RuntimeError, OSError) as e:
    fail("data.tokenizer", name, f"a readable SentencePiece .model file ({e})")
