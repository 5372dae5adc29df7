"""The training loop: data -> jitted step (donated, sharded state) -> metrics, eval, diagnostics,
checkpoints; SIGTERM/SIGINT save and exit; a non-finite loss stops the run without saving that state.

Metrics of step t are fetched after step t+1 is dispatched (so the host never stalls the device), and
always before a checkpoint of step t is written: a checkpoint is only ever of a state whose loss was
finite.
"""
from __future__ import annotations

import json
import math
import os
import shlex
import signal
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mhc_jax import distributed
from mhc_jax.checkpoint import Checkpointer, SaveFailed
from mhc_jax.config import ConfigError, RunConfig, diff, fail, to_dict
from mhc_jax.train import run_dir as rd
from mhc_jax.train.metrics import MetricsWriter, truncate_after
from mhc_jax.train.signals import StopSignals
from mhc_jax.train.state import (MeshSetup, TrainState, abstract_target, create_state, make_setup,
                                 n_params)
from mhc_jax.train.step import (LN2, make_diagnostics, make_eval_step, make_train_step,
                                summarize_diagnostics)


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
  from mhc_jax.data import make_eval_batches, make_tokenizer, make_train_iterator
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


def _to_device(batch: dict, setup: MeshSetup) -> dict:
  return {k: distributed.global_batch_array(np.asarray(v, np.int32), setup.mesh, setup.mesh_cfg)
          for k, v in batch.items() if k in ("inputs", "targets")}


def _jit_steps(cfg: RunConfig, setup: MeshSetup):
  batch_sh = {"inputs": setup.batch_sharding, "targets": setup.batch_sharding}
  train_step = jax.jit(make_train_step(cfg), in_shardings=(setup.state_shardings, batch_sh),
                       out_shardings=(setup.state_shardings, None), donate_argnums=0)
  eval_step = jax.jit(make_eval_step(cfg), in_shardings=(setup.state_shardings.params, batch_sh))
  diag = make_diagnostics(cfg)
  diag = jax.jit(diag, in_shardings=(setup.state_shardings.params, batch_sh)) if diag else None
  return train_step, eval_step, diag


def count_bytes(tokenizer, host_batches: list[dict]) -> int:
  """Text bytes the eval targets stand for (separators excluded): the bits-per-byte denominator."""
  return int(sum(tokenizer.num_bytes(np.asarray(b["targets"])) for b in host_batches))


def evaluate(eval_step, params, batches: list[dict], n_bytes: int | None = None) -> dict:
  """Mean loss per token over `batches`; bits per byte = total nats / (ln 2 * n_bytes)."""
  tot, n = 0.0, 0.0
  for b in batches:
    out = eval_step(params, b)
    tot += float(out["loss_sum"])
    n += float(out["tokens"])
  loss = tot / max(n, 1.0)
  res = {"loss": loss, "perplexity": math.exp(min(loss, 700.0)), "tokens": n}
  if n_bytes:
    res["bits_per_byte"] = tot / LN2 / (n_bytes * jax.process_count())
  return res


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


