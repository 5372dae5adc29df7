"""Causal multi-head attention with RoPE (`jax.nn.dot_product_attention`) and an optional KV cache."""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from mhc_jax.ops.kv_cache import dequantize_kv, write_int8
from mhc_jax.ops.rope import rope  # noqa: F401  (re-exported: `from mhc_jax.layers.attention import rope`)


class Attention(nn.Module):
  n_heads: int
  head_dim: int
  max_len: int
  rope_theta: float = 10000.0
  init_std: float = 0.02
  out_std: float = 0.02
  dtype: jnp.dtype = jnp.float32
  decode: bool = False
  kv_cache: str = "float"     # "int8": cached keys/values as int8 + one scale per vector

  @nn.compact
  def __call__(self, x_BTC):
    b, t, c = x_BTC.shape
    h, d = self.n_heads, self.head_dim
    # nn.Einsum creates each kernel in its own shape ([C, H, D], [H, D, C]), so its logical names
    # box the real array (DenseGeneral initialises a flattened 2-D kernel).
    dense = lambda name, axes: nn.Einsum(   # noqa: E731
        (c, h, d), "btc,chd->bthd", use_bias=False, dtype=self.dtype, param_dtype=jnp.float32,
        name=name,
        kernel_init=nn.with_logical_partitioning(nn.initializers.normal(self.init_std), axes))
    q = dense("query", ("embed", "heads", "kv"))(x_BTC)
    k = dense("key", ("embed", "heads", "kv"))(x_BTC)
    v = dense("value", ("embed", "heads", "kv"))(x_BTC)
    q, k, v = (nn.with_logical_constraint(a, ("batch", "length", "heads", "kv")) for a in (q, k, v))

    if self.decode:
      out = self._decode(q, k, v)
    else:
      pos = jnp.broadcast_to(jnp.arange(t), (b, t))
      q, k = rope(q, pos, self.rope_theta), rope(k, pos, self.rope_theta)
      out = jax.nn.dot_product_attention(q, k, v, is_causal=True)
    out = nn.with_logical_constraint(out, ("batch", "length", "heads", "kv"))
    return nn.Einsum(
        (h, d, c), "bthd,hdc->btc", use_bias=False, dtype=self.dtype, param_dtype=jnp.float32,
        name="out",
        kernel_init=nn.with_logical_partitioning(nn.initializers.normal(self.out_std),
                                                 ("heads", "kv", "embed")))(out)

  def _decode(self, q, k, v):
    """Write k, v at the cache index and attend over positions <= the query's."""
    b, t, h, d = q.shape
    int8 = self.kv_cache == "int8"
    shape = (b, self.max_len, h, d)
    initialized = self.has_variable("cache", "cached_key")
    ck = self.variable("cache", "cached_key", jnp.zeros, shape, jnp.int8 if int8 else k.dtype)
    cv = self.variable("cache", "cached_value", jnp.zeros, shape, jnp.int8 if int8 else v.dtype)
    if int8:
      sk = self.variable("cache", "cached_key_scale", jnp.zeros, shape[:3] + (1,), jnp.float32)
      sv = self.variable("cache", "cached_value_scale", jnp.zeros, shape[:3] + (1,), jnp.float32)
    idx = self.variable("cache", "cache_index", lambda: jnp.zeros((), jnp.int32))
    start = idx.value
    pos = jnp.broadcast_to(start + jnp.arange(t), (b, t))
    q, k = rope(q, pos, self.rope_theta), rope(k, pos, self.rope_theta)
    if not initialized:   # init call: shapes only
      return jax.nn.dot_product_attention(q, k, v, is_causal=True)
    if int8:
      ck.value, sk.value = write_int8(ck.value, sk.value, k, start)
      cv.value, sv.value = write_int8(cv.value, sv.value, v, start)
      keys, values = dequantize_kv(ck.value, sk.value, q.dtype), dequantize_kv(cv.value, sv.value,
                                                                                 q.dtype)
    else:
      ck.value = jax.lax.dynamic_update_slice(ck.value, k, (0, start, 0, 0))
      cv.value = jax.lax.dynamic_update_slice(cv.value, v, (0, start, 0, 0))
      keys, values = ck.value, cv.value
    idx.value = start + t
    mask = jnp.arange(self.max_len)[None, :] <= (start + jnp.arange(t))[:, None]   # [T, S]
    return jax.nn.dot_product_attention(q, keys, values, mask=mask[None, None])
