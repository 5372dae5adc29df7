"""Pure train / eval steps and the mapping diagnostics.

Loss per token: `ce = logsumexp(z) - z[target]`, plus `z_loss * logsumexp(z)^2` when enabled (PaLM).
Gradient accumulation: the batch `[B, T]` is split into `A` micro-batches (rows `a, a+A, ...` keep every
micro-batch spread over the batch shards); gradients are averaged over them in a `lax.scan`, so the update
equals the full-batch update up to float summation order.

MoE models: the loss adds the sequence-wise balance loss (`moe.seq_aux_weight`, DeepSeek-V3 Eq. 17);
after the optimizer update every MoE layer's balance bias moves by `gamma · sign(mean(load) − load)`
with the tokens each expert received in this step (all micro-batches; `moe.bias_update_rate` = gamma).
"""
from __future__ import annotations

import math
import re
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from mhc_jax.config import ModelConfig, RunConfig
from mhc_jax.model import LM, MOE_STATE, MOE_STATS, collect_mappings
from mhc_jax.ops import gains
from mhc_jax.ops.moe import balance_bias_update
from mhc_jax.train.optimizer import global_norm, make_optimizer, make_schedule
from mhc_jax.train.state import TrainState

LN2 = math.log(2.0)


def eval_summary(loss_sum: float, tokens: float, n_bytes: float | None = None) -> dict[str, float]:
  """Mean loss per token, perplexity = exp(loss) and, given the text bytes the targets stand for,
  bits per byte = total nats / (ln 2 * n_bytes)."""
  loss = loss_sum / max(tokens, 1.0)
  res = {"loss": loss, "perplexity": math.exp(min(loss, 700.0)), "tokens": tokens}
  if n_bytes:
    res["bits_per_byte"] = loss_sum / LN2 / n_bytes
  return res


def token_losses(logits_BTV, targets_BT):
  """`(ce [B, T], log_z [B, T])` in float32."""
  logits = logits_BTV.astype(jnp.float32)
  log_z = jax.nn.logsumexp(logits, axis=-1)
  target_logit = jnp.take_along_axis(logits, targets_BT[..., None], axis=-1)[..., 0]
  return log_z - target_logit, log_z


def model_variables(params, moe_state=None) -> dict:
  """The variables `LM.apply` takes: params, plus the MoE balance biases of an MoE model."""
  return {"params": params, MOE_STATE: moe_state} if moe_state else {"params": params}


def loss_fn(params, batch, cfg: RunConfig, moe_state=None):
  """`(total, (ce, z_term, moe_stats))` averaged over tokens; `moe_stats` is `{}` for a dense model,
  else the LM's `counts [L_moe, E]`, `router_entropy [L_moe]`, `seq_aux_loss` (part of `total`)."""
  variables = model_variables(params, moe_state)
  if cfg.model.moe is None:
    logits, moe_stats = LM(cfg.model).apply(variables, batch["inputs"]), {}
  else:
    logits, mut = LM(cfg.model).apply(variables, batch["inputs"], mutable=[MOE_STATS])
    moe_stats = mut[MOE_STATS]
  ce, log_z = token_losses(logits, batch["targets"])
  ce = jnp.mean(ce)
  z_term = cfg.train.z_loss * jnp.mean(jnp.square(log_z))
  total = ce + z_term + (moe_stats["seq_aux_loss"] if moe_stats else 0.0)
  return total, (ce, z_term, moe_stats)


def update_moe_state(moe_state, counts_LE, cfg: ModelConfig):
  """Every MoE layer's balance bias after one auxiliary-loss-free step (`ops.balance_bias_update`);
  `counts_LE` are the tokens per expert of the MoE layers in order (the LM's `moe_stats`)."""
  rate = cfg.moe.bias_update_rate
  if cfg.scan_layers:
    bias = moe_state["blocks"]["moe"]["bias"]
    return {"blocks": {"moe": {"bias": balance_bias_update(bias, counts_LE, rate)}}}
  layers = [l for l in range(cfg.n_layers) if cfg.is_moe_layer(l)]
  return {f"block_{l}": {"moe": {"bias": balance_bias_update(
      moe_state[f"block_{l}"]["moe"]["bias"], counts_LE[i], rate)}} for i, l in enumerate(layers)}


