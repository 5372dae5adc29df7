"""A TF-free TFDS builder that turns local text files into an ArrayRecord dataset, split by file.

`prepare_local_text(files, cache_root, val_fraction)` builds it once per distinct corpus and returns
the TFDS `data_dir` to read it from with `tfds.data_source(BUILDER_NAME, split=..., data_dir=...)`.
The cache key hashes the builder version, the split rule and every file's path and content, so a
changed file gives a new build. Concurrent builders are safe: each writes into its own temporary
directory and renames it into place; the loser of the rename discards its copy.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import sys
import time
import uuid

import tensorflow_datasets as tfds
from tensorflow_datasets.core.utils import tqdm_utils

BUILDER_NAME = "mhc_local_text"
PIECE_BYTES = 32768  # files longer than this are cut at line boundaries into examples this size


class MhcLocalText(tfds.core.GeneratorBasedBuilder):
  """Examples `{"text": str, "path": str}`: one per file piece, in file order (no TFDS shuffling).

  Splits: `train` and, when it has files, `validation`. Reading needs no constructor arguments.
  """
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Local text files, split by file, pieces of <= 32 KiB."}
  # Nothing is downloaded, so no checksums file: tfds would otherwise locate this module's source
  # through `importlib_resources`, a package it does not declare as a dependency.
  code_path = None

  def __init__(self, *, file_splits: dict | None = None, **kwargs):
    self._file_splits = file_splits or {}
    super().__init__(**kwargs)

  def _log_download_bytes(self):  # `prepare_local_text` reports the build in one line instead
    pass

  def _log_download_done(self):
    pass

  def _info(self):
    return tfds.core.DatasetInfo(
        builder=self,
        description="Local text files; each example is a file or a <= 32 KiB piece of one.",
        features=tfds.features.FeaturesDict(
            {"text": tfds.features.Text(), "path": tfds.features.Text()}),
        disable_shuffling=True)

  def _split_generators(self, dl_manager):
    del dl_manager
    return {name: self._generate_examples(files)
            for name, files in self._file_splits.items() if files}

  def _generate_examples(self, files):
    for i, (rel, path) in enumerate(files):
      with open(path, "rb") as f:
        text = f.read().decode("utf-8", errors="replace")
      for j, piece in enumerate(split_pieces(text)):
        yield f"{i:07d}.{j:05d}", {"text": piece, "path": rel}


def split_pieces(text: str, limit: int = PIECE_BYTES) -> list[str]:
  """Cut `text` at line ends into pieces of at most `limit` UTF-8 bytes (a longer line is its own piece)."""
  if len(text.encode("utf-8")) <= limit:
    return [text]
  pieces, cur, size = [], [], 0
  for line in text.splitlines(keepends=True):
    n = len(line.encode("utf-8"))
    if cur and size + n > limit:
      pieces.append("".join(cur))
      cur, size = [], 0
    cur.append(line)
    size += n
  if cur:
    pieces.append("".join(cur))
  return pieces


def split_by_file(files, val_fraction: float):
  """Deterministic file-level split: `max(1, round(f * N))` files (none if f == 0 or N < 2) go to
  validation, chosen by the SHA-1 of their relative path (spread over the tree, stable across
  machines); both lists keep the input order."""
  n = len(files)
  n_val = 0 if (val_fraction <= 0 or n < 2) else min(n - 1, max(1, round(val_fraction * n)))
  ranked = sorted(files, key=lambda rf: hashlib.sha1(rf[0].encode()).hexdigest())
  val = {rel for rel, _ in ranked[:n_val]}
  return [rf for rf in files if rf[0] not in val], [rf for rf in files if rf[0] in val]


def corpus_key(files, val_fraction: float) -> str:
  """Content key: builder version, piece size, split rule, then each file's path and bytes."""
  h = hashlib.sha256(f"{BUILDER_NAME}:{MhcLocalText.VERSION}:{PIECE_BYTES}:{val_fraction!r}".encode())
  for rel, path in files:
    h.update(rel.encode() + b"\0")
    with open(path, "rb") as f:
      h.update(hashlib.sha256(f.read()).digest())
  return h.hexdigest()[:24]


def prepare_local_text(files, cache_root: str, val_fraction: float) -> str:
  """Build (or reuse) the dataset for `files` = [(relative path, absolute path)]; returns its data_dir."""
  key = corpus_key(files, val_fraction)
  base = os.path.join(cache_root, "local_text")
  final = os.path.join(base, key)
  if _complete(final):
    return final
  os.makedirs(base, exist_ok=True)
  start = time.perf_counter()
  tmp = os.path.join(base, f".tmp-{key}-{os.getpid()}-{uuid.uuid4().hex[:8]}")
  try:
    train, val = split_by_file(files, val_fraction)
    builder = MhcLocalText(file_splits={"train": train, "validation": val}, data_dir=tmp)
    with _quiet_progress():
      builder.download_and_prepare(file_format="array_record")
    shutil.rmtree(os.path.join(tmp, "downloads"), ignore_errors=True)
    for attempt in range(2):
      try:
        os.rename(tmp, final)
        break
      except OSError:
        if _complete(final):  # lost the race to an identical build: use that one
          break
        if attempt or not os.path.isdir(final):  # a real failure
          raise
        _discard(final, f"{tmp}.damaged")  # a damaged entry (not a finished build): replace it
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  print(f"mhc_jax.data: built a {len(files)}-file text corpus in {time.perf_counter() - start:.1f} s "
        f"(cached for next time in {final})", file=sys.stderr)
  return final


@contextlib.contextmanager
def _quiet_progress():
  """No per-split tqdm bars while building (the build is one line in a training log)."""
  was = getattr(tqdm_utils, "_active", True)
  tfds.display_progress_bar(False)
  try:
    yield
  finally:
    tfds.display_progress_bar(was)


def _discard(path: str, aside: str):
  try:
    os.rename(path, aside)  # atomic, so a reader never sees it half-deleted
  except FileNotFoundError:
    return
  shutil.rmtree(aside, ignore_errors=True)


def _complete(data_dir: str) -> bool:
  return os.path.isfile(
      os.path.join(data_dir, BUILDER_NAME, str(MhcLocalText.VERSION), "dataset_info.json"))
