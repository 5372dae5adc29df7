"""Sharded NNX LM on 8 fake CPU devices: created directly sharded (`nnx.get_partition_spec` +
`jax.jit(out_shardings=...)`), one `nnx.Optimizer` step; same loss, grads and update as one device."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding

from mhc_jax import nnx as mnnx
from mhc_jax import sharding as msh
from mhc_jax.config import ConnectionConfig, ModelConfig, TrainConfig
from mhc_jax.train.optimizer import make_optimizer
from mhc_jax.train.step import token_losses

CFG = ModelConfig(vocab_size=32, d_model=16, n_layers=2, n_heads=2, max_seq_len=8, dtype="float32",
                  connection=ConnectionConfig(kind="mhc", n_streams=2))
# adam_eps well above the gradients' float noise: a first Adam step is g / (|g| + eps)
TX = make_optimizer(TrainConfig(lr=1e-2, warmup_steps=0, steps=10, adam_eps=1e-3))


def _loss(model, tok):
  return jnp.mean(token_losses(model(tok[:, :-1]), tok[:, 1:])[0])


def _step(model, opt, tok):
  loss, grads = nnx.value_and_grad(_loss)(model, tok)
  opt.update(model, grads)
  return loss, grads


def _create():
  return mnnx.LM(CFG, rngs=nnx.Rngs(0))


@pytest.mark.parametrize("strategy,shape", [("dp", None),
                                            pytest.param("fsdp_tp", (1, 4, 2), marks=pytest.mark.slow)])
def test_sharded_nnx_matches_single_device(strategy, shape):
  tok = jax.random.randint(jax.random.PRNGKey(1), (8, 9), 0, CFG.vocab_size)
  ref = _create()
  ref_opt = nnx.Optimizer(ref, TX, wrt=nnx.Param)
  ref_loss, ref_grads = nnx.jit(_step)(ref, ref_opt, tok)

  mesh_cfg = msh.MeshConfig(strategy=strategy, shape=shape)
  mesh = msh.make_mesh(mesh_cfg)
  with msh.sharding_context(mesh, mesh_cfg):
    abstract = nnx.eval_shape(_create)
    graphdef, abs_state = nnx.split(abstract)
    shardings = nnx.get_named_sharding(abs_state, mesh)
    state = jax.jit(lambda: nnx.split(_create())[1], out_shardings=shardings)()
    model = nnx.merge(graphdef, state)
    opt = nnx.Optimizer(model, TX, wrt=nnx.Param)
    tok_s = jax.device_put(tok, msh.batch_sharding(mesh, mesh_cfg))
    loss, grads = nnx.jit(_step)(model, opt, tok_s)
    specs = nnx.to_pure_dict(nnx.get_partition_spec(abs_state))

  if strategy == "fsdp_tp":
    # NNX reads the rules as a dict (the last rule of a name wins): embed -> ("data", "fsdp"), the
    # rule Linen keeps for expert weights (Linen gives dense weights ("data", "expert", "fsdp"))
    assert specs["embed"]["embedding"] == jax.sharding.PartitionSpec("tensor", ("data", "fsdp"))
    assert specs["blocks"]["attn"]["query"]["kernel"][2] == "tensor"
    emb = model.embed.embedding[...]
    assert emb.sharding.is_equivalent_to(NamedSharding(mesh, specs["embed"]["embedding"]), emb.ndim)
    assert emb.addressable_shards[0].data.shape == (CFG.vocab_size // 2, CFG.d_model // 4)
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(nnx.to_pure_dict(grads)), jax.tree.leaves(nnx.to_pure_dict(ref_grads))):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
  for a, b in zip(jax.tree.leaves(mnnx.to_linen_params(model)), jax.tree.leaves(mnnx.to_linen_params(ref))):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
  assert isinstance(shardings["embed"]["embedding"].get_value(), NamedSharding)


def test_kernel_path_under_mesh_matches_unsharded():
  """`implementation="interpret"` from NNX under a dp mesh: the kernels run under `shard_map`."""
  cfg = ConnectionConfig(kind="mhc", n_streams=2, implementation="interpret")
  conn = mnnx.Connection(cfg, 16, rngs=nnx.Rngs(0))
  conn.b[...] = conn.b[...] + jax.random.normal(jax.random.PRNGKey(3), conn.b.shape)
  x = jax.random.normal(jax.random.PRNGKey(4), (8, 4, 2, 16))
  mlp = lambda u: jnp.tanh(u)  # noqa: E731
  want = conn(x, mlp)
  mesh_cfg = msh.MeshConfig(strategy="dp")
  mesh = msh.make_mesh(mesh_cfg)
  with msh.sharding_context(mesh, mesh_cfg):
    got = nnx.jit(lambda c, x: c(x, mlp))(conn, jax.device_put(x, NamedSharding(mesh, msh.logical_spec(
        ("batch", "length", "streams", "embed"), mesh_cfg))))
    assert "shard_map" in str(jax.make_jaxpr(lambda x: conn(x, mlp))(x))
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
