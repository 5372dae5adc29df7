"""mhc_jax.quant.stream (`--max-memory`): layers streamed from disk give the in-memory run's tokens
and loss (float32, int8 and int4; stacked and unstacked blocks); the peak resident memory stays under
the budget plus an allowance; bad budgets are one clear error."""
import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.quant.helpers import run_cli as _cli
from mhc_jax.config import ConfigError, apply_overrides
from mhc_jax.configs import tiny
from mhc_jax.model import LM
from mhc_jax.quant import QuantSpec, quantize_params, save_quantized, stream
from mhc_jax.quant.cli import parse_size
from mhc_jax.quant.infer import evaluate_quantized, quantized_generate
from mhc_jax.quant.io import _to_plain

pytestmark = pytest.mark.filterwarnings("ignore:'VariableState' was removed:DeprecationWarning")
PROMPT = np.array([[3, 1, 4, 1, 5, 9]], np.int32)


def _model(scan: bool, *extra):
  rc = apply_overrides(tiny(), [f"model.scan_layers={scan}", "model.n_layers=4",
                                "model.init_std=0.3", *extra])
  params = LM(rc.model).init(jax.random.PRNGKey(0), jnp.zeros((1, 4), jnp.int32))["params"]
  return rc, jax.device_get(nn.meta.unbox(params))


def _budget(layout: stream.Layout, n_layers: int, batch: int = 1) -> int:
  """A budget with room for `n_layers` layer buffers besides the fixed part."""
  p = stream.budget_plan(layout, 10**12, batch)
  return p.minimum - p.layer + n_layers * p.layer


@pytest.mark.parametrize("scan,mode,slots", [(True, "float32", (1, 2, 3)), (False, "float32", (2,)),
                                             (True, "int4", (2,)), (False, "int8", (1, 3))])
