"""Kernels and a sharded train step compiled to H100 machine code (sm_90a cubins) without a GPU.

JAX's CUDA plugin (the `gpu-aot` extra) runs XLA's whole GPU pipeline, Triton and ptxas included, for
compile-only H100 devices (`mhc_jax.tools.h100`); the cubins are read back for registers, shared
memory and spills. Tests run with JAX_PLATFORMS=cpu (conftest): the plugin stays registered, no
driver is probed. Also: the train step with kernels compiles for a TPU v5e-8 topology (libtpu).
"""
import dataclasses
import importlib.util

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from mhc_jax.kernels import block, launch
from mhc_jax.tools import kernel_aot as aot

pytestmark = [pytest.mark.gpu_aot,
              pytest.mark.filterwarnings("ignore:The Pallas Triton backend is deprecated")]


def _gpu_unavailable():
  try:
    from mhc_jax.tools import h100
  except Exception as e:  # noqa: BLE001
    return f"mhc_jax.tools.h100: {e}"
  return h100.unavailable()


GPU_WHY = _gpu_unavailable()
needs_gpu_aot = pytest.mark.skipif(GPU_WHY is not None, reason=str(GPU_WHY))
HAS_LIBTPU = importlib.util.find_spec("libtpu") is not None


def _programs(n, c, tokens, dtype, sinkhorn_iters=20, **cfg_kw):
  spec = block.MapSpec("mhc", n, sinkhorn_iters)
  cfg_pre = launch.make_cfg("gpu", n, c, dtype, tokens, spec=spec, **cfg_kw)
  cfg_post = launch.make_cfg("gpu", n, c, dtype, tokens, **cfg_kw)
  return aot.programs(cfg_pre, cfg_post, tokens, dtype)


def _compile(fn, args, dump_dir=None):
  from mhc_jax.tools import h100
  mesh = h100.mesh((1,), ("x",))
  rep = NamedSharding(mesh, P())
  args = [jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=rep) for a in args]
  return h100.compile_program(fn, args, mesh, dump_dir=dump_dir)


def _body_kernels(report, want):
  from mhc_jax.tools import h100
  kernels = [k for k in report["kernels"] if k["kernel"].endswith("_body")]
  assert {k["kernel"] for k in kernels} == want, report["kernels"]
  for k in kernels:
    assert 0 < k["registers"] <= 255 and k["shared_bytes"] >= 0, k
    assert k["threads"][0] == 32 * launch.GPU_NUM_WARPS and k["grid"][0] == 64 // 16, k
    assert k["launch_shared_bytes"] <= h100.SMEM_PER_BLOCK, k
  assert report["memory"]["argument_bytes"] > 0
  assert report["cost"]["bytes_accessed"] and report["cost"]["bytes_accessed"] > 0
  return kernels


def _spills(k):
  return k["local_bytes"] + k.get("spill_stores", k["stack_bytes"])


@needs_gpu_aot
@pytest.mark.slow
def test_h100_post_kernels_compile_without_spills(tmp_path):
  """post forward + backward (value-and-grad runs both kernels): real sm_90a cubins, registers /
  shared memory / launch shape reported, and no register spill (no STL in the SASS)."""
  from mhc_jax.tools import h100
  fn, args = _programs(4, 1024, 64, jnp.bfloat16)["post_bwd"]
  report = h100.report(_compile(fn, args, str(tmp_path)))
  for k in _body_kernels(report, {"_fwd_body", "_bwd_body"}):
    assert _spills(k) == 0, f"register spills in {k}"


# The looped pre kernels at the GPU defaults (n = 4, 20 Sinkhorn iterations, 128-feature chunks):
# no spill forward; backward spill only in the per-block Sinkhorn section (its 40 saved [16, W]
# iterates), none inside the feature loops. Measured 208 B per thread (bf16) / 0 (float32) at
# C = 2048 and 4096, experiments/results/h100_aot_pre_kernels_20261203_chunked.json; the unrolled
# kernel spilled 7-12 KB and needed too much shared memory from C = 2048.
PRE_BWD_SPILL_LIMIT_BYTES = 256


def _spill_bytes(k):
  return k["local_bytes"] + k["stack_bytes"]


