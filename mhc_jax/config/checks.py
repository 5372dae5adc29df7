"""`ConfigError` and the field checks every config uses: each names the field, the value and what is
allowed, in one line."""
from __future__ import annotations

import math
from typing import Any

SEED_LIMIT = 2**32


class ConfigError(ValueError):
  """A user-facing configuration mistake: one line, no traceback needed."""


def fail(field: str, value: Any, allowed: str):
  raise ConfigError(f"{field}={value!r} is not allowed: {allowed}")


def check_choice(field: str, value: Any, choices):
  if value not in choices:
    fail(field, value, "choose one of " + ", ".join(repr(c) for c in choices))


def check_int(field: str, value: Any, minimum: int):
  if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
    fail(field, value, f"an integer >= {minimum}")


def check_float(field: str, value: Any, minimum: float = 0.0, strict: bool = False):
  ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
  if not ok or value < minimum or (strict and value == minimum):
    fail(field, value, f"a finite number {'>' if strict else '>='} {minimum}")


def check_seed(field: str, value: Any):
  check_int(field, value, 0)
  if value >= SEED_LIMIT:
    fail(field, value, "an integer in [0, 2**32)")
