"""`make bench-gpu` plumbing on CPU (--smoke): every section runs or skips cleanly and the JSON is
written with its metadata, so the one command cannot rot while no GPU is at hand."""
import json

import pytest

from mhc_jax.tools import bench_gpu


@pytest.mark.slow
def test_bench_gpu_smoke_writes_json(tmp_path):
  out = tmp_path / "bench_gpu.json"
  assert bench_gpu.main(["--smoke", "--out", str(out), "--budget-s", "300"]) == 0
  data = json.loads(out.read_text())
  meta = data["meta"]
  assert data["complete"] and meta["device"].startswith("cpu") and meta["jax_version"]
  assert meta["date"] and meta["command"].startswith("python -m mhc_jax.tools.bench_gpu")
  kern = data["sections"]["kernels"]
  assert kern["status"] == "done" and kern["implementations"] == ["xla"]
  rows = kern["items"][0]["rows"]
  assert {(r["op"], r["mode"]) for r in rows} >= {("pre", "fwd"), ("post", "fwd+bwd"),
                                                  ("connection", "fwd+bwd")}
  step = data["sections"]["step"]
  assert step["status"] == "done" and len(step["items"]) == 1     # smoke: remat none only
  for item in step["items"]:
    assert "error" not in item, item
    kinds = {r["kind"] for r in item["result"]["results"]}
    assert kinds == {"residual", "mhc"}
    assert all(r["step_time_s"] > 0 for r in item["result"]["results"])
  assert data["sections"]["peers"]["status"] in ("done", "skipped")


def test_bench_gpu_budget_spent_skips_cleanly(tmp_path):
  out = tmp_path / "b.json"
  assert bench_gpu.main(["--smoke", "--out", str(out), "--budget-s", "0.001",
                         "--sections", "kernels,step"]) == 0
  data = json.loads(out.read_text())
  assert data["complete"]
  for name in ("kernels", "step"):
    sec = data["sections"][name]
    assert sec["status"] == "skipped" and not sec["items"], sec


def test_bench_gpu_rejects_bad_section(tmp_path):
  assert bench_gpu.main(["--sections", "nope", "--out", str(tmp_path / "x.json")]) == 2
