"""Per-token-block math shared by every kernel body (TPU Mosaic, GPU Triton, CPU interpret).

Everything here is pure `jnp` on 2-D values `[bt, ...]` that both Pallas backends lower: no value
slicing (Triton has no `slice`), no reshapes, only elementwise ops, lane reductions and `dot`.
The mapping coefficients live in one packed lane vector per token, `W` = a power of two >= 16:

    lanes [0, n)            pre  (logits in, H_pre out)
    lanes [n, 2n)           post (logits in, H_post out)
    lanes [2n, 2n + r_in)   res logits in   (r_in = n*n for mHC, n! for mHC-lite)
    lanes [2n, 2n + n*n)    H_res out, row-major (i, j)

Row / column sums of the n x n block (Sinkhorn) and the permutation mixture (mHC-lite) are matmuls
with constant 0/1 matrices `[W, W]`; group maxima are masked lane reductions. The whole mapping is a
few `[bt, W]` ops per iteration.
"""
from __future__ import annotations

import dataclasses
import functools
import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np

_HIGHEST = jax.lax.Precision.HIGHEST
_NEG = -1e30


@dataclasses.dataclass(frozen=True)
class MapSpec:
  """Static description of one mapping: kind, stream count, numerics. Hashable (a jit static)."""
  kind: str            # "mhc" | "mhc_lite"
  n: int
  sinkhorn_iters: int = 20
  sinkhorn_eps: float = 0.0
  norm_eps: float = 1e-6
  pre_eps: float = 0.0

  @property
  def r_in(self) -> int:
    return self.n * self.n if self.kind == "mhc" else math.factorial(self.n)

  @property
  def width(self) -> int:
    """Packed parameter width (`phi` columns): 2n + r_in."""
    return 2 * self.n + self.r_in

  @property
  def lanes(self) -> int:
    """W: the padded lane width, a power of two >= 16 holding both the input and output layouts."""
    need = max(self.width, 2 * self.n + self.n * self.n, 16)
    return 1 << (need - 1).bit_length()


def chunks(c: int, max_chunk: int | None) -> tuple[tuple[int, int], ...]:
  """Static `(offset, size)` pieces of a feature axis of length c.

  `max_chunk=None`: one piece (TPU / interpret). Otherwise a binary decomposition into power-of-two
  pieces <= max_chunk (Triton needs power-of-two arrays), largest first.
  """
  if max_chunk is None:
    return ((0, c),)
  out, off = [], 0
  size = max_chunk
  while off < c:
    while size > c - off:
      size //= 2
    out.append((off, size))
    off += size
  return tuple(out)


