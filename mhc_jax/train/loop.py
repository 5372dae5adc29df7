"""The training loop around a `Trainer`: data -> step -> metrics, eval, diagnostics, checkpoints, in a
locked run directory; SIGTERM/SIGINT save and exit; a non-finite loss stops the run without saving
that state. `train()` returns a `RunResult` holding the trainer with the final state.

Metrics of step t are fetched after step t+1 is dispatched (so the host never stalls the device), and
always before a checkpoint of step t is written: a checkpoint is only ever of a state whose loss was
finite.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import shlex
import signal
import sys
import time
from typing import Any

import jax
import numpy as np
from tqdm import tqdm

from mhc_jax import distributed
from mhc_jax.checkpoint import Checkpointer, SaveFailed
from mhc_jax.config import ConfigError, RunConfig, diff, fail, to_dict
from mhc_jax.data import make_eval_batches, make_tokenizer, make_train_iterator, sources
from mhc_jax.train import run_dir as rd
from mhc_jax.train.metrics import MetricsWriter, truncate_after
from mhc_jax.train.signals import StopSignals
from mhc_jax.train.state import n_params
from mhc_jax.train.step import LN2, summarize_diagnostics
from mhc_jax.train.trainer import Trainer, count_bytes


class TrainingDiverged(RuntimeError):
  """The loss became NaN/Inf; the run stopped and the bad state was not checkpointed."""


class Interrupted(Exception):
  """SIGTERM / SIGINT arrived; the last good step was checkpointed when the loop was running."""

  def __init__(self, signum: int, step: int, run_dir: str, saved: bool):
    self.signum, self.step, self.run_dir = signum, step, run_dir
    name = signal.Signals(signum).name
    if saved:
      msg = f"stopped by {name} at step {step}; checkpoint saved."
    elif step:
      msg = f"stopped by {name} at step {step} before a new checkpoint."
    else:
      msg = f"stopped by {name} before training started; nothing to keep."
    if os.path.isfile(os.path.join(run_dir, rd.CONFIG)):
      msg += f" Resume with: {resume_command(run_dir)}"
    super().__init__(msg)


def resume_command(run_dir: str) -> str:
  return f"mhc-jax train --run-dir {shlex.quote(run_dir)} --resume"


def _say(msg: str):
  if distributed.is_main_process():
    print(msg, flush=True)


def open_data(cfg: RunConfig):
  """Tokenizer, train iterator and eval batches; raises ConfigError for bad data (before any write)."""
  tok = make_tokenizer(cfg.data)
  if tok.vocab_size > cfg.model.vocab_size:
    raise ConfigError(f"model.vocab_size={cfg.model.vocab_size} is not allowed: the tokenizer has "
                      f"{tok.vocab_size} ids")
  n_prompt = len(tok.encode(cfg.train.sample_prompt))
  if cfg.train.sample_tokens and not 1 <= n_prompt < cfg.model.max_seq_len:
    fail("train.sample_prompt", cfg.train.sample_prompt,
         f"1 to {cfg.model.max_seq_len - 1} tokens (it has {n_prompt}; model.max_seq_len="
         f"{cfg.model.max_seq_len}), or train.sample_tokens=0 to sample nothing")
  pi, pc = jax.process_index(), jax.process_count()
  it = make_train_iterator(cfg.data, process_index=pi, process_count=pc)
  evals = make_eval_batches(cfg.data, cfg.train.eval_batches, process_index=pi, process_count=pc)
  return tok, it, evals


def _meta(cfg: RunConfig) -> dict:
  return {"config": to_dict(cfg), "jax": jax.__version__}


def _host(metrics: dict) -> dict:
  out = {}
  for k, v in jax.device_get(metrics).items():
    v = np.asarray(v)
    out[k] = float(v) if v.ndim == 0 else [float(x) for x in v]
  return out


def check_meta_fn(cfg: RunConfig, fingerprint: str | None, *, where: str,
                  allow_data_change: bool = False):
  """`check_meta(step, meta)` for `Checkpointer.restore_latest`: a checkpoint saved with another
  model/data config is a mismatch (one line, nothing moved), not a corrupt checkpoint; changed
  training data is refused unless `allow_data_change` (then a warning)."""
  mine = to_dict(cfg)

  def check(step: int, meta: dict):
    stored = meta.get("config")
    if isinstance(stored, dict):
      fields = [k for k in _dict_diff(stored, mine) if not k.startswith(rd.RESUMABLE_SECTIONS)]
      if fields:
        raise ConfigError(f"checkpoint step {step} in {where} was saved by a run with a different "
                          f"{', '.join(fields[:6])}{', ...' if len(fields) > 6 else ''}; nothing was "
                          "changed (use the matching config, another --run-dir or --force)")
    old = meta.get("data_fingerprint")
    if fingerprint and old and old != fingerprint:
      msg = (f"the training data changed since checkpoint step {step} (corpus fingerprint {old} -> "
             f"{fingerprint})")
      if not allow_data_change:
        raise ConfigError(f"--resume is not allowed: {msg}; pass --allow-data-change to continue "
                          "on the new data")
      _say(f"warning: {msg}; continuing on the new data (--allow-data-change)")
  return check


def _dict_diff(a: dict, b: dict, prefix: str = "") -> list[str]:
  """Dotted keys present in both nested dicts with different values."""
  out = []
  for k in sorted(set(a) & set(b)):
    if isinstance(a[k], dict) and isinstance(b[k], dict):
      out += _dict_diff(a[k], b[k], prefix + k + ".")
    elif a[k] != b[k]:
      out.append(prefix + k)
  return out


@dataclasses.dataclass
class RunResult:
  """What `train` returns: the run directory, the last step and eval, and the trainer holding the
  final state (`result.state`), ready for `evaluate`, diagnostics or sampling."""
  run_dir: str
  step: int
  eval: dict
  trainer: Trainer

  @property
  def state(self):
    return self.trainer.state


def train(cfg: RunConfig, run_dir: str, *, resume: bool = False, force: bool = False,
          allow_data_change: bool = False, progress: bool = True, devices=None) -> RunResult:
  """Train `cfg` in `run_dir` (config.json, metrics.jsonl, tb/, checkpoints/, eval.json).

  Raises ConfigError (bad input, nothing written), TrainingDiverged (NaN/Inf loss), SaveFailed (a
  checkpoint or run-directory write failed; earlier checkpoints kept) or Interrupted (SIGTERM/SIGINT).
  """
  run_dir = os.path.abspath(run_dir)
  progress_state = {"step": 0, "saved": None}

  def describe() -> str:
    last = progress_state["saved"]
    return (f"last checkpoint: {'none' if last is None else 'step ' + str(last)}"
            + (f"; resume with: {resume_command(run_dir)}" if last is not None else ""))

  cleanup: list = []
  with StopSignals(cfg.train.stop_timeout_s, describe, cleanup) as sig:
    return _train(cfg, run_dir, sig, cleanup, progress_state, resume=resume, force=force,
                  allow_data_change=allow_data_change, progress=progress, devices=devices)


def _check_stop(sig: StopSignals, run_dir: str, state: dict):
  if sig.received is not None:
    raise Interrupted(sig.received, state["step"], run_dir, saved=False)


def _cannot_write(run_dir: str, e: OSError) -> SaveFailed:
  return SaveFailed(f"cannot write the run directory {run_dir} "
                    f"({e.strerror or type(e).__name__}: {e.filename or run_dir})")


def _lock(run_dir: str) -> rd.RunLock:
  try:
    return rd.RunLock(run_dir)
  except OSError as e:
    raise _cannot_write(run_dir, e) from None


def _prepare_run_dir(run_dir: str, cfg: RunConfig, mode: str, lock: rd.RunLock):
  """Clear (`--force`) and write the config of a fresh run; a failed write leaves nothing behind."""
  try:
    if mode == "force":
      rd.clear(run_dir)
    rd.write_config(run_dir, cfg)
  except OSError as e:
    lock.remove()
    raise _cannot_write(run_dir, e) from None


def _train(cfg: RunConfig, run_dir: str, sig: StopSignals, cleanup: list, progress_state: dict, *,
           resume: bool, force: bool, allow_data_change: bool, progress: bool,
           devices) -> RunResult:
  # 1. Validate everything that can be validated without writing.
  mode = rd.check_run_dir(run_dir, cfg, resume=resume, force=force)
  trainer = Trainer(cfg, devices)
  data = _RunData.open(cfg)
  _check_stop(sig, run_dir, progress_state)

  # 2. Now the run directory: lock it, then write.
  main = distributed.is_main_process()
  lock = _lock(run_dir) if main else None
  if lock is not None:
    cleanup.append(lock.release)
  try:
    if main and mode != "resume":
      _prepare_run_dir(run_dir, cfg, mode, lock)
    ckpt = Checkpointer(os.path.join(run_dir, rd.CHECKPOINTS), keep=cfg.train.keep,
                        save_timeout_s=cfg.train.save_timeout_s)
    cleanup.insert(0, ckpt.remove_partial)
    if main:
      ckpt.remove_partial()    # left by an earlier process that was cut short; the lock is ours
    start = _start_state(trainer, ckpt, data, run_dir, mode, allow_data_change)
    if start >= cfg.train.steps:   # a finished run resumed: nothing to do
      return RunResult(run_dir, start, {}, trainer)
    progress_state["step"], progress_state["saved"] = start, ckpt.latest_step()
    _check_stop(sig, run_dir, progress_state)
    return _Loop(trainer, data, ckpt, run_dir, sig, progress_state, progress).run(start)
  finally:
    if lock is not None:
      lock.release()


@dataclasses.dataclass
class _RunData:
  """Tokenizer, train iterator, eval batches and what the records need to know about them."""
  tokenizer: Any
  train_iter: Any
  eval_host: list
  fingerprint: str | None
  eval_bytes: int
  bytes_per_token: float | None    # 1 for bytes: train bits/byte ~ loss / ln 2

  @classmethod
  def open(cls, cfg: RunConfig) -> "_RunData":
    tok, it, evals = open_data(cfg)
    return cls(tok, it, evals, sources.fingerprint(cfg.data), count_bytes(tok, evals),
               1.0 if cfg.data.tokenizer == "byte" else None)


def _start_state(trainer: Trainer, ckpt: Checkpointer, data: _RunData, run_dir: str, mode: str,
                 allow_data_change: bool) -> int:
  """Restore the newest good checkpoint (`--resume`) or create the state; returns the start step
  (>= `train.steps`: the run is finished, nothing changed)."""
  cfg, start, restored = trainer.cfg, 0, False
  if mode == "resume":
    got = trainer.restore(ckpt, data.train_iter, check_meta=check_meta_fn(
        cfg, data.fingerprint, where=ckpt.directory, allow_data_change=allow_data_change))
    if got is None:
      _say(f"resume: {ckpt.directory} holds no usable checkpoint yet; starting from step 0")
    else:
      start, restored = got, True
    if start >= cfg.train.steps:
      _say(f"nothing to do: the run is already at step {start} >= train.steps={cfg.train.steps}; "
           "nothing was changed")
      ckpt.close()
      return start
    if distributed.is_main_process():
      changed = diff(rd.read_config(run_dir), cfg)
      if changed:
        _say(f"resume: config changes {', '.join(changed)}")
      rd.write_config(run_dir, cfg)
      truncate_after(os.path.join(run_dir, rd.METRICS), start if restored else -1)
    if restored:
      _say(f"resumed from step {start} ({ckpt.directory}/{start})")
  if not restored:
    trainer.init()
  return start


class _Loop:
  """The step loop of one run. Metrics of step t are fetched after step t+1 is dispatched (the host
  never stalls the device) and always before a checkpoint of step t is written."""

  def __init__(self, trainer: Trainer, data: _RunData, ckpt: Checkpointer, run_dir: str,
               sig: StopSignals, progress_state: dict, progress: bool):
    self.trainer, self.data, self.ckpt, self.run_dir = trainer, data, ckpt, run_dir
    self.sig, self.progress_state = sig, progress_state
    self.t = trainer.cfg.train
    self.main = distributed.is_main_process()
    self.writer = MetricsWriter(run_dir, enabled=self.main)
    self.eval_batches = [trainer.to_device(b) for b in data.eval_host]
    self.tokens_per_step = trainer.cfg.data.batch_size * trainer.cfg.data.seq_len
    self.progress = progress and self.main
    self.bar = None
    self.pending: list[tuple[int, Any]] = []
    self.window: list[dict] = []
    self.window_t0, self.timed = time.perf_counter(), 0
    self.last_eval: dict = {}
    self.last_saved = ckpt.latest_step()
    self.run_dir_id = os.stat(run_dir).st_ino
    self.start = 0

  def run(self, start: int) -> RunResult:
    t, trainer = self.t, self.trainer
    self.start = step = start
    if self.progress:
      self.bar = tqdm(total=t.steps, initial=start, desc="train", unit="step", dynamic_ncols=True,
                      file=sys.stderr)
    if self.main and start == 0:
      cfg = trainer.cfg
      _say(f"run dir: {self.run_dir}\nmodel: {cfg.model.connection.kind} "
           f"n={cfg.model.connection.n_streams}, {n_params(trainer.state.params) / 1e6:.2f}M params; "
           f"data: {cfg.data.source}, {cfg.data.batch_size}x{cfg.data.seq_len} tokens/step; mesh "
           f"{dict(trainer.setup.mesh.shape)} ({cfg.mesh.strategy}); {t.steps} steps")
    try:
      if start == 0 and t.eval_every:
        self.eval(0)
      if start == 0 and t.diagnostics_every:
        self.diagnostics(0)
      while step < t.steps:
        m = trainer.step(next(self.data.train_iter))
        step += 1
        self.progress_state["step"] = step
        self.pending.append((step, m))
        self.drain(step - 1)
        self.ckpt.poll()
        self.check_run_dir_alive()
        if self.bar is not None:
          self.bar.update(1)
        stop = self.sig.received is not None
        due_ckpt = t.checkpoint_every and step % t.checkpoint_every == 0
        due_eval = t.eval_every and step % t.eval_every == 0
        if stop or due_ckpt or due_eval or step == t.steps:
          self.drain(step)
        if due_eval and step != t.steps:
          self.eval(step)
        if t.diagnostics_every and step % t.diagnostics_every == 0:
          self.diagnostics(step)
        if stop:
          self.save(step, wait=True)
          raise Interrupted(self.sig.received, step, self.run_dir, saved=True)
        if due_ckpt:
          self.save(step)
      self.drain(step)
      if start < t.steps or not self.last_eval:
        self.eval(step)
      if self.last_saved != step:
        self.save(step)
      self.ckpt.wait()
    except OSError as e:
      self.ckpt.broken = True
      self.ckpt.remove_partial()
      raise SaveFailed(f"an I/O error stopped the run at step {step}: "
                       f"{e.strerror or type(e).__name__} ({e.filename or self.run_dir})") from None
    finally:
      if self.bar is not None:
        self.bar.close()
      try:
        self.ckpt.close()
      finally:
        self.writer.close()
    if self.main:
      with open(os.path.join(self.run_dir, rd.EVAL), "w", encoding="utf-8") as f:
        json.dump({"step": step, **self.last_eval}, f, indent=2)
    return RunResult(self.run_dir, step, self.last_eval, trainer)

  def drain(self, upto: int):
    """Fetch metrics of steps <= upto; check them; write train records at log steps."""
    t = self.t
    while self.pending and self.pending[0][0] <= upto:
      s, m = self.pending.pop(0)
      m = _host(m)
      if not math.isfinite(m["loss"]) or not math.isfinite(m["grad_norm"]):
        raise TrainingDiverged(
            f"loss is {m['loss']} (grad norm {m['grad_norm']}) at step {s}; stopped without "
            f"checkpointing this state (last checkpoint: "
            f"{'none' if self.last_saved is None else 'step ' + str(self.last_saved)})")
      self.window.append(m)
      self.timed += 1
      if s == self.start + 1:       # the first step includes compilation: time from its end
        self.window_t0, self.timed = time.perf_counter(), 0
      if s % t.log_every == 0 or s == t.steps:
        self.write_train_record(s, m)

  def write_train_record(self, s: int, m: dict):
    dt = time.perf_counter() - self.window_t0
    rec = {k: float(np.mean([w[k] for w in self.window])) for k in ("loss", "z_loss", "grad_norm")}
    rec.update(lr=m["lr"], param_norm=m["param_norm"], grad_norm_layers=m["grad_norm_layers"],
               perplexity=math.exp(min(rec["loss"], 700.0)), window_steps=len(self.window))
    rec.update({k: v for k, v in m.items() if k.startswith("moe/")})   # MoE: the latest step's
    if self.timed:
      rec.update(step_time_s=dt / self.timed, tokens_per_s=self.tokens_per_step * self.timed / dt)
    if self.data.bytes_per_token:
      rec["bits_per_byte"] = rec["loss"] / LN2 / self.data.bytes_per_token
    self.writer.write(s, "train", rec)
    if self.bar is not None:
      self.bar.set_postfix(loss=f"{rec['loss']:.3f}", tok_s=f"{rec.get('tokens_per_s', 0):.0f}")
    self.window.clear()
    self.window_t0, self.timed = time.perf_counter(), 0

  def diagnostics(self, step: int):
    d = self.trainer.diagnostics(self.eval_batches[0])
    if d is not None:
      d = _host(d)
      rec = summarize_diagnostics(d)
      rec.update({f"{k}/sites": v for k, v in d.items()})
      self.writer.write(step, "diag", rec)

  def eval(self, step: int):
    self.last_eval = self.trainer.evaluate(self.eval_batches, self.data.eval_bytes)
    self.writer.write(step, "eval", self.last_eval)
    if not self.t.diagnostics_every:
      self.diagnostics(step)
    msg = f"step {step}: eval loss {self.last_eval['loss']:.4f}"
    if "bits_per_byte" in self.last_eval:
      msg += f", {self.last_eval['bits_per_byte']:.3f} bits/byte"
    (self.bar.write if self.bar is not None else _say)(msg)

  def save(self, step: int, wait: bool = False):
    meta = dict(_meta(self.trainer.cfg), data_fingerprint=self.data.fingerprint)
    self.trainer.save(self.ckpt, step, self.data.train_iter, meta, wait=wait)
    self.last_saved = self.progress_state["saved"] = step

  def check_run_dir_alive(self):
    try:
      alive = os.stat(self.run_dir).st_ino == self.run_dir_id
    except OSError:
      alive = False
    if not alive:
      raise SaveFailed(f"the run directory {self.run_dir} was deleted or replaced while training; "
                       "stopped (nothing more can be saved there)")


def load_checkpoint(run_dir: str, step: int | None = None, devices=None) -> Trainer:
  """A `Trainer` holding a run directory's checkpoint (the newest good one by default, else `step`);
  `trainer.cfg` is the run's config and `trainer.step_count` the checkpoint's step."""
  cfg = rd.read_config(run_dir)
  trainer = Trainer(cfg, devices)
  ckpt = Checkpointer(os.path.join(run_dir, rd.CHECKPOINTS), keep=cfg.train.keep)
  try:
    check = check_meta_fn(cfg, None, where=ckpt.directory)
    if step is None:
      if trainer.restore(ckpt, quarantine=False, check_meta=check) is None:
        raise ConfigError(f"--run-dir {run_dir!r} is not allowed: it holds no usable checkpoint")
    else:
      if step not in ckpt.steps():
        raise ConfigError(f"--step={step} is not allowed: choose one of {ckpt.steps()}")
      check(step, ckpt.read_meta(step) or {})
      state, _ = ckpt.restore(step, trainer.setup.target)
      trainer.set_state(state)
  finally:
    ckpt.close()
  return trainer
