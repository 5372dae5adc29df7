"""RMSNorm as a pure function: `y = x * rsqrt(mean(x^2) + eps) * scale`, computed in float32."""
from __future__ import annotations

import jax
import jax.numpy as jnp


def rms_norm(x, scale, eps, dtype):
  """`x * rsqrt(mean(x^2) + eps) * scale` over the last axis, in float32, cast to `dtype`."""
  xf = x.astype(jnp.float32)
  y = xf * jax.lax.rsqrt(jnp.mean(jnp.square(xf), axis=-1, keepdims=True) + eps)
  return (y * scale).astype(dtype)