def train(cfg: RunConfig, run_dir: str, *, resume: bool = False, force: bool = False,
          allow_data_change: bool = False, progress: bool = True, final_outputs: bool = True,
          devices=None) -> dict[str, Any]:
  """Train `cfg` in `run_dir`; returns a summary dict. Raises ConfigError (bad input, nothing
  written), TrainingDiverged (NaN/Inf loss), SaveFailed (a checkpoint or run-directory write failed;
  earlier checkpoints kept) or Interrupted (SIGTERM/SIGINT)."""
  run_dir = os.path.abspath(run_dir)
  progress_state = {"step": 0, "saved": None}

  def describe() -> str:
    last = progress_state["saved"]
    return (f"last checkpoint: {'none' if last is None else 'step ' + str(last)}"
            + (f"; resume with: {resume_command(run_dir)}" if last is not None else ""))

  cleanup: list = []
  with StopSignals(cfg.train.stop_timeout_s, describe, cleanup) as sig:
    return _train(cfg, run_dir, sig, cleanup, progress_state, resume=resume, force=force,
                  allow_data_change=allow_data_change, progress=progress,
                  final_outputs=final_outputs, devices=devices)


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
           resume: bool, force: bool, allow_data_change: bool, progress: bool, final_outputs: bool,
           devices) -> dict[str, Any]:
  # 1. Validate everything that can be validated without writing.
  mode = rd.check_run_dir(run_dir, cfg, resume=resume, force=force)
  setup = make_setup(cfg, devices)
  tokenizer, data_iter, eval_host = open_data(cfg)
  from mhc_jax.data.sources import fingerprint
  data_fp = fingerprint(cfg.data)
  # Train records: bits per byte ~ loss / ln 2 for bytes (document separators count as tokens).
  bytes_per_token = 1.0 if cfg.data.tokenizer == "byte" else None
  eval_bytes = count_bytes(tokenizer, eval_host)
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
    return _run(cfg, run_dir, sig, progress_state, setup, tokenizer, data_iter, eval_host, data_fp,
                bytes_per_token, eval_bytes, ckpt, mode, allow_data_change, progress, final_outputs)
  finally:
    if lock is not None:
      lock.release()


