"""Up-front checks of the paths a command will write, so that a run never fails at its end for a path
it could have refused at its start. Each failure is a one-line `ConfigError` naming the flag."""
from __future__ import annotations

import os
import tempfile

from mhc_jax.config import ConfigError

NAME_MAX = 255
PATH_MAX = 4096


def _refuse(flag: str, path: str, why: str):
  raise ConfigError(f"{flag} {path!r} is not allowed: {why}")


def _existing_ancestor(flag: str, path: str) -> str:
  """The nearest existing ancestor of `path` (itself when it exists); it must be a directory."""
  anc = path
  while not os.path.lexists(anc):
    parent = os.path.dirname(anc)
    if parent == anc:
      break
    anc = parent
  if not os.path.isdir(anc):
    _refuse(flag, path, f"{anc} is a file, not a directory")
  return anc


def _check_length(flag: str, path: str):
  if len(os.fsencode(path)) >= PATH_MAX:
    _refuse(flag, path, f"the path is longer than {PATH_MAX - 1} bytes")
  for part in path.split(os.sep):
    if len(os.fsencode(part)) > NAME_MAX:
      _refuse(flag, path, f"a path component is longer than {NAME_MAX} bytes ({part[:20]}...)")


def _check_writable(flag: str, path: str, d: str):
  """`d` (an existing directory) must take a new file."""
  try:
    with tempfile.TemporaryFile(dir=d):
      pass
  except OSError as e:
    _refuse(flag, path, f"{d} is not writable ({e.strerror or type(e).__name__})")


def check_dir(flag: str, path: str) -> str:
  """`path` is (or can be created as) a writable directory; returns it absolute. Creates nothing."""
  path = os.path.abspath(os.path.expanduser(path))
  _check_length(flag, path)
  if os.path.lexists(path) and not os.path.isdir(path):
    _refuse(flag, path, "it is a file, not a directory")
  _check_writable(flag, path, _existing_ancestor(flag, path))
  return path


def check_file(flag: str, path: str, suffixes: tuple[str, ...] = ()) -> str:
  """`path` names a file that can be written (its folder exists or can be created, suffix allowed);
  returns it absolute. Creates nothing."""
  if not path or path.endswith(os.sep) or os.path.isdir(path):
    _refuse(flag, path, "it names a directory; give a file name" +
            (f" ending in {suffixes[0]}" if suffixes else ""))
  full = os.path.abspath(os.path.expanduser(path))
  _check_length(flag, full)
  base = os.path.basename(full)
  if suffixes and os.path.splitext(base)[1].lower() not in suffixes:
    _refuse(flag, path, "the file name must end in " + ", ".join(suffixes))
  if os.path.lexists(full) and not os.path.isfile(full):
    _refuse(flag, path, "it exists and is not a regular file")
  if os.path.exists(full) and not os.access(full, os.W_OK):
    _refuse(flag, path, "the file is not writable")
  _check_writable(flag, path, _existing_ancestor(flag, os.path.dirname(full)))
  return full
