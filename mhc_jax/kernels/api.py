"""Public kernel-backed ops with `implementation="auto" | "xla" | "pallas" | "interpret"`.

    mhc_pre(x, params, kind=...)     -> (u, h_pre, h_post, h_res)   = ops mappings + ops.stream_pre
    stream_post(x, y, h_res, h_post) -> x_next                      = ops.stream_post

`xla` is the `mhc_jax.ops` path. `pallas` compiles the kernel for the current platform (TPU: Mosaic,
GPU: Triton lowering) and raises `ConfigError` for an unsupported platform, shape or dtype.
`interpret` runs the same kernel body in the Pallas interpreter (any platform; tests).
`auto` is `pallas` on TPU/GPU when the inputs are supported (on TPU also C % 128 == 0, the
lane-aligned case), else `xla` (always `xla` on CPU).
"""
from __future__ import annotations

from typing import Mapping

import jax
import jax.numpy as jnp

from mhc_jax import ops
from mhc_jax.config import IMPLEMENTATIONS, ConfigError, check_choice
from mhc_jax.kernels import block, launch
from mhc_jax.kernels.post import fused_post, lanes
from mhc_jax.kernels.pre import fused_pre

KINDS = ("mhc", "mhc_lite")
_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))


def platform_backend() -> str | None:
  """Kernel backend of the default platform: "tpu", "gpu" or None (no compiled kernels)."""
  p = jax.default_backend()
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


def resolve(implementation: str, x, kind: str = "mhc", field: str = "implementation") -> str:
  """`implementation` -> "xla" | "tpu" | "gpu" | "interpret"; raises ConfigError when impossible."""
  check_choice(field, implementation, IMPLEMENTATIONS)
  if implementation in ("xla", "interpret"):
    return implementation
  backend = platform_backend()
  why = unsupported(backend, x, kind)
  if implementation == "auto":
    # TPU compiles any C, but stream slices are lane-aligned (fast) only for C % 128 == 0.
    slow = backend == "tpu" and x.shape[-2] > 1 and x.shape[-1] % 128
    return "xla" if (why or slow) else backend
  if why:
    raise ConfigError(f"{field}='pallas' is not available here: {why}; "
                      "use implementation='auto' to fall back to XLA")
  return backend


def _check_kind(kind):
  check_choice("kind", kind, KINDS)


def mhc_pre(x: jax.Array, params: Mapping[str, jax.Array], *, kind: str = "mhc",
            sinkhorn_iters: int = 20, sinkhorn_eps: float = 0.0, norm_eps: float = 1e-6,
            pre_eps: float = 0.0, implementation: str = "auto", block_tokens: int | None = None,
            max_chunk: int | None = None, bf16_passes: int = 3):
  """Fused mHC / mHC-lite pre: `(u [..., C], h_pre [..., n], h_post [..., n], h_res [..., n, n])`.

  Equals `ops.mhc_mappings` (or `ops.mhc_lite_mappings`) followed by `ops.stream_pre` with float32
  accumulation. `block_tokens`, `max_chunk`, `bf16_passes` tune the kernel (tests, benchmarks).
  """
  _check_kind(kind)
  impl = resolve(implementation, x, kind)
  if impl == "xla" or x.size == 0:
    if kind == "mhc":
      h_pre, h_post, h_res = ops.mhc_mappings(x, params, sinkhorn_iters=sinkhorn_iters,
                                              sinkhorn_eps=sinkhorn_eps, norm_eps=norm_eps,
                                              pre_eps=pre_eps)
    else:
      h_pre, h_post, h_res = ops.mhc_lite_mappings(x, params, norm_eps=norm_eps, pre_eps=pre_eps)
    return ops.stream_pre(x, h_pre), h_pre, h_post, h_res
  *lead, n, c = x.shape
  spec = block.MapSpec(kind, n, int(sinkhorn_iters), float(sinkhorn_eps), float(norm_eps),
                       float(pre_eps))
  want = {"phi": (n * c, spec.width), "b": (spec.width,), "alpha": (3,)}
  for key, shape in want.items():
    if key not in params or tuple(params[key].shape) != shape:
      got = tuple(params[key].shape) if key in params else "missing"
      raise ValueError(f"mhc_pre: params[{key!r}] is {got}, expected {shape} for kind={kind!r}, "
                       f"n={n}, C={c}")
  t = 1
  for d in lead:
    t *= d
  cfg = launch.make_cfg(impl, n, c, x.dtype, t, spec=spec, bt=block_tokens, max_chunk=max_chunk,
                        bf16_passes=bf16_passes)
  u, h = fused_pre(cfg, x.reshape(t, n * c), params["phi"], params["b"], params["alpha"])
  return (u.reshape(*lead, c),) + _split_h(h, lead, n)


def _split_h(h, lead, n):
  """Packed `H [T, W]` -> `(h_pre [..., n], h_post [..., n], h_res [..., n, n])`."""
  return (h[:, :n].reshape(*lead, n), h[:, n:2 * n].reshape(*lead, n),
          h[:, 2 * n:2 * n + n * n].reshape(*lead, n, n))


def pack_post(h_res: jax.Array, h_post: jax.Array) -> jax.Array:
  """`[T, W]` float32 lanes `[0 (n) | H_post (n) | H_res (n*n) | 0 ...]` for the post kernel."""
  n = h_post.shape[-1]
  t = h_post.size // n
  w = lanes(n)
  parts = [jnp.zeros((t, n), jnp.float32), h_post.reshape(t, n).astype(jnp.float32),
           h_res.reshape(t, n * n).astype(jnp.float32)]
  packed = jnp.concatenate(parts, axis=1)
  return jnp.pad(packed, ((0, 0), (0, w - packed.shape[1])))


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
  t = 1
  for d in lead:
    t *= d
  cfg = launch.make_cfg(impl, n, c, x.dtype, t, bt=block_tokens, max_chunk=max_chunk)
  out = fused_post(cfg, x.reshape(t, n * c), y.reshape(t, c), pack_post(h_res, h_post))
  return out.reshape(x.shape)
