"""Rotary position embedding (rotate-half form), a pure function.

For the last axis of width D split into halves (x1, x2) and angles a_i = pos · theta^(-2i/D):
    rope(x) = [x1 cos a - x2 sin a,  x2 cos a + x1 sin a]     (computed in float32)
"""
from __future__ import annotations

import jax.numpy as jnp


def rope(x_BTHD, positions_BT, theta: float):
  """Rotary embedding (rotate-half form) on the last axis: pairs (i, i + D/2) rotate by pos * theta^(-2i/D)."""
  d = x_BTHD.shape[-1]
  freq = theta ** (-jnp.arange(0, d // 2, dtype=jnp.float32) * 2.0 / d)
  ang = positions_BT.astype(jnp.float32)[..., None, None] * freq            # [B, T, 1, D/2]
  sin, cos = jnp.sin(ang), jnp.cos(ang)
  x1, x2 = jnp.split(x_BTHD.astype(jnp.float32), 2, axis=-1)
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1).astype(x_BTHD.dtype)
