"""RMSNorm: `y = x * rsqrt(mean(x^2) + eps) * scale`, computed in float32."""
from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from mhc_jax.ops.norm import rms_norm


class RMSNorm(nn.Module):
  eps: float = 1e-6
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("embed",)),
                       (x.shape[-1],), jnp.float32)
    return rms_norm(x, scale, self.eps, self.dtype)