def moe_metrics(moe_stats, moe_state) -> dict[str, jax.Array]:
  """Per MoE layer `[L_moe]`: the max / min / coefficient of variation of the fraction of tokens
  each expert received, the router entropy; and the balance biases' global norm."""
  frac = moe_stats["counts"].astype(jnp.float32)
  frac = frac / jnp.maximum(jnp.sum(frac, axis=-1, keepdims=True), 1.0)
  return {"moe/load_max": jnp.max(frac, -1), "moe/load_min": jnp.min(frac, -1),
          "moe/load_cv": jnp.std(frac, -1) / jnp.mean(frac, -1),
          "moe/router_entropy": moe_stats["router_entropy"],
          "moe/seq_aux_loss": moe_stats["seq_aux_loss"],
          "moe/bias_norm": global_norm(moe_state)}


def layer_sq_norms(tree, n_layers: int) -> jax.Array:
  """Sum of squares of each block's leaves, `[L]`: scanned stacks (`dense_blocks/*` holds the first
  layers, `blocks/*` the last ones, each with a leading layer axis) or `block_<l>`."""
  out = jnp.zeros((n_layers,), jnp.float32)
  for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
    keys = [str(getattr(k, "key", k)) for k in path]
    sq = jnp.square(leaf.astype(jnp.float32))
    if keys and keys[0] in ("blocks", "dense_blocks"):
      start = 0 if keys[0] == "dense_blocks" else n_layers - sq.shape[0]
      out = out.at[start:start + sq.shape[0]].add(jnp.sum(sq.reshape(sq.shape[0], -1), axis=1))
    elif keys and (m := re.fullmatch(r"block_(\d+)", keys[0])):
      out = out.at[int(m.group(1))].add(jnp.sum(sq))
  return out


