"""The pre kernel's looped form (GPU: `lax.fori_loop` over equal feature chunks, `pl.ds` slices) in
interpret mode: chunk choice, and the feature-sharded path (stats kernel + psum + finish kernel,
backward with dH_pre given) with several chunks per local stream against the unsharded kernel."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from mhc_jax import ops
from mhc_jax.kernels import api, block, launch
from mhc_jax.kernels.pre import loop_chunk


@pytest.mark.parametrize("backend,c,max_chunk,want", [
    ("gpu", 4096, 256, 256), ("gpu", 7168, 256, 256), ("gpu", 48, 32, 16), ("gpu", 96, 128, 32),
    ("gpu", 16, 256, 16), ("interpret", 64, 16, 16), ("interpret", 64, None, None),
    ("tpu", 4096, 256, None)])
def test_loop_chunk(backend, c, max_chunk, want):
  cfg = launch.KernelCfg(backend=backend, n=4, c=c, bt=16, max_chunk=max_chunk,
                         spec=block.MapSpec("mhc", 4))
  assert loop_chunk(cfg) == want


def test_gpu_cfg_loops_over_chunks():
  """`make_cfg("gpu", ...)` gives the looped form with the measured chunk sizes."""
  spec = block.MapSpec("mhc", 4)
  for dtype, s in ((jnp.bfloat16, 128), (jnp.float32, 128)):
    cfg = launch.make_cfg("gpu", 4, 4096, dtype, 1024, spec=spec)
    assert loop_chunk(cfg) == s and cfg.c // s == 4096 // s


def test_feature_sharded_pre_with_looped_chunks():
  n, c, t, k = 3, 64, 10, 2           # local C = 32, max_chunk 8: 4 chunks per local stream
  rng = np.random.default_rng(7)
  w = ops.mhc_width(n)
  x = jnp.asarray(rng.standard_normal((t, n, c)), jnp.float32)
  params = {"phi": jnp.asarray(rng.standard_normal((n * c, w)) / np.sqrt(n * c), jnp.float32),
            "b": jnp.asarray(rng.standard_normal(w), jnp.float32),
            "alpha": jnp.asarray([0.8, 1.1, 2.0], jnp.float32)}
  spec = api._map_spec("mhc", n, 3)
  wu = jnp.asarray(rng.standard_normal((t, c)), jnp.float32)
  wh = jnp.asarray(rng.standard_normal((t, spec.lanes)), jnp.float32)

  def loss(u, h):
    return jnp.sum(u * wu) + jnp.sum(jnp.sin(h[:, :spec.width]) * wh[:, :spec.width])

  def plain(x, params):
    return loss(*api._pre_kernel("interpret", spec, {"bt": 8}, x, params))

  mesh = Mesh(np.array(jax.devices()[:k]), ("tensor",))
  body = functools.partial(api._pre_kernel, "interpret", spec, {"bt": 8, "max_chunk": 8},
                           axis="tensor")

  def sharded(x, params):
    u, h = jax.shard_map(body, mesh=mesh, in_specs=(P(None, None, "tensor"), P()),
                         out_specs=(P(None, "tensor"), P()), check_vma=False)(x, params)
    return loss(u, h)

  want = jax.value_and_grad(plain, argnums=(0, 1))(x, params)
  with jax.set_mesh(mesh):
    got = jax.jit(jax.value_and_grad(sharded, argnums=(0, 1)))(x, params)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("iters,eps,kind", [(20, 0.0, "mhc"), (1, 0.0, "mhc"), (0, 0.0, "mhc"),
                                            (3, 1e-6, "mhc"), (0, 0.0, "mhc_lite")])
@pytest.mark.parametrize("scale", [1.0, 1e4])
def test_mapping_vjp_equals_autodiff(iters, eps, kind, scale):
  """The backward kernel's mapping VJP (written-out Sinkhorn adjoint, one tile per half step)
  equals autodiff through `block.mapping`, whole packed tile, gates included, any logit range."""
  if iters == 0 and kind == "mhc" and scale > 1:
    pytest.skip("no Sinkhorn iteration: H_res = exp(logits) overflows at this scale")
  n, t = 4 if kind == "mhc" else 3, 24
  spec = block.MapSpec(kind, n, iters, eps, pre_eps=1e-3)
  vecs, mats = (jnp.asarray(a) for a in block.constants(spec))
  rng = np.random.default_rng(int(scale) + iters)
  z = np.zeros((t, spec.lanes), np.float32)
  z[:, :spec.width] = rng.standard_normal((t, spec.width))
  z[:, 2 * n:spec.width] *= scale                                  # res logits; gates moderate
  z = jnp.asarray(z)
  ct = jnp.asarray(rng.standard_normal((t, spec.lanes)), jnp.float32)
  want, pull = jax.vjp(lambda zz: block.mapping(spec, zz, vecs, mats[0], mats[1]), z)
  got, vjp = block.mapping_vjp(spec, z, vecs, mats[0], mats[1])
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  g, gw = np.asarray(vjp(ct)[0]), np.asarray(pull(ct)[0])
  assert np.all(np.isfinite(g))
  np.testing.assert_allclose(g, gw, atol=1e-5 * max(1.0, np.abs(gw).max()), rtol=0)
