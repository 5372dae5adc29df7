"""Pure functions: the math of HC / mHC / mHC-lite. No Flax."""
from mhc_jax.ops.gains import amax_gain, composite, composite_suffixes, gain
from mhc_jax.ops.mappings import (hc_mappings, mhc_lite_mappings, mhc_lite_width, mhc_mappings,
                                  mhc_width, permutation_matrices, projected_logits)
from mhc_jax.ops.sinkhorn import sinkhorn
from mhc_jax.ops.streams import collapse_streams, expand_streams, stream_post, stream_pre
