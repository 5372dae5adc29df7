"""Layer streaming (`--max-memory`) vs in-memory decoding: tokens/s, peak RSS, bytes read per token.

    JAX_PLATFORMS=cpu python -m mhc_jax.tools.bench_stream [--d-model 512] [--layers 8]
        [--tokens 32] [--budget-frac 0.5] [--out experiments/results/stream_cpu.json]
    JAX_PLATFORMS=cpu python -m mhc_jax.tools.bench_stream --moe 64,6,128 --mode int8 \
        --out experiments/results/stream_moe_cpu.json      # routed experts read on demand

`--moe E,k,F`: a DeepSeekMoE model (E routed experts of width F, top-k, one shared expert, the first
layer dense); its routed experts are streamed expert by expert through the LRU cache the budget
leaves room for, and the report adds the expert bytes read per token and the cache's hits/misses.
`--mode int8|int4`: the weights are quantised (`mhc_jax.quant`) before the layout is written.

A float32 model initialised with `LM(cfg).init` (weights dominate: vocab 256) is written once as a
`mhc_jax.quant.layout` layout; then each mode runs in its own child process (`--child`): in memory
(`load_params` + the `lax.scan` decoder of `mhc_jax.sample`), and streamed at a budget of
`--budget-frac` of the weights, `--rounds` times each, alternated (the fastest run of each mode is
reported; all rates are in the JSON). Each child generates once (compiling), drops the model, takes
its resident set (`rss0`: Python, the JAX runtime, compiled code), resets the peak
(`/proc/self/clear_refs`), builds the model again, times greedy generation and reads VmHWM:
`peak_rss - rss0` is what the model took (weights, KV cache, activations, read buffers). The layer
files are in the OS page cache after the first pass, so "disk" reads here run at memory-copy speed.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time

DEFAULT_OUT = "experiments/results/stream_cpu.json"


def _trim():
  """Free what Python and the allocator hold but no longer use (glibc `malloc_trim`)."""
  import ctypes
  import gc
  gc.collect()
  try:
    ctypes.CDLL("libc.so.6").malloc_trim(0)
  except (OSError, AttributeError):
    pass


def child(layout_path: str, budget: int | None, tokens: int, prompt_len: int,
          reps: int = 1) -> dict:
  """Measure one mode in this process (run it in a fresh process: the peak RSS is per process).

  Warm-up generation (compiles), model dropped, `rss0` = the resident set then (runtime + compiled
  code), peak reset; then the model is built again and timed: `model_rss = peak - rss0`."""
  import numpy as np
  from mhc_jax.quant import stream
  from mhc_jax.quant.infer import quantized_generate
  layout = stream.Layout(layout_path)
  cfg = layout.cfg.model
  prompt = (np.arange(prompt_len, dtype=np.int32) * 7 + 1)[None] % cfg.vocab_size
  kw = dict(max_new_tokens=tokens, temperature=0.0, top_k=0, seed=0)

  def build():
    if budget is None:
      params, moe_state = stream.load_params(layout)
      return None, lambda: quantized_generate(cfg, layout.spec, params, prompt, moe_state=moe_state,
                                              **kw)
    m = stream.StreamedLM(layout, budget, batch=1)
    return m, lambda: m.generate(prompt, **kw)

  m, run = build()
  t = time.perf_counter()
  out = run()
  first = time.perf_counter() - t
  if m:
    m.close()
  del m, run
  _trim()
  rss0 = stream.current_rss()
  reset = stream.reset_peak_rss()
  m, run = build()
  read0 = m.bytes_read if m else 0
  best = first_rep = None
  for _ in range(reps):
    t = time.perf_counter()
    out2 = run()
    dt = time.perf_counter() - t
    best = dt if best is None else min(best, dt)
    assert (out2 == out).all()
    if first_rep is None and m and m.experts:   # expert stats of one generation (later reps
      first_rep = m.report()                    # repeat its routing and would only hit the cache)
  res = {"mode": "in_memory" if m is None else "streamed", "budget_bytes": budget,
         "weight_bytes": layout.weight_bytes, "rss0_bytes": rss0,
         "peak_rss_bytes": stream.peak_rss(),
         "peak_reset_after_warmup": reset, "first_call_s": first, "tokens": tokens,
         "prompt_len": prompt_len, "decode_s": best, "tokens_per_s": tokens / best,
         "bytes_read_per_token": ((m.bytes_read - read0) / reps / tokens) if m else 0,
         "tokens_out": np.asarray(out).tolist()}
  res["model_rss_bytes"] = res["peak_rss_bytes"] - rss0
  if m and m.experts:
    r = first_rep
    res["experts"] = {"record_bytes": m.plan.expert_record, "cache_records": m.plan.expert_cache,
                      "total_records": m.plan.n_experts, "hits": r["expert_hits"],
                      "misses": r["expert_misses"],
                      "hit_rate": r["expert_hits"] / max(1, r["expert_hits"] + r["expert_misses"]),
                      "bytes_read_per_token": r["expert_bytes_read"] / tokens,
                      "prefill_chunk": stream.MOE_PREFILL_CHUNK,
                      "note": "one generation (prompt + new tokens), the first timed one"}
  if m:
    res["plan"] = {"cached_layers": m.plan.cached,
                   "streamed_layers": m.plan.n_layers - m.plan.cached,
                   "slots": m.plan.slots, "layer_bytes": m.plan.layer,
                   "resident_bytes": m.plan.resident, "kv_cache_bytes": m.plan.kv_cache,
                   "activations_bytes": m.plan.activations, "read_buffer_bytes": m.plan.read_buffer}
    m.close()
  return res


def run_child(layout_path: str, budget: int | None, tokens: int, prompt_len: int, reps: int = 1,
              env=None) -> dict:
  """`child(...)` in a fresh Python process; its JSON result."""
  cmd = [sys.executable, "-m", "mhc_jax.tools.bench_stream", "--child", layout_path,
         "--budget", str(budget or 0), "--tokens", str(tokens), "--prompt-len", str(prompt_len),
         "--reps", str(reps)]
  e = dict(os.environ, JAX_PLATFORMS="cpu", **(env or {}))
  p = subprocess.run(cmd, capture_output=True, text=True, env=e, check=False)
  if p.returncode:
    raise RuntimeError(f"{' '.join(cmd)} failed:\n{p.stderr[-3000:]}")
  return json.loads(p.stdout.strip().splitlines()[-1])


def write_model(path: str, d_model: int, layers: int, heads: int, seq: int, seed: int = 0,
                moe: tuple | None = None, mode: str = "float32") -> str:
  """Initialise a model (float32; `moe=(E, k, F)`: DeepSeekMoE FFNs after one dense layer),
  quantise it when `mode` is int8/int4, and write its layout to `path`."""
  import jax
  import jax.numpy as jnp
  import flax.linen as nn
  from mhc_jax.config import apply_overrides
  from mhc_jax.configs import tiny
  from mhc_jax.model import LM
  from mhc_jax.quant import QuantSpec, quantize_params, stream
  from mhc_jax.quant.io import _to_plain
  over = [f"model.d_model={d_model}", f"model.n_layers={layers}", f"model.n_heads={heads}",
          f"model.max_seq_len={seq}", "model.init_std=0.1"]
  if moe:
    E, k, F = moe
    over += [f"model.moe.n_routed={E}", f"model.moe.top_k={k}", f"model.moe.d_expert={F}",
             "model.moe.n_shared=1", "model.n_dense_layers=1"]
  rc = apply_overrides(tiny(), over)
  v = LM(rc.model).init(jax.random.PRNGKey(seed), jnp.zeros((1, 4), jnp.int32))
  params = jax.device_get(nn.meta.unbox(v["params"]))
  state = jax.device_get(nn.meta.unbox(v.get("moe_state", {})))
  spec = None if mode == "float32" else QuantSpec(mode, 64)
  if spec is not None:
    params = jax.device_get(_to_plain(quantize_params(rc.model, params, spec)))
  return stream.write_layout(path, rc, params, spec, {"step": 0}, state)


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(prog="python -m mhc_jax.tools.bench_stream", description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--d-model", type=int, default=512)
  ap.add_argument("--layers", type=int, default=8)
  ap.add_argument("--heads", type=int, default=8)
  ap.add_argument("--tokens", type=int, default=32)
  ap.add_argument("--prompt-len", type=int, default=16)
  ap.add_argument("--reps", type=int, default=2, help="timed generations after the warm-up (best)")
  ap.add_argument("--rounds", type=int, default=2,
                  help="child runs per mode, alternated; the fastest of each is reported")
  ap.add_argument("--budget-frac", type=float, default=0.5,
                  help="budget as a fraction of the weights")
  ap.add_argument("--moe", default=None, help="E,k,F: a DeepSeekMoE model (routed experts streamed)")
  ap.add_argument("--mode", default="float32", choices=("float32", "int8", "int4"))
  ap.add_argument("--out", default=DEFAULT_OUT, help="result JSON ('-': none)")
  ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
  ap.add_argument("--budget", type=int, default=0, help=argparse.SUPPRESS)
  a = ap.parse_args(argv)
  if a.child:
    print(json.dumps(child(a.child, a.budget or None, a.tokens, a.prompt_len, a.reps)))
    return 0
  from mhc_jax.tools.results import metadata, save_json
  with tempfile.TemporaryDirectory() as tmp:
    moe = tuple(int(v) for v in a.moe.split(",")) if a.moe else None
    path = write_model(os.path.join(tmp, "layout"), a.d_model, a.layers, a.heads,
                       a.prompt_len + a.tokens, moe=moe, mode=a.mode)
    from mhc_jax.quant import stream
    weights = stream.Layout(path).weight_bytes
    budget = int(weights * a.budget_frac)
    runs = {"in_memory": [], "streamed": []}
    for _ in range(a.rounds):     # alternated: a shared machine's load hits both modes alike
      runs["in_memory"].append(run_child(path, None, a.tokens, a.prompt_len, a.reps))
      runs["streamed"].append(run_child(path, budget, a.tokens, a.prompt_len, a.reps))
    mem, st = (max(r, key=lambda x: x["tokens_per_s"]) for r in runs.values())
  record = {
      "command": " ".join(["python -m mhc_jax.tools.bench_stream"]
                          + list(sys.argv[1:] if argv is None else argv)),
      **metadata(),
      "shapes": {"d_model": a.d_model, "n_layers": a.layers, "n_heads": a.heads, "vocab_size": 256,
                 "n_streams": 4, "batch": 1, "prompt_len": a.prompt_len, "new_tokens": a.tokens,
                 "dtype": "float32", "weights": a.mode,
                 "moe": None if not a.moe else dict(zip(("n_routed", "top_k", "d_expert"), moe))},
      "weight_bytes": weights, "budget_bytes": budget, "budget_frac": a.budget_frac,
      "in_memory": mem, "streamed": st, "rounds": a.rounds, "load_avg_after": os.getloadavg(),
      "tokens_per_s_all_rounds": {k: [x["tokens_per_s"] for x in v] for k, v in runs.items()},
      "same_tokens": mem["tokens_out"] == st["tokens_out"],
      "speed_ratio": st["tokens_per_s"] / mem["tokens_per_s"],
      "target_speed_ratio": 0.3,
  }
  for r in (mem, st):
    print(f"{r['mode']:9s}: {r['tokens_per_s']:7.1f} tokens/s, model RSS "
          f"{r['model_rss_bytes'] / 2**20:6.1f}MiB (peak {r['peak_rss_bytes'] / 2**20:.0f}MiB, "
          f"runtime {r['rss0_bytes'] / 2**20:.0f}MiB), read {r['bytes_read_per_token'] / 2**20:.1f}"
          f"MiB/token")
  if "experts" in st:
    x = st["experts"]
    print(f"routed experts: {x['record_bytes'] / 2**10:.0f}KiB each, cache {x['cache_records']} of "
          f"{x['total_records']}, hit rate {x['hit_rate']:.2f}, "
          f"{x['bytes_read_per_token'] / 2**20:.2f}MiB read per token "
          f"(all experts: {x['total_records'] * x['record_bytes'] / 2**20:.1f}MiB)")
  print(f"weights {weights / 2**20:.1f}MiB, budget {budget / 2**20:.1f}MiB, speed ratio "
        f"{record['speed_ratio']:.2f}, same tokens {record['same_tokens']}")
  if a.out != "-":
    out = pathlib.Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_json(record, out)
    print(f"wrote {out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
