"""`DataConfig`: where text comes from, how it is tokenized, packed and batched.

Validated in `__post_init__`; a bad value raises `ConfigError` naming field, value
and what is allowed. Checks that need the file system (missing directory, empty corpus, dataset not
prepared, sequence longer than the data) happen when the data is opened.
"""
from __future__ import annotations

import dataclasses
import os

from mhc_jax.config.checks import check_choice, check_float, check_int, check_seed, fail

SOURCES = ("stdlib", "files", "tfds")
DATA_DIR_ENV = "MHC_JAX_DATA_DIR"


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """Text data for LM training.

  source: "stdlib" (this Python's standard-library `.py` files, built once and cached) | "files"
    (`path`: a directory, searched recursively, or a glob of text files) | "tfds" (a prepared TFDS
    dataset `tfds_name` under `data_dir`).
  data_dir: TFDS data_dir and cache of built corpora; "" = $MHC_JAX_DATA_DIR or ~/.cache/mhc_jax/tfds.
  tokenizer: "byte" (vocab 256, document separator byte 0) or a path to a SentencePiece `.model`.
  seq_len / batch_size: each step yields `inputs`, `targets` int32 [batch_size, seq_len] (global).
  val_fraction: files/stdlib only; this fraction of files (at least one; > 0) forms the validation
    split.
  max_files: files/stdlib only; 0 = all, else the first `max_files` files in sorted path order.
  """
  source: str = "stdlib"
  path: str = ""
  tfds_name: str = ""
  data_dir: str = ""
  text_key: str = "text"
  tokenizer: str = "byte"
  seq_len: int = 256
  batch_size: int = 16
  seed: int = 0
  val_fraction: float = 0.05
  max_files: int = 0

  def __post_init__(self):
    check_choice("data.source", self.source, SOURCES)
    for name in ("path", "tfds_name", "data_dir", "text_key", "tokenizer"):
      if not isinstance(getattr(self, name), str):
        fail(f"data.{name}", getattr(self, name), "a string")
    if self.source == "files" and not self.path:
      fail("data.path", self.path, "source='files' needs a directory or glob of text files")
    if self.source == "tfds" and not self.tfds_name:
      fail("data.tfds_name", self.tfds_name, "source='tfds' needs a prepared TFDS dataset name, "
           "e.g. 'lm1b' or 'tiny_shakespeare'")
    if not self.text_key:
      fail("data.text_key", self.text_key, "the name of the text feature, e.g. 'text'")
    if self.tokenizer != "byte" and not self.tokenizer.endswith(".model"):
      fail("data.tokenizer", self.tokenizer, "'byte' or a path to a SentencePiece .model file")
    check_int("data.seq_len", self.seq_len, 1)
    check_int("data.batch_size", self.batch_size, 1)
    check_seed("data.seed", self.seed)
    check_float("data.val_fraction", self.val_fraction)
    if self.val_fraction >= 1 or (self.source != "tfds" and self.val_fraction == 0):
      fail("data.val_fraction", self.val_fraction,
           "a number in (0, 1): the validation split of a local corpus needs at least one file")
    check_int("data.max_files", self.max_files, 0)

  def resolved_data_dir(self) -> str:
    """`data_dir`, or $MHC_JAX_DATA_DIR, or ~/.cache/mhc_jax/tfds (user-expanded, absolute)."""
    d = self.data_dir or os.environ.get(DATA_DIR_ENV, "") or "~/.cache/mhc_jax/tfds"
    return os.path.abspath(os.path.expanduser(d))
