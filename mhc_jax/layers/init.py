"""Initial connection parameters. `site` (the sublayer index, may be traced under nn.scan) picks the
stream a site reads first, as in HC's `layer mod n` one-hot (HC paper Eq. 14).

mHC presets (the paper fixes only alpha = 0.01):
  hc_like   phi = 0, alpha = gate, b_pre = +1 on stream (site mod n) and -1 elsewhere, b_post = 0
            (H_post = 1), b_res = 0 on the diagonal and -8 off it (H_res ~= I; mHC-lite: 0 on the
            identity permutation, -8 on the others).
  uniform   phi ~ N(0, 0.02), alpha = gate, b = 0 (H_pre = 0.5, H_post = 1, H_res ~= J/n).
  identity  alpha = 0, phi ~ N(0, 0.02), b_pre = b_post = 0, b_res as hc_like: H_res rows sum to 1
            and the streams start identical, so the network equals a pre-norm residual network
            exactly up to the pre-norm scale, until alpha moves.
Why break symmetry: the streams start as n identical copies. If every parameter is also symmetric
under a permutation of the streams (phi = 0 and b_pre uniform), the gradients are symmetric too and
the n streams stay identical forever: the model degenerates to n = 1. hc_like breaks it with b_pre;
uniform and identity rely on random phi.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

_OFF = -8.0


def _stream_sign(n: int, site) -> jax.Array:
  return jnp.where(jnp.arange(n) == jnp.mod(site, n), 1.0, -1.0).astype(jnp.float32)


def _res_bias(n: int, lite: bool) -> jax.Array:
  if lite:   # permutation 0 of itertools.permutations is the identity
    return jnp.full((math.factorial(n),), _OFF, jnp.float32).at[0].set(0.0)
  return jnp.where(jnp.eye(n, dtype=bool), 0.0, _OFF).astype(jnp.float32).reshape(n * n)


def mhc_bias(preset: str, n: int, site, lite: bool) -> jax.Array:
  """Packed `b = [pre (n) | post (n) | res (n*n or n!)]`."""
  res_w = math.factorial(n) if lite else n * n
  if preset == "uniform":
    return jnp.zeros((2 * n + res_w,), jnp.float32)
  pre = _stream_sign(n, site) if preset == "hc_like" else jnp.zeros((n,), jnp.float32)
  return jnp.concatenate([pre, jnp.zeros((n,), jnp.float32), _res_bias(n, lite)])


def mhc_phi(preset: str, key, shape, std: float = 0.02) -> jax.Array:
  if preset == "hc_like":
    return jnp.zeros(shape, jnp.float32)
  return std * jax.random.normal(key, shape, jnp.float32)


def mhc_alpha(preset: str, gate: float) -> jax.Array:
  return jnp.full((3,), 0.0 if preset == "identity" else gate, jnp.float32)


def hc_biases(n: int, site):
  """HC paper Eq. 14: b_pre = one_hot(site mod n), b_post = 1, b_res = I."""
  b_pre = (jnp.arange(n) == jnp.mod(site, n)).astype(jnp.float32)
  return b_pre, jnp.ones((n,), jnp.float32), jnp.eye(n, dtype=jnp.float32)
