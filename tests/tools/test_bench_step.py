"""`mhc-jax bench step` at smoke size: runs the real train step, writes the JSON, refuses bad input."""
import json

import pytest

from mhc_jax import cli
from mhc_jax.tools import bench_step

TINY = ["--preset", "tiny", "--set", "data.batch_size=2", "--set", "data.seq_len=8",
        "--set", "model.n_layers=2"]


@pytest.mark.slow
def test_bench_step_smoke(tmp_path, capsys):
  out = tmp_path / "bench_step_cpu.json"
  rc = cli.main(["bench", "step", *TINY, "--kinds", "residual,mhc", "--remat", "mhc_paper",
                 "--steps", "2", "--warmup", "1", "--out", str(out)])
  assert rc == 0
  printed = capsys.readouterr().out
  assert "mhc_paper" in printed and str(out) in printed
  res = json.loads(out.read_text())
  for key in ("date", "device", "device_kind", "backend", "jax", "flax", "shapes", "results",
              "load_average", "cpu_count"):
    assert key in res
  assert res["shapes"]["seq_len"] == 8 and res["shapes"]["batch"] == 2
  rows = {(r["kind"], r["remat"]): r for r in res["results"]}
  assert set(rows) == {("residual", "mhc_paper"), ("mhc", "mhc_paper")}
  res_row, mhc_row = rows["residual", "mhc_paper"], rows["mhc", "mhc_paper"]
  assert res_row["n_streams"] == 1 and mhc_row["n_streams"] == 4
  assert res_row["overhead_vs_residual_pct"] == 0.0
  for r in (res_row, mhc_row):
    assert len(r["step_times_s"]) == 2 and r["step_time_s"] > 0
    assert r["step_cpu_s"] > 0 and r["compile_cpu_s"] > 0
    assert r["tokens_per_s"] == pytest.approx(16 / r["step_time_s"])
    assert r["temp_bytes"] > 0 and r["model_flops"] > 0
    assert r["mfu"] is None and r["device_peak_tflops"] is None        # CPU: no meaningful peak
  assert mhc_row["params"] > res_row["params"]                         # phi, b, alpha per site
  expected = 100 * (mhc_row["step_time_s"] / res_row["step_time_s"] - 1)
  assert mhc_row["overhead_vs_residual_pct"] == pytest.approx(expected)


def test_model_flops_formula():
  from mhc_jax.config import ModelConfig
  m = ModelConfig(vocab_size=256, d_model=32, n_layers=2, n_heads=2, tie_embeddings=True)
  # tied: every parameter is a matmul weight (the table doubles as the LM head)
  assert bench_step.model_flops_per_step(m, 1000, 2, 8) == 6 * 16 * 1000 + 12 * 2 * 8 * 32 * 16


def test_device_peak_table():
  assert bench_step.device_peak_tflops("NVIDIA H100 80GB HBM3", "bfloat16") == 989.0
  assert bench_step.device_peak_tflops("TPU v5 lite", "bfloat16") == 197.0
  assert bench_step.device_peak_tflops("cpu", "float32") is None


@pytest.mark.parametrize("args,msg", [
    (["--kinds", "residual,foo"], "--kinds='foo' is not allowed"),
    (["--remat", "paper"], "--remat='paper' is not allowed"),
    (["--steps", "0"], "--steps=0 is not allowed"),
    (["--set", "model.remat_group=-1"], "model.remat_group=-1 is not allowed"),
])
def test_bench_step_bad_input(args, msg, capsys):
  assert cli.main(["bench", "step", *TINY, *args, "--out", "-"]) == 2
  err = capsys.readouterr().err.strip()
  assert err.startswith("error: ") and msg in err and "\n" not in err
