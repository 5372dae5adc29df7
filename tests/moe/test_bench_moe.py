"""`python -m mhc_jax.tools.bench_moe` runs end to end on tiny shapes and writes its JSON record."""
import json

from mhc_jax.tools import bench_moe


def test_bench_moe_tiny(tmp_path):
  out = tmp_path / "moe.json"
  bench_moe.main(["--tokens", "16", "--c", "8", "--f", "4", "--experts", "4", "--top-k", "2",
                  "--iters", "2", "--out", str(out)])
  rec = json.loads(out.read_text())
  for key in ("date_utc", "jax_version", "device", "command", "shapes", "note", "modes"):
    assert key in rec
  assert set(rec["modes"]) == {"fwd", "fwd_bwd"} and rec["max_abs_diff_fwd"] < 1e-5
  assert set(rec["max_abs_diff_fwd_vs_dense"]) == {"ragged", "tiled", "dense"}
  for row in rec["modes"].values():
    assert {"tiled_wall_s", "tiled_cpu_s", "dense_over_tiled_cpu", "ragged_over_tiled_wall"} <= set(row)
  assert "not accelerator" in rec["note"].lower()
