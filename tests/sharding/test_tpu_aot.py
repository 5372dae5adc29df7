"""Ahead-of-time compilation for a TPU v5e-8 topology through libtpu (no TPU needed).

`compare-sharding --topology v5e:2x4` must compile every strategy; multi-slice meshes put `data` across
slices. Skipped without libtpu (the `tpu-aot` extra).
"""
import dataclasses
import importlib.util
import os

import pytest

from mhc_jax.config import STRATEGIES, MeshConfig

pytestmark = [pytest.mark.tpu_aot, pytest.mark.slow,
              pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                                 reason="libtpu not installed (pip install libtpu)")]


def test_hsdp_mesh_spans_slices_on_the_data_axis():
  from jax.experimental import topologies
  from mhc_jax import sharding as S
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  devs = topologies.get_topology_desc(platform="tpu", topology_name="v5e:2x2",
                                      chip_config_name="default", chips_per_host_bounds=(2, 2, 1),
                                      num_slices=2).devices
  mesh = S.make_mesh(MeshConfig("hsdp"), devs)
  assert dict(mesh.shape) == {"data": 2, "expert": 1, "fsdp": 4, "tensor": 1}
  for i in range(2):     # each data row is one slice (DCN), fsdp stays inside it (ICI)
    assert {d.slice_index for d in mesh.devices[i].flat} == {i}


def test_compare_sharding_compiles_every_strategy_for_v5e_8(tmp_path):
  from mhc_jax.tools import compare_sharding as C
  from mhc_jax.config import ConnectionConfig
  devices = C.topology_devices("v5e:2x4")
  base = C.preset("small")
  base = dataclasses.replace(base, model=dataclasses.replace(
      base.model, n_layers=1, dtype="bfloat16",
      connection=ConnectionConfig(kind="mhc", n_streams=4, sinkhorn_iters=4)))
  rows = C.make_rows([base.model.connection], STRATEGIES, ("replicated",), {}, len(devices))
  out = {}
  for row in rows:
    cfg = dataclasses.replace(base, mesh=row.mesh)
    out[row.mesh.strategy] = C.compile_row(cfg, devices, steps=0, real=False)
  assert set(out) == set(STRATEGIES)
  for rec in out.values():
    assert rec["memory_mib"]["arguments"] > 0 and rec["flops"] > 0
  args = {k: v["memory_mib"]["arguments"] for k, v in out.items()}
  assert args["dp"] > 2 * args["fsdp"] and args["dp"] > 2 * args["tp"], args
  gathered = {k: v["collectives"]["all-gather"]["bytes"] for k, v in out.items()}
  assert gathered["fsdp"] > gathered["dp"], gathered                   # FSDP gathers weights
