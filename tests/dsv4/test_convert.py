"""`mhc_jax.convert`: exact round trips, the res-block transpose, and the safetensors loader."""
from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mhc_jax import convert, ops
from mhc_jax.config import ModelConfig, dsv4
from mhc_jax.model import LM

from tests.dsv4 import torch_env

HERE = os.path.dirname(os.path.abspath(__file__))


def _rand_v4(rng, n, c, lead=()):
  rows = (2 + n) * n
  return (rng.standard_normal((*lead, rows, n * c)).astype(np.float32),
          rng.standard_normal((*lead, rows)).astype(np.float32),
          rng.standard_normal((*lead, 3)).astype(np.float32))


@pytest.mark.parametrize("n", [1, 2, 3, 4, 6])
def test_round_trips_are_exact(n):
  rng = np.random.default_rng(n)
  fn, base, scale = _rand_v4(rng, n, 8, lead=(3,))            # stacked over 3 layers
  ours = convert.site_from_v4(fn, base, scale)
  assert ours["phi"].shape == (3, n * 8, n * n + 2 * n)
  back = convert.site_to_v4(ours)
  for k, v in zip(("fn", "base", "scale"), (fn, base, scale)):
    np.testing.assert_array_equal(back[k], v)
  ours2 = convert.site_from_v4(*convert.site_to_v4(ours).values())
  for k in ours:
    np.testing.assert_array_equal(ours2[k], ours[k])
  perm = convert.packed_permutation(n)
  np.testing.assert_array_equal(perm[perm], np.arange(len(perm)))
  # JAX arrays convert the same way.
  ours_j = convert.site_from_v4(jnp.asarray(fn), jnp.asarray(base), jnp.asarray(scale))
  np.testing.assert_array_equal(np.asarray(ours_j["phi"]), ours["phi"])


def test_res_block_is_transposed():
  """Our column 2n + i*n + j holds V4's comb row 2n + j*n + i; pre and post are untouched."""
  n, c = 4, 3
  fn = np.arange(24 * n * c, dtype=np.float32).reshape(24, n * c)
  base = np.arange(24, dtype=np.float32)
  ours = convert.site_from_v4(fn, base, np.ones(3, np.float32))
  for i in range(n):
    for j in range(n):
      np.testing.assert_array_equal(ours["phi"][:, 2 * n + i * n + j], fn[2 * n + j * n + i])
      assert ours["b"][2 * n + i * n + j] == base[2 * n + j * n + i]
  np.testing.assert_array_equal(ours["phi"][:, :2 * n], fn[:2 * n].T)


def test_converted_h_res_is_comb_transposed():
  """float64 NumPy oracle of V4's kernel (softmax rows, then cols, (rows, cols) x (iters-1))."""
  rng = np.random.default_rng(0)
  n, c, iters, eps = 4, 16, 20, 1e-6
  fn, base, scale = _rand_v4(rng, n, c)
  fn *= 0.2
  x = rng.standard_normal((5, n, c)).astype(np.float32)
  flat = x.reshape(5, -1).astype(np.float64)
  mixes = flat / np.sqrt(np.mean(flat ** 2, -1, keepdims=True) + eps) @ fn.T.astype(np.float64)
  comb = (mixes[:, 2 * n:] * scale[2] + base[2 * n:]).reshape(5, n, n)
  comb = np.exp(comb - comb.max(-1, keepdims=True))
  comb = comb / comb.sum(-1, keepdims=True) + eps
  comb = comb / (comb.sum(-2, keepdims=True) + eps)
  for _ in range(iters - 1):
    comb = comb / (comb.sum(-1, keepdims=True) + eps)
    comb = comb / (comb.sum(-2, keepdims=True) + eps)
  pre = 1 / (1 + np.exp(-(mixes[:, :n] * scale[0] + base[:n]))) + eps
  h_pre, _, h_res = ops.mhc_mappings(jnp.asarray(x), convert.site_from_v4(fn, base, scale),
                                     sinkhorn_iters=iters, sinkhorn_eps=eps, pre_eps=eps,
                                     norm_eps=eps)
  np.testing.assert_allclose(np.asarray(h_res), np.swapaxes(comb, -1, -2), atol=2e-6)
  np.testing.assert_allclose(np.asarray(h_pre), pre, atol=2e-6)
  assert np.max(np.abs(comb - np.swapaxes(comb, -1, -2))) > 1e-2    # the transpose matters


