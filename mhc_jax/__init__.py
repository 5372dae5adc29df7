"""mhc_jax: Hyper-Connections (HC) and Manifold-Constrained Hyper-Connections (mHC) in JAX/Flax."""
from mhc_jax.ops import (amax_gain, collapse_streams, expand_streams, hc_mappings,
                         mhc_lite_mappings, mhc_mappings, sinkhorn, stream_post, stream_pre)

__version__ = "0.1.0"
__all__ = ["sinkhorn", "mhc_mappings", "mhc_lite_mappings", "hc_mappings", "stream_pre",
           "stream_post", "expand_streams", "collapse_streams", "amax_gain"]
