"""Corpus listing: directory, glob, single file; sorted; hidden, empty and binary files skipped."""
from mhc_jax.data import corpus
from mhc_jax.config import DataConfig
from tests.data.helpers import write_corpus


def _rels(tmp_path, path, **kw):
  cfg = DataConfig(source="files", path=str(path), data_dir=str(tmp_path / "cache"), **kw)
  return [r for r, _ in corpus.list_corpus_files(cfg)]


def test_directory_glob_and_file(tmp_path):
  root = tmp_path / "c"
  rels = write_corpus(root, n_files=7)
  (root / ".hidden.txt").write_text("hidden")
  (root / "empty.txt").write_text("")
  (root / "blob.bin").write_bytes(b"ab\0cd")
  (root / ".git").mkdir()
  (root / ".git" / "HEAD").write_text("ref")
  assert _rels(tmp_path, root) == rels
  assert _rels(tmp_path, root, max_files=3) == rels[:3]
  assert _rels(tmp_path, root / "**" / "*.txt") == rels  # recursive glob, relative to common dir
  assert _rels(tmp_path, root / "sub" / "*.txt") == [r.split("/", 1)[1] for r in rels if "/" in r]
  assert _rels(tmp_path, root / "f001.txt") == ["f001.txt"]


def test_stdlib_listing_is_sorted_python_without_site_packages():
  files = corpus.list_corpus_files(DataConfig(max_files=50))
  rels = [r for r, _ in files]
  assert rels == sorted(rels) and len(rels) == 50
  assert all(r.endswith(".py") and "site-packages" not in r for r in rels)
