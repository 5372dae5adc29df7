"""The connection's kernels under a mesh (`kernels.site_ops` -> `shard_map`) on 8 fake CPU devices
equal the unsharded results, values and gradients.

Feature ("tensor") sharding of the pre kernel runs the stats kernel, a psum, and the finish kernel;
the XLA path under feature sharding psums the projection inside `ops.mhc_mappings(axis=...)`.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, Mesh
from jax.sharding import PartitionSpec as P

from mhc_jax import ops
from mhc_jax.config import ConnectionConfig
from mhc_jax.kernels import mhc_pre, site_ops, stream_post

B, T, N, C = 4, 2, 2, 32
KW = dict(sinkhorn_iters=3, implementation="interpret")


@pytest.fixture(scope="module")
def mesh():
  return Mesh(np.array(jax.devices()[:8]).reshape(4, 2), ("data", "tensor"),
              axis_types=(AxisType.Auto,) * 2)


@pytest.fixture(scope="module")
def mesh3():
  """A third axis that x is replicated over (as `tensor` under plain TP)."""
  return Mesh(np.array(jax.devices()[:8]).reshape(2, 2, 2), ("data", "tensor", "extra"),
              axis_types=(AxisType.Auto,) * 3)


def _data():
  rng = np.random.default_rng(0)
  w = ops.mhc_width(N)
  x = jnp.asarray(rng.standard_normal((B, T, N, C)), jnp.float32)
  params = {"phi": jnp.asarray(rng.standard_normal((N * C, w)) / np.sqrt(N * C), jnp.float32),
            "b": jnp.asarray(rng.standard_normal(w), jnp.float32),
            "alpha": jnp.asarray([0.8, 1.1, 2.0], jnp.float32)}
  y = jnp.asarray(rng.standard_normal((B, T, C)), jnp.float32)
  return x, params, y


def _weights(shape):
  return jnp.arange(np.prod(shape), dtype=jnp.float32).reshape(shape) % 7 - 3


def _site_loss(impl, x_spec):
  cfg = ConnectionConfig(kind="mhc", n_streams=N, sinkhorn_iters=3, implementation=impl)

  def f(x, params, y):
    site = site_ops(cfg, x, x_spec)
    u, coeffs = site.pre(x, params)
    out = site.post(x, y + u, coeffs)
    return jnp.sum(out * _weights(out.shape)) + jnp.sum(jnp.sin(coeffs.split()[0]))
  return jax.value_and_grad(f, argnums=(0, 1, 2))


@pytest.fixture(scope="module")
def reference():
  """Unsharded public ops (`mhc_pre` + `stream_post`) in the interpreter."""
  x, params, y = _data()

  def f(x, params, y):
    u, h_pre, h_post, h_res = mhc_pre(x, params, **KW)
    out = stream_post(x, y + u, h_res, h_post, implementation="interpret")
    return jnp.sum(out * _weights(out.shape)) + jnp.sum(jnp.sin(h_pre))
  return jax.value_and_grad(f, argnums=(0, 1, 2))(x, params, y)


@pytest.mark.parametrize("impl", ["interpret", "xla"])
@pytest.mark.parametrize("x_spec", [P("data", "tensor", None, None),     # batch x sequence
                                    P("data", None, None, "tensor")])    # batch x features
def test_sharded_site_equals_unsharded(mesh, reference, x_spec, impl):
  x, params, y = _data()
  with jax.set_mesh(mesh):
    f = jax.jit(_site_loss(impl, x_spec))
    got = f(x, params, y)
    text = f.lower(x, params, y).compile().as_text()
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(reference)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-5, atol=2e-5)
  if impl == "interpret":
    # Each device ran the kernels on its own block: nothing was gathered for them.
    assert "all-gather" not in text


@pytest.mark.parametrize("x_spec", [P("data", "tensor", None, None), P("data", None, None, "tensor")])
def test_axes_that_replicate_x_add_no_collective(mesh3, reference, x_spec):
  """Every device on `extra` computes the same block: values and gradients still equal the
  unsharded ones, and no all-reduce runs over `extra` (shard_map's own transpose would psum the
  equal cotangents there)."""
  x, params, y = _data()
  with jax.set_mesh(mesh3):
    f = jax.jit(_site_loss("interpret", x_spec))
    got = f(x, params, y)
    text = f.lower(x, params, y).compile().as_text()
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(reference)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-5, atol=2e-5)
  assert "all-gather" not in text
  groups = [l for l in text.splitlines() if "all-reduce(" in l or "all-reduce-start(" in l]
  assert groups and not any("{'extra'}" in l or "'extra'}" in l for l in groups), groups


def test_stream_axis_sharding_is_refused(mesh):
  x, params, y = _data()
  cfg = ConnectionConfig(kind="mhc", n_streams=N, implementation="interpret")
  with jax.set_mesh(mesh), pytest.raises(ValueError, match="shards the stream axis"):
    site_ops(cfg, x, P("data", None, "tensor", None))


def test_no_mesh_is_the_plain_call():
  x, _, _ = _data()
  cfg = ConnectionConfig(kind="mhc", n_streams=N, implementation="interpret")
  assert site_ops(cfg, x, P("data", None, None, None)).x_spec is None
