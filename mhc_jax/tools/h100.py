"""Compile for NVIDIA H100 / H200 on a machine without a GPU, and read what the compiler produced.

JAX's CUDA plugin (the `gpu-aot` extra: jax-cuda12-plugin + jax-cuda12-pjrt at the jax version,
nvidia-cuda-nvcc-cu12 for ptxas) runs XLA's whole GPU pipeline, Triton and ptxas included, for
compile-only devices described by a `stream_executor.GpuTargetConfigProto`. Run with
`JAX_PLATFORMS=cpu`: the plugin stays registered (its topology API works) but no driver is probed.

    devices(8, "h100")                     compile-only devices ("NVIDIA H100 80GB HBM3")
    mesh((2, 4), ("fsdp", "tensor"))       a `jax.sharding.Mesh` over them
    compile_program(fn, args, mesh)        lower + compile inside `use_abstract_mesh`, with an XLA dump
    report(compiled, dump_dir)             memory, cost, collectives, kernels (launch + resources)

Per-kernel resources come from the cubins inside the serialized executable (nested riegeli records,
snappy/zstd/brotli chunks; `cramjam`) read by `cuobjdump -res-usage` (pip `nvidia-cuda-cuobjdump`):
registers, shared memory, local memory (spills; also `ptxas` stack frame). Grid and threads come from
XLA's `*.thunk_sequence.txt` dump. Bytes accessed: XLA's CPU cost model run over the optimized GPU
module (`cost_analysis()` returns None on this path): a private API, guarded.

Limits: no autotuning without a device, so XLA's own GEMM fusions get an untuned tile; the
Pallas (Triton) kernels use the launch parameters we set, so their resource figures are the real ones.
"""
from __future__ import annotations

import dataclasses
import functools
import glob
import importlib.util
import os
import pathlib
import re
import shutil
import struct
import subprocess
import tempfile
import time
from typing import Any

GPUS = {"h100": "NVIDIA H100 80GB HBM3", "h200": "NVIDIA H200 141GB HBM3e"}
HBM_BYTES_PER_S = {"h100": 3.35e12, "h200": 4.8e12}     # SXM data sheets
SMEM_PER_BLOCK = 232448                                 # sm_90 opt-in shared memory per block
_BUNDLED = pathlib.Path(__file__).with_name("h100_sxm.txtpb")


# ---------------------------------------------------------------------------------------------
# Plugin and topology.

def unavailable() -> str | None:
  """Why a deviceless GPU compile cannot run here (None when it can)."""
  if importlib.util.find_spec("jax_plugins.xla_cuda12") is None and \
     importlib.util.find_spec("jax_plugins.xla_cuda13") is None:
    return "JAX CUDA plugin not installed (pip install -e '.[gpu-aot]')"
  if ptxas() is None:
    return "ptxas not found (pip install nvidia-cuda-nvcc-cu12)"
  return None


def _plugin_so() -> pathlib.Path | None:
  for name in ("jax_plugins.xla_cuda12", "jax_plugins.xla_cuda13"):
    spec = importlib.util.find_spec(name)
    if spec and spec.origin:
      so = pathlib.Path(spec.origin).with_name("xla_cuda_plugin.so")
      if so.exists():
        return so
  return None


def _nvidia_bin(tool: str) -> str | None:
  """`tool` on PATH or inside an installed `nvidia-*` / `triton` wheel."""
  found = shutil.which(tool)
  if found:
    return found
  roots = []
  for pkg in ("nvidia", "triton"):
    spec = importlib.util.find_spec(pkg)
    if spec and spec.submodule_search_locations:
      roots += list(spec.submodule_search_locations)
  for root in roots:
    hits = sorted(glob.glob(os.path.join(root, "**", "bin", tool), recursive=True))
    if hits:
      return hits[0]
  return None


def ptxas() -> str | None:
  return _nvidia_bin("ptxas")


def cuobjdump() -> str | None:
  return _nvidia_bin("cuobjdump")


