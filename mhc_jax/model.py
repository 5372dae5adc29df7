"""Decoder LM with HC / mHC / mHC-lite residual streams.

    h = embed(tokens);  x = expand(h, n)                      [B, T, n, C]
    x = Block_{L-1}( ... Block_0(x))                          each block: attention site, MLP site
    logits = head(RMSNorm(collapse(x)))                       collapse = sum (HC) or learned head (V4)
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from mhc_jax import ops, remat
from mhc_jax.config import ModelConfig, compute_dtype
from mhc_jax.layers.block import STREAM_AXES, Block
from mhc_jax.layers.connection import CollapseHead
from mhc_jax.layers.norm import RMSNorm

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
    if cfg.remat in remat.POLICIES:
      block = nn.remat(Block, policy=remat.POLICIES[cfg.remat], prevent_cse=not cfg.scan_layers)
    grouped = (cfg.remat == "mhc_paper" and not self.decode and not self.is_initializing()
               and not self.is_mutable_collection("intermediates"))
    if grouped:   # training / plain forward: parameters exist, run the recompute groups
      x_BTnC = self._grouped_blocks(x_BTnC, dtype)
    elif cfg.scan_layers:
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

  def _grouped_blocks(self, x_BTnC, dtype):
    """remat="mhc_paper": the L blocks run in recompute groups of g blocks (`remat.mhc_paper_group`),
    each a `jax.checkpoint` with `remat.mhc_paper_policy`; the streams are stored only at group
    boundaries. With `scan_layers` the full groups run in a `lax.scan`, a shorter last group after it.

    Why init and the diagnostics forward take the plain stack instead: the parameter layout is fixed
    (`blocks/...` stacked over L, or `block_<l>`; DESIGN.md), and a group of g blocks inside a scan
    over L/g groups would need `[L/g, g, ...]` parameters. So the groups apply `Block` by hand to
    slices of the existing parameters, which needs them to exist (not at init), and sow nothing
    (not the diagnostics). `Block`'s layer index only chooses initial values, so the groups pass 0;
    tests/test_recompute.py checks that the grouped and plain forwards and gradients agree.
    """
    cfg = self.cfg
    n_layers = cfg.n_layers
    g = cfg.remat_group or remat.mhc_paper_group(cfg.connection.n, n_layers)
    policy = remat.mhc_paper_policy(cfg.connection.n)
    params = nn.meta.unbox(self.variables["params"])

    def run_group(x, layer_params, layers):
      for p, layer in zip(layer_params, layers):
        x, _ = Block(cfg, dtype, False).apply({"params": p}, x, layer)
      return x

    if not cfg.scan_layers:
      for start in range(0, n_layers, g):
        layers = list(range(start, min(start + g, n_layers)))
        group = jax.checkpoint(run_group, policy=policy, static_argnums=(2,))
        x_BTnC = group(x_BTnC, [params[f"block_{l}"] for l in layers], tuple(layers))
      return x_BTnC

    stacked = params["blocks"]
    n_full = n_layers // g

    def take(tree, i):
      return jax.tree.map(lambda a: a[i], tree)

    def scanned_group(x, p_group):   # p_group: leaves [g, ...]
      return run_group(x, [take(p_group, i) for i in range(g)], [0] * g), None

    if n_full:
      full = jax.tree.map(lambda a: a[:n_full * g].reshape(n_full, g, *a.shape[1:]), stacked)
      x_BTnC, _ = jax.lax.scan(jax.checkpoint(scanned_group, policy=policy, prevent_cse=False),
                               x_BTnC, full)
    rest = list(range(n_full * g, n_layers))
    if rest:
      group = jax.checkpoint(run_group, policy=policy, static_argnums=(2,))
      x_BTnC = group(x_BTnC, [take(stacked, l) for l in rest], tuple(rest))
    return x_BTnC


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


def init_cache(cfg: ModelConfig, batch_size: int):
  """Zero KV cache for `LM(cfg, decode=True)` (capacity `cfg.max_seq_len`)."""
  shapes = jax.eval_shape(lambda: LM(cfg, decode=True).init(
      jax.random.PRNGKey(0), jnp.zeros((batch_size, 1), jnp.int32)))
  return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes["cache"])
