"""Configs as plain dicts / JSON (`config.json` of a run) and `--set section.field=value` overrides,
with values coerced to each field's annotated type."""
from __future__ import annotations

import dataclasses
import json
import types
import typing
from typing import Any

from mhc_jax.config.checks import ConfigError, fail
from mhc_jax.config.train import RunConfig


def to_dict(cfg) -> dict:
  """Nested plain dict (tuples become lists)."""
  return json.loads(json.dumps(dataclasses.asdict(cfg)))


def to_json(cfg) -> str:
  return json.dumps(to_dict(cfg), indent=2, sort_keys=True)


def _hints(cls) -> dict:
  return typing.get_type_hints(cls)


def _section(hint):
  """The dataclass a field holds (`X` or `X | None`), else None."""
  if dataclasses.is_dataclass(hint):
    return hint
  if typing.get_origin(hint) in (typing.Union, types.UnionType):
    inner = [a for a in typing.get_args(hint) if dataclasses.is_dataclass(a)]
    return inner[0] if inner else None
  return None


def _coerce(field: str, value: Any, hint) -> Any:
  """Convert a JSON/CLI value to the annotated type of a dataclass field, or raise ConfigError."""
  origin = typing.get_origin(hint)
  if dataclasses.is_dataclass(hint):
    if not isinstance(value, dict):
      fail(field, value, f"a mapping of {hint.__name__} fields")
    return from_dict(hint, value, prefix=field + ".")
  if origin in (typing.Union, types.UnionType):
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if value is None or (isinstance(value, str) and value.strip().lower() in ("none", "null")):
      return None
    return _coerce(field, value, args[0])
  if origin is tuple or hint is tuple:
    args = typing.get_args(hint)
    if isinstance(value, str):
      value = [v.strip() for v in value.strip("()[] ").split(",") if v.strip()]
    if not isinstance(value, (list, tuple)):
      fail(field, value, "a tuple such as (-1, 1, 1)")
    elem = args[0] if args else Any
    return tuple(_coerce(field, v, elem) for v in value)
  if hint is bool:
    if isinstance(value, bool):
      return value
    if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
      return value.lower() in ("true", "1", "yes")
    fail(field, value, "true or false")
  if hint in (int, float):
    numeric = (int, float) if hint is float else int
    if isinstance(value, numeric) and not isinstance(value, bool):
      return hint(value)
    if isinstance(value, str):
      try:
        return hint(value)
      except ValueError:
        pass
    fail(field, value, "an integer" if hint is int else "a number")
  if hint is str:
    if isinstance(value, str):
      return value
    fail(field, value, "a string")
  return value


def from_dict(cls, d: dict, prefix: str = ""):
  """Build dataclass `cls` from a nested dict; unknown keys and wrong types raise ConfigError."""
  hints = _hints(cls)
  names = [f.name for f in dataclasses.fields(cls)]
  kwargs = {}
  for key, value in d.items():
    if key not in names:
      fail(prefix + key, value, f"unknown key; {prefix or cls.__name__ + '.'}* has "
           + ", ".join(names))
    kwargs[key] = _coerce(prefix + key, value, hints[key])
  try:
    return cls(**kwargs)
  except TypeError as e:  # pragma: no cover - defensive: dataclass signature mismatch
    raise ConfigError(f"{prefix or cls.__name__}: {e}") from None


def run_config_from_dict(d: dict) -> RunConfig:
  return from_dict(RunConfig, d)


def apply_overrides(cfg: RunConfig, overrides: list[str]) -> RunConfig:
  """Apply `section.field=value` (nested: `model.connection.n_streams=4`) overrides in order.

  Values are coerced to the field's type: ints, floats, `true/false`, tuples as `-1,2,1`.
  """
  d = to_dict(cfg)
  for item in overrides:
    if "=" not in item:
      raise ConfigError(f"--set {item!r} is not allowed: use key=value, e.g. "
                        "model.connection.n_streams=4")
    key, value = item.split("=", 1)
    key = key.strip()
    parts = key.split(".")
    node, cls = d, RunConfig
    for i, part in enumerate(parts):
      names = [f.name for f in dataclasses.fields(cls)]
      where = ".".join(parts[:i]) or "config"
      if part not in names:
        raise ConfigError(f"--set {key}: unknown key {part!r} in {where}; choose one of "
                          + ", ".join(names))
      hint = _hints(cls)[part]
      section = _section(hint)
      if i == len(parts) - 1:
        if dataclasses.is_dataclass(hint):
          raise ConfigError(f"--set {key}: {key} is a section; set one of its fields, e.g. "
                            f"{key}.{dataclasses.fields(hint)[0].name}=...")
        node[part] = _coerce(key, value, hint)
      else:
        if section is None:
          raise ConfigError(f"--set {key}: {'.'.join(parts[:i + 1])} is not a section")
        if node.get(part) is None:   # an optional section that is off: start from its defaults
          node[part] = to_dict(section())
        node, cls = node[part], section
  return run_config_from_dict(d)


def diff(a: RunConfig, b: RunConfig) -> list[str]:
  """Dotted names of the fields that differ between two configs."""
  out = []

  def walk(x, y, prefix):
    for k in sorted(set(x) | set(y)):
      if isinstance(x.get(k), dict) and isinstance(y.get(k), dict):
        walk(x[k], y[k], prefix + k + ".")
      elif x.get(k) != y.get(k):
        out.append(prefix + k)
  walk(to_dict(a), to_dict(b), "")
  return out