def make_train_step(cfg: RunConfig, tx: optax.GradientTransformation | None = None
                    ) -> Callable[[TrainState, dict], tuple[TrainState, dict]]:
  """`train_step(state, batch) -> (state, metrics)`, pure; jit it with `donate_argnums=0`.
  `tx`: the run's optimizer (`MeshSetup.tx`); built from `cfg.train` when omitted."""
  tx = make_optimizer(cfg.train) if tx is None else tx
  schedule = make_schedule(cfg.train)
  accum = cfg.train.grad_accum
  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

  def train_step(state: TrainState, batch: dict[str, jax.Array]):
    if accum == 1:
      (_, (ce, z_term, moe_stats)), grads = grad_fn(state.params, batch, cfg, state.moe_state)
    else:
      micro = jax.tree.map(
          lambda x: jnp.moveaxis(x.reshape(x.shape[0] // accum, accum, *x.shape[1:]), 1, 0), batch)

      def body(carry, mb):
        g_acc, ce_acc, z_acc, st_acc = carry
        (_, (ce, z, st)), g = grad_fn(state.params, mb, cfg, state.moe_state)
        return (jax.tree.map(jnp.add, g_acc, g), ce_acc + ce, z_acc + z,
                jax.tree.map(jnp.add, st_acc, st)), None
      zeros = jax.tree.map(jnp.zeros_like, state.params)
      st0 = jax.tree.map(jnp.zeros_like, jax.eval_shape(
          lambda: grad_fn(state.params, micro_batch(micro), cfg, state.moe_state)[0][1][2]))
      (grads, ce, z_term, moe_stats), _ = jax.lax.scan(body, (zeros, 0.0, 0.0, st0), micro)
      grads = jax.tree.map(lambda g: g / accum, grads)
      ce, z_term = ce / accum, z_term / accum
      if moe_stats:   # counts stay summed over the micro-batches; the rest are means
        moe_stats = dict(moe_stats, router_entropy=moe_stats["router_entropy"] / accum,
                         seq_aux_loss=moe_stats["seq_aux_loss"] / accum)
    if cfg.train.inject_nan_at_step:
      # Fault injection for tests: the loss (and so every gradient) of that step becomes NaN.
      bad = state.step + 1 == cfg.train.inject_nan_at_step
      poison = jnp.where(bad, jnp.nan, 1.0)
      ce = ce * poison
      grads = jax.tree.map(lambda g: g * poison, grads)
    grad_norm = global_norm(grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {
        "loss": ce, "z_loss": z_term, "grad_norm": grad_norm,
        "grad_norm_layers": jnp.sqrt(layer_sq_norms(grads, cfg.model.n_layers)),
        "param_norm": global_norm(params), "lr": schedule(state.step),
    }
    moe_state = state.moe_state
    if moe_stats:
      moe_state = update_moe_state(moe_state, moe_stats["counts"], cfg.model)
      metrics.update(moe_metrics(moe_stats, moe_state))
    new_state = TrainState(step=state.step + 1, params=params, opt_state=opt_state,
                           moe_state=moe_state)
    return new_state, metrics
  return train_step


def micro_batch(micro: dict) -> dict:
  """The first micro-batch of `[A, B/A, ...]` stacked micro-batches (for shapes)."""
  return jax.tree.map(lambda x: x[0], micro)


def make_eval_step(cfg: RunConfig):
  """`eval_step(params, batch, moe_state=None) -> {"loss_sum", "tokens"}` (sum, so batches of any
  count average)."""
  def eval_step(params, batch, moe_state=None):
    logits = LM(cfg.model).apply(model_variables(params, moe_state), batch["inputs"])
    ce, _ = token_losses(logits, batch["targets"])
    return {"loss_sum": jnp.sum(ce), "tokens": jnp.asarray(ce.size, jnp.float32)}
  return eval_step


def make_diagnostics(cfg: RunConfig):
  """`diagnostics(params, batch) -> dict` of the paper's Amax gain magnitudes and Sinkhorn errors.

  Per token: single-layer gains of each site's `H_res` and composite gains of `P_l = H_{S-1}...H_l`
  (`composite_suffixes`, l = 0 is the whole depth); then the mean and max over the batch's tokens.
  `None` for `kind="residual"` (no stream mixing to measure).
  """
  if cfg.model.connection.kind == "residual":
    return None

  def diagnostics(params, batch, moe_state=None):
    _, state = LM(cfg.model).apply(model_variables(params, moe_state), batch["inputs"],
                                   mutable=["intermediates"])
    maps = collect_mappings(state["intermediates"], cfg.model)
    h_res = maps["h_res"].astype(jnp.float32)                   # [S, B, T, n, n]
    fwd, bwd = gains.gain(h_res)                                # [S, B, T]
    cfwd, cbwd = gains.gain(gains.composite_suffixes(h_res))    # [S, B, T]
    tok_axes = (1, 2)
    row_err = jnp.max(jnp.abs(jnp.sum(h_res, -1) - 1.0), axis=-1)   # [S, B, T]
    col_err = jnp.max(jnp.abs(jnp.sum(h_res, -2) - 1.0), axis=-1)
    out = {
        "gain/fwd_max": jnp.max(fwd, tok_axes), "gain/fwd_mean": jnp.mean(fwd, tok_axes),
        "gain/bwd_max": jnp.max(bwd, tok_axes), "gain/bwd_mean": jnp.mean(bwd, tok_axes),
        "gain/composite_fwd_max": jnp.max(cfwd, tok_axes),
        "gain/composite_fwd_mean": jnp.mean(cfwd, tok_axes),
        "gain/composite_bwd_max": jnp.max(cbwd, tok_axes),
        "gain/composite_bwd_mean": jnp.mean(cbwd, tok_axes),
        "sinkhorn/row_err_max": jnp.max(row_err, tok_axes),
        "sinkhorn/col_err_max": jnp.max(col_err, tok_axes),
    }
    return out     # each [S]; the loop logs the per-site curves and their summaries
  return diagnostics


def summarize_diagnostics(diag: dict[str, Any]) -> dict[str, float]:
  """Scalars from the per-site arrays: the max over sites of the single-layer gains, composite gain of
  the whole depth (site 0 suffix), Sinkhorn errors' max over sites."""
  out = {}
  for k, v in diag.items():
    v = [float(x) for x in v]
    if k.startswith("gain/composite"):
      out[k] = v[0]
    elif k.endswith("_mean"):
      out[k] = sum(v) / len(v)
    else:
      out[k] = max(v)
  return out
