"""Decoder LM with HC / mHC / mHC-lite residual streams.

    h = embed(tokens);  x = expand(h, n)                      [B, T, n, C]
    x = Block_{L-1}( ... Block_0(x))                          each block: attention site, FFN site
    logits = head(RMSNorm(collapse(x)))                       collapse = sum (HC) or learned head (V4)

Block parameters (DESIGN.md): with `scan_layers` one stack `blocks/...` with a leading layer axis, else
`block_<l>`. An MoE model (`cfg.moe`) scans its `n_dense_layers` leading dense blocks as `dense_blocks`
and its MoE blocks as `blocks`. The MoE balance biases live in the `moe_state` collection (same tree
layout); with `mutable=["moe_stats"]` the forward also returns the MoE layers' statistics stacked over
the MoE layers in order: `counts [L_moe, E]`, `router_entropy [L_moe]` and `seq_aux_loss` (their sum).
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

MOE_STATS = "moe_stats"
MOE_STATE = "moe_state"
SCAN_AXES = {"params": 0, "cache": 0, "intermediates": 0, MOE_STATE: 0}


def _stack_stats(per_layer: list[dict]) -> dict:
  counts = jnp.stack([s["counts"] for s in per_layer])
  entropy = jnp.stack([s["router_entropy"] for s in per_layer])
  seq = sum((s["seq_aux_loss"] for s in per_layer[1:]), per_layer[0]["seq_aux_loss"])
  return {"counts": counts, "router_entropy": entropy, "seq_aux_loss": seq}


def _scanned_stats(stats: dict) -> dict:
  return {"counts": stats["counts"], "router_entropy": stats["router_entropy"],
          "seq_aux_loss": jnp.sum(stats["seq_aux_loss"])}


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

    x_BTnC, moe_stats = self._blocks(x_BTnC, dtype)
    if moe_stats is not None and self.is_mutable_collection(MOE_STATS):
      for key, value in moe_stats.items():
        self.put_variable(MOE_STATS, key, value)

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

  def _blocks(self, x_BTnC, dtype):
    """The L blocks: `(x, moe_stats or None)`."""
    cfg = self.cfg
    block = Block
    if cfg.remat in remat.POLICIES:
      block = nn.remat(Block, policy=remat.POLICIES[cfg.remat], prevent_cse=not cfg.scan_layers)
    grouped = (cfg.remat == "mhc_paper" and not self.decode and not self.is_initializing()
               and not self.is_mutable_collection("intermediates"))
    if grouped:   # training / plain forward: parameters exist, run the recompute groups
      return self._grouped_blocks(x_BTnC, dtype)
    n_dense = cfg.n_dense_layers if cfg.moe is not None else cfg.n_layers
    if not cfg.scan_layers:
      per_layer = []
      for layer in range(cfg.n_layers):
        x_BTnC, st = block(cfg, dtype, self.decode, cfg.is_moe_layer(layer),
                           name=f"block_{layer}")(x_BTnC, layer)
        if st is not None:
          per_layer.append(st)
      return x_BTnC, (_stack_stats(per_layer) if per_layer else None)

    def stack(name, start, stop, moe):
      scan = nn.scan(block, variable_axes=SCAN_AXES, split_rngs={"params": True}, in_axes=0,
                     length=stop - start, metadata_params={nn.PARTITION_NAME: "layers"})
      return scan(cfg, dtype, self.decode, moe, name=name)(x_BTnC, jnp.arange(start, stop))

    if cfg.moe is None:
      x_BTnC, _ = stack("blocks", 0, cfg.n_layers, False)
      return x_BTnC, None
    if n_dense:
      x_BTnC, _ = stack("dense_blocks", 0, n_dense, False)
    x_BTnC, st = stack("blocks", n_dense, cfg.n_layers, True)
    return x_BTnC, _scanned_stats(st)

  def _grouped_blocks(self, x_BTnC, dtype):
    """remat="mhc_paper": the L blocks run in recompute groups of g blocks (`remat.mhc_paper_group`),
    each a `jax.checkpoint` with `remat.mhc_paper_policy`; the streams are stored only at group
    boundaries. With `scan_layers` the full groups of a stack run in a `lax.scan`, a shorter last
    group after it (an MoE model's `dense_blocks` stack runs first, in groups of its own).

    Why init and the diagnostics forward take the plain stack instead: the parameter layout is fixed
    (`blocks/...` stacked over L, or `block_<l>`; DESIGN.md), and a group of g blocks inside a scan
    over L/g groups would need `[L/g, g, ...]` parameters. So the groups apply `Block` by hand to
    slices of the existing variables (params and the MoE balance biases), which needs them to exist
    (not at init), and sow nothing (not the diagnostics). The MoE statistics come back as group
    outputs. `Block`'s layer index only chooses initial values, so the groups pass 0;
    tests/test_recompute.py checks that the grouped and plain forwards and gradients agree.
    """
    cfg = self.cfg
    n_layers = cfg.n_layers
    g = cfg.remat_group or remat.mhc_paper_group(cfg.connection.n, n_layers)
    policy = remat.mhc_paper_policy(cfg.connection.n)
    variables = {k: nn.meta.unbox(v) for k, v in self.variables.items()
                 if k in ("params", MOE_STATE)}

    def layer_vars(tree_of, key, index=None):
      out = {}
      for col, tree in tree_of.items():
        if key in tree:
          out[col] = tree[key] if index is None else jax.tree.map(lambda a: a[index], tree[key])
      return out

    def run_group(x, group_vars, moe_flags):
      stats = []
      for v, moe in zip(group_vars, moe_flags):
        x, st = Block(cfg, dtype, False, moe).apply(v, x, 0)
        if st is not None:
          stats.append(st)
      return x, stats

    group = jax.checkpoint(run_group, policy=policy, static_argnums=(2,))
    per_layer = []
    if not cfg.scan_layers:
      for start in range(0, n_layers, g):
        layers = range(start, min(start + g, n_layers))
        x_BTnC, st = group(x_BTnC, [layer_vars(variables, f"block_{l}") for l in layers],
                           tuple(cfg.is_moe_layer(l) for l in layers))
        per_layer += st
      return x_BTnC, (_stack_stats(per_layer) if per_layer else None)

    def run_stack(x, key, length, moe):
      stacked = layer_vars(variables, key)
      n_full = length // g
      stats = []

      def scanned_group(x, v_group):   # leaves [g, ...]
        x, st = run_group(x, [jax.tree.map(lambda a: a[i], v_group) for i in range(g)],
                          (moe,) * g)
        return x, (_stack_stats(st) if st else None)

      if n_full:
        full = jax.tree.map(lambda a: a[:n_full * g].reshape(n_full, g, *a.shape[1:]), stacked)
        x, st = jax.lax.scan(jax.checkpoint(scanned_group, policy=policy, prevent_cse=False), x, full)
        if st is not None:   # [n_full, g, ...] -> per layer
          stats += [{"counts": st["counts"].reshape(-1, st["counts"].shape[-1]),
                     "router_entropy": st["router_entropy"].reshape(-1),
                     "seq_aux_loss": jnp.sum(st["seq_aux_loss"])}]
      rest = list(range(n_full * g, length))
      if rest:
        x, st = group(x, [jax.tree.map(lambda a: a[l], stacked) for l in rest], (moe,) * len(rest))
        if st:
          stats += [_stack_stats(st)]
      return x, stats

    if cfg.moe is None:
      x_BTnC, _ = run_stack(x_BTnC, "blocks", n_layers, False)
      return x_BTnC, None
    if cfg.n_dense_layers:
      x_BTnC, _ = run_stack(x_BTnC, "dense_blocks", cfg.n_dense_layers, False)
    x_BTnC, parts = run_stack(x_BTnC, "blocks", cfg.n_moe_layers, True)
    return x_BTnC, {"counts": jnp.concatenate([p["counts"] for p in parts]),
                    "router_entropy": jnp.concatenate([p["router_entropy"] for p in parts]),
                    "seq_aux_loss": sum(p["seq_aux_loss"] for p in parts)}


def collect_mappings(intermediates, cfg: ModelConfig) -> dict[str, jax.Array]:
  """Stack sown mappings over the 2L sites in order (attn_0, mlp_0, attn_1, ...).

  Returns `{"h_pre": [S, B, T, n], "h_post": [S, B, T, n], "h_res": [S, B, T, n, n]}`; empty for
  `kind="residual"`.
  """
  if cfg.connection.kind == "residual":
    return {}
  if cfg.scan_layers:
    stacks = [intermediates[name] for name in ("dense_blocks", "blocks") if name in intermediates]
    out = {}
    for key in ("h_pre", "h_post", "h_res"):
      a, m = (jnp.concatenate([st[site][key][0] for st in stacks])   # each [L, B, T, ...]
              for site in ("attn_conn", "mlp_conn"))
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


def param_counts(cfg: ModelConfig) -> dict[str, int]:
  """Parameter counts from the abstract init (nothing is allocated).

  total: every parameter. vocab: embedding table plus an untied head. active: what one token's
  forward pass multiplies by: all but the embedding table (a lookup) and, in each MoE layer, the
  `n_routed - top_k` routed experts the token was not sent to (the mHC paper's Table 5 convention:
  its totals and active counts come out this way)."""
  shapes = jax.eval_shape(lambda: LM(cfg).init(jax.random.PRNGKey(0), jnp.zeros((1, 1), jnp.int32)))
  params = nn.meta.unbox(shapes["params"])
  total = sum(int(a.size) for a in jax.tree.leaves(params))
  embed = int(params["embed"]["embedding"].size)
  head = int(params["lm_head"]["kernel"].size) if "lm_head" in params else 0
  idle = 0
  if cfg.moe is not None:
    per_expert = 3 * cfg.d_model * cfg.moe.d_expert
    idle = cfg.n_moe_layers * (cfg.moe.n_routed - cfg.moe.top_k) * per_expert
  return {"total": total, "vocab": embed + head, "active": total - embed - idle}
