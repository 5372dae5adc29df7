"""Kernels inside shard_map on 8 fake CPU devices equal the unsharded results (values and grads).

Feature ("tensor") sharding of the pre kernel runs the stats kernel, a psum, and the finish kernel.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from mhc_jax import ops
from mhc_jax.kernels import mhc_pre, stream_post
from mhc_jax.kernels.sharded import mhc_pre_sharded, stream_post_sharded

B, T, N, C = 4, 2, 2, 32
KW = dict(sinkhorn_iters=3, implementation="interpret")


@pytest.fixture(scope="module")
def mesh():
  return Mesh(np.array(jax.devices()[:8]).reshape(4, 2), ("data", "tensor"))


def _data():
  rng = np.random.default_rng(0)
  w = ops.mhc_width(N)
  x = jnp.asarray(rng.standard_normal((B, T, N, C)), jnp.float32)
  params = {"phi": jnp.asarray(rng.standard_normal((N * C, w)) / np.sqrt(N * C), jnp.float32),
            "b": jnp.asarray(rng.standard_normal(w), jnp.float32),
            "alpha": jnp.asarray([0.8, 1.1, 2.0], jnp.float32)}
  y = jnp.asarray(rng.standard_normal((B, T, C)), jnp.float32)
  return x, params, y


def _loss(pre, post):
  def f(x, params, y):
    u, h_pre, h_post, h_res = pre(x, params)
    out = post(x, y + u, h_res, h_post)
    w = jnp.arange(out.size, dtype=jnp.float32).reshape(out.shape) % 7 - 3
    return jnp.sum(out * w) + jnp.sum(jnp.sin(h_pre))
  return jax.value_and_grad(f, argnums=(0, 1, 2))


@pytest.fixture(scope="module")
def reference():
  x, params, y = _data()
  return _loss(lambda a, p: mhc_pre(a, p, **KW),
               lambda *a: stream_post(*a, implementation="interpret"))(x, params, y)


@pytest.mark.parametrize("x_spec", [P("data", "tensor", None, None),     # batch x sequence
                                    P("data", None, None, "tensor")])    # batch x features
def test_sharded_kernels_equal_unsharded(mesh, reference, x_spec):
  x, params, y = _data()
  ref = reference
  got = jax.jit(_loss(mhc_pre_sharded(mesh, x_spec, **KW),
                      stream_post_sharded(mesh, x_spec, implementation="interpret")))(x, params, y)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(ref)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-5, atol=2e-5)


def test_feature_sharded_pre_xla_path_equals_kernel(mesh, reference):
  """`implementation="xla"` under feature sharding takes the psum-ed XLA mappings: same results."""
  x, params, y = _data()
  spec = P("data", None, None, "tensor")
  got = jax.jit(_loss(mhc_pre_sharded(mesh, spec, sinkhorn_iters=3, implementation="xla"),
                      stream_post_sharded(mesh, spec, implementation="xla")))(x, params, y)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(reference)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-5, atol=2e-5)
