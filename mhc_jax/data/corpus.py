"""Which files make a local corpus: the running Python's standard library, or a directory / glob.

Files are listed in sorted relative-path order (deterministic on every machine with the same files);
empty files and binary files (containing a NUL byte) are skipped.
"""
from __future__ import annotations

import glob
import os
import sysconfig

from mhc_jax.config import ConfigError, fail

_SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__"}


def stdlib_dir() -> str:
  return sysconfig.get_paths()["stdlib"]


def _walk(root: str, suffix: str = "") -> list[str]:
  """Relative paths of the regular, non-hidden files under `root` (recursively), sorted."""
  out = []
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames[:] = [d for d in dirnames if d not in _SKIP_DIRS and not d.startswith(".")]
    for name in filenames:
      if name.startswith(".") or not name.endswith(suffix):
        continue
      path = os.path.join(dirpath, name)
      if os.path.isfile(path):
        out.append(os.path.relpath(path, root))
  return sorted(out)


def _keep_text(root: str, rels: list[str], max_files: int) -> list[tuple[str, str]]:
  files = []
  for rel in rels:
    path = os.path.join(root, rel)
    with open(path, "rb") as f:
      data = f.read()
    if data and b"\0" not in data:
      files.append((rel, path))
      if max_files and len(files) == max_files:
        break
  return files


def list_corpus_files(cfg) -> list[tuple[str, str]]:
  """[(relative path, absolute path)] for `cfg.source` in ("stdlib", "files"); ConfigError if none."""
  if cfg.source == "stdlib":
    root = stdlib_dir()
    if not os.path.isdir(root):
      raise ConfigError(f"data.source='stdlib': the standard-library directory {root!r} is missing")
    rels = _walk(root, ".py")
    what = f"data.source='stdlib' ({root})"
  else:
    path = os.path.abspath(os.path.expanduser(cfg.path))
    if os.path.isdir(path):
      root, rels = path, _walk(path)
    elif glob.has_magic(cfg.path):
      matches = sorted(p for p in glob.glob(path, recursive=True) if os.path.isfile(p))
      if not matches:
        fail("data.path", cfg.path, "a directory or glob of text files; the glob matched no files")
      root = os.path.commonpath([os.path.dirname(p) for p in matches])
      rels = [os.path.relpath(p, root) for p in matches]
    elif os.path.isfile(path):
      root, rels = os.path.dirname(path), [os.path.basename(path)]
    else:
      fail("data.path", cfg.path, "an existing directory or a glob of text files; no such directory")
    what = f"data.path={cfg.path!r}"
  files = _keep_text(root, rels, cfg.max_files)
  if not files:
    raise ConfigError(f"{what}: empty corpus, no non-empty text files found")
  return files
