"""The kernels' packed-lane mapping math (`kernels/block.py`) equals `ops` for any logit range."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mhc_jax import ops
from mhc_jax.kernels import block


@pytest.mark.parametrize("eps", [0.0, 1e-6])
@pytest.mark.parametrize("scale", [1.0, 30.0, 1e4])
def test_packed_sinkhorn_equals_ops_values_and_grads(eps, scale):
  n, t = 4, 32
  spec = block.MapSpec("mhc", n, 20, eps)
  vecs, mats = block.constants(spec)
  rng = np.random.default_rng(int(scale))
  z = np.zeros((t, spec.lanes), np.float32)
  z[:, 2 * n:2 * n + n * n] = rng.standard_normal((t, n * n)) * scale
  ct = jnp.asarray(rng.standard_normal((t, n, n)), jnp.float32)

  def packed(zz):
    h = block.mapping(spec, zz, jnp.asarray(vecs), jnp.asarray(mats[0]), jnp.asarray(mats[1]))
    return h[:, 2 * n:2 * n + n * n].reshape(t, n, n)

  got, pull = jax.vjp(packed, jnp.asarray(z))
  g = pull(ct)[0][:, 2 * n:2 * n + n * n].reshape(t, n, n)
  want, pull_r = jax.vjp(lambda l: ops.sinkhorn(l, iters=20, eps=eps),
                         jnp.asarray(z[:, 2 * n:2 * n + n * n]).reshape(t, n, n))
  gr = pull_r(ct)[0]
  assert np.all(np.isfinite(np.asarray(g)))
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-6)
  np.testing.assert_allclose(np.asarray(g), np.asarray(gr), atol=1e-5)


def test_chunks():
  assert block.chunks(7168, 1024) == tuple((k * 1024, 1024) for k in range(7))
  assert block.chunks(48, 1024) == ((0, 32), (32, 16))
  assert block.chunks(200, None) == ((0, 200),)
