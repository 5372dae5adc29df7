"""Command-line flags the tools share."""
from __future__ import annotations

import argparse


def config_parser(prog: str, doc: str, *, preset: str, preset_help: str,
                  set_help: str) -> argparse.ArgumentParser:
  """A parser for `prog` (description: the first line of `doc`) with the run-config flags:
  `--preset NAME` (default `preset`) and `--set KEY=VALUE` (repeatable, into `overrides`)."""
  p = argparse.ArgumentParser(prog=prog, description=doc.split("\n")[0])
  p.add_argument("--preset", default=preset, help=preset_help)
  p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                 help=set_help)
  return p
