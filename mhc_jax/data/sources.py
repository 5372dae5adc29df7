"""Random-access example sources (`tfds.data_source`) for every `DataConfig.source`.

stdlib / files: listed by `corpus.list_corpus_files`, built once by `MhcLocalText` into the cache
under the resolved data_dir, then read like any TFDS dataset. tfds: a dataset already prepared in
ArrayRecord format under data_dir (nothing is downloaded; `tfds.testing.mock_data` also works).
"""
from __future__ import annotations

import hashlib
import os

import tensorflow_datasets as tfds

from mhc_jax.config import ConfigError, fail
from mhc_jax.data import corpus, text_builder

SPLITS = ("train", "validation")
_prepared: dict = {}  # (file list with sizes and mtimes, val_fraction, cache root) -> data_dir


def _local_data_dir(cfg) -> str:
  files = corpus.list_corpus_files(cfg)
  stats = tuple((rel, os.stat(p).st_size, os.stat(p).st_mtime_ns) for rel, p in files)
  memo = (stats, cfg.val_fraction, cfg.resolved_data_dir())
  if memo not in _prepared:
    root = cfg.resolved_data_dir()
    try:
      _prepared[memo] = text_builder.prepare_local_text(files, root, cfg.val_fraction)
    except OSError as e:  # unwritable, or a file where the directory should be
      fail("data.data_dir", root, f"a writable directory for the built corpus "
           f"({e.strerror or e}: {e.filename or root})")
  return _prepared[memo]


def _local_split(cfg, split: str):
  data_dir = _local_data_dir(cfg)
  builder = text_builder.MhcLocalText(data_dir=data_dir)
  if split not in builder.info.splits:
    n = len(corpus.list_corpus_files(cfg))
    fail("data.val_fraction", cfg.val_fraction,
         f"a fraction > 0 of at least 2 files for a validation split (the corpus has {n} file(s))")
  return tfds.data_source(text_builder.BUILDER_NAME, split=split, data_dir=data_dir, download=False)


def _tfds_split(cfg, split: str):
  name, data_dir = cfg.tfds_name, cfg.resolved_data_dir()
  hint = ("prepare it in ArrayRecord format first (building lm1b / tiny_shakespeare needs "
          "TensorFlow and network: `tfds build NAME --file_format=array_record --data_dir DIR`), "
          "or point data.data_dir / $MHC_JAX_DATA_DIR at a prepared copy")
  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except tfds.core.registered.DatasetNotFoundError:
    fail("data.tfds_name", name, "the name of a TFDS dataset (e.g. 'lm1b', 'tiny_shakespeare')")
  splits = list(builder.info.splits.keys())  # empty under tfds.testing.mock_data: any split works
  if split == "validation" and splits and "validation" not in splits:
    if "test" not in splits:
      fail("data.tfds_name", name, f"a dataset with a 'validation' or 'test' split (has {splits})")
    split = "test"
  try:
    src = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
  except Exception as e:  # tfds raises several types here; all mean "not usable as prepared"
    if not builder.is_prepared():
      if not os.path.isdir(data_dir):
        fail("data.data_dir", data_dir, f"an existing TFDS data_dir holding {name!r}; no such "
             f"directory; {hint}")
      raise ConfigError(f"data.tfds_name={name!r}: dataset not prepared under {data_dir}; "
                        f"nothing is downloaded here; {hint}") from None
    raise ConfigError(f"data.tfds_name={name!r}: cannot open split {split!r} under {data_dir} "
                      f"for random access ({type(e).__name__}: {str(e).splitlines()[0]}); "
                      f"{hint}") from None
  features = getattr(builder.info, "features", None)
  keys = list(features.keys()) if features is not None and hasattr(features, "keys") else []
  if keys and cfg.text_key not in keys:
    fail("data.text_key", cfg.text_key, f"a text feature of {name!r}: one of {keys}")
  return src


def open_split(cfg, split: str):
  """`split` in ("train", "validation") -> random-access source of dicts holding the text."""
  if split not in SPLITS:
    raise ValueError(f"split={split!r}: choose one of {SPLITS}")
  if cfg.source == "tfds":
    return _tfds_split(cfg, split)
  return _local_split(cfg, split)


def text_key(cfg) -> str:
  """The text feature's name: always "text" for built corpora, `cfg.text_key` for tfds."""
  return cfg.text_key if cfg.source == "tfds" else "text"


def fingerprint(cfg) -> str:
  """A short hash of the corpus a run trains on: file names and contents for stdlib/files, the
  dataset's name, version and split sizes for tfds. Stored with every checkpoint, so that a resume
  on changed data is noticed ("" when a TFDS dataset does not describe itself)."""
  h = hashlib.sha256()
  if cfg.source == "tfds":
    try:
      builder = tfds.builder(cfg.tfds_name, data_dir=cfg.resolved_data_dir())
      splits = {k: v.num_examples for k, v in builder.info.splits.items()}
      version = str(builder.info.version)
    except Exception:  # noqa: BLE001 - e.g. mock data without split info: nothing to compare
      return ""
    h.update(repr((cfg.tfds_name, version, sorted(splits.items()))).encode())
  else:
    for rel, path in corpus.list_corpus_files(cfg):
      h.update(rel.encode("utf-8", "surrogateescape") + b"\0")
      with open(path, "rb") as f:
        h.update(hashlib.sha256(f.read()).digest())
  return h.hexdigest()[:16]
