"""Parity with Hugging Face transformers' `DeepseekV4HyperConnection` / `DeepseekV4HyperHead`.

Random V4-layout weights and inputs are sent to the real PyTorch modules (in their own Python 3.11
env, `torch_env.py`) and, converted with `mhc_jax.convert`, to our `Connection` / `CollapseHead`
with the `dsv4()` preset. Compared: post, comb (= H_res^T), the collapsed branch input, the full
sublayer update and the gradients of a random projection of it, to 1e-5 in float32.
"""
from __future__ import annotations

import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mhc_jax import convert, ops
from mhc_jax.config import dsv4
from mhc_jax.layers.connection import CollapseHead, Connection
from mhc_jax.layers.norm import RMSNorm

from tests.dsv4 import torch_env

pytestmark = [pytest.mark.torch, pytest.mark.slow, pytest.mark.xdist_group("dsv4")]
HERE = os.path.dirname(os.path.abspath(__file__))
TOL = dict(rtol=1e-5, atol=1e-5)

# (name, kind, n, C, iters, hc_eps): n in {2, 4}, several widths and iteration counts.
CASES = [
    ("s_n2_c32_i1", "site", 2, 32, 1, 1e-6),
    ("s_n2_c96_i20", "site", 2, 96, 20, 1e-6),
    ("s_n4_c64_i3", "site", 4, 64, 3, 1e-6),
    ("s_n4_c128_i20", "site", 4, 128, 20, 1e-6),
    ("s_n4_c48_i7_eps", "site", 4, 48, 7, 1e-3),
    ("h_n2_c32", "head", 2, 32, 20, 1e-6),
    ("h_n4_c64", "head", 4, 64, 20, 1e-6),
]
BF16_CASE = ("s_n4_c256_bf16", "site", 4, 256, 20, 1e-6)
RMS_EPS = 1e-6
B, T = 2, 3


def _inputs(name, kind, n, c, iters, eps, seed):
  rng = np.random.default_rng(seed)
  f = lambda *s, std=1.0: (std * rng.standard_normal(s)).astype(np.float32)  # noqa: E731
  a = {"x": f(B, T, n, c), "norm_w": 1.0 + f(c, std=0.3)}
  if kind == "site":
    rows = (2 + n) * n
    # fn std 0.1 gives mapping logits of std ~ 0.1 sqrt(nC) (1.1 to 2.3): a far from uniform comb.
    a.update(fn=f(rows, n * c, std=0.1), base=f(rows, std=0.5),
             scale=rng.uniform(0.5, 2.0, 3).astype(np.float32), W=f(c, c, std=c ** -0.5),
             cot=f(B, T, n, c))
  else:
    a.update(fn=f(n, n * c, std=0.1), base=f(n, std=0.5),
             scale=rng.uniform(0.5, 2.0, 1).astype(np.float32), cot=f(B, T, c))
  return a


@pytest.fixture(scope="session")
def hf(tmp_path_factory):
  """Run every case through the PyTorch modules once: `{name: (inputs, torch outputs)}`."""
  py, msg = torch_env.ensure()
  if py is None:
    pytest.skip("DeepSeek-V4 parity NOT RUN: " + msg)
  d = tmp_path_factory.mktemp("dsv4")
  meta, arrays, inputs = [], {}, {}
  for seed, (name, kind, n, c, iters, eps) in enumerate(CASES + [BF16_CASE]):
    meta.append(dict(name=name, kind=kind, n=n, C=c, iters=iters, eps=eps, rms_eps=RMS_EPS,
                     dtype="bfloat16" if name == BF16_CASE[0] else "float32"))
    inputs[name] = _inputs(name, kind, n, c, iters, eps, seed)
    arrays.update({f"{name}/{k}": v for k, v in inputs[name].items()})
  np.savez(d / "in.npz", meta=np.array(json.dumps(meta)), **arrays)
  torch_env.run(os.path.join(HERE, "hf_side.py"), "cases", str(d / "in.npz"), str(d / "out.npz"))
  out = np.load(d / "out.npz")
  res = {}
  for m in meta:
    got = {k.split("/", 1)[1]: out[k] for k in out.files if k.startswith(m["name"] + "/")}
    res[m["name"]] = (m, inputs[m["name"]], got)
  return res


def _site_module(m):
  cfg = dsv4(n_streams=m["n"], sinkhorn_iters=m["iters"], sinkhorn_eps=m["eps"],
             pre_eps=m["eps"], norm_eps=m["rms_eps"])
  return Connection(cfg, norm_eps=m["rms_eps"], dtype=jnp.float32)


def run_site(m, a, site_params):
  """Our side of a site case: mappings, collapsed input, update and gradients."""
  conn = _site_module(m)
  params = {**{k: jnp.asarray(v) for k, v in site_params.items()},
            "norm": {"scale": jnp.asarray(a["norm_w"])}}

  def update(params, x, w):
    out, state = conn.apply({"params": params}, x, lambda v: jnp.tanh(v @ w),
                            mutable=["intermediates"])
    return out, state["intermediates"]

  x, w, cot = (jnp.asarray(a[k]) for k in ("x", "W", "cot"))
  out, inter = jax.jit(update)(params, x, w)
  h_pre, h_post, h_res = (inter[k][0] for k in ("h_pre", "h_post", "h_res"))
  loss = lambda p, x, w: jnp.sum(update(p, x, w)[0] * cot)  # noqa: E731
  g_p, g_x, g_w = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(params, x, w)
  g_v4 = convert.site_to_v4(jax.tree.map(np.asarray, {k: g_p[k] for k in ("phi", "b", "alpha")}))
  return {"post": h_post, "comb": jnp.swapaxes(h_res, -1, -2), "collapsed": ops.stream_pre(x, h_pre),
          "out": out, "g_x": g_x, "g_fn": g_v4["fn"], "g_base": g_v4["base"],
          "g_scale": g_v4["scale"], "g_norm_w": g_p["norm"]["scale"], "g_W": g_w}


