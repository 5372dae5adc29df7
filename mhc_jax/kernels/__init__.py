"""Pallas kernels for the mHC stream-mixing ops (TPU Mosaic, GPU Triton, CPU interpret).

Public: `mhc_pre` (fused mappings + `u`), `stream_post`, both with `implementation=
"auto" | "xla" | "pallas" | "interpret"` and a `jax.custom_vjp` backward kernel, and `site_ops`,
the dispatch of one connection site (kernels under `shard_map` on a mesh). See `api.py`.
"""
from mhc_jax.kernels.api import (Coeffs, SiteOps, check_site, mhc_pre, pack_post, platform_backend,
                                 resolve, site_ops, stream_post, unsupported)
