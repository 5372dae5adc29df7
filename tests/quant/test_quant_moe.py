"""Quantised MoE + MLA models: routed and shared experts and the MLA projections are quantised with
qwix's quantiser (NumPy reference for scales, integers and the expert FFN), the router, balance
biases and connection parameters stay float32 and bit-equal, the quantised model equals the float
model on the dequantised weights, checkpoints round-trip; layer streaming reads only the routed
experts (LRU cache), with the in-memory run's tokens and loss."""
import dataclasses
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import qwix

from tests.quant.helpers import run_cli as _cli
from mhc_jax.config import ConnectionConfig, MLAConfig, ModelConfig, MoEConfig
from mhc_jax.configs import tiny
from mhc_jax.model import LM
from mhc_jax.ops.moe import compact_experts, moe_ffn
from mhc_jax.quant import (QuantSpec, dequantize_params, load_moe_state, load_quantized,
                           quantize_params, quantized_generate, quantized_lm, save_quantized, stream)
from mhc_jax.quant.core import WithAux
from mhc_jax.quant.infer import evaluate_quantized
from mhc_jax.quant.io import _to_plain
from mhc_jax.train.step import model_variables

pytestmark = pytest.mark.filterwarnings("ignore:'VariableState' was removed:DeprecationWarning")
MOE = MoEConfig(n_routed=8, n_shared=1, top_k=2, d_expert=16, seq_aux_weight=1e-2)
MLA = MLAConfig(kv_rank=16, rope_dim=4, nope_dim=8, v_dim=8)
TOK = jax.random.randint(jax.random.PRNGKey(0), (2, 8), 0, 256)
PROMPT = np.array([[3, 1, 4, 1, 5]], np.int32)


def _cfg(scan=True, mla=True, n_layers=3, moe=MOE):
  return ModelConfig(vocab_size=256, d_model=32, n_layers=n_layers, n_heads=2, max_seq_len=16,
                     dtype="float32", moe=moe, mla=MLA if mla else None, n_dense_layers=1,
                     scan_layers=scan,
                     connection=ConnectionConfig(kind="mhc", n_streams=2, sinkhorn_iters=3))


def _model(scan=True, mla=True, n_layers=3, moe=MOE):
  """Params scaled like trained weights (larger than init), and balance biases that differ."""
  cfg = _cfg(scan, mla, n_layers, moe)
  v = LM(cfg).init(jax.random.PRNGKey(1), TOK)
  params = jax.tree_util.tree_map_with_path(
      lambda p, a: a * 8.0 if a.ndim >= 2 and "conn" not in jax.tree_util.keystr(p) else a,
      nn.meta.unbox(v["params"]))
  state = jax.tree.map(lambda b: b + jnp.linspace(-0.2, 0.2, b.shape[-1]), nn.meta.unbox(v["moe_state"]))
  return cfg, params, state


def _is_q(x):
  return isinstance(x, (qwix.QArray, WithAux))