@needs_gpu_aot
@pytest.mark.slow
def test_h100_pre_kernels_compile_within_spill_limits(tmp_path):
  """pre forward + backward (value-and-grad runs both kernels) at the default launch, 2 chunks per
  stream: real cubins within the shared-memory limit, no forward spill, and a backward spill of at
  most PRE_BWD_SPILL_LIMIT_BYTES per thread (fails if the spills come back)."""
  from mhc_jax.tools import h100
  fn, args = _programs(4, 256, 64, jnp.bfloat16)["pre_bwd"]
  report = h100.report(_compile(fn, args, str(tmp_path)))
  ks = {k["kernel"]: k for k in _body_kernels(report, {"_fwd_body", "_bwd_body"})}
  fwd, bwd = ks["_fwd_body"], ks["_bwd_body"]
  assert _spill_bytes(fwd) == 0 and fwd.get("spill_stores", 0) == 0, f"forward spills: {fwd}"
  assert _spill_bytes(bwd) <= PRE_BWD_SPILL_LIMIT_BYTES, f"backward spills: {bwd}"


@needs_gpu_aot
def test_h100_oversized_block_fails_with_shared_memory_error():
  """The check is real: the pre kernel with 4096-feature bf16 chunks (x [16, 4096] and three bf16
  phi parts [4096, W] per step) needs more shared memory than the H100's 227 KiB per block."""
  from mhc_jax.tools import h100
  fn, args = _programs(4, 4096, 32, jnp.bfloat16, sinkhorn_iters=1, max_chunk=4096)["pre_fwd"]
  with pytest.raises(Exception) as err:
    _compile(fn, args)
  assert h100.is_smem_overflow(err.value), str(err.value)[:300]
  assert "available: 232448" in str(err.value)


def _tiny_cfg(strategy, shape, implementation, d_model=32):
  from mhc_jax.configs import get_preset
  from mhc_jax.config import MeshConfig
  base = get_preset("tiny")
  conn = dataclasses.replace(base.model.connection, implementation=implementation)
  model = dataclasses.replace(base.model, connection=conn, d_model=d_model, dtype="bfloat16")
  return dataclasses.replace(base, model=model, mesh=MeshConfig(strategy, shape))


@needs_gpu_aot
@pytest.mark.slow
def test_h100x8_fsdp_train_step_with_kernels_compiles():
  """Tiny model, 8 abstract H100s, fsdp, implementation="pallas": the sharded step compiles to
  cubins with the Triton kernels inside (per-device shard_map), and the collectives are counted."""
  from mhc_jax.tools.compare_sharding import lower_step
  from mhc_jax.tools.hlo import collective_stats
  from mhc_jax.tools import h100
  cfg = _tiny_cfg("fsdp", (1, 8, 1), "pallas")
  lowered, mesh, _ = lower_step(cfg, h100.devices(8))
  compiled = lowered.compile()
  text = compiled.as_text()
  assert text.count('custom_call_target="__gpu$xla.gpu.triton"') >= 4   # pre/post, fwd/bwd
  stats = collective_stats(text)
  assert stats["all-gather"]["count"] + stats["reduce-scatter"]["count"] > 0   # fsdp params
  assert compiled.memory_analysis().temp_size_in_bytes > 0


@pytest.mark.slow
@pytest.mark.tpu_aot
@pytest.mark.skipif(not HAS_LIBTPU, reason="needs libtpu (pip install -e '.[tpu-aot]')")
def test_tpu_v5e8_fsdp_tp_train_step_with_kernels_compiles():
  """The same step under fsdp_tp (fsdp 4 x tensor 2 on v5e-8, streams replicated over tensor) compiles for a
  TPU v5e-8 topology with the Mosaic kernels inside."""
  from mhc_jax.tools.compare_sharding import lower_step, topology_devices
  cfg = _tiny_cfg("fsdp_tp", (1, 4, 2), "pallas", d_model=128)
  lowered, mesh, _ = lower_step(cfg, topology_devices("v5e:2x4"))
  text = lowered.compile().as_text()
  assert text.count("tpu_custom_call") >= 4


@needs_gpu_aot
def test_compare_sharding_accepts_h100_topologies():
  from mhc_jax.tools.compare_sharding import topology_devices
  devs = topology_devices("h100:8")
  assert len(devs) == 8 and devs[0].platform == "gpu" and "H100" in devs[0].device_kind
  assert "H200" in topology_devices("h200:2")[0].device_kind
