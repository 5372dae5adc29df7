"""`mhc-jax` command line (also `python -m mhc_jax`).

    mhc-jax train [--preset default] [--set model.connection.n_streams=4 ...] [--run-dir D]
                  [--resume | --force] [--no-progress]
    mhc-jax eval --run-dir D [--step N] [--split validation|train] [--batches K]
    mhc-jax sample --run-dir D [--prompt TEXT] [--tokens N] [--temperature T] [--top-k K] [--seed S]
    mhc-jax sample|eval --run-dir D --max-memory 2GB   (layers beyond the budget stream from disk)
    mhc-jax plot RUN_DIR [RUN_DIR ...] [--out plot.png]
    mhc-jax show-config [--preset P] [--set ...]
    mhc-jax bench kernels ...          (mhc_jax.tools.bench_kernels)
    mhc-jax bench step ...             (mhc_jax.tools.bench_step: train-step time/memory/MFU per connection)
    mhc-jax compare-sharding ...       (mhc_jax.tools.compare_sharding)

Exit status: see EXIT_STATUS below (also printed by `mhc-jax --help`).

Each command imports what it needs when it runs (JAX, the data pipeline, the tools), so `--help`
and argument errors answer at once; that is why the imports below sit inside the commands.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import time

from mhc_jax import distributed
from mhc_jax.config import ConfigError

EXIT_BAD_INPUT = 2
EXIT_DIVERGED = 3
EXIT_SAVE_FAILED = 4
EXIT_STATUS = """exit status:
  0         success
  2         bad input (config, flag, path, data, run directory in use or refused); nothing written
  3         training diverged (NaN/Inf loss); the bad state is not checkpointed
  4         a checkpoint save (or another write to the run directory) failed or ran past
            train.save_timeout_s; earlier checkpoints are kept
  128+N     stopped by signal N (SIGTERM: 143, SIGINT: 130) after saving the last step, or after
            train.stop_timeout_s without a new checkpoint"""
SEED_LIMIT = 2**32


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="mhc-jax", description="Hyper-Connections / mHC in JAX",
                              epilog=EXIT_STATUS, formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = p.add_subparsers(dest="command", required=True)

  def config_args(sp):
    sp.add_argument("--preset", default=None, help="named config (default, smoke, tiny)")
    sp.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="override a field, e.g. model.connection.n_streams=4 (repeatable)")

  t = sub.add_parser("train", help="train a model", epilog=EXIT_STATUS,
                     formatter_class=argparse.RawDescriptionHelpFormatter)
  config_args(t)
  t.add_argument("--run-dir", default=None, help="default: runs/<preset>-<date>-<time>")
  t.add_argument("--resume", action="store_true", help="continue the run in --run-dir")
  t.add_argument("--force", action="store_true",
                 help="delete the run in --run-dir (only the files training wrote) and start over")
  t.add_argument("--allow-data-change", action="store_true",
                 help="with --resume: continue although the corpus changed since the checkpoint")
  t.add_argument("--no-progress", action="store_true", help="no progress bar")
  add_distributed_args(t)   # multi-host: jax.distributed flags

  e = sub.add_parser("eval", help="evaluate a checkpoint on a split")
  e.add_argument("--run-dir", required=True)
  e.add_argument("--step", type=int, default=None, help="checkpoint step (default: newest)")
  e.add_argument("--split", default="validation", choices=("validation", "train"))
  e.add_argument("--batches", type=int, default=None, help="default: train.eval_batches")
  importlib.import_module("mhc_jax.quant.cli").add_max_memory(e)   # layers streamed from disk

  s = sub.add_parser("sample", help="generate text from a checkpoint (KV cache)")
  s.add_argument("--run-dir", required=True)
  s.add_argument("--step", type=int, default=None)
  s.add_argument("--prompt", default="def ")
  s.add_argument("--tokens", type=int, default=None,
                 help="new tokens (default: 200, or as many as fit in model.max_seq_len)")
  s.add_argument("--temperature", type=float, default=0.8)
  s.add_argument("--top-k", type=int, default=40)
  s.add_argument("--seed", type=int, default=0)
  s.add_argument("--num", type=int, default=1, help="number of samples")
  importlib.import_module("mhc_jax.quant.cli").add_max_memory(s)

  pl = sub.add_parser("plot", help="plot loss and gain curves of runs to PNG")
  pl.add_argument("run_dirs", nargs="+")
  pl.add_argument("--out", default="plot.png", help="image file (.png, .pdf, .svg)")

  c = sub.add_parser("show-config", help="print the resolved config as JSON")
  config_args(c)

  # Listed for --help only: `main` hands these commands to their tools before parsing.
  b = sub.add_parser("bench", help="benchmarks: `bench kernels ...`, `bench step ...`")
  b.add_argument("what", choices=("kernels", "step"))
  sub.add_parser("compare-sharding", help="compare sharding strategies (memory, comms)")
  importlib.import_module("mhc_jax.quant.cli").add_parser(sub)   # quantize (mhc_jax.quant)
  return p


def _delegate(module: str, argv: list[str], what: str) -> int:
  try:
    mod = importlib.import_module(module)
  except ModuleNotFoundError as e:
    if e.name and module.startswith(e.name):
      raise ConfigError(f"{what} is not available: module {module} is not installed in this checkout")
    raise
  return int(mod.main(argv) or 0)


def resolve_config(preset: str | None, overrides: list[str], run_dir: str | None = None,
                   resume: bool = False):
  """Preset (or, for `--resume` without a preset, the run directory's config) + overrides."""
  from mhc_jax.configs import get_preset
  from mhc_jax.train import run_dir as rd
  from mhc_jax.config import apply_overrides
  if preset is None and resume and run_dir:
    base = rd.read_config(run_dir)
  else:
    base = get_preset(preset or "default")
  return apply_overrides(base, overrides)


def _distributed():
  """`jax.distributed.initialize()` when the environment asks for it (Cloud TPU pod, SLURM, ...)."""
  distributed.maybe_initialize_distributed()


def add_distributed_args(parser) -> None:
  """`--coordinator-address HOST:PORT --num-processes N --process-id I` (else the environment:
  `JAX_COORDINATOR_ADDRESS` + `JAX_NUM_PROCESSES` + `JAX_PROCESS_ID`, SLURM, Cloud TPU, Open MPI)."""
  g = parser.add_argument_group("multi-host (jax.distributed)")
  g.add_argument("--coordinator-address", default=None, help="process 0's HOST:PORT")
  g.add_argument("--num-processes", type=int, default=None)
  g.add_argument("--process-id", type=int, default=None)


def initialize_from_args(args) -> bool:
  """`maybe_initialize_distributed` from parsed `add_distributed_args` flags or the environment."""
  env = os.environ
  addr = getattr(args, "coordinator_address", None)
  nproc = getattr(args, "num_processes", None)
  pid = getattr(args, "process_id", None)
  if addr is None and env.get("JAX_COORDINATOR_ADDRESS") and env.get("JAX_NUM_PROCESSES"):
    addr = env["JAX_COORDINATOR_ADDRESS"]
    nproc = int(env["JAX_NUM_PROCESSES"])
    pid = int(env.get("JAX_PROCESS_ID", "-1"))
  if addr is not None:
    if nproc is None or pid is None or not 0 <= pid < nproc:
      raise ConfigError(f"--process-id={pid!r} is not allowed: with --coordinator-address give "
                        "--num-processes N and --process-id in [0, N)")
  return distributed.maybe_initialize_distributed(addr, nproc, pid)


def _exit_now(code: int, message: str):
  """Print `message`, flush, and end the process at once: Orbax's non-daemon threads, possibly
  stuck on a failed write, must not keep it alive."""
  print(message, file=sys.stderr, flush=True)
  sys.stdout.flush()
  os._exit(code)


def _check_backend():
  """A JAX_PLATFORMS naming hardware this machine lacks is bad input, not a traceback. The native
  runtimes' own start-up messages (written straight to stderr) are shown only when it works."""
  import tempfile
  import jax
  sys.stderr.flush()
  saved = os.dup(2)
  with tempfile.TemporaryFile() as log:
    os.dup2(log.fileno(), 2)
    try:
      jax.devices()
      error = None
    except (RuntimeError, AssertionError, ValueError) as e:
      error = e
    finally:
      os.dup2(saved, 2)
      os.close(saved)
    if error is None:
      log.seek(0)
      sys.stderr.write(log.read().decode("utf-8", "replace"))
      sys.stderr.flush()
      return
  first = (str(error).strip().splitlines() or ["its runtime did not start"])[0][:200]
  raise ConfigError(f"JAX_PLATFORMS={os.environ.get('JAX_PLATFORMS', '')!r} is not usable here "
                    f"({first}); unset it or choose a platform this machine has, e.g. cpu")


def cmd_train(args) -> int:
  from mhc_jax.checkpoint import SaveFailed
  from mhc_jax.train.loop import Interrupted, TrainingDiverged, train
  cfg = resolve_config(args.preset, args.overrides, args.run_dir, args.resume)
  run_dir = args.run_dir
  if run_dir is None:
    if args.resume:
      raise ConfigError("--resume needs --run-dir (the run to continue)")
    run_dir = os.path.join("runs", f"{args.preset or 'default'}-{time.strftime('%Y%m%d-%H%M%S')}")
  _check_backend()
  try:
    result = train(cfg, run_dir, resume=args.resume, force=args.force,
                   allow_data_change=args.allow_data_change, progress=not args.no_progress)
    if distributed.is_main_process():
      finish(result)
  except TrainingDiverged as e:
    print(f"error: training diverged: {e}", file=sys.stderr, flush=True)
    return EXIT_DIVERGED
  except SaveFailed as e:
    _exit_now(EXIT_SAVE_FAILED, f"error: {e}")
  except Interrupted as e:
    _exit_now(128 + e.signum, str(e))
  except KeyboardInterrupt:
    _exit_now(130, "interrupted")
  return 0


def finish(result) -> None:
  """After a run: sample.txt (`train.sample_*`) and plot.png in the run directory; say where all is."""
  from mhc_jax.data import make_tokenizer
  from mhc_jax.sample import sample_text
  from mhc_jax.tools.plots import plot_runs
  from mhc_jax.train import run_dir as rd
  cfg, run_dir, ev = result.trainer.cfg, result.run_dir, result.eval
  t, sample, sample_path = cfg.train, None, None
  if t.sample_tokens:
    tokenizer = make_tokenizer(cfg.data)
    n_new = min(t.sample_tokens, cfg.model.max_seq_len - len(tokenizer.encode(t.sample_prompt)))
    if n_new >= 1:
      sample = sample_text(cfg.model, result.state.params, tokenizer, t.sample_prompt,
                           moe_state=result.state.moe_state,
                           max_new_tokens=n_new, temperature=t.sample_temperature,
                           top_k=t.sample_top_k, seed=t.seed)
      sample_path = os.path.join(run_dir, rd.SAMPLE)
      with open(sample_path, "w", encoding="utf-8") as f:
        f.write(sample + "\n")
  plot_path = plot_runs([run_dir], os.path.join(run_dir, rd.PLOT))
  msg = [f"\nfinished step {result.step}: eval loss {ev.get('loss', float('nan')):.4f}"
         + (f" ({ev['bits_per_byte']:.3f} bits/byte, perplexity {ev['perplexity']:.2f})"
            if "bits_per_byte" in ev else "")]
  if sample is not None:
    msg.append("sample:\n" + "-" * 60 + "\n" + sample + "\n" + "-" * 60)
  msg.append(f"eval:        {os.path.join(run_dir, rd.EVAL)}\n"
             f"sample:      {sample_path or '(disabled)'}\nplot:        {plot_path}\n"
             f"metrics:     {os.path.join(run_dir, rd.METRICS)}\n"
             f"tensorboard: tensorboard --logdir {os.path.join(run_dir, rd.TB)}\n"
             f"checkpoints: {os.path.join(run_dir, rd.CHECKPOINTS)}")
  print("\n".join(msg), flush=True)


def cmd_eval(args) -> int:
  _distributed()
  import jax
  from mhc_jax.data import make_eval_batches, make_tokenizer, make_train_iterator
  from mhc_jax.train.loop import load_checkpoint
  from mhc_jax.train.trainer import count_bytes
  _check_loaded_args(args)
  trainer = _load_latest(load_checkpoint, args)
  cfg = trainer.cfg
  n = cfg.train.eval_batches if args.batches is None else args.batches
  if n < 1:
    raise ConfigError(f"--batches={n} is not allowed: an integer >= 1")
  pi, pc = jax.process_index(), jax.process_count()
  if args.split == "validation":
    host = make_eval_batches(cfg.data, n, process_index=pi, process_count=pc)
  else:
    it = make_train_iterator(cfg.data, process_index=pi, process_count=pc)
    host = [next(it) for _ in range(n)]
  res = trainer.evaluate(host, count_bytes(make_tokenizer(cfg.data), host))
  print(json.dumps({"run_dir": args.run_dir, "step": trainer.step_count, "split": args.split,
                    "batches": n, **res}))
  return 0


def _check_sample_args(args):
  import math
  if args.num < 1:
    raise ConfigError(f"--num={args.num} is not allowed: an integer >= 1")
  if args.top_k < 0:
    raise ConfigError(f"--top-k={args.top_k} is not allowed: an integer >= 0 (0 = no limit)")
  if not math.isfinite(args.temperature) or args.temperature < 0:
    raise ConfigError(f"--temperature={args.temperature} is not allowed: a finite number >= 0")
  if not 0 <= args.seed < SEED_LIMIT:
    raise ConfigError(f"--seed={args.seed} is not allowed: an integer in [0, 2**32)")
  if args.tokens is not None and args.tokens < 1:
    raise ConfigError(f"--tokens={args.tokens} is not allowed: an integer >= 1")


def _load_latest(load_checkpoint, args, attempts: int = 3):
  """`load_checkpoint(run_dir, step)`; without `--step`, retried when a running trainer removes the
  chosen checkpoint (keep-N) while it is being read."""
  for attempt in range(attempts):
    try:
      return load_checkpoint(args.run_dir, args.step)
    except FileNotFoundError:
      if args.step is not None or attempt == attempts - 1:
        raise


def _check_eval_args(args):
  if args.batches is not None and args.batches < 1:
    raise ConfigError(f"--batches={args.batches} is not allowed: an integer >= 1")


def _check_loaded_args(args):
  """The checks of `eval` / `sample` that do not need the checkpoint (any checkpoint kind)."""
  (_check_sample_args if args.command == "sample" else _check_eval_args)(args)
  _check_backend()


def cmd_sample(args) -> int:
  _distributed()
  from mhc_jax.data import make_tokenizer
  from mhc_jax.sample import generate
  from mhc_jax.train.loop import load_checkpoint
  _check_loaded_args(args)
  trainer = _load_latest(load_checkpoint, args)
  cfg, state = trainer.cfg, trainer.state
  tok = make_tokenizer(cfg.data)
  import numpy as np
  ids = tok.encode(args.prompt)
  room = cfg.model.max_seq_len - len(ids)
  if room < 1:
    raise ConfigError(f"--prompt is not allowed: it has {len(ids)} tokens, the model reads at most "
                      f"{cfg.model.max_seq_len - 1} before generating (model.max_seq_len="
                      f"{cfg.model.max_seq_len})")
  n_new = min(200, room) if args.tokens is None else args.tokens
  prompt = np.tile(ids[None], (args.num, 1))
  out = generate(cfg.model, state.params, prompt, moe_state=state.moe_state, max_new_tokens=n_new,
                 temperature=args.temperature, top_k=args.top_k, seed=args.seed)
  for row in out:
    print(tok.decode(np.concatenate([ids, row])))
    if args.num > 1:
      print("-" * 60)
  return 0


def cmd_plot(args) -> int:
  from mhc_jax.tools.plots import check_out, plot_runs
  print(plot_runs(args.run_dirs, check_out(args.out)))
  return 0


def cmd_show_config(args) -> int:
  from mhc_jax.config import to_json
  print(to_json(resolve_config(args.preset, args.overrides)))
  return 0


def _quiet_libraries():
  """Orbax and TensorStore report a failed write or read with long tracebacks in their logs (absl,
  asyncio); the commands report it in one line instead."""
  import logging
  for name in ("absl", "asyncio"):
    logging.getLogger(name).setLevel(logging.CRITICAL)


def main(argv: list[str] | None = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  _quiet_libraries()
  try:
    # Tools with their own argument parsers get every remaining argument (including --help).
    if argv[:1] == ["compare-sharding"]:
      return _delegate("mhc_jax.tools.compare_sharding", argv[1:], "compare-sharding")
    if argv[:2] == ["bench", "kernels"]:
      return _delegate("mhc_jax.tools.bench_kernels", argv[2:], "bench kernels")
    if argv[:2] == ["bench", "step"]:
      return _delegate("mhc_jax.tools.bench_step", argv[2:], "bench step")
  except ConfigError as e:
    print(f"error: {e}", file=sys.stderr, flush=True)
    return EXIT_BAD_INPUT
  args = _parser().parse_args(argv)
  try:
    if args.command == "train":
      initialize_from_args(args)   # before any device use; no-op on a single host
      return cmd_train(args)
    qcli = importlib.import_module("mhc_jax.quant.cli")
    if args.command == "quantize":
      return qcli.run(args)
    if args.command in ("eval", "sample") and args.max_memory is not None:
      qcli.parse_size(args.max_memory)   # a bad size answers before JAX loads
      _check_loaded_args(args)
      return qcli.run_budgeted(args)     # run dir or quantised dir, within --max-memory
    if args.command in ("eval", "sample") and qcli.is_quantized_dir(args.run_dir):
      _check_loaded_args(args)
      return qcli.run_loaded(args)   # a quantised checkpoint (mhc-jax quantize --out)
    if args.command == "eval":
      return cmd_eval(args)
    if args.command == "sample":
      return cmd_sample(args)
    if args.command == "plot":
      return cmd_plot(args)
    if args.command == "show-config":
      return cmd_show_config(args)
  except ConfigError as e:
    print(f"error: {e}", file=sys.stderr, flush=True)
    return EXIT_BAD_INPUT
  except KeyboardInterrupt:
    print("interrupted", file=sys.stderr)
    return 130
  return 0


if __name__ == "__main__":
  sys.exit(main())
