"""`TrainConfig` (optimisation and bookkeeping) and `RunConfig(model, data, train, mesh)` with the
rules that cross sections."""
from __future__ import annotations

import dataclasses

from mhc_jax.config.checks import check_choice, check_float, check_int, check_seed, fail
from mhc_jax.config.data import DataConfig
from mhc_jax.config.mesh import MeshConfig
from mhc_jax.config.model import ModelConfig

SCHEDULES = ("cosine", "paper_step", "constant")


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
    check_seed("train.seed", self.seed)
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