@functools.lru_cache(maxsize=None)
def target_config(gpu: str = "h100") -> str:
  """GpuTargetConfigProto text for `gpu` ("h100" | "h200").

  Order: `$MHC_GPU_TARGET_CONFIG` (a file), the specs embedded in the CUDA plugin (0.12 embeds H100,
  H200, B200, A100, ...), then the H100 copy shipped here (XLA's h100_sxm.txtpb) for plugins that do
  not embed it (0.11.x).
  """
  if gpu not in GPUS:
    raise ValueError(f"gpu={gpu!r}; allowed: {tuple(GPUS)}")
  path = os.environ.get("MHC_GPU_TARGET_CONFIG")
  if path:
    return pathlib.Path(path).read_text()
  so = _plugin_so()
  if so is not None:
    blob = so.read_bytes()
    for m in re.finditer(rb"proto-message: stream_executor.GpuTargetConfigProto", blob):
      start, end = blob.rfind(b"\0", 0, m.start()) + 1, blob.find(b"\0", m.start())
      text = blob[start:end].decode(errors="replace")
      if f'name: "{GPUS[gpu]}"' in text:
        return text
  if gpu == "h100":
    return _BUNDLED.read_text()
  raise RuntimeError(f"no target config for {gpu!r} in the CUDA plugin; set MHC_GPU_TARGET_CONFIG")


# XLA sorts large arrays (e.g. the MoE dispatch's argsort over T*k pairs) with CUB's radix sort,
# whose scratch size is asked of a GPU at compile time: without a device that ends in "CUDA Runtime
# error: invalid device ordinal". Compile-only runs take XLA's own sort instead.
COMPILE_ONLY_XLA_FLAGS = "--xla_gpu_enable_cub_radix_sort=false"


def set_compile_only_flags():
  """Add `COMPILE_ONLY_XLA_FLAGS` to `XLA_FLAGS`; call before JAX starts a backend (XLA reads the
  flags once per process)."""
  flags = os.environ.get("XLA_FLAGS", "")
  if COMPILE_ONLY_XLA_FLAGS not in flags:
    os.environ["XLA_FLAGS"] = f"{flags} {COMPILE_ONLY_XLA_FLAGS}".strip()


def parse_topology(name: str) -> tuple[str, int] | None:
  """`"h100:8"` -> ("h100", 8); `"h200"` -> ("h200", 1); None when `name` is not a GPU topology."""
  m = re.fullmatch(r"(h100|h200)(?::(\d+))?", name.strip().lower())
  if not m:
    return None
  return m.group(1), int(m.group(2) or 1)


@functools.lru_cache(maxsize=None)
def _topology(n: int, gpu: str):
  from jax.experimental import topologies
  return topologies.get_topology_desc(platform="cuda", target_config=target_config(gpu),
                                      topology=f"1x1x{n}")


def devices(n: int = 1, gpu: str = "h100") -> list:
  """`n` compile-only GPU devices on one host (NVLink-connected, as one HGX board)."""
  return list(_topology(n, gpu).devices)


def mesh(shape: tuple[int, ...], names: tuple[str, ...], gpu: str = "h100"):
  import math

  import numpy as np
  from jax.sharding import Mesh
  devs = devices(math.prod(shape), gpu)
  return Mesh(np.array(devs).reshape(shape), names)


# ---------------------------------------------------------------------------------------------
# Compile.

@dataclasses.dataclass
class Program:
  compiled: Any
  lower_s: float
  compile_s: float
  dump_dir: str | None


def compile_program(fn, args, mesh_, *, dump_dir: str | None = None, jit_kwargs=None) -> Program:
  """`jax.jit(fn, **jit_kwargs).lower(*args).compile()` for the GPU devices of `mesh_`.

  Inside `use_abstract_mesh(mesh_.abstract_mesh)` so Pallas (and `kernels.api.platform_backend`)
  see a GPU device; `dump_dir` gets XLA's dump (thunk sequence, optimized HLO) for `report`.
  """
  import jax
  options = {"xla_dump_to": dump_dir} if dump_dir else None
  with jax.sharding.use_abstract_mesh(mesh_.abstract_mesh):
    t0 = time.perf_counter()
    lowered = jax.jit(fn, **(jit_kwargs or {})).lower(*args)
    t1 = time.perf_counter()
    compiled = lowered.compile(compiler_options=options) if options else lowered.compile()
    t2 = time.perf_counter()
  return Program(compiled, t1 - t0, t2 - t1, dump_dir)


def is_smem_overflow(err: BaseException | str) -> bool:
  text = str(err)
  return "RESOURCE_EXHAUSTED" in text and "Shared memory size limit exceeded" in text


# ---------------------------------------------------------------------------------------------
# Cubins inside the serialized executable.

_RIEGELI_SIG = bytes.fromhex("83af70d10d884a3f")
_BLOCK = 1 << 16


