"""Pure train / eval steps and the mapping diagnostics.

Loss per token: `ce = logsumexp(z) - z[target]`, plus `z_loss * logsumexp(z)^2` when enabled (PaLM).
Gradient accumulation: the batch `[B, T]` is split into `A` micro-batches (rows `a, a+A, ...` keep every
micro-batch spread over the batch shards); gradients are averaged over them in a `lax.scan`, so the update
equals the full-batch update up to float summation order.
"""
from __future__ import annotations

import math
import re
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from mhc_jax.config import RunConfig
from mhc_jax.model import LM, collect_mappings
from mhc_jax.ops import gains
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


def loss_fn(params, batch, cfg: RunConfig):
  """`(total, (ce, z_term))` averaged over tokens."""
  logits = LM(cfg.model).apply({"params": params}, batch["inputs"])
  ce, log_z = token_losses(logits, batch["targets"])
  ce = jnp.mean(ce)
  z_term = cfg.train.z_loss * jnp.mean(jnp.square(log_z))
  return ce + z_term, (ce, z_term)


def layer_sq_norms(tree, n_layers: int) -> jax.Array:
  """Sum of squares of each block's leaves, `[L]` (scanned `blocks/*` leading axis or `block_<l>`)."""
  out = jnp.zeros((n_layers,), jnp.float32)
  for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
    keys = [str(getattr(k, "key", k)) for k in path]
    sq = jnp.square(leaf.astype(jnp.float32))
    if keys and keys[0] == "blocks":
      out = out + jnp.sum(sq.reshape(sq.shape[0], -1), axis=1)
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
      (_, (ce, z_term)), grads = grad_fn(state.params, batch, cfg)
    else:
      micro = jax.tree.map(
          lambda x: jnp.moveaxis(x.reshape(x.shape[0] // accum, accum, *x.shape[1:]), 1, 0), batch)

      def body(carry, mb):
        g_acc, ce_acc, z_acc = carry
        (_, (ce, z)), g = grad_fn(state.params, mb, cfg)
        return (jax.tree.map(jnp.add, g_acc, g), ce_acc + ce, z_acc + z), None
      zeros = jax.tree.map(jnp.zeros_like, state.params)
      (grads, ce, z_term), _ = jax.lax.scan(body, (zeros, 0.0, 0.0), micro)
      grads = jax.tree.map(lambda g: g / accum, grads)
      ce, z_term = ce / accum, z_term / accum
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
    new_state = TrainState(step=state.step + 1, params=params, opt_state=opt_state)
    return new_state, metrics
  return train_step


def make_eval_step(cfg: RunConfig):
  """`eval_step(params, batch) -> {"loss_sum", "tokens"}` (sum, so batches of any count average)."""
  def eval_step(params, batch):
    logits = LM(cfg.model).apply({"params": params}, batch["inputs"])
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

  def diagnostics(params, batch):
    _, state = LM(cfg.model).apply({"params": params}, batch["inputs"], mutable=["intermediates"])
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
