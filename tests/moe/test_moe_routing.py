"""Routing (`route`), auxiliary-loss-free balancing (`balance_bias_update`) and the sequence-wise
balance loss (`sequence_balance_loss`)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mhc_jax.ops.moe import balance_bias_update, route, sequence_balance_loss
from tests.moe import oracle
from tests.moe.helpers import make_x


def _router(seed, C, E):
  return jnp.asarray(np.random.default_rng(seed).normal(0, 1 / np.sqrt(C), (C, E)), jnp.float32)


@pytest.mark.parametrize("k,scale", [(1, 1.0), (2, 2.5), (3, 1.0)])
def test_gates_are_normalised_chosen_affinities(k, scale):
  x, w = make_x(0, 12, 6), _router(1, 6, 8)
  ids, gates, aff = route(x, w, jnp.zeros(8), top_k=k, routed_scale=scale)
  assert ids.dtype == jnp.int32 and gates.dtype == jnp.float32 and aff.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(gates.sum(-1)), scale, rtol=1e-6)
  want_aff = oracle.sigmoid(np.asarray(x, np.float64) @ np.asarray(w, np.float64))
  np.testing.assert_allclose(np.asarray(aff), want_aff, rtol=1e-5)
  chosen = np.take_along_axis(want_aff, np.asarray(ids), axis=1)
  np.testing.assert_allclose(np.asarray(gates), scale * chosen / chosen.sum(1, keepdims=True),
                             rtol=1e-5)
  # the chosen experts are the top-k affinities (no bias), in descending order
  np.testing.assert_array_equal(np.asarray(ids), np.argsort(-want_aff, axis=1)[:, :k])


def test_bias_changes_selection_not_gate_values():
  T, C, E, k, scale = 16, 6, 8, 2, 1.7
  x, w = make_x(2, T, C), _router(3, C, E)
  ids0, gates0, aff0 = route(x, w, jnp.zeros(E), top_k=k, routed_scale=scale)
  never = int(np.argmin(np.bincount(np.asarray(ids0).ravel(), minlength=E)))
  bias = jnp.zeros(E).at[never].set(5.0)                   # force an unpopular expert in
  ids1, gates1, aff1 = route(x, w, bias, top_k=k, routed_scale=scale)
  assert np.all(np.asarray(ids1)[:, 0] == never), "the bias must change the selection"
  assert not np.array_equal(np.asarray(ids0), np.asarray(ids1))
  np.testing.assert_array_equal(np.asarray(aff0), np.asarray(aff1))   # affinities ignore the bias
  # gates of the chosen experts: their own affinities normalised, the bias nowhere in them
  chosen = np.take_along_axis(np.asarray(aff1, np.float64), np.asarray(ids1), axis=1)
  np.testing.assert_allclose(np.asarray(gates1), scale * chosen / chosen.sum(1, keepdims=True),
                             rtol=1e-6)
  np.testing.assert_allclose(np.asarray(gates1.sum(-1)), scale, rtol=1e-6)
  # and the bias value (once it is large enough to select) does not move the gates
  _, gates2, _ = route(x, w, bias * 3, top_k=k, routed_scale=scale)
  np.testing.assert_array_equal(np.asarray(gates1), np.asarray(gates2))


def test_no_gradient_through_bias():
  x, w = make_x(4, 8, 6), _router(5, 6, 4)

  def f(b, w):
    _, gates, aff = route(x, w, b, top_k=2, routed_scale=1.0)
    return jnp.sum(gates * jnp.arange(2.0)) + jnp.sum(aff)

  db, dw = jax.grad(f, argnums=(0, 1))(jnp.zeros(4), w)
  assert not np.any(np.asarray(db)) and np.any(np.asarray(dw))


def test_bias_update_follows_the_rule():
  bias = jnp.asarray([0.5, 0.0, -0.25, 0.1, 0.0])
  load = jnp.asarray([6.0, 1.0, 3.0, 0.0, 5.0])       # mean 3: over, under, at, under, over
  new = balance_bias_update(bias, load, 0.01)
  np.testing.assert_allclose(np.asarray(new), [0.49, 0.01, -0.25, 0.11, -0.01], rtol=1e-6)
  # fractions give the same step as counts; a leading (layer) axis is kept, mean per row
  np.testing.assert_allclose(np.asarray(balance_bias_update(bias, load / 16, 0.01)), np.asarray(new))
  two = balance_bias_update(jnp.zeros((2, 3)), jnp.asarray([[1.0, 2.0, 3.0], [5.0, 0.0, 1.0]]), 1.0)
  np.testing.assert_array_equal(np.asarray(two), [[1, 0, -1], [-1, 1, 1]])


def test_bias_updates_balance_a_skewed_router():
  """300 steps of (route -> loads -> update) on a fixed router whose constant feature strongly
  prefers the low-numbered experts: the max/min load ratio falls from > 20 to < 2."""
  T, C, E, k, gamma = 256, 8, 8, 2, 0.01
  rng = np.random.default_rng(0)
  x = rng.normal(size=(T, C))
  x[:, 0] = 1.0
  w = rng.normal(0, 0.3, (C, E))
  w[0] = np.linspace(2, -2, E)
  x, w = jnp.asarray(x, jnp.float32), jnp.asarray(w, jnp.float32)

  def counts(b):
    ids, _, _ = route(x, w, b, top_k=k)
    return jnp.bincount(ids.reshape(-1), length=E)

  @jax.jit
  def run(b):
    def step(b, _):
      c = counts(b)
      return balance_bias_update(b, c, gamma), c
    return jax.lax.scan(step, b, None, length=300)

  bias, _ = run(jnp.zeros(E))
  before, after = np.asarray(counts(jnp.zeros(E))), np.asarray(counts(bias))
  ratio = lambda c: c.max() / max(c.min(), 1)
  msg = (f"loads before {before.tolist()} (max/min {ratio(before):.1f}), after {after.tolist()} "
         f"(max/min {ratio(after):.2f}), bias {np.round(np.asarray(bias), 3).tolist()}")
  assert ratio(before) > 20 and ratio(after) < 2, msg
  assert before.sum() == after.sum() == T * k, msg


def test_sequence_balance_loss_matches_formula():
  B, T, E, k, alpha = 3, 7, 5, 2, 1e-3
  rng = np.random.default_rng(6)
  aff = rng.uniform(0.05, 0.95, (B, T, E))
  ids = np.argsort(-aff, axis=-1)[..., :k]
  loss, grad = jax.value_and_grad(
      lambda a: sequence_balance_loss(a, jnp.asarray(ids), alpha=alpha))(jnp.asarray(aff, jnp.float32))
  f = np.zeros((B, E))
  for b in range(B):
    f[b] = np.bincount(ids[b].ravel(), minlength=E) * E / (k * T)
  S = aff.sum(-1, keepdims=True)
  P = (aff / S).mean(1)
  want = alpha * np.mean(np.sum(f * P, axis=-1))
  np.testing.assert_allclose(float(loss), want, rtol=1e-5)
  # dL/ds_{b,t,j} = alpha/(B T) (f_bj / S_bt - sum_i f_bi s_bti / S_bt^2); f carries no gradient
  fw = f[:, None, :]
  want_grad = alpha / (B * T) * (fw / S - np.sum(fw * aff, -1, keepdims=True) / S**2)
  np.testing.assert_allclose(np.asarray(grad), want_grad, rtol=1e-4, atol=1e-12)
  # perfectly balanced selection with uniform affinities gives exactly alpha
  ids_bal = np.stack([np.arange(k) + k * t for t in range(E)]) % E      # T = E tokens, each expert k times
  uniform = jnp.full((E, E), 0.5)
  np.testing.assert_allclose(float(sequence_balance_loss(uniform, jnp.asarray(ids_bal), alpha=alpha)),
                             alpha, rtol=1e-6)
