"""NNX causal attention (RoPE, optional KV cache) and SwiGLU MLP: the parameters and math of
`mhc_jax.layers.attention.Attention` / `mhc_jax.layers.mlp.MLP`.

    attention: q, k, v = x W_{q,k,v} [C, H, D];  o = softmax(rope(q) rope(k)^T / sqrt(D) + causal) v;  y = o W_out
    MLP:       y = (silu(x W_0) * (x W_1)) W_o
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx

from mhc_jax.layers.attention import rope
from mhc_jax.ops.kv_cache import dequantize_kv, write_int8
from mhc_jax.nnx.norm import param


def _normal(rngs: nnx.Rngs, shape, std):
  return std * jax.random.normal(rngs.params(), shape, jnp.float32)


def _constrain(a, axes):
  return nn.with_logical_constraint(a, axes)


class Attention(nnx.Module):
  """`__call__(x [B, T, C]) -> [B, T, C]`. Params `query/key/value.kernel [C, H, D]`,
  `out.kernel [H, D, C]`. With a cache (`init_cache`) each call appends its tokens at
  `cache_index` and attends over all cached positions <= its own (`decode=True`); `kv_cache="int8"`
  keeps the cache as int8 with one scale per vector (`mhc_jax.ops.kv_cache`)."""

  def __init__(self, d_model, n_heads, head_dim, max_len, *, rope_theta=10000.0, init_std=0.02,
               out_std=0.02, dtype=jnp.float32, kv_cache="float", rngs: nnx.Rngs):
    self.n_heads, self.head_dim, self.max_len = n_heads, head_dim, max_len
    self.rope_theta, self.dtype, self.kv_cache = rope_theta, dtype, kv_cache
    shape, axes = (d_model, n_heads, head_dim), ("embed", "heads", "kv")
    self.query = Kernel(_normal(rngs, shape, init_std), axes)
    self.key = Kernel(_normal(rngs, shape, init_std), axes)
    self.value = Kernel(_normal(rngs, shape, init_std), axes)
    self.out = Kernel(_normal(rngs, (n_heads, head_dim, d_model), out_std), ("heads", "kv", "embed"))

  def init_cache(self, batch_size: int, dtype=None):
    """Zero KV cache `[B, max_len, H, D]` and index 0 (names as the Linen `cache` collection)."""
    shape, dtype = (batch_size, self.max_len, self.n_heads, self.head_dim), dtype or self.dtype
    if self.kv_cache == "int8":
      dtype = jnp.int8
      self.cached_key_scale = nnx.Cache(jnp.zeros(shape[:3] + (1,), jnp.float32))
      self.cached_value_scale = nnx.Cache(jnp.zeros(shape[:3] + (1,), jnp.float32))
    self.cached_key = nnx.Cache(jnp.zeros(shape, dtype))
    self.cached_value = nnx.Cache(jnp.zeros(shape, dtype))
    self.cache_index = nnx.Cache(jnp.zeros((), jnp.int32))

  def __call__(self, x_BTC, decode: bool = False):
    b, t, _ = x_BTC.shape
    proj = lambda w: _constrain(jnp.einsum("btc,chd->bthd", *_promote(x_BTC, w, self.dtype)),  # noqa: E731
                                ("batch", "length", "heads", "kv"))
    q, k, v = proj(self.query), proj(self.key), proj(self.value)
    if decode:
      out = self._decode(q, k, v)
    else:
      pos = jnp.broadcast_to(jnp.arange(t), (b, t))
      q, k = rope(q, pos, self.rope_theta), rope(k, pos, self.rope_theta)
      out = jax.nn.dot_product_attention(q, k, v, is_causal=True)
    out = _constrain(out, ("batch", "length", "heads", "kv"))
    return jnp.einsum("bthd,hdc->btc", *_promote(out, self.out, self.dtype))

  def _decode(self, q, k, v):
    if not hasattr(self, "cache_index"):
      raise ValueError("decode=True needs a KV cache: call model.init_cache(batch_size) first")
    b, t, h, d = q.shape
    start = self.cache_index[...]
    pos = jnp.broadcast_to(start + jnp.arange(t), (b, t))
    q, k = rope(q, pos, self.rope_theta), rope(k, pos, self.rope_theta)
    if self.kv_cache == "int8":
      qk, sk = write_int8(self.cached_key[...], self.cached_key_scale[...], k, start)
      qv, sv = write_int8(self.cached_value[...], self.cached_value_scale[...], v, start)
      self.cached_key[...], self.cached_key_scale[...] = qk, sk
      self.cached_value[...], self.cached_value_scale[...] = qv, sv
      ck, cv = dequantize_kv(qk, sk, q.dtype), dequantize_kv(qv, sv, q.dtype)
    else:
      ck = jax.lax.dynamic_update_slice(self.cached_key[...], k.astype(self.cached_key.dtype),
                                        (0, start, 0, 0))
      cv = jax.lax.dynamic_update_slice(self.cached_value[...], v.astype(self.cached_value.dtype),
                                        (0, start, 0, 0))
      self.cached_key[...], self.cached_value[...] = ck, cv
    self.cache_index[...] = start + t
    mask = jnp.arange(self.max_len)[None, :] <= (start + jnp.arange(t))[:, None]   # [T, S]
    return jax.nn.dot_product_attention(q, ck, cv, mask=mask[None, None])


class MLP(nnx.Module):
  """`__call__(x [B, T, C]) -> [B, T, C]`. Params `wi_0.kernel, wi_1.kernel [C, F]`, `wo.kernel [F, C]`."""

  def __init__(self, d_model, hidden, *, init_std=0.02, out_std=0.02, dtype=jnp.float32,
               rngs: nnx.Rngs):
    self.dtype = dtype
    self.wi_0 = Kernel(_normal(rngs, (d_model, hidden), init_std), ("embed", "mlp"))
    self.wi_1 = Kernel(_normal(rngs, (d_model, hidden), init_std), ("embed", "mlp"))
    self.wo = Kernel(_normal(rngs, (hidden, d_model), out_std), ("mlp", "embed"))

  def __call__(self, x_BTC):
    dense = lambda x, w: jnp.einsum("...f,fg->...g", *_promote(x, w, self.dtype))  # noqa: E731
    h = _constrain(jax.nn.silu(dense(x_BTC, self.wi_0)) * dense(x_BTC, self.wi_1),
                   ("batch", "length", "mlp"))
    return dense(h, self.wo)


class Kernel(nnx.Module):
  """A bias-free projection's weight, `kernel` (the Linen `nn.Einsum` / `nn.Dense` sub-tree)."""

  def __init__(self, value, axes):
    self.kernel = param(value, axes)


def _promote(x, w: Kernel, dtype):
  return x.astype(dtype), w.kernel[...].astype(dtype)
