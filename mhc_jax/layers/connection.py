"""Connection modules: thin parameter holders around `mhc_jax.ops` / `mhc_jax.kernels`.

Every sublayer is wrapped as (mHC paper Eq. 3, pre-norm order of HC Alg. 3):
    u = H_pre x            y = branch(RMSNorm(u))            x_next = H_res x + H_post^T y
`kind="residual"` (n = 1) is exactly `x + branch(RMSNorm(x))`.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from mhc_jax import kernels, ops
from mhc_jax.config import ConnectionConfig
from mhc_jax.layers import init as cinit
from mhc_jax.layers.norm import RMSNorm

STREAM_AXES = ("batch", "length", "streams", "embed")
# Logical names of the connection parameters' axes (all replicated by every strategy; distinct
# names so no array repeats one): the packed projection [n*C, W], streams, gates.
FEATURES, COEFFS_AXIS, STREAMS, STREAMS_IN, GATES = (
    "mhc_in", "mhc_out", "mhc_streams", "mhc_streams_in", "mhc_gates")
# `jax.checkpoint` names for remat="mhc_paper" (Eq. 20): kept per sublayer, everything else in the
# connection (stream states, H_pre x, the normalised branch input) is recomputed in the backward pass.
BRANCH_OUT = "branch_out"      # y = F(RMSNorm(H_pre x)), [B, T, C]
COEFFS = "mhc_coeffs"          # the site's mapping coefficients (`kernels.Coeffs`)


def _param(module: nn.Module, name: str, fn, shape, axes):
  return module.param(name, nn.with_logical_partitioning(fn, axes), shape, jnp.float32)


def stream_spec():
  """PartitionSpec of streams `[B, T, n, C]` under the active logical rules (None without rules)."""
  rules = nn.get_logical_axis_rules()
  return nn.logical_to_mesh_axes(STREAM_AXES, rules) if rules else None


class Connection(nn.Module):
  """One connection site. `__call__(x [B, T, n, C], branch, site) -> x_next [B, T, n, C]`.

  `site` is the sublayer index (2*layer for attention, 2*layer + 1 for the MLP); it only
  affects the initial parameters. The stream ops come from `kernels.site_ops` (XLA or the Pallas
  kernels, under `shard_map` when a mesh and logical rules are active).
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
    # Initialisation only creates parameters: it takes the XLA path, whatever the platform (an
    # abstract init on a CPU host for a GPU/TPU target must not resolve kernels for the host).
    site_cfg = dataclasses.replace(cfg, implementation="xla") if self.is_initializing() else cfg
    site_ops = kernels.site_ops(site_cfg, x, stream_spec())
    u, coeffs = site_ops.pre(x, self.params_for(x, site))
    coeffs = jax.tree.map(lambda h: checkpoint_name(h, COEFFS), coeffs)
    for name, value in zip(("h_pre", "h_post", "h_res"), coeffs.split()):
      self.sow("intermediates", name, value)
    y = checkpoint_name(branch(norm(u)), BRANCH_OUT).astype(x.dtype)
    return site_ops.post(x, y, coeffs)

  def params_for(self, x, site):
    """This site's mapping parameters (DESIGN.md layouts) for streams like `x [..., n, C]`."""
    n, c = x.shape[-2:]
    return self._hc_params(n, c, site) if self.cfg.kind == "hc" else self._mhc_params(n, c, site)

  def _mhc_params(self, n, c, site):
    cfg = self.cfg
    lite = cfg.kind == "mhc_lite"
    width = ops.mhc_lite_width(n) if lite else ops.mhc_width(n)
    return {
        "phi": _param(self, "phi", lambda k, s, d: cinit.mhc_phi(cfg.init, k, s), (n * c, width),
                      (FEATURES, COEFFS_AXIS)),
        "b": _param(self, "b", lambda k, s, d: cinit.mhc_bias(cfg.init, n, site, lite), (width,),
                    (COEFFS_AXIS,)),
        "alpha": _param(self, "alpha", lambda k, s, d: cinit.mhc_alpha(cfg.init, cfg.gate_init),
                        (3,), (GATES,)),
    }

  def _hc_params(self, n, c, site):
    cfg = self.cfg
    zeros = nn.initializers.zeros
    if cfg.dynamic:
      theta = {"theta_pre": _param(self, "theta_pre", zeros, (c,), (FEATURES,)),
               "theta_post": _param(self, "theta_post", zeros, (c,), (FEATURES,)),
               "theta_res": _param(self, "theta_res", zeros, (n, c), (STREAMS, FEATURES))}
    else:   # static HC: theta fixed at 0 (not a parameter)
      theta = {"theta_pre": jnp.zeros((c,)), "theta_post": jnp.zeros((c,)),
               "theta_res": jnp.zeros((n, c))}
    b_pre, b_post, b_res = cinit.hc_biases(n, site)
    return {
        **theta,
        "b_pre": _param(self, "b_pre", lambda k, s, d: b_pre, (n,), (STREAMS,)),
        "b_post": _param(self, "b_post", lambda k, s, d: b_post, (n,), (STREAMS,)),
        "b_res": _param(self, "b_res", lambda k, s, d: b_res, (n, n), (STREAMS, STREAMS_IN)),
        "alpha": _param(self, "alpha", lambda k, s, d: jnp.full((3,), cfg.gate_init, jnp.float32),
                        (3,), (GATES,)),
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
    phi = _param(self, "phi", nn.initializers.zeros, (n * c, n), (FEATURES, STREAMS))
    b = _param(self, "b", nn.initializers.zeros, (n,), (STREAMS,))
    alpha = _param(self, "alpha", nn.initializers.ones, (1,), (GATES,))
    logits = ops.projected_logits(x, phi, self.norm_eps)
    w = jax.nn.sigmoid(alpha[0] * logits + b) + self.eps
    return ops.stream_pre(x, w)
