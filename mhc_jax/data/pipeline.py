"""Grain pipeline: documents -> tokens + EOS -> concatenate-and-split packing -> batches.

Train (infinite): shard documents by process (`docs[p::P]`, disjoint), shuffle them with `seed`
(a fresh permutation each epoch), tokenize, append EOS, concatenate and split into windows of
`seq_len + 1` tokens, shuffle windows within a window of `SHUFFLE_WINDOW`, batch `B_local =
batch_size // P`, then `inputs = w[:, :-1]`, `targets = w[:, 1:]`. The iterator's
`get_state()/set_state()` resume it exactly (Orbax: `grain.checkpoint.CheckpointSave/Restore`).

Eval: the validation split in stored order (no shuffling), same sharding and packing, first
`num_batches` batches; a short split wraps around.
"""
from __future__ import annotations

import sys

import grain
import grain.experimental as gex
import numpy as np

from mhc_jax.config import ConfigError, fail
from mhc_jax.data.sources import open_split, text_key
from mhc_jax.data.tokenizer import Tokenizer, make_tokenizer

SHUFFLE_WINDOW = 512      # packed sequences shuffled together (train only)
# Reading and byte-tokenizing a document costs tens of microseconds: prefetch threads would only
# contend for the CPU the train step needs, so documents are read on the consumer's thread.
_READ = grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)


class _EpochShuffled:
  """Random-access view of `docs` repeated forever, each epoch in its own seeded permutation.

  (grain's `MapDataset.shuffle` is the same idea, but its per-index shuffle costs ~10 ms per
  element on a dataset of a few examples; here a permutation costs O(n) once per epoch.)
  """

  def __init__(self, docs, seed: int):
    self._docs, self._seed, self._n = docs, seed, len(docs)
    self._epoch, self._perm = -1, None

  def __len__(self):
    return sys.maxsize

  def __getitem__(self, index):
    epoch, i = divmod(int(index), self._n)
    if epoch != self._epoch:
      self._epoch = epoch
      self._perm = np.random.default_rng([self._seed, epoch]).permutation(self._n)
    return self._docs[int(self._perm[i])]


def _local_batch(cfg, process_index: int, process_count: int) -> int:
  if isinstance(process_count, bool) or not isinstance(process_count, int) or process_count < 1:
    raise ConfigError(f"process_count={process_count!r} is not allowed: an integer >= 1")
  if not isinstance(process_index, int) or not 0 <= process_index < process_count:
    raise ConfigError(f"process_index={process_index!r} is not allowed: 0 <= index < "
                      f"process_count={process_count}")
  if cfg.batch_size % process_count:
    fail("data.batch_size", cfg.batch_size,
         f"a multiple of the process count ({process_count}), split evenly over processes")
  return cfg.batch_size // process_count


def _encoder(tok: Tokenizer, key: str):
  def encode(example):
    text = example[key]
    ids = tok.encode(text if isinstance(text, (str, bytes)) else str(text))
    return {"tokens": np.append(ids, np.int32(tok.eos_id)).astype(np.int32)}
  return encode


def _documents(cfg, split: str, tok: Tokenizer, process_index: int, process_count: int,
               b_local: int = 1):
  """This process's shard of `split` as a MapDataset of token arrays (EOS-terminated).

  The shard must hold one window of `seq_len + 1` tokens, and the train split one whole batch of
  them (a batch larger than the data would only repeat it, at the cost of memory and time)."""
  docs = grain.MapDataset.source(open_split(cfg, split))
  n_docs = len(docs)
  docs = docs[process_index::process_count]
  encode = _encoder(tok, text_key(cfg))
  window = cfg.seq_len + 1
  need, have = window * (b_local if split == "train" else 1), 0
  for i in range(len(docs)):  # stops as soon as the data fits; reads everything only if small
    have += len(encode(docs[i])["tokens"])
    if have >= need:
      break
  where = f" in process {process_index}'s shard of {process_count}" if process_count > 1 else ""
  if have < window:
    fail("data.seq_len", cfg.seq_len,
         f"at most {have - 1}: the {split} split has {have} tokens{where} "
         f"({n_docs} examples), fewer than seq_len + 1")
  if have < need:
    fail("data.batch_size", cfg.batch_size,
         f"at most {have // window * process_count}: one batch of (seq_len + 1) tokens per row must "
         f"fit in the {split} split ({have} tokens{where})")
  return docs.map(encode)


def _pack_and_batch(docs_iter, cfg, b_local: int, shuffle_seed: int | None):
  packed = gex.ConcatThenSplitIterDataset(docs_iter, length_struct={"tokens": cfg.seq_len + 1})
  packed = packed.map(lambda ex: ex["tokens"])
  if shuffle_seed is not None:
    packed = gex.WindowShuffleIterDataset(packed, window_size=SHUFFLE_WINDOW, seed=shuffle_seed)
  batched = packed.batch(b_local, drop_remainder=True)
  return batched.map(lambda w: {"inputs": np.ascontiguousarray(w[:, :-1]),
                                "targets": np.ascontiguousarray(w[:, 1:])})


class _Iterator(grain.DatasetIterator):
  """The pipeline's iterator, with a `set_state` that accepts a JSON round trip of `get_state()`.

  `grain.checkpoint.CheckpointSave` writes the state as JSON, which turns the packer's
  `remainder_slices` tuples into lists; grain 0.2.18's `ConcatThenSplit` compares them with the tuple
  `(-1, -1)` and would then resume from a phantom remainder. Lists of two ints become tuples here.
  """

  def __init__(self, parent: grain.DatasetIterator):
    super().__init__(parent)

  def __next__(self):
    return next(self._parent)

  def get_state(self):
    return self._parent.get_state()

  def set_state(self, state):
    self._parent.set_state(_slices_as_tuples(state))


def _slices_as_tuples(state):
  if not isinstance(state, dict):
    return state
  out = {k: _slices_as_tuples(v) for k, v in state.items()}
  if isinstance(out.get("remainder_slices"), dict):
    out["remainder_slices"] = {f: tuple(sl) for f, sl in out["remainder_slices"].items()}
  return out


def make_train_iterator(cfg, *, process_index: int = 0, process_count: int = 1):
  """Infinite, seeded iterator of {"inputs", "targets"}: int32 [batch_size // process_count, seq_len]."""
  b_local = _local_batch(cfg, process_index, process_count)
  docs = _documents(cfg, "train", make_tokenizer(cfg), process_index, process_count, b_local)
  docs = grain.MapDataset.source(_EpochShuffled(docs, cfg.seed)).to_iter_dataset(_READ)
  return _Iterator(iter(_pack_and_batch(docs, cfg, b_local, shuffle_seed=cfg.seed + 1)))


def make_eval_batches(cfg, num_batches: int, *, process_index: int = 0,
                      process_count: int = 1) -> list[dict]:
  """`num_batches` deterministic validation batches (same for any seed) for this process."""
  if isinstance(num_batches, bool) or not isinstance(num_batches, int) or num_batches < 1:
    raise ConfigError(f"num_batches={num_batches!r} is not allowed: an integer >= 1")
  b_local = _local_batch(cfg, process_index, process_count)
  docs = _documents(cfg, "validation", make_tokenizer(cfg), process_index, process_count)
  it = iter(_pack_and_batch(docs.repeat().to_iter_dataset(_READ), cfg, b_local, None))
  return [next(it) for _ in range(num_batches)]
