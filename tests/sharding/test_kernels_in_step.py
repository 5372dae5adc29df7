"""The connection kernels inside the sharded training step (`implementation="interpret"`, the same
kernel bodies the GPU/TPU compile) equal the XLA path in loss and gradients under every strategy and
stream sharding, and add no all-gather and no collective bytes: each device runs the kernels on its
own block through `shard_map` (a kernel called on the global arrays would gather every stream)."""
import dataclasses
import functools

import jax
import numpy as np
import pytest

from mhc_jax.config import (STRATEGIES, STREAM_SHARDINGS, ConnectionConfig, DataConfig, MeshConfig,
                            ModelConfig, RunConfig)
from mhc_jax import sharding as S
from mhc_jax.model import LM
from mhc_jax.tools.hlo import collective_stats
from mhc_jax.train.step import loss_fn

pytestmark = pytest.mark.slow

B, T, C, N = 8, 8, 32, 4
MODEL = ModelConfig(vocab_size=256, d_model=C, n_layers=1, n_heads=4, d_ff=64, max_seq_len=T,
                    dtype="float32", connection=ConnectionConfig(kind="mhc", n_streams=N,
                                                                 sinkhorn_iters=3))
SHAPES = {"dp": (4, 1, 2), "fsdp": (1, 4, 2), "tp": (2, 1, 4), "fsdp_tp": (1, 4, 2),
          "hsdp": (2, 2, 2), "ep": (4, 1, 2)}
CASES = [(s, st) for s in STRATEGIES for st in STREAM_SHARDINGS]


def _cfg(impl):
  conn = dataclasses.replace(MODEL.connection, implementation=impl)
  return RunConfig(model=dataclasses.replace(MODEL, connection=conn),
                   data=DataConfig(seq_len=T, batch_size=B))


@functools.lru_cache(maxsize=None)
def _inputs():
  k_init, k_tok = jax.random.split(jax.random.key(0))
  tokens = jax.random.randint(k_tok, (B, T + 1), 0, MODEL.vocab_size)
  batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}
  boxed = jax.eval_shape(lambda: LM(MODEL).init(k_init, batch["inputs"]))["params"]
  params = jax.jit(lambda: LM(MODEL).init(k_init, batch["inputs"]))()["params"]
  import flax.linen as nn
  params = nn.meta.unbox(params)
  # Perturb the connection parameters so every mapping (and its gradient) is far from its init.
  params = jax.tree.map(lambda p: p + 0.05 * jax.random.normal(jax.random.key(3), p.shape), params)
  return params, boxed, batch


def _run(impl, mesh_cfg):
  params, boxed, batch = _inputs()
  cfg = _cfg(impl)
  mesh = S.make_mesh(mesh_cfg)
  p_sh = S.param_shardings(boxed, mesh, mesh_cfg)
  b_sh = S.batch_sharding(mesh, mesh_cfg)

  def grads(p, b):   # a fresh function per layout (jit does not key its cache on Flax's rules)
    (total, _), g = jax.value_and_grad(loss_fn, has_aux=True)(p, b, cfg)
    return total, g
  fn = jax.jit(grads, in_shardings=(p_sh, {"inputs": b_sh, "targets": b_sh}),
               out_shardings=(S.replicated(mesh), p_sh))
  with S.sharding_context(mesh, mesh_cfg):
    compiled = fn.lower(params, batch).compile()
  loss, g = compiled(jax.device_put(params, p_sh), jax.device_put(batch, b_sh))
  return float(loss), jax.tree.map(np.asarray, g), collective_stats(compiled.as_text())


@pytest.mark.parametrize("strategy, stream", CASES)
def test_kernels_in_sharded_step_equal_xla_without_extra_collectives(strategy, stream):
  mesh_cfg = MeshConfig(strategy, SHAPES[strategy], stream)
  loss_x, grads_x, coll_x = _run("xla", mesh_cfg)
  loss_k, grads_k, coll_k = _run("interpret", mesh_cfg)
  np.testing.assert_allclose(loss_k, loss_x, rtol=1e-5)
  for (path, a), b in zip(jax.tree.leaves_with_path(grads_k), jax.tree.leaves(grads_x)):
    scale = float(np.abs(b).max()) + 1e-12
    np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-5 * scale,
                               err_msg=jax.tree_util.keystr(path))
  assert coll_k["all-gather"]["count"] <= coll_x["all-gather"]["count"], (coll_k, coll_x)
  total = lambda c: sum(v["bytes"] for v in c.values())  # noqa: E731
  assert total(coll_k) <= total(coll_x), (coll_k, coll_x)
