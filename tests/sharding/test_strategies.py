"""Every strategy (and stream sharding) gives the single-device loss and gradients; memory orders.

The loss is the training loss (`mhc_jax.train.step.loss_fn`) of a small mHC LM; the sharded version
is traced under `sharding_context` so the model's activation constraints take effect.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from mhc_jax import sharding as S
from mhc_jax.config import (MESH_AXES, ConnectionConfig, DataConfig, MeshConfig, ModelConfig,
                            RunConfig)
from mhc_jax.model import LM
from mhc_jax.train.step import loss_fn

pytestmark = pytest.mark.slow

MODEL = ModelConfig(vocab_size=256, d_model=32, n_layers=2, n_heads=8, d_ff=64, max_seq_len=16,
                    dtype="float32", connection=ConnectionConfig(kind="mhc", n_streams=4,
                                                                 sinkhorn_iters=4))
CFG = RunConfig(model=MODEL, data=DataConfig(seq_len=16, batch_size=8))
B, T = 8, 16


def _setup():
  k_init, k_tok = jax.random.split(jax.random.key(0))
  tokens = jax.random.randint(k_tok, (B, T + 1), 0, MODEL.vocab_size)
  batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}
  boxed = jax.eval_shape(lambda: LM(MODEL).init(k_init, batch["inputs"]))["params"]
  params = jax.jit(lambda: LM(MODEL).init(k_init, batch["inputs"]))()["params"]
  import flax.linen as nn
  return nn.meta.unbox(params), boxed, batch


PARAMS, BOXED, BATCH = _setup()


def _grad_fn(params, batch):
  (total, _), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch, CFG)
  return total, grads


@pytest.fixture(scope="module")
def reference():
  dev = jax.devices()[0]
  params, batch = jax.device_put((PARAMS, BATCH), dev)
  loss, grads = jax.jit(_grad_fn)(params, batch)
  return float(loss), jax.tree.map(np.asarray, grads)


@functools.lru_cache(maxsize=None)
def _compiled(mesh_cfg):
  mesh = S.make_mesh(mesh_cfg)
  p_sh = S.param_shardings(BOXED, mesh, mesh_cfg)
  b_sh = S.batch_sharding(mesh, mesh_cfg)
  # a fresh function per layout: jit caches traces by function, and Flax's logical rules are not
  # part of that key (the same function traced under other rules would reuse the first trace)
  fn = jax.jit(lambda p, b: _grad_fn(p, b), in_shardings=(p_sh, {"inputs": b_sh, "targets": b_sh}),
               out_shardings=(S.replicated(mesh), p_sh))
  with S.sharding_context(mesh, mesh_cfg):
    compiled = fn.lower(PARAMS, BATCH).compile()
  return mesh, p_sh, compiled


CASES = [("dp", None, "replicated"), ("fsdp", None, "replicated"), ("tp", None, "replicated"),
         ("fsdp_tp", (1, 4, 2), "replicated"), ("hsdp", (2, 4, 1), "replicated"), ("ep", (4, 1, 2), "replicated"),
         ("tp", (2, 1, 4), "feature"), ("tp", (2, 1, 4), "sequence")]


@pytest.mark.parametrize("strategy, shape, stream", CASES)
def test_strategy_matches_single_device(strategy, shape, stream, reference):
  cfg = MeshConfig(strategy, shape, stream)
  mesh, p_sh, compiled = _compiled(cfg)
  params = jax.device_put(PARAMS, p_sh)
  b_sh = S.batch_sharding(mesh, cfg)
  batch = jax.device_put(BATCH, b_sh)
  loss, grads = compiled(params, batch)
  ref_loss, ref_grads = reference
  np.testing.assert_allclose(float(loss), ref_loss, rtol=1e-5)
  flat, flat_ref = jax.tree.leaves_with_path(grads), jax.tree.leaves(ref_grads)
  for (path, g), r in zip(flat, flat_ref):
    scale = float(np.abs(r).max()) + 1e-12
    np.testing.assert_allclose(np.asarray(g), r, rtol=2e-4, atol=2e-5 * scale,
                               err_msg=jax.tree_util.keystr(path))
  # the layout really is the strategy's: params are split where the rules say
  q = params["blocks"]["attn"]["query"]["kernel"]        # [L, embed, heads, kv]
  d, e, f, t = (mesh.shape[a] for a in MESH_AXES)
  want = {"dp": 1, "fsdp": d * e * f, "tp": t, "fsdp_tp": d * e * f * t, "hsdp": f, "ep": 1}[strategy]
  assert q.addressable_shards[0].data.size * want == q.size


def test_stream_sharding_constrains_the_residual_streams():
  """The model's `[B, T, n, C]` constraints follow the stream sharding in the lowered program."""
  want = {"replicated": '[{"data", "expert", "fsdp"}, {}, {}, {}]',
          "feature": '[{"data", "expert", "fsdp"}, {}, {}, {"tensor"}]',
          "sequence": '[{"data", "expert", "fsdp"}, {"tensor"}, {}, {}]'}
  for stream, spec in want.items():
    cfg = MeshConfig("tp", (2, 1, 4), stream)
    mesh = S.make_mesh(cfg)
    p_sh = S.param_shardings(BOXED, mesh, cfg)
    b_sh = S.batch_sharding(mesh, cfg)
    fn = jax.jit(lambda p, b: _grad_fn(p, b), in_shardings=(p_sh, {"inputs": b_sh, "targets": b_sh}))
    with S.sharding_context(mesh, cfg):
      text = fn.lower(PARAMS, BATCH).as_text()
    streams = {line.split("<@mesh, ")[1].split(">")[0] for line in text.splitlines()
               if "sharding_constraint" in line and f"tensor<{B}x{T}x4x32xf32>" in line}
    assert streams == {spec}, (stream, streams)


def test_argument_bytes_order_dp_over_fsdp_and_tp():
  args = {}
  for strategy in ("dp", "fsdp", "tp"):
    args[strategy] = _compiled(MeshConfig(strategy))[2].memory_analysis().argument_size_in_bytes
  # not 8x: in this tiny model the replicated mHC projections `phi [nC, n^2+2n]` are ~30% of params
  assert args["dp"] > 2 * args["fsdp"], args
  assert args["dp"] > 2 * args["tp"], args
