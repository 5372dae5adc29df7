"""Pallas kernels for the mHC stream-mixing ops (TPU Mosaic, GPU Triton, CPU interpret).

Public: `mhc_pre` (fused mappings + `u`), `stream_post`, both with `implementation=
"auto" | "xla" | "pallas" | "interpret"` and a `jax.custom_vjp` backward kernel. See `api.py`.
"""
from mhc_jax.kernels.api import mhc_pre, pack_post, platform_backend, resolve, stream_post, unsupported