def _varint(b: bytes, p: int) -> tuple[int, int]:
  r = s = 0
  while True:
    c = b[p]
    p += 1
    r |= (c & 0x7F) << s
    s += 7
    if c < 0x80:
      return r, p


def _decompress(kind: int, blob: bytes) -> bytes:
  if kind == 0:
    return blob
  import cramjam
  _, q = _varint(blob, 0)                      # riegeli prefixes the decompressed size
  if kind == ord("s"):
    return bytes(cramjam.snappy.decompress_raw(blob[q:]))
  if kind == ord("z"):
    return bytes(cramjam.zstd.decompress(blob[q:]))
  if kind == ord("b"):
    return bytes(cramjam.brotli.decompress(blob[q:]))
  raise ValueError(f"riegeli compression {kind!r}")


def _riegeli_records(data: bytes) -> list[bytes]:
  """Records of the simple ('r') chunks of a riegeli file; block headers (24 bytes at every 64 KiB)
  are removed first. Candidate chunk headers are found by scanning and kept when they decode."""
  body = b"".join(data[i + 24:i + _BLOCK] for i in range(0, len(data), _BLOCK))
  records = []
  for m in re.finditer(rb"r", body):
    p = m.start() - 24
    if p < 0:
      continue
    size = struct.unpack("<Q", body[p + 8:p + 16])[0]
    if not 0 < size <= len(body) - p - 40:
      continue
    chunk = body[p + 40:p + 40 + size]
    try:
      kind = chunk[0]
      n, q = _varint(chunk, 1)
      sizes = _decompress(kind, chunk[q:q + n])
      values = _decompress(kind, chunk[q + n:])
      lens, k = [], 0
      while k < len(sizes):
        v, k = _varint(sizes, k)
        lens.append(v)
      if not lens or sum(lens) != len(values):
        continue
    except Exception:  # noqa: BLE001 - not a chunk header after all
      continue
    o = 0
    for length in lens:
      records.append(values[o:o + length])
      o += length
  return records


def _elf_images(blob: bytes) -> list[bytes]:
  out = []
  for m in re.finditer(rb"\x7fELF\x02\x01\x01", blob):
    p = m.start()
    h = blob[p:p + 64]
    if len(h) < 64 or struct.unpack("<H", h[18:20])[0] != 190:     # e_machine EM_CUDA
      continue
    shoff = struct.unpack("<Q", h[40:48])[0]
    shentsize, shnum = struct.unpack("<HH", h[58:62])
    phoff = struct.unpack("<Q", h[32:40])[0]
    phentsize, phnum = struct.unpack("<HH", h[54:58])
    size = max(shoff + shentsize * shnum, phoff + phentsize * phnum)
    if 64 <= size <= len(blob) - p:
      out.append(blob[p:p + size])
  return out


def cubins(compiled) -> list[bytes]:
  """The CUDA ELF images (cubins) of a compiled GPU executable."""
  blobs = [compiled.runtime_executable().serialize()]
  images, seen = [], set()
  for _ in range(4):                            # riegeli nested in riegeli records
    nxt = []
    for blob in blobs:
      for img in _elf_images(blob):
        if img not in seen:
          seen.add(img)
          images.append(img)
      for m in re.finditer(re.escape(_RIEGELI_SIG), blob):    # a riegeli file starts there
        nxt += [r for r in _riegeli_records(blob[m.start():]) if len(r) > 64]
    if not nxt:
      break
    blobs = nxt
  return images


_RES_RE = re.compile(r"Function\s+(\S+):\s*\n\s*(.*)")


def res_usage(images: list[bytes]) -> list[dict]:
  """`cuobjdump -res-usage` per kernel: registers, shared/local/stack/constant bytes.

  `local_bytes` > 0 means register spills (or a local array) in that kernel.
  """
  tool = cuobjdump()
  if tool is None:
    raise RuntimeError("cuobjdump not found (pip install nvidia-cuda-cuobjdump)")
  out = []
  with tempfile.TemporaryDirectory() as tmp:
    for i, img in enumerate(images):
      path = os.path.join(tmp, f"k{i}.cubin")
      pathlib.Path(path).write_bytes(img)
      text = subprocess.run([tool, "-res-usage", path], capture_output=True, text=True,
                            timeout=120).stdout
      for m in _RES_RE.finditer(text):
        fields = dict(re.findall(r"(REG|STACK|SHARED|LOCAL|CONSTANT\[\d+\]|TEXTURE|SURFACE|SAMPLER)"
                                 r":(\d+)", m.group(2)))
        consts = sum(int(v) for k, v in fields.items() if k.startswith("CONSTANT"))
        out.append({"function": m.group(1), "cubin": i, "registers": int(fields.get("REG", 0)),
                    "shared_bytes": int(fields.get("SHARED", 0)),
                    "local_bytes": int(fields.get("LOCAL", 0)),
                    "stack_bytes": int(fields.get("STACK", 0)), "constant_bytes": consts})
      spills = _sass_spills(tool, path)
      for rec in out:
        if rec["cubin"] == i and rec["function"] in spills:
          rec["spill_stores"], rec["spill_loads"] = spills[rec["function"]]
  return out


