"""Run configuration: `TrainConfig` and `RunConfig(model, data, train, mesh)`, JSON round trip and
`--set section.field=value` overrides with type coercion.

Every mistake raises `mhc_jax.config.ConfigError` with one line naming the field, the value and what is
allowed.
"""
from __future__ import annotations

import dataclasses
import json
import types
import typing
from typing import Any

from mhc_jax.config import (ConfigError, ConnectionConfig, ModelConfig, check_choice, check_float,
                            check_int, fail)
from mhc_jax.data.config import DataConfig
from mhc_jax.sharding import MeshConfig

SCHEDULES = ("cosine", "paper_step", "constant")
SEED_LIMIT = 2**32


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """Optimisation and bookkeeping of one run.

  schedule: "cosine" = linear warmup to `lr`, cosine decay to `lr * min_lr_ratio` at `steps`;
    "paper_step" = warmup, then `lr` x 0.316 from 0.8*steps and x 0.1 from 0.9*steps (mHC paper);
    "constant" = warmup then flat.
  grad_accum: micro-batches per step; `data.batch_size` must be divisible by it.
  z_loss: weight of `log(Z)^2` added to the loss (PaLM); 0 disables it.
  eval_every / checkpoint_every / log_every: in steps; 0 disables periodic eval / checkpoints.
  inject_nan_at_step: fault injection for tests, makes the loss NaN at that step (0 = never).
  save_timeout_s: deadline of each checkpoint save (its blocking part and its background write);
    a save that fails or runs past it ends the run with exit code 4, earlier checkpoints kept.
  stop_timeout_s: after SIGTERM/SIGINT the run saves and exits; if that takes longer (a save stuck,
    a long compilation) the process exits anyway after this many seconds, without a new checkpoint.
  """
  steps: int = 1000
  lr: float = 3e-3
  schedule: str = "cosine"
  warmup_steps: int = 100
  min_lr_ratio: float = 0.1
  b1: float = 0.9
  b2: float = 0.95
  adam_eps: float = 1e-8
  weight_decay: float = 0.1
  clip_norm: float = 1.0        # global-norm clipping; 0 disables it
  grad_accum: int = 1
  z_loss: float = 0.0
  eval_every: int = 200
  eval_batches: int = 8
  log_every: int = 10
  diagnostics_every: int = 0    # 0: with every eval; gains on one validation batch
  checkpoint_every: int = 200
  keep: int = 3
  seed: int = 0
  sample_tokens: int = 200      # generated at the end of `train`; 0 disables it
  sample_prompt: str = "def "
  sample_temperature: float = 0.8
  sample_top_k: int = 40
  inject_nan_at_step: int = 0
  save_timeout_s: float = 300.0
  stop_timeout_s: float = 25.0

  def __post_init__(self):
    check_int("train.steps", self.steps, 1)
    check_float("train.lr", self.lr, 0.0, strict=True)
    check_choice("train.schedule", self.schedule, SCHEDULES)
    check_int("train.warmup_steps", self.warmup_steps, 0)
    if self.warmup_steps >= self.steps and self.steps > 1:
      fail("train.warmup_steps", self.warmup_steps, f"must be < train.steps={self.steps}")
    check_float("train.min_lr_ratio", self.min_lr_ratio)
    if self.min_lr_ratio > 1:
      fail("train.min_lr_ratio", self.min_lr_ratio, "a number in [0, 1]")
    for name in ("b1", "b2"):
      v = getattr(self, name)
      check_float(f"train.{name}", v)
      if v >= 1:
        fail(f"train.{name}", v, "a number in [0, 1)")
    check_float("train.adam_eps", self.adam_eps)
    check_float("train.weight_decay", self.weight_decay)
    check_float("train.clip_norm", self.clip_norm)
    check_int("train.grad_accum", self.grad_accum, 1)
    check_float("train.z_loss", self.z_loss)
    for name in ("eval_every", "log_every", "checkpoint_every", "diagnostics_every", "sample_tokens",
                 "sample_top_k", "inject_nan_at_step"):
      check_int(f"train.{name}", getattr(self, name), 0)
    check_int("train.eval_batches", self.eval_batches, 1)
    check_int("train.keep", self.keep, 1)
    check_int("train.seed", self.seed, 0)
    if self.seed >= SEED_LIMIT:
      fail("train.seed", self.seed, "an integer in [0, 2**32)")
    check_float("train.save_timeout_s", self.save_timeout_s, strict=True)
    check_float("train.stop_timeout_s", self.stop_timeout_s, strict=True)
    check_float("train.sample_temperature", self.sample_temperature)
    if not isinstance(self.sample_prompt, str):
      fail("train.sample_prompt", self.sample_prompt, "a string")


@dataclasses.dataclass(frozen=True)
class RunConfig:
  """Everything that defines a run; saved as `config.json` in the run directory and every checkpoint."""
  model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
  data: DataConfig = dataclasses.field(default_factory=DataConfig)
  train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
  mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)

  def __post_init__(self):
    if self.data.seq_len > self.model.max_seq_len:
      fail("data.seq_len", self.data.seq_len,
           f"must be <= model.max_seq_len={self.model.max_seq_len}")
    if self.data.batch_size % self.train.grad_accum:
      fail("train.grad_accum", self.train.grad_accum,
           f"must divide data.batch_size={self.data.batch_size}")
    if self.data.tokenizer == "byte" and self.model.vocab_size < 256:
      fail("model.vocab_size", self.model.vocab_size, "must be >= 256 for the byte tokenizer")


# ---------------------------------------------------------------------------------------------
# dict / JSON round trip


def to_dict(cfg) -> dict:
  """Nested plain dict (tuples become lists)."""
  return json.loads(json.dumps(dataclasses.asdict(cfg)))


def to_json(cfg) -> str:
  return json.dumps(to_dict(cfg), indent=2, sort_keys=True)


def _hints(cls) -> dict:
  return typing.get_type_hints(cls)


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
  if hint is int:
    if isinstance(value, int) and not isinstance(value, bool):
      return value
    if isinstance(value, str):
      try:
        return int(value)
      except ValueError:
        pass
    fail(field, value, "an integer")
  if hint is float:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
      return float(value)
    if isinstance(value, str):
      try:
        return float(value)
      except ValueError:
        pass
    fail(field, value, "a number")
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
      if i == len(parts) - 1:
        if dataclasses.is_dataclass(hint):
          raise ConfigError(f"--set {key}: {key} is a section; set one of its fields, e.g. "
                            f"{key}.{dataclasses.fields(hint)[0].name}=...")
        node[part] = _coerce(key, value, hint)
      else:
        if not dataclasses.is_dataclass(hint):
          raise ConfigError(f"--set {key}: {'.'.join(parts[:i + 1])} is not a section")
        node, cls = node[part], hint
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


__all__ = ["TrainConfig", "RunConfig", "ConnectionConfig", "ModelConfig", "DataConfig", "MeshConfig",
           "to_dict", "to_json", "from_dict", "run_config_from_dict", "apply_overrides", "diff",
           "ConfigError"]