def _run(cfg, run_dir, sig, progress_state, setup, tokenizer, data_iter, eval_host, data_fp,
         bytes_per_token, eval_bytes, ckpt, mode, allow_data_change, progress, final_outputs):
  main = distributed.is_main_process()
  train_step, eval_step, diag_fn = _jit_steps(cfg, setup)
  metrics_path = os.path.join(run_dir, rd.METRICS)

  # 3. State: restore the newest good checkpoint, or create it born sharded.
  state, start = None, 0
  if mode == "resume":
    target = abstract_target(setup, cfg)
    got = ckpt.restore_latest(target, data_iter, check_meta=check_meta_fn(
        cfg, data_fp, where=ckpt.directory, allow_data_change=allow_data_change))
    if got is None:
      _say(f"resume: {ckpt.directory} holds no usable checkpoint yet; starting from step 0")
    else:
      state, _, start = got
      # Orbax-restored buffers may not be donatable: re-materialise them through an identity jit.
      state = jax.jit(lambda s: s, out_shardings=setup.state_shardings)(state)
    if start >= cfg.train.steps:
      _say(f"nothing to do: the run is already at step {start} >= train.steps={cfg.train.steps}; "
           "nothing was changed")
      ckpt.close()
      return {"run_dir": run_dir, "step": start, "eval": {}}
    if main:
      changed = diff(rd.read_config(run_dir), cfg)
      if changed:
        _say(f"resume: config changes {', '.join(changed)}")
      rd.write_config(run_dir, cfg)
      truncate_after(metrics_path, start if got is not None else -1)
    if got is not None:
      _say(f"resumed from step {start} ({ckpt.directory}/{start})")
  if state is None:
    state = create_state(cfg, setup)
  progress_state["step"], progress_state["saved"] = start, ckpt.latest_step()
  _check_stop(sig, run_dir, progress_state)

  writer = MetricsWriter(run_dir, enabled=main)
  eval_batches = [_to_device(b, setup) for b in eval_host]
  tokens_per_step = cfg.data.batch_size * cfg.data.seq_len
  t = cfg.train
  if main and start == 0:
    _say(f"run dir: {run_dir}\nmodel: {cfg.model.connection.kind} n={cfg.model.connection.n_streams}, "
         f"{n_params(state.params) / 1e6:.2f}M params; data: {cfg.data.source}, "
         f"{cfg.data.batch_size}x{cfg.data.seq_len} tokens/step; mesh {dict(setup.mesh.shape)} "
         f"({cfg.mesh.strategy}); {t.steps} steps")

  bar = None
  if progress and main:
    from tqdm import tqdm
    bar = tqdm(total=t.steps, initial=start, desc="train", unit="step", dynamic_ncols=True,
               file=sys.stderr)

  pending: list[tuple[int, Any]] = []
  window: list[dict] = []
  window_t0 = time.perf_counter()
  timed = [0]                      # steps timed in the current window
  last_eval: dict = {}
  last_saved = ckpt.latest_step()
  run_dir_id = os.stat(run_dir).st_ino

  def drain(upto: int):
    """Fetch metrics of steps <= upto; check them; write train records at log steps."""
    nonlocal window_t0
    while pending and pending[0][0] <= upto:
      s, m = pending.pop(0)
      m = _host(m)
      if not math.isfinite(m["loss"]) or not math.isfinite(m["grad_norm"]):
        raise TrainingDiverged(
            f"loss is {m['loss']} (grad norm {m['grad_norm']}) at step {s}; stopped without "
            f"checkpointing this state (last checkpoint: "
            f"{'none' if last_saved is None else 'step ' + str(last_saved)})")
      window.append(m)
      timed[0] += 1
      if s == start + 1:            # the first step includes compilation: time from its end
        window_t0, timed[0] = time.perf_counter(), 0
      if s % t.log_every == 0 or s == t.steps:
        dt = time.perf_counter() - window_t0
        rec = {k: float(np.mean([w[k] for w in window])) for k in ("loss", "z_loss", "grad_norm")}
        rec.update(lr=m["lr"], param_norm=m["param_norm"], grad_norm_layers=m["grad_norm_layers"],
                   perplexity=math.exp(min(rec["loss"], 700.0)), window_steps=len(window))
        if timed[0]:
          rec.update(step_time_s=dt / timed[0], tokens_per_s=tokens_per_step * timed[0] / dt)
        if bytes_per_token:
          rec["bits_per_byte"] = rec["loss"] / LN2 / bytes_per_token
        writer.write(s, "train", rec)
        if bar is not None:
          bar.set_postfix(loss=f"{rec['loss']:.3f}", tok_s=f"{rec.get('tokens_per_s', 0):.0f}")
        window.clear()
        window_t0, timed[0] = time.perf_counter(), 0

  def run_diag(step: int):
    if diag_fn is not None:
      d = _host(diag_fn(state.params, eval_batches[0]))
      rec = summarize_diagnostics(d)
      rec.update({f"{k}/sites": v for k, v in d.items()})
      writer.write(step, "diag", rec)

  def run_eval(step: int):
    nonlocal last_eval
    last_eval = evaluate(eval_step, state.params, eval_batches, eval_bytes)
    writer.write(step, "eval", last_eval)
    if not t.diagnostics_every:
      run_diag(step)
    msg = f"step {step}: eval loss {last_eval['loss']:.4f}"
    if "bits_per_byte" in last_eval:
      msg += f", {last_eval['bits_per_byte']:.3f} bits/byte"
    (bar.write if bar is not None else _say)(msg)

  def save(step: int, wait: bool = False):
    nonlocal last_saved
    ckpt.save(step, state, data_iter, dict(_meta(cfg), data_fingerprint=data_fp), wait=wait)
    last_saved = progress_state["saved"] = step

  def check_run_dir_alive():
    try:
      alive = os.stat(run_dir).st_ino == run_dir_id
    except OSError:
      alive = False
    if not alive:
      raise SaveFailed(f"the run directory {run_dir} was deleted or replaced while training; "
                       "stopped (nothing more can be saved there)")

  step = start
  try:
    with setup.context():
      if start == 0 and t.eval_every:
        run_eval(0)
      if start == 0 and t.diagnostics_every:
        run_diag(0)
      while step < t.steps:
        batch = _to_device(next(data_iter), setup)
        state, m = train_step(state, batch)
        step += 1
        progress_state["step"] = step
        pending.append((step, m))
        drain(step - 1)
        ckpt.poll()
        check_run_dir_alive()
        if bar is not None:
          bar.update(1)
        stop = sig.received is not None
        due_ckpt = t.checkpoint_every and step % t.checkpoint_every == 0
        if stop or due_ckpt or step == t.steps or (t.eval_every and step % t.eval_every == 0):
          drain(step)
        if t.eval_every and step % t.eval_every == 0 and step != t.steps:
          run_eval(step)
        if t.diagnostics_every and step % t.diagnostics_every == 0:
          run_diag(step)
        if stop:
          save(step, wait=True)
          raise Interrupted(sig.received, step, run_dir, saved=True)
        if due_ckpt:
          save(step)
      drain(step)
    if start < t.steps or not last_eval:
      run_eval(step)
    if last_saved != step:
      save(step)
    ckpt.wait()
  except OSError as e:
    ckpt.broken = True
    ckpt.remove_partial()
    raise SaveFailed(f"an I/O error stopped the run at step {step}: "
                     f"{e.strerror or type(e).__name__} ({e.filename or run_dir})") from None
  finally:
    if bar is not None:
      bar.close()
    try:
      ckpt.close()
    finally:
      writer.close()

  summary = {"run_dir": run_dir, "step": step, "eval": last_eval}
  if main and final_outputs:
    summary.update(finish(cfg, run_dir, state.params, tokenizer, last_eval, step))
  return summary