def _sass_spills(tool: str, path: str) -> dict[str, tuple[int, int]]:
  """`{function: (STL count, LDL count)}` from the SASS (local-memory stores / loads: register
  spills in a Triton kernel, which has no local arrays). Needs `nvdisasm` (pip
  `nvidia-cuda-nvdisasm`) next to cuobjdump or on PATH; `{}` without it."""
  nvdisasm = _nvidia_bin("nvdisasm")
  if nvdisasm is None:
    return {}
  env = dict(os.environ, PATH=os.path.dirname(nvdisasm) + os.pathsep + os.environ.get("PATH", ""))
  text = subprocess.run([tool, "-sass", path], capture_output=True, text=True, timeout=300,
                        env=env).stdout
  out, name = {}, None
  for line in text.splitlines():
    m = re.match(r"\s*Function\s*:\s*(\S+)", line)
    if m:
      name = m.group(1)
      out[name] = (0, 0)
    elif name is not None:
      st, ld = out[name]
      out[name] = (st + len(re.findall(r"\bSTL(?:\.\S+)?\s", line)),
                   ld + len(re.findall(r"\bLDL(?:\.\S+)?\s", line)))
  return out


_THUNK_RE = re.compile(r"^\d+:\s+(\w+)\s+\[[^\]]*\]\s+(\S+)\s+grid:\s*\[([\d, ]+)\]\s+threads:\s*"
                       r"\[([\d, ]+)\]\s+shared_memory:\s*(\d+)")


def thunks(dump_dir: str | None) -> list[dict]:
  """Kernel launches from XLA's `*.thunk_sequence.txt` dump: name, grid, threads, dynamic smem."""
  if not dump_dir:
    return []
  out = []
  for path in sorted(glob.glob(os.path.join(dump_dir, "*thunk_sequence.txt"))):
    for line in pathlib.Path(path).read_text().splitlines():
      m = _THUNK_RE.match(line.strip())
      if m:
        out.append({"thunk": m.group(1), "kernel": m.group(2),
                    "grid": [int(v) for v in m.group(3).split(",")],
                    "threads": [int(v) for v in m.group(4).split(",")],
                    "launch_shared_bytes": int(m.group(5))})
  return out


# ---------------------------------------------------------------------------------------------
# Program figures.

def memory(compiled) -> dict | None:
  mem = compiled.memory_analysis()
  if mem is None:
    return None
  return {"argument_bytes": int(mem.argument_size_in_bytes),
          "output_bytes": int(mem.output_size_in_bytes),
          "alias_bytes": int(mem.alias_size_in_bytes),
          "temp_bytes": int(mem.temp_size_in_bytes),
          "total_bytes": int(mem.argument_size_in_bytes + mem.output_size_in_bytes
                             - mem.alias_size_in_bytes + mem.temp_size_in_bytes)}


def cost(compiled) -> dict:
  """`{"flops", "bytes_accessed", "source"}` per device; XLA's CPU cost model over the optimized GPU
  module when `cost_analysis()` has nothing (private API: any failure gives None values). The
  model counts each custom call (a Pallas kernel) by its operands and results, and a while-loop body
  once (a scanned layer stack contributes one layer; see `loop_trip_counts`)."""
  res = {"flops": None, "bytes_accessed": None, "source": None}
  try:
    ca = compiled.cost_analysis()
    if isinstance(ca, (list, tuple)):
      ca = ca[0] if ca else None
    if ca and ca.get("bytes accessed"):
      return {"flops": float(ca.get("flops", 0.0)), "bytes_accessed": float(ca["bytes accessed"]),
              "source": "cost_analysis"}
  except Exception:  # noqa: BLE001
    pass
  try:
    import jax
    from jax._src import xla_bridge
    from jax._src.lib import _jax
    module = compiled.runtime_executable().hlo_modules()[0]
    ca = _jax.hlo_module_cost_analysis(xla_bridge.get_backend("cpu"), module)
    res = {"flops": float(ca.get("flops", 0.0)), "bytes_accessed": float(ca["bytes accessed"]),
           "source": f"cpu cost model over the optimized gpu module (jax {jax.__version__})"}
  except Exception as e:  # noqa: BLE001 - private API moved: report why, keep going
    res["source"] = f"unavailable: {type(e).__name__}: {str(e)[:120]}"
  return res


