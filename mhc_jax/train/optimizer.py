"""Optax AdamW with warmup + cosine / paper step schedule, global-norm clipping and a weight-decay mask.

Weight-decay mask: decay the matrices that map features (attention, MLP, and the connections' dynamic
projections `phi` / `theta_*`, as the HC paper decays its dynamic components); no decay on norm scales
(`scale`), biases and the static connection parts (`bias`, `b`, `b_pre`, `b_post`, `b_res`; HC: "the
static component does not utilize weight decay"), the gates `alpha`, and
the token embedding. The embedding is exempt because with tied embeddings it is also the output head:
decay pulls the rows of rare bytes toward zero and biases the softmax (the usual GPT-style choice).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from mhc_jax.config import TrainConfig

NO_DECAY = frozenset({"scale", "bias", "b", "b_pre", "b_post", "b_res", "alpha", "embedding"})


def make_schedule(cfg: TrainConfig) -> optax.Schedule:
  """Learning rate at optimizer step t (0-based)."""
  warm = cfg.warmup_steps
  if cfg.schedule == "cosine":
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0 if warm else cfg.lr, peak_value=cfg.lr, warmup_steps=warm,
        decay_steps=max(cfg.steps, warm + 1), end_value=cfg.lr * cfg.min_lr_ratio)
  if cfg.schedule == "paper_step":
    # lr x 0.316 from 0.8*steps, x 0.1 from 0.9*steps (mHC paper, "step" decay).
    decay = optax.piecewise_constant_schedule(
        cfg.lr, {int(0.8 * cfg.steps) - warm: 0.316, int(0.9 * cfg.steps) - warm: 0.1 / 0.316})
  else:
    decay = optax.constant_schedule(cfg.lr)
  if not warm:
    return decay
  return optax.join_schedules([optax.linear_schedule(0.0, cfg.lr, warm), decay], [warm])


def _leaf_name(path) -> str:
  """The parameter's own name; an NNX `Variable`'s trailing `.value` attribute is skipped."""
  if len(path) > 1 and isinstance(path[-1], jax.tree_util.GetAttrKey) and path[-1].name == "value":
    path = path[:-1]
  last = path[-1]
  return str(getattr(last, "key", getattr(last, "name", last)))


def decay_mask(params):
  """Pytree of bools: True where weight decay applies (see module docstring)."""
  return jax.tree_util.tree_map_with_path(lambda p, _: _leaf_name(p) not in NO_DECAY, params)


def make_optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
  """clip(global norm) -> AdamW(schedule, mask). Gradient accumulation is done in the step."""
  parts = []
  if cfg.clip_norm > 0:
    parts.append(optax.clip_by_global_norm(cfg.clip_norm))
  parts.append(optax.adamw(make_schedule(cfg), b1=cfg.b1, b2=cfg.b2, eps=cfg.adam_eps,
                           weight_decay=cfg.weight_decay, mask=decay_mask))
  return optax.chain(*parts)


def global_norm(tree) -> jax.Array:
  return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(tree)))
