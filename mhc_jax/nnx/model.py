"""NNX decoder LM with HC / mHC / mHC-lite residual streams (same layout as `mhc_jax.model.LM`).

    h = embed(tokens);  x = expand(h, n)                      [B, T, n, C]
    x = Block_{L-1}( ... Block_0(x))                          each block: attention site, MLP site
    logits = head(RMSNorm(collapse(x)))                       collapse = sum (HC) or learned head (V4)

`scan_layers=True` keeps the blocks as one stacked module `blocks` (leaves `[L, ...]`, logical axis
"layers", created with `nnx.vmap`) run by `jax.lax.scan`; otherwise `block_0 ... block_{L-1}`. The
parameter tree is the Linen `params` tree exactly (`mhc_jax.nnx.convert`).
"""
from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx

from mhc_jax import ops
from mhc_jax.config import ConfigError, ModelConfig, compute_dtype
from mhc_jax.layers.connection import STREAM_AXES
from mhc_jax.remat import POLICIES, mhc_paper_group, mhc_paper_policy
from mhc_jax.nnx.connection import MAPPINGS, CollapseHead, Connection
from mhc_jax.nnx.layers import MLP, Attention, Kernel, _normal
from mhc_jax.nnx.moe import MLA, MoE
from mhc_jax.nnx.norm import RMSNorm, param


class Block(nnx.Module):
  """Attention (site 2l) then the FFN (site 2l + 1), each wrapped by a `Connection`. Attention is
  multi-head with RoPE, or MLA when `cfg.mla`; the FFN a SwiGLU `mlp`, or the DeepSeekMoE `moe` when
  built with `moe=True`. `__call__(x, decode) -> (x, stats)`: stats None for a dense block, else the
  MoE layer's `counts [E]`, `seq_aux_loss`, `router_entropy` (as the Linen `Block`)."""

  def __init__(self, cfg: ModelConfig, layer, dtype, moe: bool = False, *, rngs: nnx.Rngs):
    c, out_std = cfg.d_model, cfg.init_std / math.sqrt(2 * cfg.n_layers)
    conn = lambda site: Connection(cfg.connection, c, site=site, norm_eps=cfg.norm_eps,  # noqa: E731
                                   dtype=dtype, rngs=rngs)
    self.attn_conn = conn(2 * layer)
    if cfg.mla is not None:
      self.attn = MLA(c, cfg.mla, cfg.n_heads, cfg.max_seq_len, rope_theta=cfg.rope_theta,
                      init_std=cfg.init_std, out_std=out_std, dtype=dtype, norm_eps=cfg.norm_eps,
                      rngs=rngs)
    else:
      self.attn = Attention(c, cfg.n_heads, cfg.head_dim, cfg.max_seq_len, rope_theta=cfg.rope_theta,
                            init_std=cfg.init_std, out_std=out_std, dtype=dtype,
                            kv_cache=cfg.kv_cache, rngs=rngs)
    self.mlp_conn = conn(2 * layer + 1)
    self.is_moe = moe
    if moe:
      self.moe = MoE(c, cfg.moe, init_std=cfg.init_std, out_std=out_std, dtype=dtype, rngs=rngs)
    else:
      self.mlp = MLP(c, cfg.ff_dim, init_std=cfg.init_std, out_std=out_std, dtype=dtype, rngs=rngs)

  def __call__(self, x, decode: bool = False):
    x = nn.with_logical_constraint(self.attn_conn(x, lambda u: self.attn(u, decode)), STREAM_AXES)
    if not self.is_moe:
      return nn.with_logical_constraint(self.mlp_conn(x, self.mlp), STREAM_AXES), None
    stats = {}

    def ffn(u):
      y, st = self.moe(u)
      stats.update(st)
      return y
    x = nn.with_logical_constraint(self.mlp_conn(x, ffn), STREAM_AXES)
    return x, stats


