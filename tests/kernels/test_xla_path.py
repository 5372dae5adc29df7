"""The XLA reference path: token-minor Sinkhorn equals token-major (values and gradients)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mhc_jax.ops import sinkhorn


@pytest.mark.parametrize("eps", [0.0, 1e-6])
def test_token_minor_sinkhorn_matches_token_major(eps):
  rng = np.random.default_rng(0)
  logits = jnp.asarray(rng.standard_normal((3, 5, 4, 4)) * 3, jnp.float32)
  ct = jnp.asarray(rng.standard_normal((3, 5, 4, 4)), jnp.float32)
  out = {}
  for layout in ("token_major", "token_minor"):
    f = lambda l: sinkhorn(l, iters=6, eps=eps, layout=layout)  # noqa: E731
    y, pull = jax.vjp(f, logits)
    out[layout] = (np.asarray(y), np.asarray(pull(ct)[0]))
  np.testing.assert_allclose(out["token_minor"][0], out["token_major"][0], atol=1e-6)
  np.testing.assert_allclose(out["token_minor"][1], out["token_major"][1], atol=1e-5)


def test_layout_is_validated():
  with pytest.raises(ValueError, match="layout='rows'"):
    sinkhorn(jnp.zeros((4, 4)), layout="rows")
