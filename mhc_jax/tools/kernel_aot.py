"""Compile the kernels for hardware that is not here: a real legality check from a CPU host.

  tpu_compile: lowers through Mosaic and compiles with libtpu for a TPU topology (`tpu-aot` extra;
               jax_practice.md 2.7, 3.7). Catches block-shape, layout and op-support errors.
  gpu_lower:   lowers the Triton form for an abstract H100 (no CUDA needed). Catches Triton-lowering
               errors (non-power-of-two arrays, unsupported primitives); PTX compilation is not run.
Both build forward and forward+backward programs of `fused_pre` and `fused_post`.
"""
from __future__ import annotations

import os

import jax
import jax.numpy as jnp

from mhc_jax.kernels import block, launch
from mhc_jax.kernels.post import fused_post, lanes
from mhc_jax.kernels.pre import fused_pre


def tpu_device(topology: str = "v5e:2x2"):
  """First device of a TPU topology description (needs libtpu; no TPU hardware)."""
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")   # other processes may hold libtpu
  from jax.experimental import topologies
  topo = topologies.get_topology_desc(platform="tpu", topology_name=topology,
                                      chip_config_name="default", chips_per_host_bounds=(2, 2, 1),
                                      num_slices=1)
  return topo.devices[0]


def programs(cfg_pre: launch.KernelCfg, cfg_post: launch.KernelCfg, tokens: int, dtype):
  """`{name: (fn, abstract_args)}`: pre/post forward and value-and-grad (backward kernels)."""
  n, c, w = cfg_pre.n, cfg_pre.c, cfg_pre.spec.width
  f32 = jnp.float32
  x = jax.ShapeDtypeStruct((tokens, n * c), dtype)
  y = jax.ShapeDtypeStruct((tokens, c), dtype)
  phi, b, alpha = (jax.ShapeDtypeStruct((n * c, w), f32), jax.ShapeDtypeStruct((w,), f32),
                   jax.ShapeDtypeStruct((3,), f32))
  hp = jax.ShapeDtypeStruct((tokens, lanes(n)), f32)

  def pre_loss(x, phi, b, alpha):
    u, h = fused_pre(cfg_pre, x, phi, b, alpha)
    return jnp.sum(u.astype(f32)) + jnp.sum(h * h)

  def post_loss(x, y, hp):
    return jnp.sum(fused_post(cfg_post, x, y, hp).astype(f32) ** 2)

  return {
      "pre_fwd": (lambda *a: fused_pre(cfg_pre, *a), (x, phi, b, alpha)),
      "pre_bwd": (jax.grad(pre_loss, argnums=(0, 1, 2, 3)), (x, phi, b, alpha)),
      "post_fwd": (lambda *a: fused_post(cfg_post, *a), (x, y, hp)),
      "post_bwd": (jax.grad(post_loss, argnums=(0, 1, 2)), (x, y, hp)),
  }


def tpu_compile(kind: str, n: int, c: int, tokens: int, dtype, *, topology: str = "v5e:2x2",
                sinkhorn_iters: int = 20):
  """Compile all four programs for one TPU device; returns `{name: compiled}`."""
  from jax.sharding import SingleDeviceSharding
  dev = tpu_device(topology)
  spec = block.MapSpec(kind, n, sinkhorn_iters)
  cfg_pre = launch.make_cfg("tpu", n, c, dtype, tokens, spec=spec)
  cfg_post = launch.make_cfg("tpu", n, c, dtype, tokens)
  out = {}
  for name, (fn, args) in programs(cfg_pre, cfg_post, tokens, dtype).items():
    args = [jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=SingleDeviceSharding(dev))
            for a in args]
    out[name] = jax.jit(fn).lower(*args).compile()
  return out


def gpu_lower(kind: str, n: int, c: int, tokens: int, dtype, *, device_kind: str = "NVIDIA H100",
              sinkhorn_iters: int = 20):
  """Lower all four programs to Triton for an abstract GPU; returns `{name: lowered}`."""
  from jax.sharding import AbstractDevice, AbstractMesh, use_abstract_mesh
  spec = block.MapSpec(kind, n, sinkhorn_iters)
  cfg_pre = launch.make_cfg("gpu", n, c, dtype, tokens, spec=spec)
  cfg_post = launch.make_cfg("gpu", n, c, dtype, tokens)
  mesh = AbstractMesh((), (), abstract_device=AbstractDevice(device_kind, 132, "gpu"))
  out = {}
  with use_abstract_mesh(mesh):
    for name, (fn, args) in programs(cfg_pre, cfg_post, tokens, dtype).items():
      out[name] = jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",))
  return out
