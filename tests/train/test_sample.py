"""KV-cache generation equals greedy decoding by full recomputation; top-k / temperature rules."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mhc_jax.config import ConfigError
from mhc_jax.configs import tiny
from mhc_jax.model import LM
from mhc_jax.sample import generate, sample_logits


@pytest.mark.slow
def test_greedy_kv_cache_generation_matches_full_recompute():
  cfg = tiny().model
  params = nn.meta.unbox(LM(cfg).init(jax.random.PRNGKey(1), jnp.zeros((1, 8), jnp.int32))["params"])
  rng = np.random.default_rng(0)   # random weights away from init, so the argmax is not trivial
  params = jax.tree.map(lambda x: x + 0.3 * rng.normal(size=x.shape).astype(x.dtype), params)
  prompt = np.array([[5, 77, 120, 3], [9, 9, 200, 31]], np.int32)
  got = generate(cfg, params, prompt, max_new_tokens=6, temperature=0.0)
  # Causal model: recompute the whole (right-padded) sequence each time, read position len - 1.
  seq = np.zeros((2, 10), np.int32)
  seq[:, :4] = prompt
  apply = jax.jit(lambda p, t: LM(cfg).apply({"params": p}, t))
  for i in range(4, 10):
    seq[:, i] = np.asarray(jnp.argmax(apply(params, jnp.asarray(seq))[:, i - 1], -1))
  np.testing.assert_array_equal(got, seq[:, 4:])


def test_sample_logits_top_k_and_greedy():
  logits = jnp.asarray([[0.0, 5.0, 4.9, -1.0, 4.8]])
  assert int(sample_logits(jax.random.PRNGKey(0), logits, 0.0, 0)[0]) == 1
  draws = {int(sample_logits(jax.random.PRNGKey(i), logits, 5.0, 2)[0]) for i in range(200)}
  assert draws == {1, 2}                     # only the top 2, both reached at a high temperature


def test_generate_rejects_bad_requests():
  cfg = tiny().model
  with pytest.raises(ConfigError, match="max_seq_len"):
    generate(cfg, {}, np.zeros((3,), np.int32), max_new_tokens=cfg.max_seq_len)
  with pytest.raises(ConfigError, match="at least one"):
    generate(cfg, {}, np.zeros((0,), np.int32), max_new_tokens=2)
  with pytest.raises(ConfigError, match="temperature"):
    generate(cfg, {}, np.zeros((2,), np.int32), max_new_tokens=2, temperature=-1.0)
