"""NNX RMSNorm, `y = x * rsqrt(mean(x^2) + eps) * scale` in float32, and the `param` helper."""
from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from mhc_jax.ops.norm import rms_norm


def param(value, axes) -> nnx.Param:
  """A float32 `nnx.Param` carrying logical axis names (`out_sharding`, resolved by the active
  logical rules in `nnx.get_partition_spec`); placement is left to `jax.jit(out_shardings=...)`."""
  return nnx.Param(jnp.asarray(value, jnp.float32), out_sharding=tuple(axes), eager_sharding=False)


class RMSNorm(nnx.Module):
  def __init__(self, dim: int, eps: float = 1e-6, dtype=jnp.float32):
    self.eps, self.dtype = eps, dtype
    self.scale = param(jnp.ones((dim,), jnp.float32), ("embed",))

  def __call__(self, x):
    return rms_norm(x, self.scale[...], self.eps, self.dtype)
