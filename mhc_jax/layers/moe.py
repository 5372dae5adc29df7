"""DeepSeekMoE feed-forward layer as a Linen module: a thin parameter holder over `mhc_jax.ops.moe`.

Variables:
  params     router [C, E] ("embed", None: every token needs all E affinities, so it is not split
             over experts), gate/up [E, C, F] ("experts", "embed", "mlp"), down [E, F, C]
             ("experts", "mlp", "embed"), and with shared experts shared_gate/shared_up [C, S·F]
             ("embed", "mlp"), shared_down [S·F, C] ("mlp", "embed").
  moe_state  bias [E] ("experts"): the auxiliary-loss-free balance bias. Not a param, so the
             optimizer never sees it; a training step updates it with `update_balance_bias`.
  intermediates (sown)  counts [E], load [E] (fraction of the T·k assignments per expert) and, when
             `seq_aux_weight > 0`, seq_aux_loss (a scalar to add to the training loss).

Input `[..., T, C]` (e.g. `[B, T, C]`): all tokens are routed together; the sequence-wise loss is per
sequence (the second-to-last axis). With `with_stats=True` the call returns `(y, stats)` instead, the
statistics as values (`counts [E]`, `seq_aux_loss`, `router_entropy`): the form that passes through
`nn.scan` and `jax.checkpoint` as ordinary outputs (the LM's blocks use it).

`experts`: None (the routed experts are the params above), or an expert source for the layer-
streaming path (`mhc_jax.quant.experts.ExpertStore`): an object whose `fetch(layer, slots)`
returns only the experts a batch routes to (`ops.moe.moe_ffn(fetch=...)`); gate/up/down are then
not params, and the call takes the block's `layer` index.

`implementation`: "auto" (`ops.moe.default_implementation()`: "tiled" on CPU, "ragged" on GPU/TPU),
"ragged", "tiled" or "dense" (see `mhc_jax.ops.moe`).

Expert parallelism: when the active mesh (`jax.sharding.get_abstract_mesh()`, as the kernels use)
has an `expert` axis of size > 1, the FFN runs as `mhc_jax.ops.moe_ep.moe_ffn_ep` inside
`jax.shard_map`: tokens over the batch axes, gate/up/down over `expert` on E, the rest replicated
(GSPMD gathers fsdp/tensor-sharded params at the boundary). Same variables, outputs and statistics;
`implementation` is then ignored (the EP path is ragged). When the tokens do not split evenly over the
batch shards it falls back to the single-program `moe_ffn`.
"""
from __future__ import annotations

import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import traverse_util
from jax.sharding import PartitionSpec as P

from mhc_jax.config.mesh import BATCH_AXES
from mhc_jax.config.moe import MoEConfig
from mhc_jax.ops.moe import balance_bias_update, moe_ffn, sequence_balance_loss
from mhc_jax.ops.moe_ep import moe_ffn_ep

STATE = "moe_state"


class MoE(nn.Module):
  config: MoEConfig
  init_std: float = 0.02
  out_std: float = 0.02
  dtype: Any = jnp.float32
  implementation: str = "auto"
  with_stats: bool = False
  experts: Any = None

  @nn.compact
  def __call__(self, x, layer=None):
    cfg = self.config
    C = x.shape[-1]
    E, F = cfg.n_routed, cfg.d_expert

    def param(name, shape, axes, std):
      init = nn.with_logical_partitioning(nn.initializers.normal(std), axes)
      return self.param(name, init, shape, jnp.float32)

    params = {"router": param("router", (C, E), ("embed", None), self.init_std)}
    fetch = None
    if self.experts is None:
      params["gate"] = param("gate", (E, C, F), ("experts", "embed", "mlp"), self.init_std)
      params["up"] = param("up", (E, C, F), ("experts", "embed", "mlp"), self.init_std)
      params["down"] = param("down", (E, F, C), ("experts", "mlp", "embed"), self.out_std)
    else:
      fetch = functools.partial(self.experts.fetch, layer)
    if cfg.n_shared:
      S = cfg.n_shared * F
      params["shared_gate"] = param("shared_gate", (C, S), ("embed", "mlp"), self.init_std)
      params["shared_up"] = param("shared_up", (C, S), ("embed", "mlp"), self.init_std)
      params["shared_down"] = param("shared_down", (S, C), ("mlp", "embed"), self.out_std)
    bias = self.variable(STATE, "bias",
                         lambda: nn.LogicallyPartitioned(jnp.zeros((E,), jnp.float32),
                                                         names=("experts",)))
    params["bias"] = nn.unbox(bias.value)
    params = {k: nn.unbox(v) for k, v in params.items()}

    lead = x.shape[:-1]
    y_TC, stats = _ffn(x.reshape(-1, C), params, cfg, self.dtype, self.implementation, fetch)
    self.sow("intermediates", "counts", stats["counts"])
    self.sow("intermediates", "load", stats["load"])
    seq_loss = jnp.zeros((), jnp.float32)
    if cfg.seq_aux_weight > 0:
      T = lead[-1] if lead else 1
      aff = stats["affinity"].reshape(-1, T, E)
      ids = stats["expert_ids"].reshape(-1, T, cfg.top_k)
      seq_loss = sequence_balance_loss(aff, ids, alpha=cfg.seq_aux_weight)
      self.sow("intermediates", "seq_aux_loss", seq_loss)
    y = y_TC.reshape(*lead, C)
    if not self.with_stats:
      return y
    return y, {"counts": stats["counts"], "seq_aux_loss": seq_loss,
               "router_entropy": router_entropy(stats["affinity"])}


