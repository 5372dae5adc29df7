"""Random MoE params and inputs for the tests (tiny shapes: the CPU is shared)."""
import jax.numpy as jnp
import numpy as np


def make_params(seed, C, E, F, n_shared, bias=None):
  rng = np.random.default_rng(seed)
  p = {
      "router": rng.normal(0, 1.0 / np.sqrt(C), (C, E)),
      "gate": rng.normal(0, 1.0 / np.sqrt(C), (E, C, F)),
      "up": rng.normal(0, 1.0 / np.sqrt(C), (E, C, F)),
      "down": rng.normal(0, 1.0 / np.sqrt(F), (E, F, C)),
      "bias": np.zeros(E) if bias is None else np.asarray(bias, np.float64),
  }
  if n_shared:
    S = n_shared * F
    p["shared_gate"] = rng.normal(0, 1.0 / np.sqrt(C), (C, S))
    p["shared_up"] = rng.normal(0, 1.0 / np.sqrt(C), (C, S))
    p["shared_down"] = rng.normal(0, 1.0 / np.sqrt(S), (S, C))
  return {k: jnp.asarray(v, jnp.float32) for k, v in p.items()}


def make_x(seed, T, C):
  return jnp.asarray(np.random.default_rng(seed).normal(size=(T, C)), jnp.float32)