def finish(cfg: RunConfig, run_dir: str, params, tokenizer, last_eval: dict, step: int) -> dict:
  """Write eval.json, sample.txt and plot.png; print where they are."""
  from mhc_jax.plot import plot_runs
  from mhc_jax.sample import sample_text
  t = cfg.train
  out = {}
  eval_path = os.path.join(run_dir, "eval.json")
  with open(eval_path, "w", encoding="utf-8") as f:
    json.dump({"step": step, **last_eval}, f, indent=2)
  out["eval_path"] = eval_path
  if t.sample_tokens:
    n_prompt = len(tokenizer.encode(t.sample_prompt))
    n_new = min(t.sample_tokens, cfg.model.max_seq_len - n_prompt)
    if n_new >= 1:
      text = sample_text(cfg.model, params, tokenizer, t.sample_prompt, max_new_tokens=n_new,
                         temperature=t.sample_temperature, top_k=t.sample_top_k, seed=t.seed)
      path = os.path.join(run_dir, "sample.txt")
      with open(path, "w", encoding="utf-8") as f:
        f.write(text + "\n")
      out["sample_path"], out["sample"] = path, text
  out["plot_path"] = plot_runs([run_dir], os.path.join(run_dir, "plot.png"))
  msg = [f"\nfinished step {step}: eval loss {last_eval.get('loss', float('nan')):.4f}"
         + (f" ({last_eval['bits_per_byte']:.3f} bits/byte, perplexity {last_eval['perplexity']:.2f})"
            if "bits_per_byte" in last_eval else "")]
  if "sample" in out:
    msg.append("sample:\n" + "-" * 60 + "\n" + out["sample"] + "\n" + "-" * 60)
  msg.append(f"eval:        {eval_path}\nsample:      {out.get('sample_path', '(disabled)')}\n"
             f"plot:        {out['plot_path']}\nmetrics:     {os.path.join(run_dir, rd.METRICS)}"
             f"\ntensorboard: tensorboard --logdir {os.path.join(run_dir, 'tb')}\n"
             f"checkpoints: {os.path.join(run_dir, rd.CHECKPOINTS)}")
  _say("\n".join(msg))
  return out


def load_checkpoint(run_dir: str, step: int | None = None, devices=None):
  """`(cfg, state, step)` from a run directory's checkpoint (newest good one by default)."""
  cfg = rd.read_config(run_dir)
  setup = make_setup(cfg, devices)
  ckpt = Checkpointer(os.path.join(run_dir, rd.CHECKPOINTS), keep=cfg.train.keep)
  try:
    target = abstract_target(setup, cfg)
    check = check_meta_fn(cfg, None, where=ckpt.directory)
    if step is None:
      got = ckpt.restore_latest(target, quarantine=False, check_meta=check)
      if got is None:
        raise ConfigError(f"--run-dir {run_dir!r} is not allowed: it holds no usable checkpoint")
      state, _, step = got
    else:
      if step not in ckpt.steps():
        raise ConfigError(f"--step={step} is not allowed: choose one of {ckpt.steps()}")
      check(step, ckpt.read_meta(step) or {})
      state, _ = ckpt.restore(step, target)
  finally:
    ckpt.close()
  return cfg, state, step, setup


__all__ = ["train", "evaluate", "load_checkpoint", "open_data", "TrainingDiverged", "Interrupted",
           "TrainState", "jnp"]
