"""Sampling and evaluation with quantised parameters (the qwix PTQ model in place of `LM`).

Generation runs `mhc_jax.sample.decode` (prefill + `lax.scan` decode, same sampling rule and argument
checks) on the quantised model; evaluation sums token cross-entropy as the train eval step does and
reports it through `mhc_jax.train.step.eval_summary` (loss, perplexity, bits per byte).
"""
from __future__ import annotations

import functools
import time

import jax
import jax.numpy as jnp
import numpy as np

from mhc_jax.config import ConfigError, ModelConfig
from mhc_jax.model import LM
from mhc_jax.quant.core import QuantSpec, quantized_lm
from mhc_jax.data import make_eval_batches, make_tokenizer, make_train_iterator
from mhc_jax.quant.io import load_moe_state, load_quantized
from mhc_jax.sample import check_generation, decode
from mhc_jax.train.step import eval_summary, model_variables
from mhc_jax.train.trainer import count_bytes

def _model(cfg: ModelConfig, spec: QuantSpec | None, decode: bool = False):
  """The qwix PTQ LM of `spec`; the float `LM` for `spec=None` (a float layout of `quant.layout`)."""
  return LM(cfg, decode=decode) if spec is None else quantized_lm(cfg, spec, decode=decode)


@functools.partial(jax.jit, static_argnames=("cfg", "spec", "max_new_tokens", "temperature", "top_k"))
def _generate(qparams, prompt_BP, rng, moe_state, *, cfg: ModelConfig, spec: QuantSpec | None,
              **sampling):
  return decode(_model(cfg, spec, decode=True), qparams, prompt_BP, rng, cfg=cfg,
                moe_state=moe_state, **sampling)


def quantized_generate(cfg: ModelConfig, spec: QuantSpec | None, qparams, prompt_ids, *,
                       max_new_tokens: int, temperature: float = 0.8, top_k: int = 40,
                       seed: int = 0, moe_state=None) -> np.ndarray:
  """`[B, max_new_tokens]` new token ids after `prompt_ids` (`[P]` or `[B, P]`); `moe_state`: the
  balance biases of an MoE model."""
  prompt = check_generation(cfg, prompt_ids, max_new_tokens, temperature, seed)
  out = _generate(qparams, jnp.asarray(prompt), jax.random.PRNGKey(seed), moe_state or None,
                  cfg=cfg, spec=spec, max_new_tokens=int(max_new_tokens),
                  temperature=float(temperature), top_k=int(top_k))
  return np.asarray(out)


def quantized_sample(path: str, prompt: str = "def ", *, tokens: int | None = None,
                     temperature: float = 0.8, top_k: int = 40, seed: int = 0, num: int = 1) -> list[str]:
  """Load the quantised checkpoint at `path` and return `num` prompt + continuation texts."""
  cfg, spec, qparams, _ = load_quantized(path)
  moe_state = load_moe_state(path)
  tok = make_tokenizer(cfg.data)
  ids = tok.encode(prompt)
  room = cfg.model.max_seq_len - len(ids)
  if room < 1:
    raise ConfigError(f"--prompt is not allowed: it has {len(ids)} tokens, the model reads at most "
                      f"{cfg.model.max_seq_len - 1} (model.max_seq_len={cfg.model.max_seq_len})")
  n_new = min(200, room) if tokens is None else tokens
  out = quantized_generate(cfg.model, spec, qparams, np.tile(ids[None], (num, 1)),
                           max_new_tokens=n_new, temperature=temperature, top_k=top_k, seed=seed,
                           moe_state=moe_state)
  return [tok.decode(np.concatenate([ids, row])) for row in out]


@functools.partial(jax.jit, static_argnames=("cfg", "spec"))
def quantized_logits(qparams, tokens_BT, moe_state=None, *, cfg: ModelConfig, spec: QuantSpec):
  return quantized_lm(cfg, spec).apply(model_variables(qparams, moe_state), tokens_BT)


@functools.partial(jax.jit, static_argnames=("cfg", "spec"))
def _eval_batch(qparams, inputs, targets, moe_state, *, cfg, spec):
  logits = _model(cfg, spec).apply(model_variables(qparams, moe_state), inputs).astype(jnp.float32)
  ce = jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, targets[..., None], -1)[..., 0]
  return jnp.sum(ce), jnp.asarray(ce.size, jnp.float32)


def evaluate_quantized(cfg: ModelConfig, spec: QuantSpec | None, qparams, batches,
                       n_bytes=None, moe_state=None) -> dict:
  """Mean loss per token over host `batches` (`{"inputs", "targets"}`), as the loop's `evaluate`
  (`spec=None`: float params)."""
  tot = n = 0.0
  for b in batches:
    s, c = _eval_batch(qparams, jnp.asarray(b["inputs"]), jnp.asarray(b["targets"]),
                       moe_state or None, cfg=cfg, spec=spec)
    tot += float(s)
    n += float(c)
  return eval_summary(tot, n, n_bytes)