@functools.lru_cache(maxsize=None)
def constants(spec: MapSpec) -> tuple[np.ndarray, np.ndarray]:
  """`(vecs [32, W], mats [2, W, W])` float32 masks and 0/1 matrices for `spec` (no parameters).

  vecs rows: 0 pre lanes, 1 post lanes, 2 res-in lanes, 3 res-out lanes, 4 / 5 / 6 the lanes that
  take alpha0 / alpha1 / alpha2, 8 + j the lanes of column j of the n x n block, 16 + i of row i.
  mats: mHC: [row-group sum, column-group sum]; mHC-lite: [permutation mixture, zeros].
  Lane `2n + k` of the lite mixture input is the weight of `P_k`; it feeds lanes `2n + i*n + perm_k[i]`.
  """
  n, w = spec.n, spec.lanes
  vecs = np.zeros((32, w), np.float32)
  vecs[0, :n] = 1
  vecs[1, n:2 * n] = 1
  vecs[2, 2 * n:2 * n + spec.r_in] = 1
  vecs[3, 2 * n:2 * n + n * n] = 1
  vecs[4, :n] = 1
  vecs[5, n:2 * n] = 1
  vecs[6, 2 * n:2 * n + spec.r_in] = 1
  for a in range(n * n):
    vecs[8 + a % n, 2 * n + a] = 1          # column group j = a % n
    vecs[16 + a // n, 2 * n + a] = 1        # row group i = a // n
  mats = np.zeros((2, w, w), np.float32)
  if spec.kind == "mhc":
    for a in range(n * n):
      for b in range(n * n):
        mats[0, 2 * n + a, 2 * n + b] = float(a // n == b // n)   # same row i
        mats[1, 2 * n + a, 2 * n + b] = float(a % n == b % n)     # same column j
  else:
    for k, perm in enumerate(itertools.permutations(range(n))):
      for i in range(n):
        mats[0, 2 * n + k, 2 * n + i * n + perm[i]] = 1.0        # P_k = eye(n)[perm_k]
  return vecs, mats


def param_rows(spec: MapSpec, b: jax.Array, alpha: jax.Array) -> jax.Array:
  """`[8, W]` float32: row 0 = alpha per lane, row 1 = b per lane (zero padding), rest zero."""
  vecs, _ = constants(spec)
  alpha = alpha.astype(jnp.float32)
  a_row = alpha[0] * vecs[4] + alpha[1] * vecs[5] + alpha[2] * vecs[6]
  b_row = jnp.zeros((spec.lanes,), jnp.float32).at[:spec.width].set(b.astype(jnp.float32))
  return jnp.zeros((8, spec.lanes), jnp.float32).at[0].set(a_row).at[1].set(b_row)


def pad_phi(spec: MapSpec, phi: jax.Array) -> jax.Array:
  """`phi [nC, width] -> [nC, W]` float32 with zero columns."""
  return jnp.pad(phi.astype(jnp.float32), ((0, 0), (0, spec.lanes - spec.width)))


def _dot(a, b):
  return jnp.dot(a, b, precision=_HIGHEST, preferred_element_type=jnp.float32)


def _dot_nt(a, b):
  """`a @ b.T` without materialising the transpose."""
  return jax.lax.dot_general(a, b, (((1,), (1,)), ((), ())), precision=_HIGHEST,
                             preferred_element_type=jnp.float32)


def sigmoid(z):
  """Stable in value and gradient on every backend (tanh form)."""
  return 0.5 * jnp.tanh(0.5 * z) + 0.5


def row(ref_value, k):
  """Row k of a `[8, W]` value as `[1, W]` (masked reduction: no slicing)."""
  ids = jax.lax.broadcasted_iota(jnp.int32, ref_value.shape, 0)
  return jnp.sum(jnp.where(ids == k, ref_value, 0.0), axis=0, keepdims=True)


def col(v, k):
  """Column k of `v [bt, W]` as `[bt, 1]` (masked lane reduction: no slicing)."""
  ids = jax.lax.broadcasted_iota(jnp.int32, v.shape, 1)
  return jnp.sum(jnp.where(ids == k, v, 0.0), axis=1, keepdims=True)


def project(xs, phis, bf16_passes: int):
  """`(proj [bt, W], sumsq [bt, 1])` from stream chunks `xs` and matching `phi` row chunks `phis`.

  `proj = sum_chunks x_chunk @ phi_chunk` accumulated in float32. For bf16 x, phi is split into
  `bf16_passes` bf16 parts (hi + lo + ...), each an exact bf16 x bf16 product on the matrix unit;
  3 parts reproduce float32 phi to ~2^-24. For float32 x: one float32 HIGHEST dot.
  """
  proj, ss = None, None
  for x, phi in zip(xs, phis):
    xf = x.astype(jnp.float32)
    if x.dtype == jnp.bfloat16:
      rest, p = phi, None
      for _ in range(bf16_passes):
        part = rest.astype(jnp.bfloat16)
        rest = rest - part.astype(jnp.float32)
        t = jnp.dot(x, part, preferred_element_type=jnp.float32)
        p = t if p is None else p + t
    else:
      p = _dot(xf, phi)
    s = jnp.sum(xf * xf, axis=1, keepdims=True)
    proj = p if proj is None else proj + p
    ss = s if ss is None else ss + s
  return proj, ss


def _group_max(f, masks):
  """Per-lane max of f over the lane's group (groups given by `[1, W]` masks; 0 elsewhere)."""
  out = jnp.zeros_like(f)
  for m in masks:
    out = jnp.where(m, jnp.max(jnp.where(m, f, _NEG), axis=1, keepdims=True), out)
  return jax.lax.stop_gradient(out)    # a shift: the value does not depend on it


def mapping(spec: MapSpec, z, vecs, mat0, mat1):
  """Packed `H [bt, W]` from packed pre-activations `z = alpha * h + b` (DESIGN.md mappings).

  mHC with eps = 0: Sinkhorn in the log domain, as `ops.sinkhorn`: `iters` x (f -= logsumexp over
  columns, then rows), `H_res = exp(f)`; each logsumexp is shifted by its own group max, so any
  finite logits give finite values and gradients. With eps > 0 (DeepSeek-V4): column softmax
  (per-column max) + eps, then `+eps` denominators, as `ops.sinkhorn`.
  mHC-lite: `H_res = sum_k softmax(z_res)_k P_k`.
  """
  pre, post, res_in = row(vecs, 0) > 0, row(vecs, 1) > 0, row(vecs, 2) > 0
  s = sigmoid(z)
  h = jnp.where(pre, s + spec.pre_eps, 0.0) + jnp.where(post, 2.0 * s, 0.0)
  if spec.kind == "mhc_lite":
    zr = jnp.where(res_in, z, _NEG)
    mx = jax.lax.stop_gradient(jnp.max(zr, axis=1, keepdims=True))
    e = jnp.where(res_in, jnp.exp(zr - mx), 0.0)
    w = e / jnp.sum(e, axis=1, keepdims=True)             # the max lane gives a sum >= 1
    return h + _dot(w, mat0)
  n = spec.n
  g_row, g_col = mat0, mat1
  cols = [row(vecs, 8 + j) > 0 for j in range(n)]
  eps = spec.sinkhorn_eps
  if eps == 0:
    f = jnp.where(res_in, z, 0.0)
    fs = _log_sinkhorn_iterates(n, spec.sinkhorn_iters, f, vecs, g_col, g_row)
    return h + jnp.where(res_in, jnp.exp(fs[-1] if fs else f), 0.0)

  def norm(m, g):       # m / (group sum + eps) on the n x n lanes; other lanes stay 0
    return m / jnp.where(res_in, _dot(m, g) + eps, 1.0)

  e = jnp.where(res_in, jnp.exp(z - _group_max(z, cols)), 0.0)
  m = jnp.where(res_in, e / jnp.where(res_in, _dot(e, g_col), 1.0) + eps, 0.0)   # softmax + eps
  m = norm(m, g_row)                                                  # T_r
  for _ in range(spec.sinkhorn_iters - 1):
    m = norm(norm(m, g_col), g_row)                                   # T_c, then T_r (rows exact)
  return h + m


def _log_sinkhorn_iterates(n, iters, f, vecs, g_col, g_row):
  """The log-domain iterates `[f_1, ..., f_2iters]` (T_c, T_r alternating) of `f_0 = f`."""
  res_in = row(vecs, 2) > 0
  cols = [row(vecs, 8 + j) > 0 for j in range(n)]
  rows = [row(vecs, 16 + i) > 0 for i in range(n)]

  def lse(f, g, groups):
    mx = _group_max(f, groups)
    total = _dot(jnp.where(res_in, jnp.exp(f - mx), 0.0), g)
    return jnp.where(res_in, jnp.log(jnp.where(res_in, total, 1.0)) + mx, 0.0)

  out = []
  for _ in range(iters):
    f = f - lse(f, g_col, cols)                                      # T_c
    out.append(f)
    f = f - lse(f, g_row, rows)                                      # T_r (rows exact)
    out.append(f)
  return out


def mapping_vjp(spec: MapSpec, z, vecs, mat0, mat1):
  """`(H, vjp)` of `mapping` at z, `vjp(dH) -> dz`; equal to `jax.vjp(mapping, z)`.

  mHC with eps = 0: the Sinkhorn adjoint is written out, keeping one tile per half step (autodiff
  keeps the shifted exponentials and group sums of every logsumexp, about twice as many; in the
  GPU backward kernel they live in registers). A half step is `f' = f - lse_g(f)` with
  `d lse_g(f)_a / d f_b = [b in g(a)] exp(f'_b)`, so `df = df' - exp(f') * G(df')`, `G` the
  group-sum matrix of that step. (No `jax.custom_vjp`: Triton cannot lower it.)
  """
  if spec.kind != "mhc" or spec.sinkhorn_eps != 0 or spec.sinkhorn_iters == 0:
    return jax.vjp(lambda z_: mapping(spec, z_, vecs, mat0, mat1), z)
  res_in = row(vecs, 2) > 0

  def gates(z_):
    pre, post = row(vecs, 0) > 0, row(vecs, 1) > 0
    s = sigmoid(z_)
    return jnp.where(pre, s + spec.pre_eps, 0.0) + jnp.where(post, 2.0 * s, 0.0)

  h, gates_vjp = jax.vjp(gates, z)
  fs = _log_sinkhorn_iterates(spec.n, spec.sinkhorn_iters, jnp.where(res_in, z, 0.0), vecs,
                              mat1, mat0)
  fs = [jax.lax.stop_gradient(f) for f in fs]
  h = h + jnp.where(res_in, jnp.exp(fs[-1]), 0.0)

  def vjp(dh):
    (dz,) = gates_vjp(dh)
    d = None
    for k in range(len(fs) - 1, -1, -1):
      p = jnp.where(res_in, jnp.exp(fs[k]), 0.0)
      d = dh * p if d is None else d                                  # through H = exp(f_last)
      d = d - p * _dot(d, mat0 if k % 2 else mat1)                    # f_k = f_k-1 - lse_g(f_k-1)
    return (dz + jnp.where(res_in, d, 0.0),)

  return h, vjp
