"""The kernel benchmark runs on CPU (XLA path only) and saves its JSON: it cannot rot."""
import json

from mhc_jax.tools import bench_kernels as bench


def test_bench_runs_on_cpu_and_saves_json(tmp_path):
  out = tmp_path / "k.json"
  assert bench.main(["--c", "128", "--tokens", "32", "--iters", "1", "--sinkhorn-iters", "2",
                     "--out", str(out)]) == 0
  data = json.loads(out.read_text())
  meta = data["meta"]
  assert meta["device"].startswith("cpu") and meta["jax_version"] and meta["date"]
  assert meta["C"] == [128] and meta["tokens"] == [32] and meta["implementations"] == ["xla"]
  ops_modes = {(r["op"], r["mode"]) for r in data["rows"]}
  for op in ("pre", "post", "connection", "sinkhorn"):
    assert {(op, "fwd"), (op, "fwd+bwd")} <= ops_modes
  assert all(r["seconds"] > 0 for r in data["rows"])


def test_bench_refuses_pallas_on_cpu(tmp_path):
  assert bench.main(["--impl", "pallas", "--out", str(tmp_path / "x.json")]) == 2


def test_ideal_bytes_table2():
  # post forward, n = 4, bf16: reads (n + 1) C + writes n C elements, plus 24 f32 coefficients.
  assert bench.ideal_bytes("post", "fwd", 4, 1024, 2) == (9 * 1024) * 2 + 4 * 24
  assert bench.peak_bandwidth("NVIDIA H100 80GB HBM3") == 3.35e12
