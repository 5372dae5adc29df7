"""Sampling and evaluation with quantised parameters (the qwix PTQ model in place of `LM`).

Mirrors `mhc_jax.sample.generate` (same prefill + `lax.scan` decode, same sampling rule and argument
checks) and the loop's eval step (mean token cross-entropy, bits per byte over the text bytes).
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from mhc_jax.config import ConfigError, ModelConfig
from mhc_jax.model import init_cache
from mhc_jax.quant.core import QuantSpec, quantized_lm
from mhc_jax.sample import sample_logits

LN2 = math.log(2.0)


@functools.partial(jax.jit, static_argnames=("cfg", "spec", "max_new_tokens", "temperature", "top_k"))
def _generate(qparams, prompt_BP, rng, *, cfg: ModelConfig, spec: QuantSpec, max_new_tokens: int,
              temperature: float, top_k: int):
  model = quantized_lm(cfg, spec, decode=True)
  cache = init_cache(cfg, None, prompt_BP.shape[0])
  logits, mut = model.apply({"params": qparams, "cache": cache}, prompt_BP, mutable=["cache"])
  rng, sub = jax.random.split(rng)
  first = sample_logits(sub, logits[:, -1], temperature, top_k)

  def step(carry, _):
    cache, tok, rng = carry
    logits, mut = model.apply({"params": qparams, "cache": cache}, tok[:, None], mutable=["cache"])
    rng, sub = jax.random.split(rng)
    nxt = sample_logits(sub, logits[:, -1], temperature, top_k)
    return (mut["cache"], nxt, rng), tok

  (_, last, _), toks = jax.lax.scan(step, (mut["cache"], first, rng), None,
                                    length=max_new_tokens - 1)
  return jnp.concatenate([toks.T, last[:, None]], axis=1) if max_new_tokens > 1 else first[:, None]


def quantized_generate(cfg: ModelConfig, spec: QuantSpec, qparams, prompt_ids, *,
                       max_new_tokens: int, temperature: float = 0.8, top_k: int = 40,
                       seed: int = 0) -> np.ndarray:
  """`[B, max_new_tokens]` new token ids after `prompt_ids` (`[P]` or `[B, P]`)."""
  prompt = np.asarray(prompt_ids, np.int32)
  if prompt.ndim == 1:
    prompt = prompt[None]
  if prompt.shape[1] == 0:
    raise ConfigError("--prompt '' is not allowed: give at least one character to start from")
  if max_new_tokens < 1:
    raise ConfigError(f"--tokens={max_new_tokens} is not allowed: an integer >= 1")
  if prompt.shape[1] + max_new_tokens > cfg.max_seq_len:
    raise ConfigError(f"--tokens={max_new_tokens} is not allowed: prompt ({prompt.shape[1]}) + new "
                      f"tokens must be <= model.max_seq_len={cfg.max_seq_len}")
  if not np.isfinite(temperature) or temperature < 0:
    raise ConfigError(f"--temperature={temperature} is not allowed: a finite number >= 0")
  out = _generate(qparams, jnp.asarray(prompt), jax.random.PRNGKey(seed), cfg=cfg, spec=spec,
                  max_new_tokens=int(max_new_tokens), temperature=float(temperature),
                  top_k=int(top_k))
  return np.asarray(out)


def quantized_sample(path: str, prompt: str = "def ", *, tokens: int | None = None,
                     temperature: float = 0.8, top_k: int = 40, seed: int = 0, num: int = 1) -> list[str]:
  """Load the quantised checkpoint at `path` and return `num` prompt + continuation texts."""
  from mhc_jax.data import make_tokenizer
  from mhc_jax.quant.io import load_quantized
  cfg, spec, qparams, _ = load_quantized(path)
  tok = make_tokenizer(cfg.data)
  ids = tok.encode(prompt)
  room = cfg.model.max_seq_len - len(ids)
  if room < 1:
    raise ConfigError(f"--prompt is not allowed: it has {len(ids)} tokens, the model reads at most "
                      f"{cfg.model.max_seq_len - 1} (model.max_seq_len={cfg.model.max_seq_len})")
  n_new = min(200, room) if tokens is None else tokens
  out = quantized_generate(cfg.model, spec, qparams, np.tile(ids[None], (num, 1)),
                           max_new_tokens=n_new, temperature=temperature, top_k=top_k, seed=seed)
  return [tok.decode(np.concatenate([ids, row])) for row in out]


@functools.partial(jax.jit, static_argnames=("cfg", "spec"))
def quantized_logits(qparams, tokens_BT, *, cfg: ModelConfig, spec: QuantSpec):
  return quantized_lm(cfg, spec).apply({"params": qparams}, tokens_BT)


@functools.partial(jax.jit, static_argnames=("cfg", "spec"))
def _eval_batch(qparams, inputs, targets, *, cfg, spec):
  logits = quantized_lm(cfg, spec).apply({"params": qparams}, inputs).astype(jnp.float32)
  ce = jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, targets[..., None], -1)[..., 0]
  return jnp.sum(ce), jnp.asarray(ce.size, jnp.float32)


def evaluate_quantized(cfg: ModelConfig, spec: QuantSpec, qparams, batches, n_bytes=None) -> dict:
  """Mean loss per token over host `batches` (`{"inputs", "targets"}`), as the loop's `evaluate`."""
  tot = n = 0.0
  for b in batches:
    s, c = _eval_batch(qparams, jnp.asarray(b["inputs"]), jnp.asarray(b["targets"]), cfg=cfg,
                       spec=spec)
    tot += float(s)
    n += float(c)
  loss = tot / max(n, 1.0)
  res = {"loss": loss, "perplexity": math.exp(min(loss, 700.0)), "tokens": n}
  if n_bytes:
    res["bits_per_byte"] = tot / LN2 / n_bytes
  return res


def quantized_eval(path: str, *, batches: int | None = None, split: str = "validation") -> dict:
  """Load the quantised checkpoint at `path` and evaluate it on `batches` batches of `split`."""
  from mhc_jax.data import make_eval_batches, make_tokenizer, make_train_iterator
  from mhc_jax.quant.io import load_quantized
  from mhc_jax.train.loop import count_bytes
  cfg, spec, qparams, meta = load_quantized(path)
  n = cfg.train.eval_batches if batches is None else batches
  if n < 1:
    raise ConfigError(f"--batches={n} is not allowed: an integer >= 1")
  if split == "validation":
    host = make_eval_batches(cfg.data, n)
  else:
    it = make_train_iterator(cfg.data)
    host = [next(it) for _ in range(n)]
  res = evaluate_quantized(cfg.model, spec, qparams, host, count_bytes(make_tokenizer(cfg.data), host))
  return {"quantized_dir": path, "mode": spec.mode, "group_size": spec.group_size,
          "step": meta.get("step"), "split": split, "batches": n, **res}
