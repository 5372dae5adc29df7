"""Shared experiment plumbing: where results go, the smoke switch; metadata, JSON and figures are
`mhc_jax.tools.results`."""
from __future__ import annotations

import os
import pathlib

from mhc_jax.tools.results import metadata, new_figure, save_figure, save_json  # noqa: F401

RESULTS_DIR = pathlib.Path(__file__).resolve().parent / "results"
SCRATCH = RESULTS_DIR / "_scratch" / "runs"      # run directories of the training experiments


def smoke_from_env(flag: bool = False) -> bool:
  """True when `--smoke` was passed or `MHC_SMOKE=1` is set (tests and notebooks)."""
  return bool(flag) or os.environ.get("MHC_SMOKE", "") not in ("", "0")


def out_dir(path: str | os.PathLike | None) -> pathlib.Path:
  d = pathlib.Path(path) if path else RESULTS_DIR
  d.mkdir(parents=True, exist_ok=True)
  return d