_CC_RE = re.compile(r"=\s*(.*?)\s+custom-call\((.*?)\),\s.*custom_call_target=\"([^\"]+)\"")


def custom_call_bytes(hlo: str) -> dict:
  """`{"count", "bytes"}` of the Triton custom calls (Pallas kernels) in optimized HLO: operands +
  results, each read or written once. XLA's cost model does not see inside them (it reports -1 for
  a custom call), so this is added to its bytes accessed. Calls inside a while body count once."""
  from mhc_jax.tools.hlo import array_bytes as _array_bytes
  count = total = 0
  for line in hlo.splitlines():
    m = _CC_RE.search(line)
    if m and "triton" in m.group(3):
      count += 1
      ops = re.search(r"operand_layout_constraints=\{(.*?)\}(?:, [a-z_]+=|$)", line)
      operands = ops.group(1) if ops else m.group(2)      # operands print as names only
      total += sum(_array_bytes(m.group(1))) + sum(_array_bytes(operands))
  return {"count": count, "bytes": total}


def loop_trip_counts(hlo: str) -> list[int]:
  return [int(v) for v in re.findall(r'"known_trip_count":\{"n":"(\d+)"', hlo)]


def kernels(compiled, dump_dir: str | None) -> list[dict]:
  """Per GPU kernel: launch (grid, threads, smem) joined with its cubin resources by name."""
  launches = thunks(dump_dir)
  try:
    res = res_usage(cubins(compiled))
  except Exception as e:  # noqa: BLE001 - no cuobjdump / cramjam: keep the launches
    res = []
    for t in launches:
      t["resources_error"] = f"{type(e).__name__}: {str(e)[:160]}"
  by_name: dict[str, dict] = {}
  for r in res:
    by_name.setdefault(r["function"], r)
  out = []
  for t in launches:
    r = by_name.get(t["kernel"])
    out.append({**t, **({k: v for k, v in r.items() if k != "function"} if r else {})})
  named = {t["kernel"] for t in launches}
  out += [{"kernel": r["function"], **{k: v for k, v in r.items() if k != "function"}}
          for r in res if r["function"] not in named]
  return out


def report(program: Program, *, with_kernels: bool = True, collectives: bool = True) -> dict:
  """Everything the compile tells: memory, cost, collectives, kernels, times."""
  compiled = program.compiled
  hlo = compiled.as_text()
  c = cost(compiled)
  cc = custom_call_bytes(hlo)
  if c.get("bytes_accessed") is not None:
    c["xla_ops_bytes"] = max(c["bytes_accessed"], 0.0)
    c["pallas_bytes"] = float(cc["bytes"])
    c["bytes_accessed"] = c["xla_ops_bytes"] + c["pallas_bytes"]
    c["note"] = "bytes_accessed = XLA cost model (non-kernel ops) + Pallas kernels' operands/results"
  out = {"lower_s": round(program.lower_s, 2), "compile_s": round(program.compile_s, 2),
         "memory": memory(compiled), "cost": c,
         "while_trip_counts": loop_trip_counts(hlo),
         "triton_custom_calls": hlo.count('custom_call_target="__gpu$xla.gpu.triton"')}
  if collectives:
    from mhc_jax.tools.hlo import collective_stats
    out["collectives"] = collective_stats(hlo)
  if with_kernels:
    ks = kernels(compiled, program.dump_dir)
    out["kernels"] = ks
    res = [k for k in ks if "registers" in k]
    out["max_registers"] = max((k["registers"] for k in res), default=None)
    out["stack_bytes"] = sum(k["stack_bytes"] + k["local_bytes"] for k in res) if res else None
    out["spill_stores"] = (sum(k.get("spill_stores", 0) for k in res)
                           if res and all("spill_stores" in k for k in res) else None)
  return out
