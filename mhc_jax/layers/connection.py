"""Connection modules: thin parameter holders around `mhc_jax.ops`.

Every sublayer is wrapped as (mHC paper Eq. 3, pre-norm order of HC Alg. 3):
    u = H_pre x            y = branch(RMSNorm(u))            x_next = H_res x + H_post^T y
`kind="residual"` (n = 1) is exactly `x + branch(RMSNorm(x))`.
"""
from __future__ import annotations

from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from mhc_jax import ops
from mhc_jax.config import ConnectionConfig
from mhc_jax.layers import init as cinit
from mhc_jax.layers.norm import RMSNorm

_MHC = ("mhc", "mhc")
# `jax.checkpoint` names for remat="mhc_paper" (Eq. 20): kept per sublayer, everything else in the
# connection (stream states, H_pre x, the normalised branch input) is recomputed in the backward pass.
BRANCH_OUT = "branch_out"      # y = F(RMSNorm(H_pre x)), [B, T, C]
COEFFS = "mhc_coeffs"          # h_pre [B, T, n], h_post [B, T, n], h_res [B, T, n, n]


def _param(module: nn.Module, name: str, fn, shape, axes):
  return module.param(name, nn.with_logical_partitioning(fn, axes), shape, jnp.float32)


class Connection(nn.Module):
  """One connection site. `__call__(x [B, T, n, C], branch, site) -> x_next [B, T, n, C]`.

  `site` is the sublayer index (2*layer for attention, 2*layer + 1 for the MLP); it only
  affects the initial parameters.
  """
  cfg: ConnectionConfig
  norm_eps: float = 1e-6
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, branch: Callable[[jax.Array], jax.Array], site=0):
    cfg = self.cfg
    norm = RMSNorm(self.norm_eps, self.dtype, name="norm")
    if cfg.kind == "residual":
      y = checkpoint_name(branch(norm(x[..., 0, :])), BRANCH_OUT)
      return x + y[..., None, :].astype(x.dtype)
    impl = self._kernel_impl(x)
    u, h_pre, h_post, h_res = self._pre(x, site, impl)
    for name, value in (("h_pre", h_pre), ("h_post", h_post), ("h_res", h_res)):
      self.sow("intermediates", name, value)
    y = checkpoint_name(branch(norm(u)), BRANCH_OUT).astype(x.dtype)
    if impl is not None:
      from mhc_jax import kernels
      return kernels.stream_post(x, y, h_res, h_post, implementation=impl)
    return ops.stream_post(x, y, h_res, h_post, acc_dtype=self._acc_dtype(x))

  def _pre(self, x, site, impl):
    """`(u, h_pre, h_post, h_res)`: one fused kernel when `impl` is set, else the ops path."""
    if impl is not None:      # fused Pallas kernels (mhc_jax.kernels): u and the mappings in one pass
      u, *hs = self._kernel_pre(x, site, impl)
    else:
      u, hs = None, self.mappings(x, site)
    h_pre, h_post, h_res = (checkpoint_name(h, COEFFS) for h in hs)
    if u is None:
      u = ops.stream_pre(x, h_pre, acc_dtype=self._acc_dtype(x))
    return u, h_pre, h_post, h_res

  def _acc_dtype(self, x):
    return jnp.float32 if self.cfg.mix_dtype == "float32" else x.dtype

  def _kernel_impl(self, x):
    """`cfg.implementation` for the kernels, or None for the ops path (xla; HC; auto fallback)."""
    cfg = self.cfg
    if cfg.kind not in ("mhc", "mhc_lite") or cfg.implementation == "xla":
      return None
    from mhc_jax import kernels
    from mhc_jax.config import ConfigError
    if cfg.mix_dtype != "float32":
      if cfg.implementation == "auto":
        return None
      raise ConfigError(f"connection.implementation={cfg.implementation!r} needs "
                        f"connection.mix_dtype='float32' (kernels mix in float32), got "
                        f"{cfg.mix_dtype!r}")
    resolved = kernels.resolve(cfg.implementation, x, cfg.kind, "connection.implementation")
    return None if resolved == "xla" else ("interpret" if resolved == "interpret" else "pallas")

  def _kernel_pre(self, x, site, impl):
    from mhc_jax import kernels
    cfg = self.cfg
    n, c = x.shape[-2:]
    return kernels.mhc_pre(x, self._mhc_params(n, c, site), kind=cfg.kind,
                           sinkhorn_iters=cfg.sinkhorn_iters, sinkhorn_eps=cfg.sinkhorn_eps,
                           norm_eps=cfg.norm_eps, pre_eps=cfg.pre_eps, implementation=impl)

  def mappings(self, x, site):
    """`(h_pre, h_post, h_res)` for this site's parameters, float32."""
    cfg = self.cfg
    n, c = x.shape[-2:]
    if cfg.kind == "hc":
      return ops.hc_mappings(x, self._hc_params(n, c, site), norm_eps=cfg.norm_eps)
    lite = cfg.kind == "mhc_lite"
    params = self._mhc_params(n, c, site)
    if lite:
      return ops.mhc_lite_mappings(x, params, norm_eps=cfg.norm_eps, pre_eps=cfg.pre_eps)
    return ops.mhc_mappings(x, params, sinkhorn_iters=cfg.sinkhorn_iters,
                            sinkhorn_eps=cfg.sinkhorn_eps, norm_eps=cfg.norm_eps,
                            pre_eps=cfg.pre_eps)

  def _mhc_params(self, n, c, site):
    cfg = self.cfg
    lite = cfg.kind == "mhc_lite"
    width = ops.mhc_lite_width(n) if lite else ops.mhc_width(n)
    return {
        "phi": _param(self, "phi", lambda k, s, d: cinit.mhc_phi(cfg.init, k, s), (n * c, width),
                      _MHC),
        "b": _param(self, "b", lambda k, s, d: cinit.mhc_bias(cfg.init, n, site, lite), (width,),
                    ("mhc",)),
        "alpha": _param(self, "alpha", lambda k, s, d: cinit.mhc_alpha(cfg.init, cfg.gate_init),
                        (3,), ("mhc",)),
    }

  def _hc_params(self, n, c, site):
    cfg = self.cfg
    zeros = nn.initializers.zeros
    if cfg.dynamic:
      theta = {"theta_pre": _param(self, "theta_pre", zeros, (c,), ("mhc",)),
               "theta_post": _param(self, "theta_post", zeros, (c,), ("mhc",)),
               "theta_res": _param(self, "theta_res", zeros, (n, c), _MHC)}
    else:   # static HC: theta fixed at 0 (not a parameter)
      theta = {"theta_pre": jnp.zeros((c,)), "theta_post": jnp.zeros((c,)),
               "theta_res": jnp.zeros((n, c))}
    b_pre, b_post, b_res = cinit.hc_biases(n, site)
    return {
        **theta,
        "b_pre": _param(self, "b_pre", lambda k, s, d: b_pre, (n,), ("mhc",)),
        "b_post": _param(self, "b_post", lambda k, s, d: b_post, (n,), ("mhc",)),
        "b_res": _param(self, "b_res", lambda k, s, d: b_res, (n, n), _MHC),
        "alpha": _param(self, "alpha", lambda k, s, d: jnp.full((3,), cfg.gate_init, jnp.float32),
                        (3,), ("mhc",)),
    }


class CollapseHead(nn.Module):
  """Learned stream collapse (DeepSeek-V4 `hc_head`): `w = sigmoid(a * (x~ phi) + b) + eps`,
  `y = sum_j w_j x_j`, with x~ the RMS-normalised flattened streams. Params `phi [nC, n]`,
  `b [n]`, `alpha [1]`; init phi = 0, b = 0, alpha = 1 (uniform weights 0.5)."""
  eps: float = 0.0
  norm_eps: float = 1e-6

  @nn.compact
  def __call__(self, x):
    n, c = x.shape[-2:]
    phi = _param(self, "phi", nn.initializers.zeros, (n * c, n), _MHC)
    b = _param(self, "b", nn.initializers.zeros, (n,), ("mhc",))
    alpha = _param(self, "alpha", nn.initializers.ones, (1,), ("mhc",))
    logits = ops.projected_logits(x, phi, self.norm_eps)
    w = jax.nn.sigmoid(alpha[0] * logits + b) + self.eps
    return ops.stream_pre(x, w)
