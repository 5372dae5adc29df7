"""`mhc_jax.ops.moe.moe_ffn` (ragged, tiled and dense) against the float64 dense-masked oracle:
values, gradients w.r.t. x and every weight (random cotangent), no drops."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mhc_jax.ops.moe import default_implementation, moe_ffn
from tests.moe import oracle
from tests.moe.helpers import make_params, make_x

T, C, F = 10, 6, 5
# (name, n_routed, top_k, n_shared, routed_scale, bias)
CASES = [
    ("top1", 4, 1, 0, 1.0, None),
    ("top2_shared1", 8, 2, 1, 2.5, None),
    ("top3_shared2", 6, 3, 2, 1.0, None),
    ("idle_experts", 8, 2, 1, 1.0, [0, 0, 0, -10, 0, -10, 0, 0]),    # experts 3, 5 get no token
    ("hot_expert", 8, 2, 0, 1.5, [10, 0, 0, 0, 0, 0, 0, 0]),         # expert 0 gets every token
]
IDS = [c[0] for c in CASES]
IMPLS = ["ragged", "tiled", "dense"]
# "tiled" runs with 3-row tiles here (odd: groups span several tiles and end in padding)
KW = {"tiled": {"tile": 3}}


def _run(case, impl, seed=0):
  _, E, k, S, scale, bias = case
  params = make_params(seed, C, E, F, S, bias)
  x = make_x(seed + 1, T, C)
  kw = dict(top_k=k, routed_scale=scale, implementation=impl, **KW.get(impl, {}))
  fn = jax.jit(lambda x, p: moe_ffn(x, p, **kw))
  return params, x, fn


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_values_match_float64_oracle(case, impl):
  _, E, k, S, scale, bias = case
  params, x, fn = _run(case, impl)
  y, stats = fn(x, params)
  want = oracle.forward(x, params, k, scale)
  np.testing.assert_allclose(np.asarray(y, np.float64), want, rtol=1e-4, atol=1e-5)
  ids_want, mask, _, gates = oracle.route(np.asarray(x, np.float64), oracle.f64(params), k, scale)
  np.testing.assert_array_equal(np.asarray(stats["expert_ids"]), ids_want)
  np.testing.assert_array_equal(np.asarray(stats["counts"]), mask.sum(0).astype(int))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_gradients_match_float64_oracle(case, impl):
  _, E, k, S, scale, bias = case
  params, x, _ = _run(case, impl)
  g = np.random.default_rng(7).normal(size=(T, C))

  def f(x, p):
    return moe_ffn(x, p, top_k=k, routed_scale=scale, implementation=impl, **KW.get(impl, {}))[0]

  _, pullback = jax.vjp(jax.jit(f), x, params)
  dx, dp = pullback(jnp.asarray(g, jnp.float32))
  dx_want, dp_want = oracle.vjp(x, params, g, k, scale)
  np.testing.assert_allclose(np.asarray(dx, np.float64), dx_want, rtol=1e-4, atol=1e-5,
                             err_msg="d/dx")
  assert set(dp) == set(dp_want)
  for name in dp:
    np.testing.assert_allclose(np.asarray(dp[name], np.float64), dp_want[name], rtol=1e-4,
                               atol=1e-5, err_msg=f"d/d{name}")
  assert not np.any(np.asarray(dp["bias"])), "the balance bias must get no gradient"
  if case[0] == "idle_experts":
    for e in (3, 5):
      assert not np.any(np.asarray(dp["gate"][e])) and not np.any(np.asarray(dp["down"][e]))


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_dropless_every_token_gets_its_k_experts(case):
  _, E, k, S, scale, bias = case
  params, x, fn = _run(case, "ragged")
  y, stats = fn(x, params)
  ids = np.asarray(stats["expert_ids"])
  assert ids.shape == (T, k) and all(len(set(row)) == k for row in ids)
  assert int(stats["counts"].sum()) == T * k
  np.testing.assert_allclose(float(stats["load"].sum()), 1.0, rtol=1e-6)
  if case[0] == "hot_expert":
    assert int(stats["counts"][0]) == T
  if case[0] == "idle_experts":
    assert int(stats["counts"][3]) == 0 and int(stats["counts"][5]) == 0
  # token by token: y_t = sum over exactly its k experts (+ shared), each expert run alone
  p = oracle.f64(params)
  xs = np.asarray(x, np.float64)
  w = np.asarray(stats["weights"], np.float64)
  for t in range(T):
    want = np.zeros(C)
    for j in range(k):
      e = ids[t, j]
      want += w[t, j] * oracle._swiglu_fwd(xs[t:t + 1], p["gate"][e], p["up"][e], p["down"][e])[3][0]
    if S:
      want += oracle._swiglu_fwd(xs[t:t + 1], p["shared_gate"], p["shared_up"], p["shared_down"])[3][0]
    np.testing.assert_allclose(np.asarray(y[t], np.float64), want, rtol=1e-4, atol=1e-5,
                               err_msg=f"token {t}")


def test_oracle_vjp_matches_finite_differences():
  """The hand-written oracle VJP agrees with central differences of the oracle forward."""
  params = {k: np.asarray(v, np.float64) for k, v in make_params(3, 4, 5, 3, 1).items()}
  x = np.random.default_rng(4).normal(size=(6, 4))
  g = np.random.default_rng(5).normal(size=(6, 4))
  k, scale, h = 2, 1.3, 1e-6
  dx, dp = oracle.vjp(x, params, g, k, scale)

  def loss(x, p):
    return float(np.sum(oracle.forward(x, p, k, scale) * g))

  num = np.zeros_like(x)
  for i in np.ndindex(x.shape):
    xp, xm = x.copy(), x.copy()
    xp[i] += h
    xm[i] -= h
    num[i] = (loss(xp, params) - loss(xm, params)) / (2 * h)
  np.testing.assert_allclose(dx, num, rtol=1e-5, atol=1e-7)
  for name in ("router", "gate", "down", "shared_up"):
    num = np.zeros_like(params[name])
    for i in np.ndindex(params[name].shape):
      pp = dict(params, **{name: params[name].copy()})
      pm = dict(params, **{name: params[name].copy()})
      pp[name][i] += h
      pm[name][i] -= h
      num[i] = (loss(x, pp) - loss(x, pm)) / (2 * h)
    np.testing.assert_allclose(dp[name], num, rtol=1e-5, atol=1e-7, err_msg=name)


def test_bfloat16_matmuls_close_to_float32():
  params = make_params(0, C, 8, F, 1)
  x = make_x(1, T, C)
  y32, _ = moe_ffn(x, params, top_k=2)
  y16, _ = moe_ffn(x.astype(jnp.bfloat16), params, top_k=2)
  assert y16.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(y16, np.float32), np.asarray(y32), rtol=0.05, atol=0.05)


def test_auto_is_tiled_on_cpu_ragged_elsewhere():
  assert default_implementation("cpu") == "tiled"
  assert default_implementation("gpu") == default_implementation("tpu") == "ragged"
  with pytest.raises(ValueError, match="implementation='grouped'"):
    moe_ffn(make_x(0, 2, C), make_params(0, C, 4, F, 0), top_k=1, implementation="grouped")
