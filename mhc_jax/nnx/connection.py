"""NNX connection modules: thin parameter holders around `mhc_jax.kernels.site_ops` / `mhc_jax.ops`.

Same math, parameter names, shapes and logical axis names as `mhc_jax.layers.connection`:
    u = H_pre x            y = branch(RMSNorm(u))            x_next = H_res x + H_post^T y
`kind="residual"` (n = 1) is exactly `x + branch(RMSNorm(x))`.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from mhc_jax import kernels, ops
from mhc_jax.config import ConfigError, ConnectionConfig, check_int
from mhc_jax.layers import init as cinit
from mhc_jax.layers.connection import (BRANCH_OUT, COEFFS, COEFFS_AXIS, FEATURES, GATES, STREAMS,
                                       STREAMS_IN, stream_spec)
from mhc_jax.nnx.norm import RMSNorm, param

MAPPINGS = ("h_pre", "h_post", "h_res")


class Connection(nnx.Module):
  """One connection site: `__call__(x [B, T, n, C], branch) -> x_next [B, T, n, C]`.

  `site` is the sublayer index (2*layer for attention, 2*layer + 1 for the MLP; may be traced under
  `nnx.vmap`); it only affects the initial parameters. `norm_eps` is the branch RMSNorm's epsilon
  (the mapping norm uses `cfg.norm_eps`). Each call sows `h_pre, h_post, h_res` as `nnx.Intermediate`
  under `nnx.capture(model, nnx.Intermediate)` (outside it nothing is stored).
  """

  def __init__(self, cfg: ConnectionConfig, d_model: int, *, site=0, norm_eps: float = 1e-6,
               dtype=jnp.float32, rngs: nnx.Rngs):
    if not isinstance(cfg, ConnectionConfig):
      raise ConfigError(f"cfg={cfg!r} is not allowed: a mhc_jax.config.ConnectionConfig")
    check_int("d_model", d_model, 1)
    self.cfg, self.d_model = cfg, d_model
    self.norm = RMSNorm(d_model, norm_eps, dtype)
    n, c = cfg.n, d_model
    if cfg.kind in ("mhc", "mhc_lite"):
      lite = cfg.kind == "mhc_lite"
      width = ops.mhc_lite_width(n) if lite else ops.mhc_width(n)
      self.phi = param(cinit.mhc_phi(cfg.init, rngs.params(), (n * c, width)), (FEATURES, COEFFS_AXIS))
      self.b = param(cinit.mhc_bias(cfg.init, n, site, lite), (COEFFS_AXIS,))
      self.alpha = param(cinit.mhc_alpha(cfg.init, cfg.gate_init), (GATES,))
    elif cfg.kind == "hc":
      if cfg.dynamic:
        self.theta_pre = param(jnp.zeros((c,), jnp.float32), (FEATURES,))
        self.theta_post = param(jnp.zeros((c,), jnp.float32), (FEATURES,))
        self.theta_res = param(jnp.zeros((n, c), jnp.float32), (STREAMS, FEATURES))
      b_pre, b_post, b_res = cinit.hc_biases(n, site)
      self.b_pre = param(b_pre, (STREAMS,))
      self.b_post = param(b_post, (STREAMS,))
      self.b_res = param(b_res, (STREAMS, STREAMS_IN))
      self.alpha = param(jnp.full((3,), cfg.gate_init, jnp.float32), (GATES,))

  def mapping_params(self) -> dict[str, jax.Array]:
    """This site's mapping parameters in the DESIGN.md layout (`ops.*_mappings` / `site_ops`)."""
    cfg, n, c = self.cfg, self.cfg.n, self.d_model
    if cfg.kind in ("mhc", "mhc_lite"):
      return {"phi": self.phi[...], "b": self.b[...], "alpha": self.alpha[...]}
    if cfg.dynamic:
      theta = {"theta_pre": self.theta_pre[...], "theta_post": self.theta_post[...],
               "theta_res": self.theta_res[...]}
    else:   # static HC: theta fixed at 0 (not a parameter)
      theta = {"theta_pre": jnp.zeros((c,)), "theta_post": jnp.zeros((c,)),
               "theta_res": jnp.zeros((n, c))}
    return {**theta, "b_pre": self.b_pre[...], "b_post": self.b_post[...],
            "b_res": self.b_res[...], "alpha": self.alpha[...]}

  def __call__(self, x, branch: Callable[[jax.Array], jax.Array]):
    cfg = self.cfg
    if x.ndim < 2 or x.shape[-2:] != (cfg.n, self.d_model):
      raise ValueError(f"x: shape {x.shape} does not end in (n_streams, d_model)="
                       f"({cfg.n}, {self.d_model})")
    if cfg.kind == "residual":
      y = checkpoint_name(branch(self.norm(x[..., 0, :])), BRANCH_OUT)
      return x + y[..., None, :].astype(x.dtype)
    site_ops = kernels.site_ops(cfg, x, stream_spec())
    u, coeffs = site_ops.pre(x, self.mapping_params())
    coeffs = jax.tree.map(lambda h: checkpoint_name(h, COEFFS), coeffs)
    for name, value in zip(MAPPINGS, coeffs.split()):
      self.sow(nnx.Intermediate, name, value, capture_noop=True)
    y = checkpoint_name(branch(self.norm(u)), BRANCH_OUT).astype(x.dtype)
    return site_ops.post(x, y, coeffs)


class CollapseHead(nnx.Module):
  """Learned stream collapse (DeepSeek-V4 `hc_head`): `w = sigmoid(a * (x~ phi) + b) + eps`,
  `y = sum_j w_j x_j`, x~ the RMS-normalised flattened streams. Params `phi [nC, n]`, `b [n]`,
  `alpha [1]`; init phi = 0, b = 0, alpha = 1."""

  def __init__(self, n_streams: int, d_model: int, *, eps: float = 0.0, norm_eps: float = 1e-6):
    n, c = n_streams, d_model
    self.eps, self.norm_eps = eps, norm_eps
    self.phi = param(jnp.zeros((n * c, n), jnp.float32), (FEATURES, STREAMS))
    self.b = param(jnp.zeros((n,), jnp.float32), (STREAMS,))
    self.alpha = param(jnp.ones((1,), jnp.float32), (GATES,))

  def __call__(self, x):
    logits = ops.projected_logits(x, self.phi[...], self.norm_eps)
    w = jax.nn.sigmoid(self.alpha[0] * logits + self.b[...]) + self.eps
    return ops.stream_pre(x, w)