class LM(nnx.Module):
  """`__call__(tokens [B, T] int, *, decode=False, return_stats=False) -> logits [B, T, V] float32`.

  `decode=True` runs on the KV cache made by `init_cache` (capacity `cfg.max_seq_len`).
  `return_stats=True` returns `(logits, stats)`: for an MoE model (`cfg.moe`) the MoE layers'
  statistics stacked in layer order, `counts [L_moe, E]`, `router_entropy [L_moe]` and
  `seq_aux_loss` (their sum; the Linen `moe_stats` collection), else None.
  `mappings(tokens)` gives the sown `h_pre, h_post, h_res` stacked over the 2L sites.
  `cfg.remat` ("full", "dots", "mhc_paper" recompute groups) applies to the plain forward / training;
  `mappings` and decode run without recomputation, as in the Linen LM.
  An MoE model with `scan_layers` has two stacks, `dense_blocks` (the `n_dense_layers` leading dense
  blocks, if any) and `blocks` (the MoE blocks); mhc_paper groups run within each stack, as in Linen.
  The MoE balance biases are `MoEState` variables (`mhc_jax.nnx.convert.to_linen_moe_state`).
  """

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    if not isinstance(cfg, ModelConfig):
      raise ConfigError(f"cfg={cfg!r} is not allowed: a mhc_jax.config.ModelConfig")
    self.cfg = cfg
    self.dtype = dtype = compute_dtype(cfg.dtype)
    self.embed = Embedding(_normal(rngs, (cfg.vocab_size, cfg.d_model), cfg.init_std))
    if cfg.scan_layers:
      def make_stack(start, stop, moe):
        @nnx.split_rngs(splits=stop - start)
        @nnx.vmap(in_axes=(0, 0), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
        def stack(rngs, layer):
          return Block(cfg, layer, dtype, moe, rngs=rngs)
        return stack(rngs, jnp.arange(start, stop))
      for name, start, stop, moe in self._stack_spans():
        setattr(self, name, make_stack(start, stop, moe))
    else:
      for layer in range(cfg.n_layers):
        setattr(self, f"block_{layer}", Block(cfg, layer, dtype, cfg.is_moe_layer(layer), rngs=rngs))
    if cfg.collapse == "head":
      self.collapse = CollapseHead(cfg.connection.n, cfg.d_model, eps=cfg.connection.pre_eps,
                                   norm_eps=cfg.connection.norm_eps)
    self.final_norm = RMSNorm(cfg.d_model, cfg.norm_eps, dtype)
    if not cfg.tie_embeddings:
      self.lm_head = Kernel(_normal(rngs, (cfg.d_model, cfg.vocab_size), cfg.init_std),
                            ("embed", "vocab"))

  def _stack_spans(self):
    """`(name, first layer, end, moe)` of the scanned stacks, in layer order."""
    cfg = self.cfg
    if cfg.moe is None:
      return [("blocks", 0, cfg.n_layers, False)]
    spans = [("dense_blocks", 0, cfg.n_dense_layers, False)] if cfg.n_dense_layers else []
    return spans + [("blocks", cfg.n_dense_layers, cfg.n_layers, True)]

  def __call__(self, tokens_BT, *, decode: bool = False, return_stats: bool = False):
    logits, _, stats = self._forward(tokens_BT, decode, record=False)
    return (logits, stats) if return_stats else logits

  def mappings(self, tokens_BT) -> dict[str, jax.Array]:
    """`{"h_pre": [S, B, T, n], "h_post": [S, B, T, n], "h_res": [S, B, T, n, n]}` over the
    S = 2L sites in order (attn_0, mlp_0, attn_1, ...), as `mhc_jax.model.collect_mappings`;
    empty for `kind="residual"`."""
    return self._forward(tokens_BT, False, record=True)[1]

  def init_cache(self, batch_size: int):
    """Zero KV caches in every attention (`nnx.Cache`, stacked `[L, ...]` per stack with
    `scan_layers`)."""
    if self.cfg.scan_layers:
      @nnx.vmap(in_axes=0, out_axes=None)
      def init(block):
        block.attn.init_cache(batch_size)
      for name, *_ in self._stack_spans():
        graphdef, state = nnx.split(getattr(self, name))
        blocks = nnx.merge(graphdef, state)
        init(blocks)   # nnx.vmap adds the per-layer caches with a leading [L] axis
        setattr(self, name, blocks)
    else:
      for layer in range(self.cfg.n_layers):
        getattr(self, f"block_{layer}").attn.init_cache(batch_size)

  def _forward(self, tokens_BT, decode, record):
    cfg = self.cfg
    h_BTC = self.embed(tokens_BT, self.dtype)
    x = nn.with_logical_constraint(ops.expand_streams(h_BTC, cfg.connection.n), STREAM_AXES)
    x, maps, stats = self._blocks(x, decode, record)
    h_BTC = self.collapse(x) if cfg.collapse == "head" else ops.collapse_streams(x)
    h_BTC = self.final_norm(h_BTC)
    if cfg.tie_embeddings:
      logits = self.embed.attend(h_BTC, self.dtype)
    else:
      logits = jnp.einsum("btc,cv->btv", h_BTC.astype(self.dtype),
                          self.lm_head.kernel[...].astype(self.dtype))
    logits = nn.with_logical_constraint(logits.astype(jnp.float32), ("batch", "length", "vocab"))
    return logits, maps, stats

  def _blocks(self, x, decode, record):
    """Run the L blocks (unrolled or `lax.scan` per stack) with the remat policy, in recompute groups
    for remat="mhc_paper" (`mhc_jax.remat.mhc_paper_group`); returns `(x, mappings, moe stats)`."""
    cfg = self.cfg
    policy_name = cfg.remat if not (decode or record) else "none"
    if policy_name == "mhc_paper":
      g = cfg.remat_group or mhc_paper_group(cfg.connection.n, cfg.n_layers)
      policy = mhc_paper_policy(cfg.connection.n)
    else:
      g, policy = 1, POLICIES.get(policy_name)

    def make_group(graphdefs):
      def group(x, group_states):
        """Blocks on their (params, rest) states -> (x, (new caches, sown mappings, MoE stats))."""
        caches, maps, stats = [], [], []
        for graphdef, state in zip(graphdefs, group_states):
          block = nnx.merge(graphdef, *state)
          (x, st), sown = nnx.capture(block, nnx.Intermediate)(x, decode)
          maps.append(_site_maps(nnx.to_pure_dict(sown)) if record else {})
          caches.append(nnx.state(block, nnx.Cache))
          stats.append(st)
        return x, (caches, maps, stats)
      if policy_name != "none":
        group = jax.checkpoint(group, policy=policy, prevent_cse=not cfg.scan_layers)
      return group

    if not cfg.scan_layers:
      blocks = [getattr(self, f"block_{l}") for l in range(cfg.n_layers)]
      splits = [nnx.split(b, nnx.Param, ...) for b in blocks]
      caches, maps, stats = [], [], []
      for start in range(0, cfg.n_layers, g):
        part = splits[start:start + g]
        x, (c, m, st) = make_group([p[0] for p in part])(x, [p[1:] for p in part])
        caches += c
        maps += m
        stats += st
      for b, c in zip(blocks, caches):
        nnx.update(b, c)
      return x, _stack_sites(maps, record), _stack_stats(stats)

    maps, stats = [], []
    for name, *_ in self._stack_spans():
      x, m, st = self._run_stack(getattr(self, name), x, g, make_group)
      maps += m
      stats += st
    return x, _stack_sites(maps, record), _stack_stats(stats)

  @staticmethod
  def _run_stack(stack, x, g, make_group):
    """One scanned stack: its full groups of g blocks in a `lax.scan`, a shorter last group after
    it. Returns `(x, per-layer mappings, per-layer stats)` and writes the new caches."""
    graphdef, params, rest = nnx.split(stack, nnx.Param, ...)
    length = jax.tree.leaves(params)[0].shape[0]
    n_full = length // g
    caches, per_maps, per_stats = None, [], []
    if n_full:
      full = jax.tree.map(lambda a: a[:n_full * g].reshape(n_full, g, *a.shape[1:]), (params, rest))
      group = make_group([graphdef] * g)

      def body(x, s):
        x, (c, m, st) = group(x, [jax.tree.map(lambda a: a[i], s) for i in range(g)])
        return x, (jax.tree.map(lambda *a: jnp.stack(a), *c), m, st)

      x, (caches, m, st) = jax.lax.scan(body, x, full)
      caches = jax.tree.map(lambda a: a.reshape(n_full * g, *a.shape[2:]), caches)
      # layers l = k*g + i of the scanned groups
      per_maps = [jax.tree.map(lambda a: a[k], m[i]) for k in range(n_full) for i in range(g)]
      per_stats = [jax.tree.map(lambda a: a[k], st[i]) for k in range(n_full) for i in range(g)]
    rest_layers = list(range(n_full * g, length))
    if rest_layers:   # mhc_paper: a shorter last group
      group = make_group([graphdef] * len(rest_layers))
      x, (c, m, st) = group(x, [jax.tree.map(lambda a: a[l], (params, rest)) for l in rest_layers])
      if caches is None:
        caches = jax.tree.map(lambda *b: jnp.stack(b), *c)
      else:
        caches = jax.tree.map(lambda a, *b: jnp.concatenate([a, jnp.stack(b)]), caches, *c)
      per_maps += m
      per_stats += st
    nnx.update(stack, caches)
    return x, per_maps, per_stats


def _stack_stats(per_layer) -> dict | None:
  """MoE statistics stacked over the MoE layers (None entries are dense layers)."""
  per_layer = [s for s in per_layer if s is not None]
  if not per_layer:
    return None
  return {"counts": jnp.stack([s["counts"] for s in per_layer]),
          "router_entropy": jnp.stack([s["router_entropy"] for s in per_layer]),
          "seq_aux_loss": sum((s["seq_aux_loss"] for s in per_layer[1:]), per_layer[0]["seq_aux_loss"])}


def _site_maps(sown) -> dict:
  """`{"attn_conn": {"h_pre": ...}, "mlp_conn": ...}` from a block's popped intermediates."""
  out = {}
  for site in ("attn_conn", "mlp_conn"):
    if site in sown:
      out[site] = {k: sown[site][k][0] for k in MAPPINGS if k in sown[site]}
  return out


def _stack_sites(per_layer, record) -> dict:
  if not record or not per_layer or not per_layer[0]:
    return {}
  return {k: jnp.stack([m[s][k] for m in per_layer for s in ("attn_conn", "mlp_conn")])
          for k in MAPPINGS}


class Embedding(nnx.Module):
  """Token embedding `embedding [V, C]` (the Linen `nn.Embed`); `attend` is the tied output head."""

  def __init__(self, value):
    self.embedding = param(value, ("vocab", "embed"))

  def __call__(self, tokens, dtype):
    return jnp.take(self.embedding[...].astype(dtype), tokens, axis=0)

  def attend(self, h, dtype):
    return jnp.dot(h.astype(dtype), self.embedding[...].astype(dtype).T)