def _ffn(x_TC, params, cfg: MoEConfig, dtype, implementation, fetch=None):
  """`moe_ffn`, or `moe_ffn_ep` under `shard_map` when the active mesh has an expert axis > 1."""
  kw = dict(top_k=cfg.top_k, routed_scale=cfg.routed_scale, dtype=dtype)
  mesh = jax.sharding.get_abstract_mesh()
  sizes = {} if mesh.empty else dict(zip(mesh.axis_names, mesh.axis_sizes))
  batch = tuple(a for a in BATCH_AXES if a in sizes)
  if (fetch is not None or sizes.get("expert", 1) <= 1
      or x_TC.shape[0] % math.prod(sizes[a] for a in batch)):
    return moe_ffn(x_TC, params, implementation=implementation, fetch=fetch, **kw)
  if cfg.n_routed % sizes["expert"]:
    raise ValueError(f"model.moe.n_routed={cfg.n_routed} must be divisible by the mesh's expert "
                     f"size {sizes['expert']}")
  tok = P(batch)
  p_specs = {k: P("expert") if k in ("gate", "up", "down") else P() for k in params}
  stat_specs = {"counts": P(), "load": P(), "expert_ids": tok, "weights": tok, "affinity": tok}
  fn = functools.partial(moe_ffn_ep, axis_name="expert", batch_axes=batch, **kw)
  return jax.shard_map(fn, mesh=mesh, in_specs=(tok, p_specs), out_specs=(tok, stat_specs))(
      x_TC, params)


def router_entropy(affinity_TE):
  """Mean over tokens of the entropy (nats) of the normalised affinities `s / Σ s`: log E for a
  router that has no preference, 0 for one that puts all weight on one expert."""
  p = affinity_TE / jnp.sum(affinity_TE, axis=-1, keepdims=True)
  return -jnp.mean(jnp.sum(p * jnp.log(jnp.maximum(p, 1e-30)), axis=-1))


def update_balance_bias(moe_state, intermediates, gamma: float):
  """New `moe_state` after one auxiliary-loss-free step: every `.../bias` moves by
  `gamma · sign(mean(load) − load)` with the `counts` (else `load`) sown beside it in `intermediates`
  (the sown tuple of one call; several calls are summed). Boxed (logically partitioned) biases stay boxed."""
  inter = traverse_util.flatten_dict(nn.unbox(intermediates))
  flat = traverse_util.flatten_dict(moe_state)
  out = {}
  for path, b in flat.items():
    if path[-1] != "bias":
      out[path] = b
      continue
    key = path[:-1] + ("counts",)                  # integer counts: exact at the mean
    sown = inter[key if key in inter else path[:-1] + ("load",)]
    load = sum(sown[1:], sown[0]) if isinstance(sown, tuple) else sown
    if isinstance(b, nn.Partitioned):
      out[path] = b.replace_boxed(balance_bias_update(b.value, load, gamma))
    else:
      out[path] = balance_bias_update(b, load, gamma)
  return traverse_util.unflatten_dict(out)
