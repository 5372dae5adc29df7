"""mhc_jax.quant: qwix weight-only int8/int4 against a NumPy quantise -> dequantise -> matmul
reference; connection parameters untouched; tiny-model logits; checkpoint round trip; CLI errors."""
import json
import os
import stat

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.quant.helpers import run_cli as _cli
from mhc_jax.config import ConfigError, apply_overrides
from mhc_jax.configs import tiny
from mhc_jax.model import LM
from mhc_jax.quant import (QuantSpec, load_quantized, quantize_params, quantize_run,
                           quantized_generate, quantized_lm, save_quantized)
from mhc_jax.quant.core import WithAux
from mhc_jax.train.loop import train
from tests.train.helpers import tiny_config, write_corpus

# qwix 0.1.8 checks isinstance(x, nnx.VariableState), which flax 0.12 deprecates (warns per call)
pytestmark = pytest.mark.filterwarnings("ignore:'VariableState' was removed:DeprecationWarning")


# ---------------------------------------------------------------- NumPy reference (float64)
def np_scale(w, bits, axis_groups):
  """Symmetric absmax scale of `w` [K, N] per group of `axis_groups` rows along the contraction axis
  0 (None: the whole column, i.e. per output channel): `absmax / (qmax + 0.5)` -- qwix's symmetric
  bound is qmax + 0.5 (the top bucket is [qmax - 0.5, qmax + 0.5)). Shape [K / g, 1, N]."""
  w = np.asarray(w, np.float64)
  k, n = w.shape
  g = k if axis_groups is None else axis_groups
  qmax = 2 ** (bits - 1) - 1            # int8: 127, int4: 7
  return np.abs(w.reshape(k // g, g, n)).max(axis=1, keepdims=True) / (qmax + 0.5)


def np_quant_dequant(w, bits, scale):
  """Integers `clip(round(w / scale), -qmax - 1, qmax)` (float32 division, round half to even) and
  the dequantised `q * scale` (float64), for `scale` [K / g, 1, N]."""
  w = np.asarray(w, np.float32)
  k, n = w.shape
  qmax = 2 ** (bits - 1) - 1
  scale = np.asarray(scale, np.float32)
  q = np.clip(np.round(w.reshape(scale.shape[0], -1, n) / scale), -qmax - 1, qmax)
  return (q.astype(np.float64) * scale.astype(np.float64)).reshape(k, n), q


class _Holder(nn.Module):
  """One projection of the kind the LM uses, named as in the LM: `mlp/wi_0` (nn.Dense) or
  `attn/query` (nn.Einsum)."""
  kind: str

  @nn.compact
  def __call__(self, x):
    if self.kind == "dense":
      return nn.Dense(48, use_bias=False, dtype=jnp.float32, name="wi_0")(x)
    return nn.Einsum((64, 3, 16), "btc,chd->bthd", use_bias=False, dtype=jnp.float32,
                     name="query")(x)


class _Wrap(nn.Module):
  kind: str

  @nn.compact
  def __call__(self, x):
    return _Holder(self.kind, name="mlp" if self.kind == "dense" else "attn")(x)


@pytest.mark.parametrize("kind", ["dense", "einsum"])
@pytest.mark.parametrize("mode,group", [("int8", None), ("int4", 16), ("int4", 32)])
def test_layer_equals_numpy_reference(kind, mode, group):
  import qwix
  from mhc_jax.quant.core import QTYPES
  rng = np.random.default_rng(0)
  x = rng.standard_normal((2, 5, 64)).astype(np.float32)
  model = _Wrap(kind)
  params = nn.meta.unbox(model.init(jax.random.PRNGKey(1), x)["params"])
  rule = qwix.QuantizationRule(module_path=r".*(mlp/wi_0|attn/query)$", weight_qtype=QTYPES[mode],
                               tile_size=group)
  qm = qwix.quantize_model(model, qwix.PtqProvider([rule]))
  abstract = jax.eval_shape(qm.init, jax.random.PRNGKey(0), x)["params"]
  qparams = qwix.quantize_params(params, abstract)
  got = np.asarray(qm.apply({"params": qparams}, x), np.float64)
  w = np.asarray(jax.tree.leaves(params)[0], np.float64)
  w2 = w.reshape(64, -1)                                 # [C, N] (einsum: N = heads * head_dim)
  bits = 8 if mode == "int8" else 4
  leaf = jax.tree.leaves(qparams, is_leaf=lambda a: isinstance(a, WithAux))[0]
  q_scale = np.asarray(leaf.array.scale, np.float32).reshape(-1, 1, w2.shape[1])
  # the scale equals the reference's to float32 rounding ...
  np.testing.assert_allclose(q_scale, np_scale(w2, bits, group), rtol=3e-7, atol=0)
  # ... and the integers are the reference's, except that the absmax element of a group sits on
  # the +-(qmax + 0.5) rounding tie, where float rounding of w / scale may pick either neighbour
  deq, q = np_quant_dequant(w2, bits, q_scale)
  got_q = np.asarray(leaf.array.qvalue.astype(jnp.int8)).reshape(w2.shape).astype(np.int64)
  ref_q = q.reshape(w2.shape).astype(np.int64)
  g = 64 if group is None else group
  absmax = np.repeat(np.abs(w2.reshape(64 // g, g, -1)).max(1), g, axis=0)
  off = got_q != ref_q
  assert np.all(np.abs(got_q - ref_q) <= 1) and np.all(np.abs(w2[off]) == absmax[off])
  assert off.sum() <= 0.05 * off.size
  # the layer output is quantise -> dequantise -> matmul with these integers and scales
  deq_got = (got_q.reshape(q.shape) * q_scale.astype(np.float64)).reshape(w2.shape)
  ref = (x.astype(np.float64).reshape(-1, 64) @ deq_got).reshape(got.shape)
  np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)
  # and equals the all-reference output up to those tie steps
  np.testing.assert_allclose(got, (x.astype(np.float64).reshape(-1, 64) @ deq).reshape(got.shape),
                             atol=float(np.abs(x).max() * q_scale.max() * off.sum(0).max()) + 1e-5)
  # and they differ from float: quantisation really happened
  assert np.abs(got - (x.astype(np.float64) @ w2).reshape(got.shape)).max() > 1e-6


# ---------------------------------------------------------------- whole model
@pytest.fixture(scope="module")
def tiny_model():
  cfg = apply_overrides(tiny(), ["model.d_model=64", "model.n_heads=2"]).model
  tok = jnp.asarray(np.random.default_rng(0).integers(0, 256, (2, 16)), jnp.int32)
  params = nn.meta.unbox(LM(cfg).init(jax.random.PRNGKey(0), tok)["params"])
  # trained-like weights: larger than init, varied scale per column
  params = jax.tree_util.tree_map_with_path(
      lambda p, a: a * 8.0 if "kernel" in jax.tree_util.keystr(p) else a, params)
  return cfg, params, tok


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_only_projections_quantized_connections_bit_equal(tiny_model, mode):
  cfg, params, _ = tiny_model
  qp = quantize_params(cfg, params, QuantSpec(mode, 16))
  flat = jax.tree_util.tree_flatten_with_path(qp, is_leaf=lambda a: isinstance(a, WithAux))[0]
  quantized = sorted(jax.tree_util.keystr(p) for p, v in flat if isinstance(v, WithAux))
  assert len(quantized) == 7 and all(("attn" in s or "mlp" in s) and "conn" not in s
                                      for s in quantized)
  fp = {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_flatten_with_path(params)[0]}
  n_conn = 0
  for p, v in flat:
    if isinstance(v, WithAux):
      continue
    k = jax.tree_util.keystr(p)
    assert v.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(v), np.asarray(fp[k]))   # bit-equal
    n_conn += "_conn" in k
  assert n_conn >= 6   # phi, b, alpha, norm scale for attn_conn and mlp_conn


def test_int8_logits_of_trained_tiny_model_close(run_dir):
  from mhc_jax.data import make_eval_batches
  from mhc_jax.train.loop import load_checkpoint
  trainer = load_checkpoint(run_dir)
  cfg, params = trainer.cfg, jax.device_get(trainer.state.params)
  tok = jnp.asarray(make_eval_batches(cfg.data, 1)[0]["inputs"])
  ref = np.asarray(LM(cfg.model).apply({"params": params}, tok))
  err = {}
  for mode in ("int8", "int4"):
    spec = QuantSpec(mode, 16)
    qp = quantize_params(cfg.model, params, spec)
    out = np.asarray(quantized_lm(cfg.model, spec).apply({"params": qp}, tok))
    err[mode] = np.abs(out - ref).max() / np.abs(ref).max()
  # stated tolerance: int8 per-channel logits within 1% of the largest |logit|
  assert 0 < err["int8"] < 0.01, err
  assert err["int4"] > err["int8"], err


def test_bad_spec_and_group_size(tiny_model):
  cfg, params, _ = tiny_model
  with pytest.raises(ConfigError, match=r"--mode='int3'"):
    QuantSpec("int3")
  with pytest.raises(ConfigError, match=r"--group-size=0"):
    QuantSpec("int4", 0)
  with pytest.raises(ConfigError, match=r"--group-size=24 .*model.d_model=64"):
    quantize_params(cfg, params, QuantSpec("int4", 24))


def test_roundtrip_bit_exact_and_decode(tiny_model, tmp_path):
  cfg, params, tok = tiny_model
  rc = dataclasses_replace_model(tiny(), cfg)
  for mode in ("int8", "int4"):
    spec = QuantSpec(mode, 32)
    qp = quantize_params(cfg, params, spec)
    out = str(tmp_path / f"q_{mode}")
    save_quantized(out, rc, spec, qp, {"step": 1})
    rc2, spec2, qp2, meta = load_quantized(out)
    assert spec2 == spec and rc2.model == cfg and meta["step"] == 1
    a, b = jax.tree.leaves(qp), jax.tree.leaves(qp2)
    assert len(a) == len(b)
    for x, y in zip(a, b):
      assert x.dtype == y.dtype and x.shape == y.shape
      np.testing.assert_array_equal(np.asarray(x.astype(jnp.int8) if x.dtype == jnp.int4 else x),
                                    np.asarray(y.astype(jnp.int8) if y.dtype == jnp.int4 else y))
    if mode == "int4":   # the loaded tree drives the decoder as the in-memory one does
      g1 = quantized_generate(cfg, spec, qp, np.asarray(tok[0, :4]), max_new_tokens=4, temperature=0)
      g2 = quantized_generate(cfg, spec, qp2, np.asarray(tok[0, :4]), max_new_tokens=4, temperature=0)
      np.testing.assert_array_equal(g1, g2)


def dataclasses_replace_model(rc, model):
  import dataclasses
  return dataclasses.replace(rc, model=model)


# ---------------------------------------------------------------- CLI (one trained tiny run)
@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
  root = tmp_path_factory.mktemp("qrun")
  corpus = write_corpus(str(root / "corpus"), n_files=4, lines=30)
  cfg = tiny_config(corpus, str(root / "cache"), "train.steps=4", "train.eval_every=4",
                    "train.checkpoint_every=4", "train.log_every=2")
  rd = str(root / "run")
  train(cfg, rd, progress=False)
  return rd


def test_cli_quantize_then_eval_and_sample(run_dir, tmp_path, capsys):
  out = str(tmp_path / "q8")
  code, o, e = _cli(["quantize", "--run-dir", run_dir, "--mode", "int8", "--out", out], capsys)
  assert code == 0, e
  info = json.loads(o.strip().splitlines()[-1])
  assert info["memory_ratio"] < 0.6 and os.path.isfile(os.path.join(out, "config.json"))
  code, o, e = _cli(["eval", "--run-dir", out, "--batches", "1"], capsys)
  assert code == 0, e
  res = json.loads(o.strip().splitlines()[-1])
  assert res["mode"] == "int8" and np.isfinite(res["loss"]) and res["bits_per_byte"] > 0
  code, o, e = _cli(["sample", "--run-dir", out, "--prompt", "def ", "--tokens", "5",
                     "--temperature", "0"], capsys)
  assert code == 0 and o.startswith("def "), e
  # the sample / eval input checks apply to a quantised checkpoint too
  for argv, field in ((["sample", "--run-dir", out, "--temperature", "nan"], "--temperature"),
                      (["eval", "--run-dir", out, "--batches", "0"], "--batches")):
    code, o, e = _cli(argv, capsys)
    lines = [ln for ln in e.strip().splitlines() if ln]
    assert code == 2 and len(lines) == 1 and field in lines[0], e


def test_cli_quantize_int8_kv_cache(run_dir, tmp_path, capsys):
  """`--kv-cache int8` goes into the quantised checkpoint's config; sampling decodes with it."""
  from mhc_jax.train import run_dir as rd
  out = str(tmp_path / "q8kv")
  code, o, e = _cli(["quantize", "--run-dir", run_dir, "--mode", "int8", "--kv-cache", "int8",
                     "--out", out], capsys)
  assert code == 0, e
  assert rd.read_config(out).model.kv_cache == "int8" and rd.read_config(run_dir).model.kv_cache == "float"
  code, o, e = _cli(["sample", "--run-dir", out, "--prompt", "def ", "--tokens", "5",
                     "--temperature", "0"], capsys)
  assert code == 0 and o.startswith("def "), e


@pytest.mark.parametrize("args,field", [
    (["--mode", "int2"], "--mode"),
    (["--mode", "int4", "--group-size", "24"], "--group-size"),
    (["--mode", "int4", "--group-size", "0"], "--group-size"),
    (["--mode", "int8", "--run-dir", "/nonexistent/run"], "--run-dir"),
    (["--mode", "int8", "--out", "/nonexistent/dir/q"], "--out"),
    (["--mode", "int8", "--out", "/"], "--out"),
    (["--mode", "int8", "--kv-cache", "int4"], "--kv-cache"),
])
def test_cli_bad_input_one_line(run_dir, tmp_path, capsys, args, field):
  out = str(tmp_path / "q")
  argv = ["quantize", "--run-dir", run_dir, "--out", out]
  argv = argv + args   # later flags win in argparse
  code, o, e = _cli(argv, capsys)
  assert code == 2
  lines = [ln for ln in e.strip().splitlines() if ln]
  assert len(lines) == 1 and field in lines[0] and lines[0].startswith("error:"), e
  assert not os.path.exists(out)


def test_cli_unwritable_out(run_dir, tmp_path, capsys):
  if os.geteuid() == 0:
    pytest.skip("root can write anywhere")
  parent = tmp_path / "ro"
  parent.mkdir()
  parent.chmod(stat.S_IRUSR | stat.S_IXUSR)
  try:
    code, o, e = _cli(["quantize", "--run-dir", run_dir, "--mode", "int8",
                       "--out", str(parent / "q")], capsys)
  finally:
    parent.chmod(stat.S_IRWXU)
  assert code == 2 and "--out" in e and len(e.strip().splitlines()) == 1
  assert os.listdir(parent) == []
