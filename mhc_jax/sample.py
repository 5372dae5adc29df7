"""Text generation with the KV cache: prefill the prompt, then one token per step inside `lax.scan`.

Sampling: `temperature == 0` is greedy; otherwise `softmax(logits / temperature)` restricted to the
`top_k` largest logits (`top_k == 0`: no restriction).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from mhc_jax.config import ConfigError, ModelConfig
from mhc_jax.model import LM, MOE_STATE, init_cache


def sample_logits(rng, logits_BV, temperature: float, top_k: int):
  """One token id per row of `logits [B, V]`."""
  if temperature == 0:
    return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
  logits = logits_BV.astype(jnp.float32) / temperature
  if top_k and top_k < logits.shape[-1]:
    kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


def decode(model, params, prompt_BP, rng, *, cfg: ModelConfig, max_new_tokens: int,
           temperature: float, top_k: int, moe_state=None):
  """Prefill `prompt_BP` with the `decode=True` `model`, then sample `max_new_tokens` tokens in a
  `lax.scan`; traceable (callers jit it with the sampling arguments static). `moe_state`: an MoE
  model's balance biases (they choose the experts)."""
  cache = init_cache(cfg, prompt_BP.shape[0])
  extra = {MOE_STATE: moe_state} if moe_state else {}
  logits, mut = model.apply({"params": params, "cache": cache, **extra}, prompt_BP,
                            mutable=["cache"])
  rng, sub = jax.random.split(rng)
  first = sample_logits(sub, logits[:, -1], temperature, top_k)

  def step(carry, _):
    cache, tok, rng = carry
    logits, mut = model.apply({"params": params, "cache": cache, **extra}, tok[:, None],
                              mutable=["cache"])
    rng, sub = jax.random.split(rng)
    nxt = sample_logits(sub, logits[:, -1], temperature, top_k)
    return (mut["cache"], nxt, rng), tok

  (_, last, _), toks = jax.lax.scan(step, (mut["cache"], first, rng), None,
                                    length=max_new_tokens - 1)
  return jnp.concatenate([toks.T, last[:, None]], axis=1) if max_new_tokens > 1 else first[:, None]


@functools.partial(jax.jit, static_argnames=("cfg", "max_new_tokens", "temperature", "top_k"))
def _generate(params, prompt_BP, rng, moe_state, *, cfg: ModelConfig, **sampling):
  return decode(LM(cfg, decode=True), params, prompt_BP, rng, cfg=cfg, moe_state=moe_state,
                **sampling)


def check_generation(cfg: ModelConfig, prompt_ids, max_new_tokens: int, temperature: float,
                     seed: int) -> np.ndarray:
  """The prompt as int32 `[B, P]`; ConfigError (one line) for arguments `generate` cannot take."""
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
  if not 0 <= int(seed) < 2**32:
    raise ConfigError(f"--seed={seed} is not allowed: an integer in [0, 2**32)")
  return prompt


def generate(cfg: ModelConfig, params, prompt_ids, *, max_new_tokens: int, temperature: float = 0.8,
             top_k: int = 40, seed: int = 0, moe_state=None) -> np.ndarray:
  """`[B, max_new_tokens]` new token ids after `prompt_ids` (`[P]` or `[B, P]`)."""
  prompt = check_generation(cfg, prompt_ids, max_new_tokens, temperature, seed)
  out = _generate(params, jnp.asarray(prompt), jax.random.PRNGKey(seed), moe_state or None, cfg=cfg,
                  max_new_tokens=int(max_new_tokens), temperature=float(temperature),
                  top_k=int(top_k))
  return np.asarray(out)


def sample_text(cfg: ModelConfig, params, tokenizer, prompt: str, **kw) -> str:
  """Prompt followed by the generated continuation, decoded together (bytes of the prompt that are
  not UTF-8 become U+FFFD, as in generated text)."""
  ids = tokenizer.encode(prompt)
  new = generate(cfg, params, ids, **kw)[0]
  return tokenizer.decode(np.concatenate([ids, new]))
