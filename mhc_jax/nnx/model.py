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
from mhc_jax.nnx.norm import RMSNorm, param


class Block(nnx.Module):
  """Attention (site 2l) then SwiGLU MLP (site 2l + 1), each wrapped by a `Connection`."""

  def __init__(self, cfg: ModelConfig, layer, dtype, *, rngs: nnx.Rngs):
    c, out_std = cfg.d_model, cfg.init_std / math.sqrt(2 * cfg.n_layers)
    conn = lambda site: Connection(cfg.connection, c, site=site, norm_eps=cfg.norm_eps,  # noqa: E731
                                   dtype=dtype, rngs=rngs)
    self.attn_conn = conn(2 * layer)
    self.attn = Attention(c, cfg.n_heads, cfg.head_dim, cfg.max_seq_len, rope_theta=cfg.rope_theta,
                          init_std=cfg.init_std, out_std=out_std, dtype=dtype, rngs=rngs)
    self.mlp_conn = conn(2 * layer + 1)
    self.mlp = MLP(c, cfg.ff_dim, init_std=cfg.init_std, out_std=out_std, dtype=dtype, rngs=rngs)

  def __call__(self, x, decode: bool = False):
    x = nn.with_logical_constraint(self.attn_conn(x, lambda u: self.attn(u, decode)), STREAM_AXES)
    return nn.with_logical_constraint(self.mlp_conn(x, self.mlp), STREAM_AXES)


