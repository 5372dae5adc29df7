"""Compile the kernels and the 1b train step for 1 and 8 abstract H100s; save what the compiler says.

    JAX_PLATFORMS=cpu python -m mhc_jax.tools.gpu_aot [--what kernels,step] [--devices 1,8]
        [--n 4,8] [--c 1024,4096,7168] [--dtypes bfloat16,float32] [--tokens 16384]
        [--programs pre_fwd,pre_bwd,post_fwd,post_bwd] [--strategies fsdp,fsdp_tp]
        [--item-timeout 1800] [--out experiments/results/h100_aot_<date>.json]
    (`make gpu-aot ARGS=...`)

kernels: `mhc_jax.tools.kernel_aot.programs` (fused pre / post, forward and value-and-grad, mHC, 20
  Sinkhorn iterations) with the GPU launch parameters of `mhc_jax.kernels.launch`; on 8 devices the
  same programs inside `shard_map` over tokens (the per-device kernel sees tokens / 8).
step: the `1b` compare-sharding preset (d 2048, 20 layers, B 16, T 2048, bf16, remat full, mHC n=4)
  with `model.connection.implementation=pallas`, under fsdp and fsdp_tp on 8 devices (and the
  single-device step with --devices 1), compiled exactly as `mhc-jax compare-sharding` does.
Per program: compile time, memory_analysis, bytes accessed / flops (CPU cost model over the
optimized GPU module), collectives (trip-count weighted), per kernel grid / threads / registers /
shared memory / spills. Each item runs in its own process with a timeout, so one slow or failing
compile does not stop the sweep; the JSON is rewritten after every item.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time

PROGRAMS = ("pre_fwd", "pre_bwd", "post_fwd", "post_bwd")


def _kernel_item(item: dict) -> dict:
  import jax
  import jax.numpy as jnp
  from jax.sharding import NamedSharding
  from jax.sharding import PartitionSpec as P

  from mhc_jax.kernels import block, launch
  from mhc_jax.tools import kernel_aot as aot
  from mhc_jax.tools import h100
  n, c, dev, t = item["n"], item["C"], item["devices"], item["tokens"]
  dtype = jnp.dtype(item["dtype"])
  local = t // dev
  spec = block.MapSpec("mhc", n, item.get("sinkhorn_iters", 20))
  cfg_pre = launch.make_cfg("gpu", n, c, dtype, local, spec=spec)
  cfg_post = launch.make_cfg("gpu", n, c, dtype, local)
  fn, args = aot.programs(cfg_pre, cfg_post, local, dtype)[item["program"]]
  mesh = h100.mesh((dev,), ("x",), item.get("gpu", "h100"))
  specs = [P("x") if a.shape[0] == local else P() for a in args]
  if dev > 1:
    def outs_spec(o):
      return P("x") if o.ndim and o.shape[0] == local else P()

    def body(*a):
      out = fn(*a)
      # parameter gradients are sums over tokens: all-reduce them, as the train step does
      return jax.tree.map(lambda o: o if outs_spec(o) == P("x") else jax.lax.psum(o, "x"), out)

    shapes = jax.eval_shape(fn, *args)
    inner = body
    fn = jax.shard_map(inner, mesh=mesh, in_specs=tuple(specs),
                       out_specs=jax.tree.map(outs_spec, shapes), check_vma=False)
  glob = [jax.ShapeDtypeStruct((a.shape[0] * dev,) + a.shape[1:] if s == P("x") else a.shape,
                               a.dtype, sharding=NamedSharding(mesh, s)) for a, s in zip(args, specs)]
  with tempfile.TemporaryDirectory() as d:
    prog = h100.compile_program(fn, glob, mesh, dump_dir=d)
    rep = h100.report(prog)
  rep["launch"] = {"bt": cfg_pre.bt, "num_warps": cfg_pre.num_warps,
                   "num_stages": cfg_pre.num_stages, "max_chunk_pre": cfg_pre.max_chunk,
                   "max_chunk_post": cfg_post.max_chunk}
  return rep


def _step_item(item: dict) -> dict:
  import dataclasses

  from mhc_jax.config import MeshConfig
  from mhc_jax.tools.compare_sharding import lower_step, preset
  from mhc_jax.tools import h100
  base = preset(item["preset"])
  impl = item["implementation"] if item["n_streams"] > 1 else "xla"    # residual: no kernels
  conn = dataclasses.replace(base.model.connection, implementation=impl,
                             n_streams=item["n_streams"],
                             kind="residual" if item["n_streams"] == 1 else "mhc")
  model = dataclasses.replace(base.model, connection=conn,
                              collapse="sum" if item["n_streams"] == 1 else base.model.collapse)
  shape = {"fsdp": (1, -1, 1), "fsdp_tp": (1, -1, 2), "dp": (-1, 1, 1)}[item["strategy"]]
  cfg = dataclasses.replace(base, model=model, mesh=MeshConfig(item["strategy"], shape))
  devs = h100.devices(item["devices"], item.get("gpu", "h100"))
  with tempfile.TemporaryDirectory() as d:
    t0 = time.perf_counter()
    lowered, mesh, n_params = lower_step(cfg, devs)
    t1 = time.perf_counter()
    compiled = lowered.compile(compiler_options={"xla_dump_to": d})
    prog = h100.Program(compiled, t1 - t0, time.perf_counter() - t1, d)
    rep = h100.report(prog)
  rep["mesh_shape"] = dict(mesh.shape)
  rep["n_params"] = n_params
  # Pallas kernels only (XLA's own fusions are listed too, with untuned tiles: no autotuning here)
  rep["pallas_kernels"] = [k for k in rep["kernels"] if k["kernel"].endswith("_body")]
  rep["kernels"] = [k for k in rep["kernels"] if k.get("local_bytes") or k.get("stack_bytes")
                    or k["kernel"].endswith("_body")]
  return rep


def run_item(item: dict) -> dict:
  t0 = time.perf_counter()
  try:
    out = _kernel_item(item) if item["kind"] == "kernel" else _step_item(item)
    out["status"] = "ok"
  except Exception as e:  # noqa: BLE001
    from mhc_jax.tools.h100 import is_smem_overflow
    text = str(e)
    out = {"status": "smem_overflow" if is_smem_overflow(e) else "error",
           "error": f"{type(e).__name__}: {text.splitlines()[0] if text else ''}"[:600]}
  out["wall_s"] = round(time.perf_counter() - t0, 1)
  return out


def _items(args) -> list[dict]:
  items = []
  split = lambda s: [v.strip() for v in s.split(",") if v.strip()]  # noqa: E731
  if "kernels" in split(args.what):
    for dev in [int(d) for d in split(args.devices)]:
      for dtype in split(args.dtypes):
        for n in [int(v) for v in split(args.n)]:
          for c in [int(v) for v in split(args.c)]:
            for prog in split(args.programs):
              items.append({"kind": "kernel", "program": prog, "n": n, "C": c, "dtype": dtype,
                            "tokens": args.tokens, "devices": dev})
  if "step" in split(args.what):
    for strategy in split(args.strategies):
      for ns in [int(v) for v in split(args.step_streams)]:
        items.append({"kind": "step", "preset": "1b", "strategy": strategy, "devices": 8,
                      "n_streams": ns, "implementation": args.implementation})
  return items


def main(argv: list[str] | None = None) -> int:
  ap = argparse.ArgumentParser(prog="python -m mhc_jax.tools.gpu_aot",
                               description=__doc__.split("\n")[0])
  ap.add_argument("--what", default="kernels,step")
  ap.add_argument("--devices", default="1,8")
  ap.add_argument("--n", default="4,8")
  ap.add_argument("--c", default="1024,4096,7168")
  ap.add_argument("--dtypes", default="bfloat16,float32")
  ap.add_argument("--tokens", type=int, default=16384, help="global tokens per kernel program")
  ap.add_argument("--programs", default=",".join(PROGRAMS))
  ap.add_argument("--strategies", default="fsdp,fsdp_tp")
  ap.add_argument("--step-streams", default="4,1", help="1 = the residual baseline")
  ap.add_argument("--implementation", default="pallas")
  ap.add_argument("--item-timeout", type=float, default=1800.0)
  ap.add_argument("--out", default=None)
  ap.add_argument("--item", default=None, help=argparse.SUPPRESS)     # child process: one item
  args = ap.parse_args(argv)
  if args.item:
    print("GPU_AOT_RESULT " + json.dumps(run_item(json.loads(args.item)), default=str), flush=True)
    return 0
  import jax

  from mhc_jax.tools import h100
  why = h100.unavailable()
  if why:
    print(f"error: {why}", file=sys.stderr)
    return 2
  now = datetime.datetime.now(datetime.timezone.utc)
  out = args.out or os.path.join("experiments", "results", f"h100_aot_{now:%Y%m%d}.json")
  items = _items(args)
  result = {"meta": {
      "what": "deviceless ahead-of-time compile for NVIDIA H100 SXM (sm_90a) through JAX's CUDA "
              "plugin; no GPU present",
      "device": h100.GPUS["h100"], "jax_version": jax.__version__,
      "date": now.isoformat(timespec="seconds"),
      "command": "JAX_PLATFORMS=cpu python -m mhc_jax.tools.gpu_aot " + " ".join(argv or sys.argv[1:]),
      "notes": "registers / shared / local (spill) / stack bytes from cuobjdump -res-usage on the "
               "cubins in the serialized executable; a non-zero stack frame in a Triton kernel is "
               "register spill; grid / threads / launch shared memory from XLA's thunk sequence; "
               "bytes_accessed from XLA's CPU cost model over the optimized GPU module (a while "
               "body counted once; Pallas kernels counted by operands + results); no autotuning "
               "without a device, so XLA GEMM fusions use untuned tiles"},
      "items": []}
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  for i, item in enumerate(items):
    t0 = time.perf_counter()
    try:
      proc = subprocess.run([sys.executable, "-m", "mhc_jax.tools.gpu_aot", "--item",
                             json.dumps(item)], capture_output=True, text=True, env=env,
                            timeout=args.item_timeout)
      line = [l for l in proc.stdout.splitlines() if l.startswith("GPU_AOT_RESULT ")]
      rec = json.loads(line[-1][len("GPU_AOT_RESULT "):]) if line else {
          "status": "error", "error": f"child rc={proc.returncode}: {proc.stderr[-600:]}"}
    except subprocess.TimeoutExpired:
      rec = {"status": "timeout", "error": f"compile exceeded --item-timeout={args.item_timeout}s"}
    rec = {**item, **rec, "item_s": round(time.perf_counter() - t0, 1)}
    result["items"].append(rec)
    ks = rec.get("pallas_kernels") or [k for k in rec.get("kernels", [])
                                       if k["kernel"].endswith("_body")]
    summary = ", ".join(f"{k['kernel']} R{k.get('registers')} S{k.get('shared_bytes')} "
                        f"L{k.get('local_bytes')}+{k.get('stack_bytes')}" for k in ks)
    print(f"[{i + 1}/{len(items)}] {json.dumps(item)} -> {rec['status']} {rec['item_s']}s "
          f"{summary} {rec.get('error', '')[:200]}", file=sys.stderr, flush=True)
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    with open(out, "w") as f:
      json.dump(result, f, indent=1, default=str)
  print(f"saved {out}")
  return 0


if __name__ == "__main__":
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  sys.exit(main())
