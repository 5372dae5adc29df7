"""MeshConfig validation, mesh construction and the per-strategy logical rules."""
import jax
import numpy as np
import pytest
from jax.sharding import AxisType, PartitionSpec as P

from mhc_jax.config import (LOGICAL_AXES, MESH_AXES, STRATEGIES, STREAM_SHARDINGS, ConfigError,
                            MeshConfig)
from mhc_jax import distributed
from mhc_jax import sharding as S


@pytest.mark.parametrize("kwargs, field", [
    (dict(strategy="zero3"), "mesh.strategy"),
    (dict(stream_sharding="embed"), "mesh.stream_sharding"),
    (dict(shape=(2, 4)), "mesh.shape"),
    (dict(shape=(-1, -1, 1)), "mesh.shape"),
    (dict(shape=(0, 8, 1)), "mesh.shape"),
    (dict(shape=(2.0, 4, 1)), "mesh.shape"),
])
def test_bad_config_names_the_field(kwargs, field):
  with pytest.raises(ConfigError, match=field):
    MeshConfig(**kwargs)


def test_shape_must_match_devices():
  with pytest.raises(ConfigError, match=r"mesh.shape=\(2, 2, 1\).*8 devices"):
    S.make_mesh(MeshConfig("dp", (2, 2, 1)))
  with pytest.raises(ConfigError, match="does not divide 8 devices"):
    S.make_mesh(MeshConfig("dp", (3, -1, 1)))


@pytest.mark.parametrize("strategy, shape, want", [
    ("dp", None, (8, 1, 1, 1)), ("fsdp", None, (1, 1, 8, 1)), ("tp", None, (1, 1, 1, 8)),
    ("fsdp_tp", None, (1, 1, 4, 2)), ("hsdp", None, (1, 1, 8, 1)), ("hsdp", (2, -1, 1), (2, 1, 4, 1)),
    ("fsdp_tp", [1, -1, 4], (1, 1, 2, 4)), ("ep", None, (1, 8, 1, 1)),
])
def test_make_mesh_shapes_and_auto_axes(strategy, shape, want):
  mesh = S.make_mesh(MeshConfig(strategy, shape))
  assert mesh.axis_names == MESH_AXES
  assert tuple(mesh.shape[a] for a in MESH_AXES) == want
  assert mesh.axis_types == (AxisType.Auto,) * 4
  assert sorted(d.id for d in mesh.devices.flat) == list(range(8))


def test_make_mesh_on_a_device_subset():
  mesh = S.make_mesh(MeshConfig("dp"), jax.devices()[:2])
  assert mesh.shape["data"] == 2


def spec(names, strategy, stream="replicated"):
  return S.logical_spec(names, MeshConfig(strategy, stream_sharding=stream))


BATCH = ("data", "expert", "fsdp")


def test_rules_per_strategy():
  w_in, w_q, emb = ("embed", "mlp"), ("embed", "heads", "kv"), ("vocab", "embed")
  x = ("batch", "length", "streams", "embed")
  assert spec(w_in, "dp") == P(None, None) and spec(x, "dp") == P(BATCH, None, None, None)
  assert spec(w_in, "fsdp") == P(BATCH, None) and spec(emb, "fsdp") == P(None, BATCH)
  # activations: the batch takes (data, expert, fsdp) first, so `embed` cannot reuse fsdp.
  assert spec(x, "fsdp") == P(BATCH, None, None, None)
  assert spec(w_in, "tp") == P(None, "tensor") and spec(w_q, "tp") == P(None, "tensor", None)
  assert spec(emb, "tp") == P("tensor", None)
  assert spec(w_in, "fsdp_tp") == P(BATCH, "tensor")
  assert spec(w_in, "hsdp") == P("fsdp", None)
  for strategy in STRATEGIES:
    assert spec(("layers", "mhc"), strategy) == P(None, None)
    assert spec(("batch", "length", "streams", "embed"), strategy)[2] is None


def test_stream_sharding_rules():
  x = ("batch", "length", "streams", "embed")
  assert spec(x, "tp", "feature") == P(BATCH, None, None, "tensor")
  assert spec(x, "tp", "sequence") == P(BATCH, "tensor", None, None)
  # model-parallel weights keep their layout: heads/mlp outrank the stream rule for `tensor`.
  assert spec(("embed", "heads", "kv"), "tp", "feature") == P(None, "tensor", None)
  assert spec(("embed", "mlp"), "fsdp_tp", "feature") == P(BATCH, "tensor")
  # attention activations under sequence sharding: heads win (Megatron sequence parallelism).
  assert spec(("batch", "length", "heads", "kv"), "tp", "sequence") == P(BATCH, None, "tensor", None)


def test_rules_cover_every_logical_axis_once_as_fallback():
  for strategy in STRATEGIES:
    for stream in STREAM_SHARDINGS:
      rules = S.logical_rules(MeshConfig(strategy, stream_sharding=stream))
      names = {name for name, _ in rules}
      assert set(LOGICAL_AXES) <= names
      for _, axes in rules:
        for a in (axes if isinstance(axes, tuple) else (axes,)):
          assert a is None or a in MESH_AXES


def test_batch_sharding_splits_rows_over_data_and_fsdp():
  cfg = MeshConfig("fsdp_tp", (2, 2, 2))
  mesh = S.make_mesh(cfg)
  sharding = S.batch_sharding(mesh, cfg)
  tokens = np.arange(8 * 6).reshape(8, 6)
  arr = distributed.global_batch_array(tokens, mesh, cfg)
  np.testing.assert_array_equal(np.asarray(arr), tokens)
  assert arr.sharding == sharding
  assert {s.data.shape for s in arr.addressable_shards} == {(2, 6)}


def test_distributed_requested_from_environment(monkeypatch):
  for var in ("JAX_COORDINATOR_ADDRESS", "SLURM_NTASKS", "SLURM_NPROCS", "TPU_WORKER_HOSTNAMES",
              "OMPI_COMM_WORLD_SIZE"):
    monkeypatch.delenv(var, raising=False)
  assert not distributed.distributed_requested()
  assert distributed.distributed_requested("127.0.0.1:1234")
  monkeypatch.setenv("SLURM_NTASKS", "1")
  assert not distributed.distributed_requested()
  monkeypatch.setenv("SLURM_NTASKS", "4")
  assert distributed.distributed_requested()
  monkeypatch.delenv("SLURM_NTASKS")
  monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "10.0.0.1,10.0.0.2")
  assert distributed.distributed_requested()
