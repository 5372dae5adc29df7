"""Kernel-backed stream ops, and the one dispatch point of a connection site.

    mhc_pre(x, params, kind=...)     -> (u, h_pre, h_post, h_res)   = ops mappings + ops.stream_pre
    stream_post(x, y, h_res, h_post) -> x_next                      = ops.stream_post
    site_ops(cfg, x, x_spec)         -> SiteOps, resolved once per call site:
        pre(x, params) -> (u, Coeffs)        post(x, y, Coeffs) -> x_next

`implementation`: `xla` is the `mhc_jax.ops` path. `pallas` compiles the kernel for the platform
(TPU: Mosaic, GPU: Triton) and raises `ConfigError` for an unsupported platform, shape or dtype.
`interpret` runs the same kernel body in the Pallas interpreter (any platform; tests).
`auto` is `pallas` when the streams mix in float32 and C % 128 == 0 on TPU (the lane-aligned case)
or on GPU for the sizes whose Triton kernels compile for sm_90a without large register spills
(`gpu_auto_reason`: n <= 4, C % 128 == 0, mHC with eps = 0 and at most 20 Sinkhorn iterations, or
mHC-lite), else `xla` (always on CPU).

The platform is the active mesh's (`jax.sharding.get_abstract_mesh()`, so an ahead-of-time compile
for a TPU or GPU topology takes that platform's kernels), else `jax.default_backend()`.

Under a mesh, `SiteOps` runs the kernels inside `jax.shard_map` with x laid out as `x_spec`, so a
kernel only ever sees its own block (a Pallas call is opaque to GSPMD, which would gather it):
tokens (batch, length) split -> the fused kernels per device; features split over an axis -> the
pre kernel's statistics are psum-ed (`pre_tp`, n*n + 2n + 1 floats per token) and post stays local.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Mapping

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from mhc_jax import ops
from mhc_jax.config import IMPLEMENTATIONS, ConfigError, ConnectionConfig, check_choice
from mhc_jax.kernels import block, launch
from mhc_jax.kernels.post import fused_post
from mhc_jax.kernels.pre import fused_pre
from mhc_jax.kernels.pre_tp import pre_feature_shard

KINDS = ("mhc", "mhc_lite")
_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))


def platform_backend() -> str | None:
  """Kernel backend of the target platform: "tpu", "gpu" or None (no compiled kernels).

  The active mesh's device platform when a mesh with a known device is set (ahead-of-time
  topologies included), else the default backend's.
  """
  device = getattr(jax.sharding.get_abstract_mesh(), "abstract_device", None)
  p = device.platform if device is not None else jax.default_backend()
  return "tpu" if p == "tpu" else "gpu" if p in ("gpu", "cuda", "rocm") else None


def unsupported(backend: str | None, x, kind: str = "mhc") -> str | None:
  """Why the kernel cannot take `x [..., n, C]` on `backend` (None when it can)."""
  if backend is None:
    return f"no Pallas kernels on the {jax.default_backend()!r} platform (use 'interpret' or 'xla')"
  n, c = x.shape[-2:]
  if jnp.dtype(x.dtype) not in _DTYPES:
    return f"x dtype {x.dtype} (kernels take float32 or bfloat16)"
  if not 1 <= n <= 8:
    return f"n_streams={n} (kernels take 1..8)"
  if kind == "mhc_lite" and n > 5:
    return f"mhc_lite with n_streams={n} (kernel takes n <= 5: n! lanes)"
  if backend == "gpu" and c % 16:
    return f"C={c} (GPU kernels need C % 16 == 0 for power-of-two chunks)"
  return None


GPU_AUTO_MAX_N = 4
GPU_AUTO_MAX_ITERS = 20


def gpu_auto_reason(x, kind: str = "mhc", sinkhorn_eps: float = 0.0,
                    sinkhorn_iters: int = GPU_AUTO_MAX_ITERS) -> str | None:
  """Why `auto` keeps XLA on GPU for supported inputs `x [..., n, C]` (None: it takes the kernels).

  Measured by deviceless sm_90a compiles (`mhc_jax.tools.gpu_aot`,
  experiments/results/h100_aot_pre_kernels_20261203_chunked.json): with the looped feature chunks
  the pre forward has no spill at C = 2048 / 4096 and the backward a few hundred bytes per thread
  (the saved Sinkhorn iterates, one [16, W] tile per half step). Wider lanes (n > 4: W = 128), more
  iterations or the eps > 0 Sinkhorn (autodiff, twice the saved tiles) spill more: XLA.
  """
  n, c = x.shape[-2:]
  if n > GPU_AUTO_MAX_N:
    return f"n_streams={n} > {GPU_AUTO_MAX_N}"
  if c % 128:
    return f"C={c} is not a multiple of 128"
  if kind == "mhc" and sinkhorn_eps != 0:
    return "sinkhorn_eps > 0"
  if kind == "mhc" and sinkhorn_iters > GPU_AUTO_MAX_ITERS:
    return f"sinkhorn_iters={sinkhorn_iters} > {GPU_AUTO_MAX_ITERS}"
  return None


def resolve(implementation: str, x, kind: str = "mhc", field: str = "implementation", *,
            sinkhorn_eps: float = 0.0, sinkhorn_iters: int = GPU_AUTO_MAX_ITERS) -> str:
  """`implementation` -> "xla" | "tpu" | "gpu" | "interpret"; raises ConfigError when impossible."""
  check_choice(field, implementation, IMPLEMENTATIONS)
  if implementation in ("xla", "interpret"):
    return implementation
  backend = platform_backend()
  why = unsupported(backend, x, kind)
  if implementation == "auto":
    # TPU compiles any C, but stream slices are lane-aligned (fast) only for C % 128 == 0.
    slow = backend == "tpu" and x.shape[-2] > 1 and x.shape[-1] % 128
    # GPU: only the sizes whose Triton kernels compile without large spills (gpu_auto_reason).
    spills = backend == "gpu" and gpu_auto_reason(x, kind, sinkhorn_eps, sinkhorn_iters)
    return "xla" if (why or slow or spills) else backend
  if why:
    raise ConfigError(f"{field}='pallas' is not available here: {why}; "
                      "use implementation='auto' to fall back to XLA")
  return backend


def _check_kind(kind):
  check_choice("kind", kind, KINDS)


def _map_spec(kind, n, sinkhorn_iters=20, sinkhorn_eps=0.0, norm_eps=1e-6, pre_eps=0.0):
  return block.MapSpec(kind, n, int(sinkhorn_iters), float(sinkhorn_eps), float(norm_eps),
                       float(pre_eps))


def _check_params(spec: block.MapSpec, params, c: int):
  want = {"phi": (spec.n * c, spec.width), "b": (spec.width,), "alpha": (3,)}
  for key, shape in want.items():
    if key not in params or tuple(params[key].shape) != shape:
      got = tuple(params[key].shape) if key in params else "missing"
      raise ValueError(f"mhc_pre: params[{key!r}] is {got}, expected {shape} for "
                       f"kind={spec.kind!r}, n={spec.n}, C={c}")


def _pre_kernel(impl, spec: block.MapSpec, tune: dict, x, params, axis: str | None = None):
  """`(u [..., C], packed H [..., W])` of the local block `x [..., n, C]` (features split over
  `axis` when given: call inside `shard_map`)."""
  *lead, n, c = x.shape
  t = math.prod(lead)
  cfg = launch.make_cfg(impl, n, c, x.dtype, t, spec=spec, **tune)
  args = (x.reshape(t, n * c), params["phi"], params["b"], params["alpha"])
  u, h = fused_pre(cfg, *args) if axis is None else pre_feature_shard(cfg, axis, *args)
  return u.reshape(*lead, c), h.reshape(*lead, h.shape[-1])


def _post_kernel(impl, tune: dict, x, y, packed):
  """`x_next [..., n, C]` from the local blocks of x, y and the packed coefficients."""
  *lead, n, c = x.shape
  t = math.prod(lead)
  cfg = launch.make_cfg(impl, n, c, x.dtype, t, **tune)
  out = fused_post(cfg, x.reshape(t, n * c), y.reshape(t, c), packed.reshape(t, -1))
  return out.reshape(x.shape)


def _tune(block_tokens=None, max_chunk=None, bf16_passes=None) -> dict:
  out = {"bt": block_tokens, "max_chunk": max_chunk}
  if bf16_passes is not None:
    out["bf16_passes"] = bf16_passes
  return out


def mhc_pre(x: jax.Array, params: Mapping[str, jax.Array], *, kind: str = "mhc",
            sinkhorn_iters: int = 20, sinkhorn_eps: float = 0.0, norm_eps: float = 1e-6,
            pre_eps: float = 0.0, implementation: str = "auto", block_tokens: int | None = None,
            max_chunk: int | None = None, bf16_passes: int = 3):
  """Fused mHC / mHC-lite pre: `(u [..., C], h_pre [..., n], h_post [..., n], h_res [..., n, n])`.

  Equals `ops.mhc_mappings` (or `ops.mhc_lite_mappings`) followed by `ops.stream_pre` with float32
  accumulation. `block_tokens`, `max_chunk`, `bf16_passes` tune the kernel (tests, benchmarks).
  """
  _check_kind(kind)
  impl = resolve(implementation, x, kind, sinkhorn_eps=sinkhorn_eps, sinkhorn_iters=sinkhorn_iters)
  spec = _map_spec(kind, x.shape[-2], sinkhorn_iters, sinkhorn_eps, norm_eps, pre_eps)
  if impl == "xla" or x.size == 0:
    hs = _xla_mappings(spec, x, params)
    return (ops.stream_pre(x, hs[0]),) + hs
  _check_params(spec, params, x.shape[-1])
  u, packed = _pre_kernel(impl, spec, _tune(block_tokens, max_chunk, bf16_passes), x, params)
  return (u,) + Coeffs(packed, None, spec.n).split()


def stream_post(x: jax.Array, y: jax.Array, h_res: jax.Array, h_post: jax.Array, *,
                implementation: str = "auto", block_tokens: int | None = None,
                max_chunk: int | None = None):
  """`x_next[i] = sum_j h_res[i, j] x[j] + h_post[i] y` (float32 accumulation, x dtype out)."""
  impl = resolve(implementation, x)
  if impl == "xla" or x.size == 0:
    return ops.stream_post(x, y, h_res, h_post)
  *lead, n, c = x.shape
  if y.shape != (*lead, c) or h_post.shape != (*lead, n) or h_res.shape != (*lead, n, n):
    raise ValueError(f"stream_post: shapes x {x.shape}, y {y.shape}, h_res {h_res.shape}, "
                     f"h_post {h_post.shape} do not match [..., n, C], [..., C], [..., n, n], "
                     "[..., n]")
  return _post_kernel(impl, _tune(block_tokens, max_chunk), x, y, pack_post(h_res, h_post))


def pack_post(h_res: jax.Array, h_post: jax.Array) -> jax.Array:
  """`[..., W]` float32 lanes `[0 (n) | H_post (n) | H_res (n*n) | 0 ...]` (the kernel layout)."""
  n = h_post.shape[-1]
  lead = h_post.shape[:-1]
  w = block.MapSpec("mhc", n).lanes
  parts = [jnp.zeros((*lead, n), jnp.float32), h_post.astype(jnp.float32),
           h_res.reshape(*lead, n * n).astype(jnp.float32)]
  packed = jnp.concatenate(parts, axis=-1)
  return jnp.pad(packed, [(0, 0)] * len(lead) + [(0, w - packed.shape[-1])])


def _xla_mappings(spec: block.MapSpec, x, params, axis: str | None = None):
  if spec.kind == "mhc":
    return ops.mhc_mappings(x, params, sinkhorn_iters=spec.sinkhorn_iters,
                            sinkhorn_eps=spec.sinkhorn_eps, norm_eps=spec.norm_eps,
                            pre_eps=spec.pre_eps, axis=axis)
  return ops.mhc_lite_mappings(x, params, norm_eps=spec.norm_eps, pre_eps=spec.pre_eps, axis=axis)


# ---------------------------------------------------------------------------------------------
# One connection site.

@functools.partial(jax.tree_util.register_dataclass, data_fields=["packed", "parts"],
                   meta_fields=["n"])
@dataclasses.dataclass(frozen=True)
class Coeffs:
  """The mapping coefficients, handed from `SiteOps.pre` to `SiteOps.post` as they are.

  Kernel paths: `packed [..., W]` float32 in the kernels' lane layout (`block.py`); XLA path:
  `parts = (h_pre [..., n], h_post [..., n], h_res [..., n, n])`. `split()` gives the three views.
  """
  packed: jax.Array | None
  parts: tuple | None
  n: int

  def split(self) -> tuple[jax.Array, jax.Array, jax.Array]:
    if self.parts is not None:
      return tuple(self.parts)
    h, n = self.packed, self.n
    lead = h.shape[:-1]
    return h[..., :n], h[..., n:2 * n], h[..., 2 * n:2 * n + n * n].reshape(*lead, n, n)


def _mesh_spec(x, x_spec: P | None) -> P | None:
  """`x_spec` restricted to the active mesh's axes that divide x's dims; None without a mesh or
  when x is not split at all (then the plain call: every device holds the whole x)."""
  mesh = jax.sharding.get_abstract_mesh()
  if x_spec is None or mesh.empty:
    return None
  sizes = dict(zip(mesh.axis_names, mesh.axis_sizes))
  out = []
  for dim, entry in zip(x.shape, tuple(x_spec) + (None,) * (x.ndim - len(x_spec))):
    names = () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
    names = tuple(a for a in names if a in sizes)
    ok = names and dim % math.prod(sizes[a] for a in names) == 0
    out.append((names[0] if len(names) == 1 else names) if ok else None)
  if out[-2] is not None:
    raise ValueError(f"connection kernels: x_spec={x_spec} shards the stream axis; leave it None")
  return P(*out) if any(e is not None for e in out) else None


def _axes(spec: P) -> frozenset:
  return frozenset(a for e in spec if e is not None for a in ((e,) if isinstance(e, str) else e))


def _shard_map(body, x_spec: P, in_specs, out_specs):
  """`body` per device under `jax.shard_map`, manual over every mesh axis (Mosaic calls cannot be
  partitioned automatically); `check_vma=False` (Pallas calls carry no varying-axis types).

  Axes that split x ("split") follow shard_map's own differentiation. On axes that replicate x
  ("rest"), every device computes the same block; shard_map's transpose would then psum cotangents
  that are equal on all of them (an activation-sized all-reduce per site, e.g. under plain TP). So
  with rest axes the VJP is explicit: each device differentiates its own block, output cotangents
  are divided and input cotangents psum-ed over the split axes an output or input is replicated on
  (exactly shard_map's rule), and nothing happens over the rest axes.
  """
  mesh = jax.sharding.get_abstract_mesh()
  flat_in = jax.tree.leaves(in_specs, is_leaf=lambda v: isinstance(v, P))
  split = _axes(x_spec)
  rest = [a for a in mesh.axis_names if a not in split]

  def smap(fn, i, o):
    return jax.shard_map(fn, mesh=mesh, in_specs=i, out_specs=o, check_vma=False)
  if not rest:
    return smap(body, in_specs, out_specs)
  sizes = dict(zip(mesh.axis_names, mesh.axis_sizes))

  def missing(spec):      # split axes this operand is replicated on
    return tuple(a for a in mesh.axis_names if a in split and a not in _axes(spec))

  def local_bwd(args, cts):
    cts = jax.tree.map(lambda c, o: c / math.prod(sizes[a] for a in missing(o)), cts,
                       out_specs)
    _, pull = jax.vjp(body, *args)
    grads = pull(cts)
    return tuple(jax.lax.psum(g, missing(sp)) if missing(sp) else g
                 for g, sp in zip(grads, flat_in))

  @jax.custom_vjp
  def mapped(*args):
    return smap(body, in_specs, out_specs)(*args)

  def fwd(*args):
    return mapped(*args), args    # the kernels' VJPs need only their inputs

  def bwd(args, cts):
    return smap(local_bwd, (in_specs, out_specs), in_specs)(args, cts)

  mapped.defvjp(fwd, bwd)
  return mapped


@dataclasses.dataclass(frozen=True)
class SiteOps:
  """The stream ops of one connection site, resolved once (`site_ops`).

  impl: "xla" | "tpu" | "gpu" | "interpret".  spec: the mapping.  hc: HC mappings (XLA only).
  acc_dtype: stream-mixing accumulation dtype on the XLA path (float32, or the activation dtype).
  x_spec: x's layout on the active mesh (kernels run under `shard_map`), or None (plain call).
  """
  impl: str
  spec: block.MapSpec | None
  acc_dtype: Any
  x_spec: P | None = None
  hc_norm_eps: float = 1e-6

  def mappings(self, x, params):
    """`(h_pre, h_post, h_res)` float32 by the XLA path (HC, or mHC / mHC-lite)."""
    if self.spec is None:
      return ops.hc_mappings(x, params, norm_eps=self.hc_norm_eps)
    return _xla_mappings(self.spec, x, params)

  def pre(self, x, params) -> tuple[jax.Array, Coeffs]:
    """`u = sum_j H_pre[j] x[j]` and the coefficients of this site."""
    n = x.shape[-2]
    if self.impl == "xla":
      hs = self.mappings(x, params)
      return ops.stream_pre(x, hs[0], acc_dtype=self.acc_dtype), Coeffs(None, hs, n)
    _check_params(self.spec, params, x.shape[-1])
    if self.x_spec is None:
      u, packed = _pre_kernel(self.impl, self.spec, {}, x, params)
      return u, Coeffs(packed, None, n)
    *lead, _, feat = self.x_spec
    body = functools.partial(_pre_kernel, self.impl, self.spec, {}, axis=feat)
    u, packed = _shard_map(body, self.x_spec, in_specs=(self.x_spec, P()),
                           out_specs=(P(*lead, feat), P(*lead, None)))(x, params)
    return u, Coeffs(packed, None, n)

  def post(self, x, y, coeffs: Coeffs) -> jax.Array:
    """`x_next[i] = sum_j H_res[i, j] x[j] + H_post[i] y`."""
    if self.impl == "xla":
      h_pre, h_post, h_res = coeffs.split()
      return ops.stream_post(x, y, h_res, h_post, acc_dtype=self.acc_dtype)
    body = functools.partial(_post_kernel, self.impl, {})
    if self.x_spec is None:
      return body(x, y, coeffs.packed)
    *lead, _, feat = self.x_spec
    return _shard_map(body, self.x_spec, in_specs=(self.x_spec, P(*lead, feat), P(*lead, None)),
                      out_specs=self.x_spec)(x, y, coeffs.packed)


def site_ops(cfg: ConnectionConfig, x, x_spec: P | None = None) -> SiteOps:
  """Resolve `cfg.implementation` for streams like `x [..., n, C]` (see the module docstring).

  `x_spec`: x's PartitionSpec on the active mesh (from the logical rules); the kernels then run
  under `shard_map`. HC and `mix_dtype="activation"` take the XLA path (`auto`); `pallas` /
  `interpret` for them are rejected by `ConnectionConfig`.
  """
  acc = jnp.float32 if cfg.mix_dtype == "float32" else x.dtype
  if cfg.kind not in KINDS:
    return SiteOps("xla", None, acc, hc_norm_eps=cfg.norm_eps)
  spec = _map_spec(cfg.kind, x.shape[-2], cfg.sinkhorn_iters, cfg.sinkhorn_eps, cfg.norm_eps,
                   cfg.pre_eps)
  impl = "xla" if cfg.mix_dtype != "float32" else resolve(
      cfg.implementation, x, cfg.kind, "connection.implementation",
      sinkhorn_eps=cfg.sinkhorn_eps, sinkhorn_iters=cfg.sinkhorn_iters)
  if impl == "xla" or x.size == 0:
    return SiteOps("xla", spec, acc)
  return SiteOps(impl, spec, acc, _mesh_spec(x, x_spec))


def check_site(cfg: ConnectionConfig, d_model: int, dtype) -> str:
  """The path a site with streams `[..., n, d_model]` of `dtype` takes on the target platform
  ("xla", "tpu", "gpu", "interpret"); raises ConfigError when `cfg.implementation` cannot run there.
  Call under the run's mesh before anything is traced or written."""
  return site_ops(cfg, jax.ShapeDtypeStruct((1, cfg.n_streams, d_model), dtype)).impl
