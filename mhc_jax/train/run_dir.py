"""Run directory layout and the rules for reusing one.

    <run_dir>/config.json        the RunConfig (also stored in every checkpoint's `meta`)
    <run_dir>/metrics.jsonl      train / eval / diag records
    <run_dir>/tb/                TensorBoard event files
    <run_dir>/checkpoints/<step>/{state,data,meta}   Orbax checkpoints (keep-N)
    <run_dir>/eval.json          final evaluation
    <run_dir>/sample.txt         generated text at the end of training
    <run_dir>/plot.png           loss and gain curves

Reuse: an existing run directory is refused unless `--resume` (continue from its newest checkpoint; the
config may differ only in `train.*` and `mesh.*`, e.g. more steps or another strategy) or `--force`
(delete this layout's files and start over). Nothing is written before the config and data are valid.
"""
from __future__ import annotations

import json
import os
import shutil

from mhc_jax.config import ConfigError
from mhc_jax.train import config as tcfg

CONFIG = "config.json"
METRICS = "metrics.jsonl"
CHECKPOINTS = "checkpoints"
OWNED = (CONFIG, METRICS, "tb", CHECKPOINTS, "eval.json", "sample.txt", "plot.png")
RESUMABLE_SECTIONS = ("train.", "mesh.")


def read_config(run_dir: str) -> tcfg.RunConfig:
  path = os.path.join(run_dir, CONFIG)
  if not os.path.isfile(path):
    raise ConfigError(f"--run-dir {run_dir!r} is not allowed: it holds no {CONFIG} (not a run directory)")
  try:
    with open(path, encoding="utf-8") as f:
      d = json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    raise ConfigError(f"{path}: unreadable run config ({e})") from None
  return tcfg.run_config_from_dict(d)


def write_config(run_dir: str, cfg: tcfg.RunConfig):
  """Atomic write (temp file + rename)."""
  os.makedirs(run_dir, exist_ok=True)
  path = os.path.join(run_dir, CONFIG)
  with open(path + ".tmp", "w", encoding="utf-8") as f:
    f.write(tcfg.to_json(cfg) + "\n")
  os.replace(path + ".tmp", path)


def has_checkpoints(run_dir: str) -> bool:
  d = os.path.join(run_dir, CHECKPOINTS)
  return os.path.isdir(d) and any(n.isdigit() for n in os.listdir(d))


def check_run_dir(run_dir: str, cfg: tcfg.RunConfig, *, resume: bool, force: bool) -> str:
  """Decide what to do with `run_dir` without touching it: "fresh", "resume" or "force".

  Raises ConfigError (one line) when the directory may not be used as asked.
  """
  if resume and force:
    raise ConfigError("--resume and --force are not allowed together: resume continues a run, "
                      "force deletes it")
  if os.path.exists(run_dir) and not os.path.isdir(run_dir):
    raise ConfigError(f"--run-dir {run_dir!r} is not allowed: it is a file, not a directory")
  entries = os.listdir(run_dir) if os.path.isdir(run_dir) else []
  if not entries:
    if resume:
      raise ConfigError(f"--resume is not allowed: {run_dir!r} holds no run to resume")
    return "fresh"
  if force:
    return "force"
  if CONFIG not in entries:
    raise ConfigError(f"--run-dir {run_dir!r} is not allowed: it is not empty and holds no {CONFIG}; "
                      "choose another directory (or --force to use it anyway)")
  old = read_config(run_dir)
  changed = tcfg.diff(old, cfg)
  if resume:
    if not has_checkpoints(run_dir):
      raise ConfigError(f"--resume is not allowed: {run_dir!r} holds no checkpoint yet; "
                        "use --force to start it over")
    fixed = [k for k in changed if not k.startswith(RESUMABLE_SECTIONS)]
    if fixed:
      raise ConfigError(f"--resume is not allowed: {run_dir!r} was trained with a different "
                        f"{', '.join(fixed)}; only train.* and mesh.* may change on resume "
                        "(use another --run-dir or --force)")
    return "resume"
  if changed:
    raise ConfigError(f"--run-dir {run_dir!r} is not allowed: it holds a run with a different config "
                      f"({', '.join(changed[:6])}{', ...' if len(changed) > 6 else ''}); "
                      "pass --resume to continue it or --force to start over")
  raise ConfigError(f"--run-dir {run_dir!r} is not allowed: it already holds this run; "
                    "pass --resume to continue it or --force to start over")


def clear(run_dir: str):
  """Remove the files this layout owns (never anything else)."""
  for name in OWNED:
    p = os.path.join(run_dir, name)
    if os.path.isdir(p):
      shutil.rmtree(p)
    elif os.path.exists(p):
      os.remove(p)