def test_head_round_trip():
  rng = np.random.default_rng(1)
  fn, base, scale = (rng.standard_normal(s).astype(np.float32) for s in ((4, 32), (4,), (1,)))
  ours = convert.head_from_v4(fn, base, scale)
  assert ours["phi"].shape == (32, 4)
  back = convert.head_to_v4(ours)
  for k, v in zip(("fn", "base", "scale"), (fn, base, scale)):
    np.testing.assert_array_equal(back[k], v)


@pytest.mark.parametrize("rows", [0, 5, 23, 25])
def test_bad_width_is_one_clear_error(rows):
  with pytest.raises(ValueError, match=r"\(2\+n\)\*n"):
    convert.site_from_v4(np.zeros((rows, 8)), np.zeros(rows), np.zeros(3))


def test_bad_base_shape():
  with pytest.raises(ValueError, match="base has shape"):
    convert.site_from_v4(np.zeros((24, 8)), np.zeros(23), np.zeros(3))


@functools.lru_cache(maxsize=None)
def _lm(scan, collapse="head", n_layers=2, d=32):
  cfg = ModelConfig(d_model=d, n_layers=n_layers, n_heads=2, max_seq_len=8, scan_layers=scan,
                    collapse=collapse, dtype="float32", connection=dsv4())
  params = jax.jit(LM(cfg).init)(jax.random.PRNGKey(0), jnp.zeros((1, 4), jnp.int32))["params"]
  return cfg, params


@pytest.mark.parametrize("layout", ["deepseek", "hf"])
@pytest.mark.parametrize("scan", [True, False])
def test_safetensors_round_trip_through_lm_params(tmp_path, layout, scan):
  """ours -> V4 file -> ours is exact, for both tensor namings and both layer layouts."""
  cfg, params = _lm(scan)
  rng = np.random.default_rng(2)
  noisy = jax.tree.map(lambda p: p + jnp.asarray(rng.standard_normal(p.shape), p.dtype),
                       nn_unbox(params))
  path = str(tmp_path / "v4.safetensors")
  convert.save_v4_safetensors(path, noisy, layout=layout)
  tensors = convert.read_v4_safetensors(path)
  assert convert.detect_layout(tensors) == layout
  name = "layers.1.hc_ffn_fn" if layout == "deepseek" else "model.layers.1.ffn_hc.fn"
  assert tensors[name].shape == (24, 4 * 32)
  loaded = convert.load_v4_safetensors(path, params)
  flat_loaded = dict(jax.tree_util.tree_leaves_with_path(nn_unbox(loaded)))
  flat_noisy = dict(jax.tree_util.tree_leaves_with_path(noisy))
  n_mhc = sum(_is_mhc(k) for k in flat_noisy)      # 4 per site (phi, b, alpha, norm), head 3, norm 1
  assert n_mhc == 4 * 2 * (1 if scan else cfg.n_layers) + 3 + 1
  for k, v in flat_noisy.items():
    want = v if _is_mhc(k) else flat_of(params)[k]         # attention/MLP/embedding untouched
    np.testing.assert_array_equal(np.asarray(flat_loaded[k]), np.asarray(want), err_msg=str(k))
  # Logical-axis boxes survive the merge.
  boxed = jax.tree_util.tree_leaves(loaded, is_leaf=lambda x: hasattr(x, "unbox"))
  assert all(hasattr(b, "unbox") for b in boxed)


def _is_mhc(path):
  keys = [getattr(p, "key", None) for p in path]
  return any(k in ("attn_conn", "mlp_conn", "collapse", "final_norm") for k in keys) and \
      ("norm" in keys or keys[-1] in ("phi", "b", "alpha") or "final_norm" in keys)


def nn_unbox(tree):
  import flax.linen as nn
  return nn.meta.unbox(tree)


def flat_of(params):
  return dict(jax.tree_util.tree_leaves_with_path(nn_unbox(params)))


