"""Backend selection for one `pallas_call` body: TPU (Mosaic), GPU (Triton lowering), CPU interpret.

The same body and BlockSpecs serve all three; only the compiler params, the token block `bt` and
the feature chunking differ:
  tpu:       bt sized to a VMEM budget (multiple of 16), one feature chunk per stream (any C;
             lane-aligned when C % 128 == 0).
  gpu:       bt = 16 (power of two, masked tail; the smallest M of a Triton `dot`), 8 warps,
             power-of-two feature chunks (C % 16 == 0) of at most `gpu_max_chunk(...)` features:
             128 (pre; post, n <= 4) / 64 (post, n > 4). The pre kernel loops over equal chunks
             (`lax.fori_loop`, `pre.loop_chunk`), so its tiles do not grow with C; the post kernel
             unrolls its chunks. Checked by compiling for an H100 without a GPU
             (`mhc_jax.tools.h100`, experiments/results/h100_aot_*.json): 1024-feature chunks
             needed 256-768 KiB of shared memory (the H100 has 227 KiB per block) and spilled; the
             looped pre kernel at 128 features: no spill forward, the least backward spill (256
             features: more registers forward, more spill backward).
  interpret: HLO interpreter on any platform (tests), TPU-style blocks unless `max_chunk` is given.
"""
from __future__ import annotations

import dataclasses
import warnings

import jax
from jax.experimental import pallas as pl

from mhc_jax.kernels.block import MapSpec

BACKENDS = ("tpu", "gpu", "interpret")
_VMEM_LIMIT = 48 * 1024 * 1024
_VMEM_BUDGET = 12 * 1024 * 1024     # bytes of per-token-block buffers we aim for (double-buffered)


@dataclasses.dataclass(frozen=True)
class KernelCfg:
  """Static launch configuration (hashable: a `custom_vjp` nondiff argument)."""
  backend: str
  n: int
  c: int
  bt: int
  max_chunk: int | None = None
  bf16_passes: int = 3
  spec: MapSpec | None = None     # mapping (pre kernels only)
  norm_count: int = 0             # features in the RMS mean when x is a feature shard (0: n*c)
  dpre_given: bool = False        # pre backward: dH already holds <du, x[j]> (feature-sharded path)
  num_warps: int = 4              # GPU (Triton) only
  num_stages: int = 2             # GPU (Triton) only

  @property
  def nc(self) -> int:
    return self.n * self.c


def token_block(backend: str, n: int, c: int, itemsize: int, tokens: int,
                bt: int | None = None) -> int:
  """Tokens per grid step. TPU: largest power of two in [16, 512] whose blocks fit the budget."""
  if bt is not None:
    return int(bt)
  if backend == "gpu":
    return 16
  per_token = 2 * (2 * n * c * itemsize + c * itemsize) + 3 * n * c * 4   # in/out x2 + f32 temps
  bt = 512
  while bt > 16 and bt * per_token > _VMEM_BUDGET:
    bt //= 2
  if backend == "interpret":
    bt = min(bt, 64)                 # the interpreter loops over the grid: keep test grids short
  return bt


GPU_NUM_WARPS = 8
GPU_NUM_STAGES = 2


def gpu_max_chunk(itemsize: int, pre: bool, n: int = 4) -> int:
  """Largest feature chunk of a GPU kernel (see the module doc; measured on sm_90a). The post
  backward keeps 2n + 3 chunk tiles live: n = 8 at 128 features spilled 496 B per thread. The
  looped pre kernel at n = 4, C = 2048, bf16: 256-feature chunks forward 237 registers, backward
  304 B spill; 128: forward 128 registers, backward 208 B (`itemsize` kept for callers)."""
  del itemsize
  if pre:
    return 128
  return 128 if n <= 4 else 64


def make_cfg(backend: str, n: int, c: int, dtype, tokens: int, *, spec: MapSpec | None = None,
             bt: int | None = None, max_chunk: int | None = None, bf16_passes: int = 3) -> KernelCfg:
  if backend not in BACKENDS:
    raise ValueError(f"backend={backend!r}; allowed: {BACKENDS}")
  itemsize = jax.numpy.dtype(dtype).itemsize
  extra = {}
  if backend == "gpu":
    if max_chunk is None:
      max_chunk = gpu_max_chunk(itemsize, pre=spec is not None, n=n)
    extra = dict(num_warps=GPU_NUM_WARPS, num_stages=GPU_NUM_STAGES)
  return KernelCfg(backend=backend, n=n, c=c, bt=token_block(backend, n, c, itemsize, tokens, bt),
                   max_chunk=max_chunk, bf16_passes=bf16_passes, spec=spec, **extra)


def call(cfg: KernelCfg, body, *, tokens: int, in_specs, out_specs, out_shape):
  """`pl.pallas_call` over token blocks with the backend's compiler params."""
  grid = (pl.cdiv(tokens, cfg.bt),)
  kwargs = {}
  if cfg.backend == "interpret":
    kwargs["interpret"] = True
  elif cfg.backend == "tpu":
    from jax.experimental.pallas import tpu as pltpu
    kwargs["compiler_params"] = pltpu.CompilerParams(dimension_semantics=("parallel",),
                                                     vmem_limit_bytes=_VMEM_LIMIT)
  else:
    from jax.experimental.pallas import triton as pltriton
    kwargs["compiler_params"] = pltriton.CompilerParams(num_warps=cfg.num_warps,
                                                         num_stages=cfg.num_stages)
  with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message=".*Triton.*deprecated.*")
    return pl.pallas_call(body, grid=grid, in_specs=in_specs, out_specs=out_specs,
                          out_shape=out_shape, **kwargs)


def tokens_spec(cfg: KernelCfg, width: int) -> pl.BlockSpec:
  """`[tokens, width]` blocked over tokens, full width."""
  return pl.BlockSpec((cfg.bt, width), lambda t: (t, 0))


def full_spec(shape) -> pl.BlockSpec:
  """Whole (small) array, same block at every step."""
  zeros = (0,) * len(shape)
  return pl.BlockSpec(tuple(shape), lambda t: zeros)