def _host_batches(cfg, batches: int | None, split: str):
  n = cfg.train.eval_batches if batches is None else batches
  if n < 1:
    raise ConfigError(f"--batches={n} is not allowed: an integer >= 1")
  if split == "validation":
    return n, make_eval_batches(cfg.data, n)
  it = make_train_iterator(cfg.data)
  return n, [next(it) for _ in range(n)]


def quantized_eval(path: str, *, batches: int | None = None, split: str = "validation") -> dict:
  """Load the quantised checkpoint at `path` and evaluate it on `batches` batches of `split`."""
  cfg, spec, qparams, meta = load_quantized(path)
  n, host = _host_batches(cfg, batches, split)
  res = evaluate_quantized(cfg.model, spec, qparams, host, count_bytes(make_tokenizer(cfg.data), host),
                           moe_state=load_moe_state(path))
  return {"quantized_dir": path, "mode": spec.mode, "group_size": spec.group_size,
          "step": meta.get("step"), "split": split, "batches": n, **res}


def _prompt_ids(cfg, tok, prompt: str, tokens: int | None):
  ids = tok.encode(prompt)
  room = cfg.model.max_seq_len - len(ids)
  if room < 1:
    raise ConfigError(f"--prompt is not allowed: it has {len(ids)} tokens, the model reads at most "
                      f"{cfg.model.max_seq_len - 1} (model.max_seq_len={cfg.model.max_seq_len})")
  return ids, (min(200, room) if tokens is None else tokens)


def budgeted_sample(path: str, budget: int, prompt: str = "def ", *, step: int | None = None,
                    tokens: int | None = None, temperature: float = 0.8, top_k: int = 40,
                    seed: int = 0, num: int = 1) -> tuple[list[str], dict]:
  """`mhc-jax sample --max-memory`: texts as `quantized_sample` / `mhc_jax.sample`, generated in
  memory when the model fits `budget` bytes, else with the layers streamed from disk
  (`mhc_jax.quant.stream`); and a report (mode, tokens/s, peak RSS, bytes read per token)."""
  from mhc_jax.quant import stream
  layout, m = stream.open_budgeted(path, budget, step=step, batch=num)
  cfg = layout.cfg
  tok = make_tokenizer(cfg.data)
  ids, n_new = _prompt_ids(cfg, tok, prompt, tokens)
  prompt_ids = np.tile(ids[None], (num, 1))
  kw = dict(max_new_tokens=n_new, temperature=temperature, top_k=top_k, seed=seed)
  t0 = time.perf_counter()
  extra = {}
  if m is None:
    params, moe_state = stream.load_params(layout)
    out = quantized_generate(cfg.model, layout.spec, params, prompt_ids, moe_state=moe_state, **kw)
    read = 0
  else:
    read0, ex0 = m.bytes_read, m.report().get("expert_bytes_read", 0)
    out = m.generate(prompt_ids, **kw)
    read = (m.bytes_read - read0) / n_new
    if m.experts:
      rep = m.report()
      extra = {"expert_bytes_read_per_token": (rep["expert_bytes_read"] - ex0) / n_new,
               "expert_hits": rep["expert_hits"], "expert_misses": rep["expert_misses"],
               "expert_cache": rep["expert_cache"]}
    m.close()
  dt = time.perf_counter() - t0
  report = {"mode": "in_memory" if m is None else "streamed", "max_memory": budget,
            "weight_bytes": layout.weight_bytes, "tokens": int(n_new * num),
            "tokens_per_s": n_new * num / dt, "peak_rss_bytes": stream.peak_rss(),
            "bytes_read_per_token": read, **extra}
  return [tok.decode(np.concatenate([ids, row])) for row in out], report


def budgeted_eval(path: str, budget: int, *, step: int | None = None, batches: int | None = None,
                  split: str = "validation") -> dict:
  """`mhc-jax eval --max-memory`: the loss of `quantized_eval` / `mhc-jax eval`, in memory when the
  model fits `budget` bytes, else with the layers streamed from disk."""
  from mhc_jax.quant import stream
  layout, m = stream.open_budgeted(path, budget, step=step, for_eval=True)
  cfg = layout.cfg
  n, host = _host_batches(cfg, batches, split)
  n_bytes = count_bytes(make_tokenizer(cfg.data), host)
  if m is None:
    params, moe_state = stream.load_params(layout)
    res = evaluate_quantized(cfg.model, layout.spec, params, host, n_bytes, moe_state=moe_state)
  else:
    res = m.evaluate(host, n_bytes)
    m.close()
  return {"run_dir": path, "step": layout.meta.get("step"), "split": split, "batches": n,
          "mode": "in_memory" if m is None else "streamed", "max_memory": budget,
          "peak_rss_bytes": stream.peak_rss(), **res}