def test_hf_names_without_model_prefix():
  rng = np.random.default_rng(4)
  fn, base, scale = _rand_v4(rng, 2, 4)
  tensors = {"layers.0.attn_hc.fn": fn, "layers.0.attn_hc.base": base, "layers.0.attn_hc.scale": scale,
             "layers.0.ffn_hc.fn": fn, "layers.0.ffn_hc.base": base, "layers.0.ffn_hc.scale": scale,
             "norm.weight": np.ones(4, np.float32)}
  assert convert.detect_layout(tensors) == "hf"
  out = convert.v4_to_params(tensors)
  np.testing.assert_array_equal(out["blocks"]["mlp_conn"]["phi"][0],
                                convert.site_from_v4(fn, base, scale)["phi"])
  assert out["final_norm"]["scale"].shape == (4,)


def test_loader_rejects_mismatched_model(tmp_path):
  _, params = _lm(True)
  _, params_sum = _lm(True, collapse="sum")
  path = str(tmp_path / "v4.safetensors")
  convert.save_v4_safetensors(path, nn_unbox(params))
  with pytest.raises(KeyError, match="collapse"):
    convert.load_v4_safetensors(path, params_sum)
  _, wide = _lm(True, d=64)
  with pytest.raises(ValueError, match="shape"):
    convert.load_v4_safetensors(path, wide)
  with pytest.raises(ValueError, match="no DeepSeek-V4 mHC tensors"):
    convert.detect_layout({"foo": np.zeros(1)})


@pytest.mark.slow
@pytest.mark.torch
@pytest.mark.xdist_group("dsv4")
def test_load_real_transformers_checkpoint(tmp_path):
  """A tiny real `DeepseekV4Model` (transformers) saves its tensors; we load them into our LM and
  our sites / head reproduce its own `attn_hc`, `ffn_hc` and `norm(hc_head(.))` outputs."""
  py, msg = torch_env.ensure()
  if py is None:
    pytest.skip("DeepSeek-V4 checkpoint test NOT RUN: " + msg)
  n, c, n_layers = 4, 32, 2
  x = np.random.default_rng(3).standard_normal((2, 3, n, c)).astype(np.float32)
  np.savez(tmp_path / "x.npz", x=x)
  ck = str(tmp_path / "tiny.safetensors")
  torch_env.run(os.path.join(HERE, "hf_side.py"), "checkpoint", ck, str(n), str(c), str(n_layers),
                str(tmp_path / "x.npz"), str(tmp_path / "out.npz"))
  theirs = np.load(tmp_path / "out.npz")
  cfg, params = _lm(True, n_layers=n_layers, d=c)
  loaded = nn_unbox(convert.load_v4_safetensors(ck, params))
  conn = cfg.connection
  mappings = jax.jit(functools.partial(ops.mhc_mappings, sinkhorn_iters=conn.sinkhorn_iters,
                                       sinkhorn_eps=conn.sinkhorn_eps, norm_eps=conn.norm_eps,
                                       pre_eps=conn.pre_eps))
  for l in range(n_layers):
    for ours_name, hf_name in (("attn_conn", "attn_hc"), ("mlp_conn", "ffn_hc")):
      p = {k: loaded["blocks"][ours_name][k][l] for k in ("phi", "b", "alpha")}
      h_pre, h_post, h_res = mappings(jnp.asarray(x), p)
      np.testing.assert_allclose(h_post, theirs[f"{l}/{hf_name}/post"], atol=1e-5)
      np.testing.assert_allclose(np.swapaxes(h_res, -1, -2), theirs[f"{l}/{hf_name}/comb"], atol=1e-5)
      np.testing.assert_allclose(ops.stream_pre(jnp.asarray(x), h_pre),
                                 theirs[f"{l}/{hf_name}/collapsed"], atol=1e-5)
  from mhc_jax.layers.connection import CollapseHead
  from mhc_jax.layers.norm import RMSNorm
  y = CollapseHead(conn.pre_eps, conn.norm_eps).apply({"params": loaded["collapse"]}, jnp.asarray(x))
  y = RMSNorm(cfg.norm_eps).apply({"params": loaded["final_norm"]}, y)
  np.testing.assert_allclose(y, theirs["head"], atol=1e-5)
  # And the loaded LM runs.
  logits = jax.jit(LM(cfg).apply)({"params": convert.load_v4_safetensors(ck, params)},
                                  jnp.zeros((1, 4), jnp.int32))
  assert np.all(np.isfinite(np.asarray(logits)))