class _HeadThenNorm(nn.Module):
  eps: float
  norm_eps: float

  @nn.compact
  def __call__(self, x):
    y = CollapseHead(self.eps, self.norm_eps, name="collapse")(x)
    return y, RMSNorm(self.norm_eps, jnp.float32, name="final_norm")(y)


def run_head(m, a, head_params):
  mod = _HeadThenNorm(m["eps"], m["rms_eps"])
  params = {"collapse": {k: jnp.asarray(v) for k, v in head_params.items()},
            "final_norm": {"scale": jnp.asarray(a["norm_w"])}}
  x, cot = jnp.asarray(a["x"]), jnp.asarray(a["cot"])
  collapsed, out = jax.jit(mod.apply)({"params": params}, x)
  loss = lambda p, x: jnp.sum(mod.apply({"params": p}, x)[1] * cot)  # noqa: E731
  g_p, g_x = jax.jit(jax.grad(loss, argnums=(0, 1)))(params, x)
  g_v4 = convert.head_to_v4(jax.tree.map(np.asarray, g_p["collapse"]))
  return {"collapsed": collapsed, "out": out, "g_x": g_x, "g_fn": g_v4["fn"],
          "g_base": g_v4["base"], "g_scale": g_v4["scale"], "g_norm_w": g_p["final_norm"]["scale"]}


def compare(ours, theirs, grad_tol=1e-4):
  """Forward outputs to 1e-5; gradients (sums over B*T tokens, |g| up to ~10) to 1e-4 relative."""
  errs = {}
  for k, want in theirs.items():
    got = np.asarray(ours[k], np.float64)
    scale = max(1.0, float(np.max(np.abs(want)))) if k.startswith("g_") else 1.0
    tol = grad_tol * scale if k.startswith("g_") else TOL["atol"]
    errs[k] = float(np.max(np.abs(got - want)))
    np.testing.assert_allclose(got, want, rtol=TOL["rtol"] if not k.startswith("g_") else grad_tol,
                               atol=tol, err_msg=f"{k} differs from transformers")
  return errs


def _ours(m, a, from_v4=convert.site_from_v4):
  if m["kind"] == "site":
    return run_site(m, a, from_v4(a["fn"], a["base"], a["scale"]))
  return run_head(m, a, convert.head_from_v4(a["fn"], a["base"], a["scale"]))


@pytest.mark.parametrize("name", [c[0] for c in CASES])
def test_matches_transformers(hf, name):
  m, a, theirs = hf[name]
  errs = compare(_ours(m, a), theirs)
  print(name, {k: f"{v:.1e}" for k, v in errs.items()})


def _naive_from_v4(fn, base, scale):
  """The classic bug: read `comb` as H_res without the transpose."""
  return {"phi": fn.T, "b": base, "alpha": scale}


@pytest.mark.parametrize("name", ["s_n4_c64_i3", "s_n4_c128_i20"])
def test_transposed_comb_is_caught(hf, name):
  """A converter that forgets `comb = H_res^T` must fail the same comparison (n = 4: for n = 2 every
  doubly stochastic matrix is symmetric, so the transpose is invisible there)."""
  m, a, theirs = hf[name]
  ours = _ours(m, a, _naive_from_v4)
  with pytest.raises(AssertionError):
    compare(ours, theirs)
  assert np.max(np.abs(np.asarray(ours["comb"]) - theirs["comb"])) > 1e-3
  assert np.max(np.abs(np.asarray(ours["out"]) - theirs["out"])) > 1e-3


def test_wrong_eps_is_caught(hf):
  """The paper's eps-free Sinkhorn (sinkhorn_eps=0, pre_eps=0) is not V4: the test sees it."""
  m, a, theirs = hf["s_n4_c48_i7_eps"]
  m0 = dict(m, eps=0.0)
  with pytest.raises(AssertionError):
    compare(_ours(m0, a), theirs)


def test_bfloat16_sublayer_update_within_rounding(hf):
  """bf16 activations, as V4 runs: streams mixed in bf16, mappings in float32. Agreement is at
  bf16 rounding level (V4 collapses with a float32 sum, we with a bf16-accumulated one)."""
  m, a, theirs = hf[BF16_CASE[0]]
  conn = _site_module(m).clone(dtype=jnp.bfloat16)
  params = {**convert.site_from_v4(a["fn"], a["base"], a["scale"]), "norm": {"scale": a["norm_w"]}}
  x, w = (jnp.asarray(a[k]).astype(jnp.bfloat16) for k in ("x", "W"))
  out = jax.jit(lambda p, x, w: conn.apply({"params": p}, x, lambda v: jnp.tanh(v @ w)))(params, x, w)
  assert out.dtype == jnp.bfloat16
  err = np.abs(np.asarray(out.astype(jnp.float32)) - theirs["out"])
  print("bf16 update: max", err.max(), "mean", err.mean(), "max|out|", np.abs(theirs["out"]).max())
  assert err.max() <= 2 ** -4 and err.mean() <= 4e-3      # ~1-2 bf16 ulps at |out| ~ 4