def _np_scale_q(w, bits, contract, group=None):
  """NumPy float64 reference: symmetric absmax scale over all contracting axes (one layer's
  kernel), `absmax / (qmax + 0.5)` (qwix's bound), with the last contracting axis cut into groups
  of `group` rows (one scale each); and the integers `clip(round(w / s))`. Returns the scale
  broadcast to `w`'s shape."""
  w = np.asarray(w, np.float64)
  qmax = 2 ** (bits - 1) - 1
  a = contract[-1]
  g = w.shape[a] if group is None else group
  shp = list(w.shape)
  shp[a:a + 1] = [shp[a] // g, g]
  red = tuple(c for c in contract if c != a) + (a + 1,)     # axes of the split shape to reduce
  s = np.abs(w.reshape(shp)).max(axis=red, keepdims=True) / (qmax + 0.5)
  s = np.broadcast_to(s, shp).reshape(w.shape).astype(np.float32)
  q = np.clip(np.round(np.asarray(w, np.float32) / s), -qmax - 1, qmax)
  return s, q


@pytest.mark.parametrize("mode,group", [("int8", None), ("int4", 8)])
def test_expert_and_mla_kernels_equal_numpy_reference(mode, group):
  cfg, params, state = _model(scan=True)
  qp = quantize_params(cfg, params, QuantSpec(mode, group or 128))
  bits = 8 if mode == "int8" else 4
  for path, contract in ((("blocks", "moe", "gate"), (1,)), (("blocks", "moe", "down"), (1,)),
                         (("blocks", "moe", "shared_up"), (0,)), (("blocks", "attn", "q"), (0,)),
                         (("dense_blocks", "attn", "out"), (0, 1))):
    w, q = params, qp
    for k in path:
      w, q = w[k], q[k]
    assert isinstance(q, qwix.QArray), path
    g = None if group is None else min(group, w.shape[1 + contract[-1]])
    for layer in range(w.shape[0]):
      ref_s, ref_q = _np_scale_q(w[layer], bits, contract, g)
      deq = np.asarray(qwix.dequantize(jax.tree.map(lambda a: a[layer], q)), np.float64)
      np.testing.assert_allclose(deq.max(), (ref_q * ref_s).max(), rtol=1e-6)
      got_q = np.asarray(q.qvalue[layer].astype(jnp.int8), np.int64)
      off = got_q != ref_q
      # integers equal the reference's except on the +-(qmax + 0.5) tie of a group's absmax
      assert np.all(np.abs(got_q - ref_q) <= 1) and off.mean() <= 0.05, (path, off.mean())
      np.testing.assert_allclose(deq, got_q * ref_s.astype(np.float64), rtol=3e-7, atol=0)
  # the expert FFN on quantised experts is the FFN on q · s (NumPy-dequantised) ...
  blk = jax.tree.map(lambda a: a[0], qp["blocks"]["moe"])          # MoE layer 0 (a QArray maps
                                                                    # over its values and scales)
  deq = {k: (jnp.asarray(np.asarray(v.qvalue.astype(jnp.int8), np.float64)
                         * np.broadcast_to(np.repeat(np.asarray(v.scale, np.float64),
                                                     v.qvalue.shape[-2] // v.scale.shape[-2],
                                                     axis=-2), v.qvalue.shape), jnp.float32)
             if isinstance(v, qwix.QArray) else v) for k, v in blk.items()}
  x = jax.random.normal(jax.random.PRNGKey(3), (12, 32))
  for impl in ("tiled", "ragged", "dense"):
    y_q, st_q = moe_ffn(x, blk, top_k=2, implementation=impl)
    y_r, st_r = moe_ffn(x, deq, top_k=2, implementation=impl)
    np.testing.assert_array_equal(st_q["expert_ids"], st_r["expert_ids"])
    np.testing.assert_allclose(y_q, y_r, rtol=2e-5, atol=2e-5)
  # ... and differs from the float experts: quantisation happened
  flt = {k: v[0] for k, v in params["blocks"]["moe"].items()}
  assert np.abs(np.asarray(y_q) - np.asarray(moe_ffn(x, flt, top_k=2)[0])).max() > 1e-4


def test_only_projections_quantized_router_bias_connections_bit_equal():
  cfg, params, _ = _model(scan=True)
  qp = quantize_params(cfg, params, QuantSpec("int8"))
  flat = jax.tree_util.tree_flatten_with_path(qp, is_leaf=_is_q)[0]
  quantized = {jax.tree_util.keystr(p) for p, v in flat if _is_q(v)}
  want = {f"['{s}']['attn']['{k}']" for s in ("dense_blocks", "blocks")
          for k in ("q", "kv_down", "k_rope", "k_up", "v_up", "out")}
  want |= {f"['blocks']['moe']['{k}']" for k in ("gate", "up", "down", "shared_gate", "shared_up",
                                                  "shared_down")}
  want |= {f"['dense_blocks']['mlp']['{k}']['kernel']" for k in ("wi_0", "wi_1", "wo")}
  assert quantized == want
  fp = {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_flatten_with_path(params)[0]}
  kept = [jax.tree_util.keystr(p) for p, v in flat if not _is_q(v)]
  assert any("router" in k for k in kept) and sum("_conn" in k for k in kept) >= 6
  for p, v in flat:
    if not _is_q(v):
      np.testing.assert_array_equal(np.asarray(v), np.asarray(fp[jax.tree_util.keystr(p)]))


@pytest.mark.parametrize("scan", [True, False])
def test_quantized_moe_model_is_float_model_on_dequantized_weights(scan):
  cfg, params, state = _model(scan=scan)
  ref = LM(cfg).apply(model_variables(params, state), TOK)
  err = {}
  for mode in ("int8", "int4"):
    spec = QuantSpec(mode, 16)
    qp = quantize_params(cfg, params, spec)
    got = quantized_lm(cfg, spec).apply(model_variables(qp, state), TOK)
    deq = LM(cfg).apply(model_variables(dequantize_params(qp), state), TOK)
    np.testing.assert_allclose(got, deq, rtol=1e-5, atol=1e-5)
    err[mode] = float(jnp.abs(got - ref).max() / jnp.abs(ref).max())
  assert 0 < err["int8"] < err["int4"], err


def test_quantized_moe_checkpoint_roundtrip_and_decode(tmp_path):
  cfg, params, state = _model(scan=True)
  rc = dataclasses.replace(tiny(), model=cfg)
  spec = QuantSpec("int4", 16)
  qp = quantize_params(cfg, params, spec)
  out = str(tmp_path / "q")
  save_quantized(out, rc, spec, qp, {"step": 3}, moe_state=state)
  rc2, spec2, qp2, meta = load_quantized(out)
  state2 = load_moe_state(out)
  assert rc2.model == cfg and spec2 == spec and meta["step"] == 3
  a, b = jax.tree.leaves(qp), jax.tree.leaves(qp2)
  assert len(a) == len(b) and jax.tree.structure(qp, is_leaf=_is_q) == \
      jax.tree.structure(qp2, is_leaf=_is_q)
  for x, y in zip(a, b):
    assert x.dtype == y.dtype and x.shape == y.shape
    np.testing.assert_array_equal(np.asarray(x.astype(jnp.int8) if x.dtype == jnp.int4 else x),
                                  np.asarray(y.astype(jnp.int8) if y.dtype == jnp.int4 else y))
  for x, y in zip(jax.tree.leaves(state), jax.tree.leaves(state2)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  kw = dict(max_new_tokens=5, temperature=0.0)
  g1 = quantized_generate(cfg, spec, qp, PROMPT, moe_state=state, **kw)
  np.testing.assert_array_equal(g1, quantized_generate(cfg, spec, qp2, PROMPT, moe_state=state2, **kw))
  # the biases matter: without them the routing (and here the tokens) differ
  zero = jax.tree.map(jnp.zeros_like, state)
  assert not np.array_equal(quantized_lm(cfg, spec).apply(model_variables(qp, state), TOK),
                            quantized_lm(cfg, spec).apply(model_variables(qp, zero), TOK))


def test_compact_experts_and_fetch_equal_all_experts():
  ids = jnp.array([[5, 2], [2, 7], [5, 0]])
  slots, local = compact_experts(ids, 8)
  np.testing.assert_array_equal(slots, [0, 2, 5, 7, 8, 8])    # distinct ascending, then sentinel E
  np.testing.assert_array_equal(slots[local], ids)
  _, params, _ = _model(scan=True)
  p = {k: v[0] for k, v in params["blocks"]["moe"].items()}
  x = jax.random.normal(jax.random.PRNGKey(4), (6, 32))
  asked = []

  def fetch(s):
    asked.append(s.shape)
    return {k: p[k][jnp.minimum(s, 7)] for k in ("gate", "up", "down")}
  rest = {k: v for k, v in p.items() if k not in ("gate", "up", "down")}
  for impl in ("tiled", "ragged", "dense"):
    y, st = moe_ffn(x, p, top_k=2, implementation=impl)
    y2, st2 = moe_ffn(x, rest, top_k=2, implementation=impl, fetch=fetch)
    np.testing.assert_allclose(y2, y, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(st2["counts"], st["counts"])
  assert asked and all(s == (8,) for s in asked)              # min(E, T·k) = min(8, 12) slots


# ---------------------------------------------------------------- streaming
def _layout(tmp_path, scan, mode):
  # 3 MoE layers of 16 experts: more than the 2 · min(E, MOE_PREFILL_CHUNK · k) = 16 one call needs
  cfg, params, state = _model(scan=scan, n_layers=4, moe=dataclasses.replace(MOE, n_routed=16))
  rc = dataclasses.replace(tiny(), model=cfg)
  spec = None if mode == "float32" else QuantSpec(mode, 16)
  tree = params if spec is None else quantize_params(cfg, params, spec)
  plain = params if spec is None else jax.device_get(_to_plain(tree))
  path = stream.write_layout(str(tmp_path / "s"), rc, plain, spec, {"step": 0}, state)
  return cfg, spec, tree, state, stream.Layout(path)


@pytest.mark.parametrize("scan,mode", [(True, "float32"), (False, "int8"), (True, "int4")])
def test_streamed_moe_reads_only_routed_experts(scan, mode, tmp_path):
  cfg, spec, tree, state, layout = _layout(tmp_path, scan, mode)
  assert layout.expert_layers == [1, 2, 3] and layout.expert_record > 0
  for x in layout.groups["experts_1"]["leaves"]:      # int4 values packed two per byte on disk
    size = int(np.prod(x["shape"]))
    assert x["nbytes"] == ((size + 1) // 2 if x["dtype"] == "int4" else
                           size * np.dtype(x["dtype"]).itemsize), x
  assert (mode == "int4") == any(x["dtype"] == "int4" for x in layout.groups["experts_1"]["leaves"])
  kw = dict(max_new_tokens=6, temperature=0.0)
  ref = quantized_generate(cfg, spec, tree, PROMPT, moe_state=state, **kw)
  rng = np.random.default_rng(0)
  batches = [{"inputs": rng.integers(0, 256, (2, 16)), "targets": rng.integers(0, 256, (2, 16))}]
  ref_loss = evaluate_quantized(cfg, spec, tree, batches, moe_state=state)["loss"]
  full = stream.budget_plan(layout, 10**12)
  assert full.in_memory and full.expert_cache == full.n_experts == 48
  rec, k, n_moe, P, N = layout.expert_record, MOE.top_k, 3, PROMPT.shape[1], kw["max_new_tokens"]
  # no expert cache, every layer streamed: each call reads just the experts it routes to
  m = stream.StreamedLM(layout, full.minimum)
  assert (m.plan.cached, m.plan.expert_cache) == (0, 0) and not m.plan.in_memory
  np.testing.assert_array_equal(m.generate(PROMPT, **kw), ref)
  r = m.report()
  assert r["expert_hits"] == 0 and r["expert_bytes_read"] == r["expert_misses"] * rec
  # prefill in chunks of MOE_PREFILL_CHUNK tokens, each routing to at least k and at most
  # min(E, c·k) distinct experts per MoE layer; then each decode step to exactly k
  chunks = [min(stream.MOE_PREFILL_CHUNK, P - i) for i in range(0, P, stream.MOE_PREFILL_CHUNK)]
  lo = n_moe * (len(chunks) * k + (N - 1) * k)
  hi = n_moe * (sum(min(16, c * k) for c in chunks) + (N - 1) * k)
  assert len(chunks) == 2 and lo <= r["expert_misses"] <= hi, (lo, r, hi)
  m.close()
  # every dense part cached, room for 5 experts: LRU hits, fewer reads, same tokens and loss
  budget = full.minimum + sum(layout.layer_bytes) - full.layer + 5 * rec
  m = stream.StreamedLM(layout, budget)
  assert m.plan.cached == 4 and m.plan.expert_cache == 5 and not m.plan.in_memory
  np.testing.assert_array_equal(m.generate(PROMPT, **kw), ref)
  r2 = m.report()
  assert r2["expert_hits"] > 0 and r2["expert_misses"] < r["expert_misses"]
  assert r2["expert_hits"] + r2["expert_misses"] == r["expert_misses"]
  assert len(m.experts.cache) == 5
  np.testing.assert_allclose(m.evaluate(batches)["loss"], ref_loss, rtol=1e-5)
  m.close()
  # the whole layout read back equals the source tree and biases
  params, moe_state = stream.load_params(layout)
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(tree)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  for a, b in zip(jax.tree.leaves(moe_state), jax.tree.leaves(state)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.fixture(scope="module")
def moe_run(tmp_path_factory):
  from mhc_jax.train.loop import train
  from tests.train.helpers import tiny_config, write_corpus
  root = tmp_path_factory.mktemp("moerun")
  corpus = write_corpus(str(root / "corpus"), n_files=4, lines=30)
  cfg = tiny_config(corpus, str(root / "cache"), "model.n_layers=3", "model.n_dense_layers=1",
                    "model.moe.n_routed=8", "model.moe.top_k=2", "model.moe.d_expert=16",
                    "model.mla.kv_rank=16", "model.mla.rope_dim=4", "model.mla.nope_dim=8",
                    "model.mla.v_dim=8", "train.steps=2", "train.warmup_steps=1",
                    "train.eval_every=2", "train.checkpoint_every=2", "train.log_every=2",
                    "train.sample_tokens=0")
  out = str(root / "run")
  train(cfg, out, progress=False)
  return out


@pytest.mark.slow
def test_cli_quantize_moe_run_then_eval_and_streamed_sample(moe_run, tmp_path, capsys):
  q = str(tmp_path / "q8")
  code, o, e = _cli(["quantize", "--run-dir", moe_run, "--mode", "int8", "--out", q], capsys)
  assert code == 0, e
  assert load_moe_state(q)       # the balance biases came along
  code, o, e = _cli(["eval", "--run-dir", q, "--batches", "1"], capsys)
  assert code == 0, e
  ref = json.loads(o.strip().splitlines()[-1])
  argv = ["sample", "--run-dir", q, "--prompt", "de", "--tokens", "5", "--temperature", "0"]
  code, want, e = _cli(argv, capsys)
  assert code == 0, e
  layout = stream.Layout(stream.ensure_layout(q))
  code, o, e = _cli(argv + ["--max-memory", str(stream.budget_plan(layout, 10**12).minimum)],
                    capsys)
  assert code == 0 and o == want and "streamed" in e and "routed experts:" in e, e
  code, o, e = _cli(["eval", "--run-dir", q, "--batches", "1", "--max-memory",
                     str(stream.budget_plan(layout, 10**12, eval_batch=(
                         layout.cfg.data.batch_size, layout.cfg.data.seq_len)).minimum)], capsys)
  assert code == 0, e
  res = json.loads(o.strip().splitlines()[-1])
  assert res["mode"] == "streamed"
  np.testing.assert_allclose(res["loss"], ref["loss"], rtol=1e-5)


@pytest.mark.slow
def test_moe_streamed_peak_rss_under_budget(tmp_path):
  """An MoE model whose routed experts dwarf the runtime's noise (float32, 3 MoE layers of 64
  experts: ~75 MiB), decoded at half its weights: the same tokens as in memory, the model's peak
  resident memory under budget + allowance (in memory: above the weights), and per token only the
  routed experts read."""
  from mhc_jax.tools.bench_stream import run_child, write_model
  path = write_model(str(tmp_path / "layout"), 256, 4, 4, 24, moe=(64, 4, 128))
  layout = stream.Layout(path)
  weights = layout.weight_bytes
  budget = weights // 2
  allowance = 16 << 20    # as for dense streaming: allocator slack, Python objects, XLA temporaries
  st = run_child(path, budget, 8, 8)
  mem = run_child(path, None, 8, 8)
  assert st["tokens_out"] == mem["tokens_out"]
  assert st["model_rss_bytes"] < budget + allowance, st
  assert mem["model_rss_bytes"] > weights, mem
  x = st["experts"]
  all_experts = x["total_records"] * x["record_bytes"]
  assert x["misses"] > 0 and 0 < x["cache_records"] < x["total_records"]
  assert x["bytes_read_per_token"] < all_experts / 8, x   # k=4 of 64 per layer, plus the prompt
  print(f"weights {weights >> 20} MiB, budget {budget >> 20} MiB: streamed "
        f"{st['model_rss_bytes'] >> 20} MiB, in memory {mem['model_rss_bytes'] >> 20} MiB; experts "
        f"read {x['bytes_read_per_token'] / 2**20:.2f} MiB/token of {all_experts / 2**20:.1f} MiB")
