"""Kernels compiled for hardware that is not here.

TPU: Mosaic lowering + libtpu compile for a v5e device (the `tpu-aot` extra): block shapes, layouts
and op support are checked for real. GPU: Triton lowering for an abstract H100 (power-of-two arrays,
supported primitives); PTX compilation is not run.
"""
import dataclasses
import importlib.util

import jax
import jax.numpy as jnp
import pytest

from mhc_jax.kernels import block, launch
from mhc_jax.tools import kernel_aot as aot

pytestmark = pytest.mark.filterwarnings("ignore:The Pallas Triton backend is deprecated")

HAS_LIBTPU = importlib.util.find_spec("libtpu") is not None


@pytest.mark.slow
@pytest.mark.tpu_aot
@pytest.mark.skipif(not HAS_LIBTPU, reason="needs libtpu (pip install -e '.[tpu-aot]')")
@pytest.mark.parametrize("kind,n,c,t,dtype", [
    ("mhc", 4, 256, 100, jnp.bfloat16),
    ("mhc_lite", 3, 128, 64, jnp.float32),
])
def test_tpu_kernels_compile_ahead_of_time(kind, n, c, t, dtype):
  compiled = aot.tpu_compile(kind, n, c, t, dtype, sinkhorn_iters=2)
  assert set(compiled) == {"pre_fwd", "pre_bwd", "post_fwd", "post_bwd"}
  for name, exe in compiled.items():
    text = exe.as_text()
    assert "tpu_custom_call" in text, name             # the Mosaic kernel, not an XLA fallback


@pytest.mark.parametrize("kind,n,c,t,dtype", [
    ("mhc", 4, 7168, 64, jnp.bfloat16),                # 7 chunks of 1024
    ("mhc", 3, 48, 20, jnp.float32),                   # chunks 32 + 16, odd n, ragged tokens
    ("mhc_lite", 4, 128, 16, jnp.bfloat16),            # 24 permutations -> 32 lanes
])
def test_gpu_kernels_lower_to_triton(kind, n, c, t, dtype):
  lowered = aot.gpu_lower(kind, n, c, t, dtype, sinkhorn_iters=3)
  for name, low in lowered.items():
    assert "xla.gpu.triton" in low.as_text(), name     # a Triton kernel call, not XLA ops


def test_gpu_lowering_rejects_non_power_of_two_arrays():
  """The Triton check is real: one un-chunked 384-wide stream slice must fail to lower."""
  spec = block.MapSpec("mhc", 3, 2)
  cfg = dataclasses.replace(launch.make_cfg("gpu", 3, 384, jnp.float32, 32, spec=spec),
                            max_chunk=None)
  from jax.sharding import AbstractDevice, AbstractMesh, use_abstract_mesh
  fn, args = aot.programs(cfg, cfg, 32, jnp.float32)["pre_fwd"]
  with use_abstract_mesh(AbstractMesh((), (), abstract_device=AbstractDevice("NVIDIA H100", 132,
                                                                               "gpu"))):
    with pytest.raises(Exception, match="power of 2"):
      jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",))


@pytest.mark.slow
@pytest.mark.tpu_aot
@pytest.mark.skipif(not HAS_LIBTPU, reason="needs libtpu (pip install -e '.[tpu-aot]')")
def test_tpu_sharded_connection_compiles():
  """Data x tensor (2 x 2) v5e mesh, features sharded: stats kernel + psum + finish kernel, post
  kernel per shard, and all their backward kernels compile with Mosaic inside shard_map."""
  import numpy as np
  from jax.sharding import Mesh, NamedSharding
  from jax.sharding import PartitionSpec as P

  from mhc_jax.config import ConnectionConfig
  from mhc_jax.kernels import site_ops
  from jax.experimental import topologies
  aot.tpu_device()                                       # sets ALLOW_MULTIPLE_LIBTPU_LOAD
  topo = topologies.get_topology_desc(platform="tpu", topology_name="v5e:2x2",
                                      chip_config_name="default", chips_per_host_bounds=(2, 2, 1),
                                      num_slices=1)
  mesh = Mesh(np.array(topo.devices).reshape(2, 2), ("data", "tensor"))
  b, t, n, c, w = 4, 64, 4, 512, 24
  spec = P("data", None, None, "tensor")
  cfg = ConnectionConfig(n_streams=n, sinkhorn_iters=2, implementation="pallas")

  def loss(x, p):
    site = site_ops(cfg, x, spec)          # the mesh's platform (tpu) picks the Mosaic kernels
    assert site.impl == "tpu"
    u, coeffs = site.pre(x, p)
    return jnp.sum(site.post(x, u, coeffs).astype(jnp.float32))

  rep = NamedSharding(mesh, P())
  x = jax.ShapeDtypeStruct((b, t, n, c), jnp.bfloat16, sharding=NamedSharding(mesh, spec))
  p = {"phi": jax.ShapeDtypeStruct((n * c, w), jnp.float32, sharding=rep),
       "b": jax.ShapeDtypeStruct((w,), jnp.float32, sharding=rep),
       "alpha": jax.ShapeDtypeStruct((3,), jnp.float32, sharding=rep)}
  with jax.set_mesh(mesh):
    text = jax.jit(jax.value_and_grad(loss, argnums=(0, 1))).lower(x, p).compile().as_text()
  # forward: stats, pre, post kernels; backward: pre and post kernels (the stats are saved)
  assert text.count("tpu_custom_call") >= 5 and "all-reduce" in text