def test_streamed_tokens_and_loss_equal_in_memory(scan, mode, slots, tmp_path):
  full = (scan, mode) in ((True, "float32"), (False, "int8"))   # sampling and eval checked too
  rc, params = _model(scan)
  cfg = rc.model
  spec = None if mode == "float32" else QuantSpec(mode, 16)
  tree = params if spec is None else quantize_params(cfg, params, spec)
  plain = params if spec is None else jax.device_get(_to_plain(tree))
  layout = stream.Layout(stream.write_layout(str(tmp_path / "s"), rc, plain, spec, {"step": 0}))
  kw = dict(max_new_tokens=8, temperature=0.0)
  ref = quantized_generate(cfg, spec, tree, PROMPT, **kw)
  if full:
    ref_t = quantized_generate(cfg, spec, tree, PROMPT, max_new_tokens=8, temperature=0.9, seed=5)
    rng = np.random.default_rng(0)
    batches = [{"inputs": rng.integers(0, 256, (2, 16)), "targets": rng.integers(0, 256, (2, 16))}]
    ref_loss = evaluate_quantized(cfg, spec, tree, batches)["loss"]
  plans = {1: (1, 0), 2: (2, 0), 3: (2, 1)}   # no prefetch; prefetch; prefetch + layer 0 kept
  for n_slots in slots:
    m = stream.StreamedLM(layout, _budget(layout, n_slots))
    assert (m.plan.slots, m.plan.cached) == plans[n_slots] and not m.plan.in_memory
    np.testing.assert_array_equal(m.generate(PROMPT, **kw), ref)
    prefetched = m.plan.slots > 1    # the next pass's first streamed layer, read ahead
    assert m.bytes_read == ((4 - m.plan.cached) * 8 + m.plan.cached + prefetched) * \
        layout.layer_bytes[0]
    if full:
      np.testing.assert_array_equal(m.generate(PROMPT, max_new_tokens=8, temperature=0.9, seed=5),
                                    ref_t)
      np.testing.assert_allclose(m.evaluate(batches)["loss"], ref_loss, rtol=1e-6)
    m.close()
  # the whole model read back equals the source tree
  for a, b in zip(jax.tree.leaves(stream.load_params(layout)[0]), jax.tree.leaves(tree)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_parse_size():
  assert parse_size("2GB") == 2 * 10**9 and parse_size("512MB") == 512 * 10**6
  assert parse_size("1.5GiB") == int(1.5 * 2**30) and parse_size("1000") == 1000
  assert parse_size("64 kib") == 64 * 1024
  for bad in ("", "GB", "2XB", "-1GB", "0MB", "1e9", "two"):
    with pytest.raises(ConfigError, match="--max-memory"):
      parse_size(bad)


def test_budget_below_one_layer(tmp_path):
  rc, params = _model(True)
  layout = stream.Layout(stream.write_layout(str(tmp_path / "s"), rc, params, None, {}))
  p = stream.budget_plan(layout, 10**12)
  assert p.in_memory
  with pytest.raises(ConfigError, match=r"--max-memory=.* is not allowed: below the minimum"):
    stream.StreamedLM(layout, p.minimum - 1)
  assert stream.StreamedLM(layout, p.minimum).plan.slots == 1


@pytest.fixture(scope="module")
def qdir(tmp_path_factory):
  rc, params = _model(True)
  spec = QuantSpec("int8")
  out = str(tmp_path_factory.mktemp("qs") / "q8")
  save_quantized(out, rc, spec, quantize_params(rc.model, params, spec), {"step": 0})
  return out


def test_cli_sample_streamed_equals_in_memory(qdir, capsys):
  argv = ["sample", "--run-dir", qdir, "--prompt", "ab", "--tokens", "6", "--temperature", "0"]
  code, ref, e = _cli(argv, capsys)
  assert code == 0, e
  layout = stream.Layout(stream.build_layout(qdir))
  budget = _budget(layout, 2)      # room for two of the four layers: streamed with prefetch
  code, o, e = _cli(argv + ["--max-memory", str(budget)], capsys)
  assert code == 0 and o == ref, e
  assert "streamed" in e and "tokens/s" in e and "peak RSS" in e
  assert os.path.isfile(os.path.join(qdir, "stream", "stream.json"))
  code, o, e = _cli(argv + ["--max-memory", "1GB"], capsys)
  assert code == 0 and o == ref and "fits; running in memory" in e, e


@pytest.mark.parametrize("size,what", [("lots", "a size such as"), ("0", "a size > 0"),
                                       ("100KB", "below the minimum")])
def test_cli_bad_budget_one_line(qdir, capsys, size, what):
  for cmd in (["sample", "--tokens", "2"], ["eval", "--batches", "1"]):
    code, o, e = _cli([cmd[0], "--run-dir", qdir, *cmd[1:], "--max-memory", size], capsys)
    lines = [ln for ln in e.strip().splitlines() if ln and "--max-memory=" in ln]
    assert code == 2 and len(lines) == 1 and what in lines[0] and lines[0].startswith("error:"), e


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
  from mhc_jax.train.loop import train
  from tests.train.helpers import tiny_config, write_corpus
  root = tmp_path_factory.mktemp("srun")
  corpus = write_corpus(str(root / "corpus"), n_files=4, lines=30)
  cfg = tiny_config(corpus, str(root / "cache"), "model.n_layers=4", "train.steps=2",
                    "train.warmup_steps=1",
                    "train.eval_every=2", "train.checkpoint_every=2", "train.log_every=2",
                    "train.sample_tokens=0")
  out = str(root / "run")
  train(cfg, out, progress=False)
  return out


@pytest.mark.slow
def test_cli_run_dir_streamed_eval_and_sample(run_dir, capsys):
  """A float32 run dir: the layout is written (in a child process) on first use; eval's loss and
  greedy samples equal the in-memory commands'."""
  code, o, e = _cli(["eval", "--run-dir", run_dir, "--batches", "1"], capsys)
  assert code == 0, e
  ref = json.loads(o.strip().splitlines()[-1])
  layout = stream.Layout(stream.ensure_layout(run_dir))
  assert layout.path == os.path.join(run_dir, "stream", str(ref["step"])) and layout.spec is None
  budget = stream.budget_plan(layout, 10**12, eval_batch=(layout.cfg.data.batch_size,
                                                          layout.cfg.data.seq_len)).minimum
  code, o, e = _cli(["eval", "--run-dir", run_dir, "--batches", "1", "--max-memory", str(budget)],
                    capsys)
  assert code == 0, e
  res = json.loads(o.strip().splitlines()[-1])
  assert res["mode"] == "streamed" and res["step"] == ref["step"]
  np.testing.assert_allclose(res["loss"], ref["loss"], rtol=1e-5)
  argv = ["sample", "--run-dir", run_dir, "--prompt", "de", "--tokens", "6", "--temperature", "0"]
  code, want, e = _cli(argv, capsys)
  assert code == 0, e
  code, o, e = _cli(argv + ["--max-memory", str(_budget(layout, 1))], capsys)
  assert code == 0 and o == want and "streamed" in e, e


@pytest.mark.slow
def test_peak_rss_under_budget(tmp_path):
  """A model whose weights dwarf the runtime's noise: streamed at half the weights, the model's
  peak resident memory (above the warmed-up runtime) stays under budget + allowance; in memory it
  does not."""
  from mhc_jax.tools.bench_stream import run_child, write_model
  path = write_model(str(tmp_path / "layout"), 384, 4, 6, 24)
  weights = stream.Layout(path).weight_bytes      # ~29 MB
  budget = weights // 2
  allowance = 16 << 20    # allocator slack (freed layers it keeps), Python objects, XLA temporaries
  st = run_child(path, budget, 8, 8)
  mem = run_child(path, None, 8, 8)
  assert st["tokens_out"] == mem["tokens_out"]
  assert st["model_rss_bytes"] < budget + allowance, st
  assert mem["model_rss_bytes"] > weights, mem
  print(f"weights {weights >> 20} MiB, budget {budget >> 20} MiB: streamed "
        f"{st['model_rss_bytes'] >> 20} MiB, in memory {mem['model_rss_bytes'] >> 20} MiB")
