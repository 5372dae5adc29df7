"""Text data for LM training: TFDS (no TensorFlow) sources read through a Grain pipeline.

    cfg = DataConfig(seq_len=256, batch_size=16)          # built-in corpus: Python stdlib sources
    it = make_train_iterator(cfg, process_index=jax.process_index(),
                             process_count=jax.process_count())
    batch = next(it)   # {"inputs": int32 [B_local, T], "targets": int32 [B_local, T]}
    val = make_eval_batches(cfg, num_batches=8)
"""
from mhc_jax.data.config import DataConfig
from mhc_jax.data.pipeline import make_eval_batches, make_train_iterator
from mhc_jax.data.tokenizer import ByteTokenizer, SentencePieceTokenizer, Tokenizer, make_tokenizer

__all__ = ["DataConfig", "make_train_iterator", "make_eval_batches", "Tokenizer", "ByteTokenizer",
           "SentencePieceTokenizer", "make_tokenizer"]
