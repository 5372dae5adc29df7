"""Text data for LM training: TFDS (no TensorFlow) sources read through a Grain pipeline.

    cfg = DataConfig(seq_len=256, batch_size=16)          # built-in corpus: Python stdlib sources
    it = make_train_iterator(cfg, process_index=jax.process_index(),
                             process_count=jax.process_count())
    batch = next(it)   # {"inputs": int32 [B_local, T], "targets": int32 [B_local, T]}
    val = make_eval_batches(cfg, num_batches=8)

`DataConfig` imports nothing heavy; the rest (tfds, grain) loads on first use.
"""
import importlib

from mhc_jax.config import DataConfig

_LAZY = {"make_train_iterator": "pipeline", "make_eval_batches": "pipeline",
         "Tokenizer": "tokenizer", "ByteTokenizer": "tokenizer",
         "SentencePieceTokenizer": "tokenizer", "make_tokenizer": "tokenizer"}

__all__ = ["DataConfig", *_LAZY]


def __getattr__(name):
  if name in _LAZY:
    return getattr(importlib.import_module(f"mhc_jax.data.{_LAZY[name]}"), name)
  raise AttributeError(f"module 'mhc_jax.data' has no attribute {name!r}")
