"""KV-cache entries stored as int8: each cached key or value vector x (the last axis, one head at
one position) is kept as integers q and one float32 scale s (symmetric absmax, qwix's quantiser):

    s = max_d |x_d| / (127 + 0.5),   q = clip(round(x / s), -128, 127),   x̂ = q · s

A cache of `[B, S, H, D]` then takes `B·S·H·(D + 4)` bytes instead of `B·S·H·D·4` (float32).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import qwix


def quantize_kv(x):
  """`(q int8 [..., D], scale float32 [..., 1])` of `x [..., D]`, one scale per vector."""
  qa = qwix.quantize(x.astype(jnp.float32), jnp.int8, channelwise_axes=tuple(range(x.ndim - 1)))
  return qa.qvalue, qa.scale.astype(jnp.float32)


def dequantize_kv(q, scale, dtype):
  """`q · scale` as `dtype`."""
  return qwix.dequantize(qwix.QArray(q, scale)).astype(dtype)


def write_int8(q_cache, scale_cache, x, start):
  """The int8 cache and its scales with `x [B, T, H, D]` written at position `start` (axis 1)."""
  q, s = quantize_kv(x)
  return (jax.lax.dynamic_update_slice(q_cache, q, (0, start, 0, 0)),
          jax.lax.dynamic_update_slice(scale_cache, s, (0, start, 0, 0)))
