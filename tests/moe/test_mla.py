"""The Linen `MLA` module (Multi-head Latent Attention): its forward against a float64 NumPy
reference of the same equations written out per head, its gradients against that reference in
float64 jnp, the compressed-latent decode cache (absorbed form) against the full causal forward,
causality, and the params' shapes / logical axes."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.traverse_util import flatten_dict

from mhc_jax.config.mla import MLAConfig
from mhc_jax.layers.mla import MLA

B, T, C, H = 2, 7, 32, 2
THETA, EPS = 10000.0, 1e-6


def _cfg(q_rank):
  return MLAConfig(kv_rank=8, q_rank=q_rank, rope_dim=4, nope_dim=6, v_dim=5)


def _model(q_rank, decode=False, max_len=T, dtype=jnp.float32):
  return MLA(_cfg(q_rank), H, max_len, THETA, 0.3, 0.2, dtype, decode, norm_eps=EPS)


def _setup(q_rank, seed=0):
  """Module, unboxed params (norm weights randomised so they matter) and x [B, T, C]."""
  model = _model(q_rank)
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.normal(size=(B, T, C)), jnp.float32)
  params = nn.unbox(model.init(jax.random.key(seed), x)["params"])
  params = dict(params)
  for norm in ("q_norm", "kv_norm"):
    if norm in params:
      s = params[norm]["scale"]
      params[norm] = {"scale": jnp.asarray(1.0 + 0.3 * rng.normal(size=s.shape), jnp.float32)}
  return model, params, x


# ---- reference: the docstring's equations, per head; `xp` is numpy (float64) or jnp (x64) ----

def _rope_ref(x, theta, xp):
  """Rotate-half RoPE on the last axis of x [B, T, ..., D] at positions 0..T-1."""
  t, d = x.shape[1], x.shape[-1]
  freq = theta ** (-xp.arange(0, d // 2) * 2.0 / d)
  ang = xp.arange(t)[:, None] * freq[None, :]                       # [T, D/2]
  ang = ang.reshape((t,) + (1,) * (x.ndim - 3) + (d // 2,))
  x1, x2 = x[..., :d // 2], x[..., d // 2:]
  return xp.concatenate([x1 * xp.cos(ang) - x2 * xp.sin(ang), x2 * xp.cos(ang) + x1 * xp.sin(ang)],
                        axis=-1)


def _rmsnorm_ref(z, w, xp):
  return z / xp.sqrt(xp.mean(z * z, axis=-1, keepdims=True) + EPS) * w


def _reference(p, x, cfg, xp=np):
  n = cfg.nope_dim
  if cfg.q_rank == 0:
    q = xp.einsum("btc,chd->bthd", x, p["q"])
  else:
    cq = _rmsnorm_ref(x @ p["q_down"], p["q_norm"]["scale"], xp)
    q = xp.einsum("btq,qhd->bthd", cq, p["q_up"])
  q_nope, q_rope = q[..., :n], _rope_ref(q[..., n:], THETA, xp)
  c = _rmsnorm_ref(x @ p["kv_down"], p["kv_norm"]["scale"], xp)      # [B, T, K]
  k_rope = _rope_ref(x @ p["k_rope"], THETA, xp)                      # [B, T, R], shared by heads
  t = x.shape[1]
  causal = xp.tril(xp.ones((t, t))) > 0
  outs = []
  for h in range(p["k_up"].shape[1]):
    q_h = xp.concatenate([q_nope[:, :, h], q_rope[:, :, h]], axis=-1)            # [B, T, n+r]
    k_h = xp.concatenate([c @ p["k_up"][:, h], k_rope], axis=-1)                   # [B, T, n+r]
    v_h = c @ p["v_up"][:, h]                                                      # [B, T, d_v]
    s = xp.einsum("btd,bsd->bts", q_h, k_h) / np.sqrt(cfg.qk_dim)
    s = xp.where(causal[None], s, -1e30)
    e = xp.exp(s - xp.max(s, axis=-1, keepdims=True))
    outs.append(xp.einsum("bts,bsv->btv", e / xp.sum(e, axis=-1, keepdims=True), v_h))
  return xp.einsum("bthv,hvc->btc", xp.stack(outs, axis=2), p["out"])


def _f64(tree):
  return jax.tree.map(lambda a: np.asarray(a, np.float64), tree)


# ---- tests ----

@pytest.mark.parametrize("q_rank", [0, 5])
def test_params_shapes_and_logical_axes(q_rank):
  cfg = _cfg(q_rank)
  boxed = _model(q_rank).init(jax.random.key(0), jnp.zeros((B, T, C)))["params"]
  shapes = flatten_dict(jax.tree.map(lambda a: a.shape, nn.unbox(boxed)), sep="/")
  specs = flatten_dict(nn.get_partition_spec(boxed), sep="/")
  K, R, D = cfg.kv_rank, cfg.rope_dim, cfg.qk_dim
  want = {"kv_down": ((C, K), ("embed", "kv_lora")), "k_rope": ((C, R), ("embed", None)),
          "k_up": ((K, H, cfg.nope_dim), ("kv_lora", "heads", "kv")),
          "v_up": ((K, H, cfg.v_dim), ("kv_lora", "heads", "kv")),
          "out": ((H, cfg.v_dim, C), ("heads", "kv", "embed")),
          "kv_norm/scale": ((K,), ("embed",))}      # RMSNorm names its scale axis "embed"
  if q_rank == 0:
    want["q"] = ((C, H, D), ("embed", "heads", "kv"))
  else:
    want.update({"q_down": ((C, q_rank), ("embed", "q_lora")),
                 "q_up": ((q_rank, H, D), ("q_lora", "heads", "kv")),
                 "q_norm/scale": ((q_rank,), ("embed",))})
  assert {k: (shapes[k], tuple(specs[k])) for k in shapes} == want
  assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(nn.unbox(boxed)))


@pytest.mark.parametrize("q_rank", [0, 5])
def test_forward_matches_float64_reference(q_rank):
  model, params, x = _setup(q_rank)
  out = model.apply({"params": params}, x)
  assert out.shape == (B, T, C) and out.dtype == jnp.float32
  ref = _reference(_f64(params), np.asarray(x, np.float64), _cfg(q_rank))
  assert np.abs(ref).max() > 0.1   # not a degenerate (all ~0) output
  np.testing.assert_allclose(np.asarray(out), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("q_rank", [0, 5])
def test_grads_match_float64_reference(q_rank):
  model, params, x = _setup(q_rank)
  ct = np.random.default_rng(1).normal(size=(B, T, C))
  g32 = jax.grad(lambda p, x: jnp.sum(model.apply({"params": p}, x) * ct), argnums=(0, 1))(
      params, x)
  with jax.enable_x64(True):
    p64 = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), _f64(params))
    x64, ct64 = jnp.asarray(np.asarray(x, np.float64)), jnp.asarray(ct)
    cfg = _cfg(q_rank)
    g64 = jax.grad(lambda p, x: jnp.sum(_reference(p, x, cfg, jnp) * ct64), argnums=(0, 1))(
        p64, x64)
    g64 = _f64(g64)
  for path, a, b in zip(jax.tree_util.tree_flatten_with_path(g32)[0],
                        jax.tree.leaves(g32), jax.tree.leaves(g64)):
    scale = np.abs(b).max()
    assert scale > 0, path[0]
    np.testing.assert_allclose(np.asarray(a), b, rtol=1e-4, atol=1e-5 * scale,
                               err_msg=jax.tree_util.keystr(path[0]))


@pytest.mark.parametrize("q_rank", [0, 5])
def test_decode_compressed_cache_matches_full_forward(q_rank):
  """Prefill 3 tokens, then one at a time: the decode path attends in the weight-absorbed form over
  the cached latent (q_nope W_uk^T . c, then (softmax . c) W_uv), the full forward in the explicit
  form (k_nope = c W_uk, v = c W_uv), so this also checks absorbed == non-absorbed."""
  model, params, x = _setup(q_rank)
  full = model.apply({"params": params}, x)
  max_len = T + 2   # slots past the written ones must stay masked
  dec = _model(q_rank, decode=True, max_len=max_len)
  variables = dec.init(jax.random.key(0), x[:, :3])
  assert jax.tree.structure(nn.unbox(variables["params"])) == jax.tree.structure(params)
  shapes = {k: (v.shape, v.dtype) for k, v in variables["cache"].items()}
  cfg = _cfg(q_rank)
  assert shapes == {"cached_latent": ((B, max_len, cfg.kv_rank), jnp.float32),
                    "cached_k_rope": ((B, max_len, cfg.rope_dim), jnp.float32),
                    "cache_index": ((), jnp.int32)}
  cache = jax.tree.map(jnp.zeros_like, variables["cache"])   # as `model.init_cache`

  @jax.jit
  def step(cache, x_chunk):
    out, mut = dec.apply({"params": params, "cache": cache}, x_chunk, mutable=["cache"])
    return out, mut["cache"]

  outs = []
  out, cache = step(cache, x[:, :3])
  outs.append(out)
  for t in range(3, T):
    out, cache = step(cache, x[:, t:t + 1])
    outs.append(out)
  assert int(cache["cache_index"]) == T
  np.testing.assert_allclose(np.asarray(jnp.concatenate(outs, axis=1)), np.asarray(full),
                             rtol=1e-5, atol=1e-5)
  assert not np.any(np.asarray(cache["cached_latent"][:, T:]))   # unwritten slots untouched


def test_causal_no_leak():
  model, params, x = _setup(5)
  out = np.asarray(model.apply({"params": params}, x))
  for t in (0, 3, T - 2):
    x2 = x.at[:, t + 1:].set(jnp.asarray(np.random.default_rng(t).normal(size=(B, T - t - 1, C)),
                                          jnp.float32))
    out2 = np.asarray(model.apply({"params": params}, x2))
    np.testing.assert_allclose(out2[:, :t + 1], out[:, :t + 1], rtol=0, atol=1e-6)
    assert np.abs(out2[:, t + 1:] - out[:, t + 1:]).max() > 1e-3


def test_bfloat16_compute_float32_params():
  model = _model(5, dtype=jnp.bfloat16)
  x = jnp.asarray(np.random.default_rng(0).normal(size=(B, T, C)), jnp.float32)
  variables = model.init(jax.random.key(0), x)
  out = model.apply(variables, x)
  assert out.dtype == jnp.bfloat16 and out.shape == (B, T, C)
  assert all(a.dtype == jnp.float32 for a in jax.tree.leaves(nn.unbox(variables["params"])))
  ref = model.clone(dtype=jnp.float32).apply(variables, x)
  np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref), atol=0.1, rtol=0.1)
