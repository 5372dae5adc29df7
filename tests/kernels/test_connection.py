"""`ConnectionConfig.implementation` routes mHC / mHC-lite through the kernels with equal results."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mhc_jax import kernels
from mhc_jax.config import ConfigError, ConnectionConfig
from mhc_jax.layers.connection import Connection

C = 32


def _branch(u):
  w = jnp.asarray(np.random.default_rng(7).standard_normal((C, C)) / np.sqrt(C), u.dtype)
  return jnp.tanh(u @ w)


@pytest.mark.slow
@pytest.mark.parametrize("kind,n", [("mhc", 2)])     # mhc_lite kernels: tests/kernels/test_pre.py
def test_connection_interpret_equals_xla(kind, n):
  x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 3, n, C)), jnp.float32)
  cfg = ConnectionConfig(kind=kind, n_streams=n, sinkhorn_iters=2, init="uniform")
  mod = {impl: Connection(dataclasses.replace(cfg, implementation=impl)) for impl in
         ("xla", "interpret")}
  params = mod["xla"].init(jax.random.PRNGKey(0), x, _branch, 1)
  # Perturb the parameters so every mapping is non-trivial.
  params = jax.tree.map(lambda p: p + 0.3 * jax.random.normal(jax.random.PRNGKey(1), p.shape),
                        params)
  ct = jnp.asarray(np.random.default_rng(2).standard_normal(x.shape), jnp.float32)
  res = {}
  for impl, m in mod.items():
    def f(p, a, c, m=m):
      out, pull = jax.vjp(lambda p_, a_: m.apply(p_, a_, _branch, 1), p, a)
      return out, pull(c)
    res[impl] = jax.jit(f)(params, x, ct)
  for a, b in zip(jax.tree.leaves(res["interpret"]), jax.tree.leaves(res["xla"])):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4,
                               atol=1e-5 * max(1.0, float(np.abs(np.asarray(b)).max())))


def test_connection_pallas_on_cpu_errors():
  """Parameters can be created for any target (init takes the XLA path); running the kernels on a
  platform without them is a ConfigError."""
  x = jnp.zeros((1, 2, 4, 128), jnp.float32)
  mod = Connection(ConnectionConfig(implementation="pallas"))
  params = mod.init(jax.random.PRNGKey(0), x, lambda u: u, 0)
  with pytest.raises(ConfigError, match="connection.implementation='pallas' is not available.*cpu"):
    mod.apply(params, x, lambda u: u, 0)


@pytest.mark.parametrize("kw,match", [
    (dict(implementation="interpret", mix_dtype="activation"), "mix_dtype='float32'"),
    (dict(implementation="pallas", kind="hc"), "kind 'mhc' and 'mhc_lite'"),
    (dict(implementation="pallas", kind="residual", n_streams=1), "kind 'mhc' and 'mhc_lite'"),
    (dict(implementation="interpret", kind="mhc_lite", n_streams=6), "n_streams <= 5"),
])
def test_kernel_cross_field_rules_are_config_errors(kw, match):
  with pytest.raises(ConfigError, match=f"connection.implementation=.*{match}"):
    ConnectionConfig(**kw)


def test_auto_is_the_default_and_takes_xla_on_cpu():
  cfg = ConnectionConfig()
  assert cfg.implementation == "auto"
  x = jnp.zeros((1, 2, 4, 128), jnp.float32)
  assert kernels.site_ops(cfg, x).impl == "xla"
  # mix_dtype="activation" quietly keeps XLA under auto (no kernel for it).
  assert kernels.site_ops(dataclasses.replace(cfg, mix_dtype="activation"), x).impl == "xla"