class LM(nnx.Module):
  """`__call__(tokens [B, T] int, *, decode=False) -> logits [B, T, V] float32`.

  `decode=True` runs on the KV cache made by `init_cache` (capacity `cfg.max_seq_len`).
  `mappings(tokens)` gives the sown `h_pre, h_post, h_res` stacked over the 2L sites.
  `cfg.remat` ("full", "dots", "mhc_paper" recompute groups) applies to the plain forward / training;
  `mappings` and decode run without recomputation, as in the Linen LM.
  """

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    if not isinstance(cfg, ModelConfig):
      raise ConfigError(f"cfg={cfg!r} is not allowed: a mhc_jax.config.ModelConfig")
    self.cfg = cfg
    self.dtype = dtype = compute_dtype(cfg.dtype)
    self.embed = Embedding(_normal(rngs, (cfg.vocab_size, cfg.d_model), cfg.init_std))
    if cfg.scan_layers:
      @nnx.split_rngs(splits=cfg.n_layers)
      @nnx.vmap(in_axes=(0, 0), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
      def stack(rngs, layer):
        return Block(cfg, layer, dtype, rngs=rngs)
      self.blocks = stack(rngs, jnp.arange(cfg.n_layers))
    else:
      for layer in range(cfg.n_layers):
        setattr(self, f"block_{layer}", Block(cfg, layer, dtype, rngs=rngs))
    if cfg.collapse == "head":
      self.collapse = CollapseHead(cfg.connection.n, cfg.d_model, eps=cfg.connection.pre_eps,
                                   norm_eps=cfg.connection.norm_eps)
    self.final_norm = RMSNorm(cfg.d_model, cfg.norm_eps, dtype)
    if not cfg.tie_embeddings:
      self.lm_head = Kernel(_normal(rngs, (cfg.d_model, cfg.vocab_size), cfg.init_std),
                            ("embed", "vocab"))

  def __call__(self, tokens_BT, *, decode: bool = False):
    return self._forward(tokens_BT, decode, record=False)[0]

  def mappings(self, tokens_BT) -> dict[str, jax.Array]:
    """`{"h_pre": [S, B, T, n], "h_post": [S, B, T, n], "h_res": [S, B, T, n, n]}` over the
    S = 2L sites in order (attn_0, mlp_0, attn_1, ...), as `mhc_jax.model.collect_mappings`;
    empty for `kind="residual"`."""
    return self._forward(tokens_BT, False, record=True)[1]

  def init_cache(self, batch_size: int):
    """Zero KV caches in every attention (`nnx.Cache`, stacked `[L, ...]` with `scan_layers`)."""
    if self.cfg.scan_layers:
      @nnx.vmap(in_axes=0, out_axes=None)
      def init(block):
        block.attn.init_cache(batch_size)
      graphdef, state = nnx.split(self.blocks)
      blocks = nnx.merge(graphdef, state)
      init(blocks)   # nnx.vmap adds the per-layer caches with a leading [L] axis
      self.blocks = blocks
    else:
      for layer in range(self.cfg.n_layers):
        getattr(self, f"block_{layer}").attn.init_cache(batch_size)

  def _forward(self, tokens_BT, decode, record):
    cfg = self.cfg
    h_BTC = self.embed(tokens_BT, self.dtype)
    x = nn.with_logical_constraint(ops.expand_streams(h_BTC, cfg.connection.n), STREAM_AXES)
    x, maps = self._blocks(x, decode, record)
    h_BTC = self.collapse(x) if cfg.collapse == "head" else ops.collapse_streams(x)
    h_BTC = self.final_norm(h_BTC)
    if cfg.tie_embeddings:
      logits = self.embed.attend(h_BTC, self.dtype)
    else:
      logits = jnp.einsum("btc,cv->btv", h_BTC.astype(self.dtype),
                          self.lm_head.kernel[...].astype(self.dtype))
    logits = nn.with_logical_constraint(logits.astype(jnp.float32), ("batch", "length", "vocab"))
    return logits, maps

  def _blocks(self, x, decode, record):
    """Run the L blocks (unrolled or `lax.scan`) with the remat policy, in recompute groups for
    remat="mhc_paper" (`mhc_jax.remat.mhc_paper_group`); returns `(x, mappings)`."""
    cfg = self.cfg
    if cfg.scan_layers:
      graphdef, params, rest = nnx.split(self.blocks, nnx.Param, ...)
      layer_state = lambda i: jax.tree.map(lambda a: a[i], (params, rest))  # noqa: E731
    else:
      blocks = [getattr(self, f"block_{l}") for l in range(cfg.n_layers)]
      graphdef, _, _ = nnx.split(blocks[0], nnx.Param, ...)
      states = [nnx.split(b, nnx.Param, ...)[1:] for b in blocks]

    def run(x, state):
      """One block on its (params, rest) state -> (x, new cache, sown mappings)."""
      block = nnx.merge(graphdef, *state)
      x, sown = nnx.capture(block, nnx.Intermediate)(x, decode)
      maps = _site_maps(nnx.to_pure_dict(sown)) if record else {}
      return x, nnx.state(block, nnx.Cache), maps

    policy_name = cfg.remat if not (decode or record) else "none"
    if policy_name == "mhc_paper":
      g = cfg.remat_group or mhc_paper_group(cfg.connection.n, cfg.n_layers)
      policy = mhc_paper_policy(cfg.connection.n)
    else:
      g, policy = 1, POLICIES.get(policy_name)

    def group(x, group_states):
      caches, maps = [], []
      for state in group_states:
        x, cache, m = run(x, state)
        caches.append(cache)
        maps.append(m)
      return x, (caches, maps)

    if policy_name != "none":
      group = jax.checkpoint(group, policy=policy, prevent_cse=not cfg.scan_layers)

    if not cfg.scan_layers:
      caches, maps = [], []
      for start in range(0, cfg.n_layers, g):
        x, (c, m) = group(x, states[start:start + g])
        caches += c
        maps += m
      for b, c in zip(blocks, caches):
        nnx.update(b, c)
      return x, _stack_sites(maps, record)

    n_full = cfg.n_layers // g
    full = jax.tree.map(lambda a: a[:n_full * g].reshape(n_full, g, *a.shape[1:]), (params, rest))

    def body(x, s):
      x, (c, m) = group(x, [jax.tree.map(lambda a: a[i], s) for i in range(g)])
      return x, (jax.tree.map(lambda *a: jnp.stack(a), *c), m)

    x, (caches, maps) = jax.lax.scan(body, x, full)
    caches = jax.tree.map(lambda a: a.reshape(n_full * g, *a.shape[2:]), caches)
    rest_layers = list(range(n_full * g, cfg.n_layers))
    if rest_layers:   # mhc_paper: a shorter last group
      x, (c, m) = group(x, [layer_state(l) for l in rest_layers])
      caches = jax.tree.map(lambda a, *b: jnp.concatenate([a, jnp.stack(b)]), caches, *c)
    else:
      m = []
    nnx.update(self.blocks, caches)
    if not record:
      return x, {}
    # order the sites: layers l = k*g + i for the scanned groups, then the rest
    per_layer = [jax.tree.map(lambda a: a[k], maps[i]) for k in range(n_full) for i in range(g)] + m
    return x, _stack_sites(per_layer, record)


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
