"""A restore target the mesh cannot hold is a config error: the checkpoint must stay where it is."""
import os

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from mhc_jax.checkpoint import Checkpointer
from mhc_jax.config import ConfigError


def test_bad_target_sharding_raises_and_keeps_the_checkpoint(tmp_path):
  ck = Checkpointer(str(tmp_path), async_save=False)
  ck.save(1, {"w": jnp.arange(12.0).reshape(6, 2)}, meta={"note": "good"}, wait=True)
  mesh = jax.make_mesh((4,), ("x",), axis_types=(jax.sharding.AxisType.Auto,),
                       devices=jax.devices()[:4])
  bad = {"w": jax.ShapeDtypeStruct((6, 2), jnp.float32, sharding=NamedSharding(mesh, P("x")))}
  with pytest.raises(ConfigError, match="shape \\(6, 2\\)"):
    ck.restore_latest(bad)
  assert os.listdir(tmp_path) == ["1"]            # not moved aside as ".corrupt"
  good = {"w": jax.ShapeDtypeStruct((6, 2), jnp.float32, sharding=NamedSharding(mesh, P()))}
  state, meta, step = ck.restore_latest(good)
  assert step == 1 and meta["note"] == "good" and float(state["w"].sum()) == 66.0
  ck.close()
