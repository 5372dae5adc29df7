"""Decoder LM with HC / mHC / mHC-lite residual streams.

    h = embed(tokens);  x = expand(h, n)                      [B, T, n, C]
    x = Block_{L-1}( ... Block_0(x))                          each block: attention site, MLP site
    logits = head(RMSNorm(collapse(x)))                       collapse = sum (HC) or learned head (V4)
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from mhc_jax import ops
from mhc_jax.config import ModelConfig, compute_dtype
from mhc_jax.layers.block import STREAM_AXES, Block
from mhc_jax.layers.connection import CollapseHead
from mhc_jax.layers.norm import RMSNorm

_REMAT_POLICIES = {
    "full": None,   # save nothing: recompute the whole block in the backward pass
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class LM(nn.Module):
  """`apply(variables, tokens [B, T] int) -> logits [B, T, V] float32`."""
  cfg: ModelConfig
  decode: bool = False

  @nn.compact
  def __call__(self, tokens_BT):
    cfg = self.cfg
    dtype = compute_dtype(cfg.dtype)
    embed = nn.Embed(cfg.vocab_size, cfg.d_model, dtype=dtype, param_dtype=jnp.float32,
                     embedding_init=nn.with_logical_partitioning(
                         nn.initializers.normal(cfg.init_std), ("vocab", "embed")), name="embed")
    h_BTC = embed(tokens_BT)
    x_BTnC = nn.with_logical_constraint(ops.expand_streams(h_BTC, cfg.connection.n), STREAM_AXES)

    block = Block
    if cfg.remat != "none":
      block = nn.remat(Block, policy=_REMAT_POLICIES[cfg.remat], prevent_cse=not cfg.scan_layers)
    if cfg.scan_layers:
      stack = nn.scan(block, variable_axes={"params": 0, "cache": 0, "intermediates": 0},
                      split_rngs={"params": True}, in_axes=0, length=cfg.n_layers,
                      metadata_params={nn.PARTITION_NAME: "layers"})
      x_BTnC, _ = stack(cfg, dtype, self.decode, name="blocks")(x_BTnC, jnp.arange(cfg.n_layers))
    else:
      for layer in range(cfg.n_layers):
        x_BTnC, _ = block(cfg, dtype, self.decode, name=f"block_{layer}")(x_BTnC, layer)

    if cfg.collapse == "head":
      h_BTC = CollapseHead(cfg.connection.pre_eps, cfg.connection.norm_eps, name="collapse")(x_BTnC)
    else:
      h_BTC = ops.collapse_streams(x_BTnC)
    h_BTC = RMSNorm(cfg.norm_eps, dtype, name="final_norm")(h_BTC)
    if cfg.tie_embeddings:
      logits = embed.attend(h_BTC)
    else:
      logits = nn.Dense(cfg.vocab_size, use_bias=False, dtype=dtype, param_dtype=jnp.float32,
                        kernel_init=nn.with_logical_partitioning(
                            nn.initializers.normal(cfg.init_std), ("embed", "vocab")),
                        name="lm_head")(h_BTC)
    return nn.with_logical_constraint(logits.astype(jnp.float32), ("batch", "length", "vocab"))


def collect_mappings(intermediates, cfg: ModelConfig) -> dict[str, jax.Array]:
  """Stack sown mappings over the 2L sites in order (attn_0, mlp_0, attn_1, ...).

  Returns `{"h_pre": [S, B, T, n], "h_post": [S, B, T, n], "h_res": [S, B, T, n, n]}`; empty for
  `kind="residual"`.
  """
  if cfg.connection.kind == "residual":
    return {}
  if cfg.scan_layers:
    per_site = [intermediates["blocks"][s] for s in ("attn_conn", "mlp_conn")]
    out = {}
    for key in ("h_pre", "h_post", "h_res"):
      a, m = (site[key][0] for site in per_site)            # each [L, B, T, ...]
      out[key] = jnp.stack([a, m], axis=1).reshape(-1, *a.shape[1:])
    return out
  out = {}
  for key in ("h_pre", "h_post", "h_res"):
    out[key] = jnp.stack([intermediates[f"block_{l}"][s][key][0] for l in range(cfg.n_layers)
                          for s in ("attn_conn", "mlp_conn")])
  return out


def init_cache(cfg: ModelConfig, params, batch_size: int):
  """Zero KV cache for `LM(cfg, decode=True)` (capacity `cfg.max_seq_len`)."""
  del params   # the cache shape depends only on the config
  shapes = jax.eval_shape(lambda: LM(cfg, decode=True).init(
      jax.random.PRNGKey(0), jnp.zeros((batch_size, 1), jnp.int32)))
  return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes["cache"])
