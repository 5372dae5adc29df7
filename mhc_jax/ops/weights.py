"""Kernels that may be stored quantised: a float array, or a qwix `QArray` (weight-only PTQ,
`mhc_jax.quant`) with integer values q and float scales s broadcast per channel or per group,

    W ≈ q · s        (symmetric: no zero point; `qwix.dequantize`)

The ops that hold raw kernels (the MoE experts, the MLA projections) read them through these two
functions, so a quantised parameter tree runs the same math as the float one on W = q · s.
"""
from __future__ import annotations

import jax.numpy as jnp
import qwix


def is_quantized(w) -> bool:
  return isinstance(w, qwix.QArray)


def materialize(w, dtype):
  """`w` as a `dtype` array: `w.astype(dtype)`, or `dequantize(w) = q · s` cast to `dtype`."""
  if is_quantized(w):
    return qwix.dequantize(w).astype(dtype)
  return jnp.asarray(w, dtype)


def take(w, index):
  """`w[index]` along the leading axis (e.g. experts), for a float array or a QArray (its values
  and its scales are gathered alike: a QArray's scales keep the leading axis unless it is tiled)."""
  if is_quantized(w):
    if w.scale.shape[0] != w.qvalue.shape[0]:
      raise ValueError(f"take: the scales {w.scale.shape} do not follow the leading axis of the "
                       f"values {w.qvalue.shape}")
    zp = None if w.zero_point is None else w.zero_point[index]
    return w.replace(qvalue=w.qvalue[index], scale=w.scale[index], zero_point=zp)
  return w[index]


def leading(w) -> int:
  """The length of the leading axis of `w` (array or QArray)."""
  return (w.qvalue if is_quantized(w) else w).shape[0]
