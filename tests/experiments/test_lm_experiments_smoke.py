"""Experiments 2-4 end to end at smoke size (real training through mhc_jax.train; slow on 2 cores)."""
import json

import pytest

pytestmark = pytest.mark.slow


def test_lm_compare_smoke(tmp_path):
  from experiments import lm_compare
  r = lm_compare.main(["--smoke", "--out", str(tmp_path)])
  data = json.loads((tmp_path / "lm_compare_smoke.json").read_text())
  assert (tmp_path / "lm_compare_smoke.png").exists()
  assert (tmp_path / "lm_compare_smoke_heatmaps.png").exists()
  assert set(data["runs"]) == {"residual", "mhc"}
  mhc = data["runs"]["mhc"][0]
  assert len(mhc["h_res_mean"]) == 2 * r["scale"]["n_layers"]
  assert abs(mhc["gain/composite_fwd_max"][-1] - 1.0) < 1e-4       # rows exact: forward gain 1
  assert data["summary"]["mhc"]["final_val_loss"]["mean"] < 5.6
  for key in ("jax_version", "device", "date_utc"):
    assert data[key]


def test_stress_and_ablations_smoke(tmp_path):
  from experiments import ablations, stress
  s = stress.main(["--smoke", "--out", str(tmp_path)])
  assert (tmp_path / "stress_smoke.png").exists()
  assert "hc" in s["runs"]
  a = ablations.main(["--smoke", "--out", str(tmp_path)])
  assert set(a["runs"]) == {"mhc n=2", "hc static"}
  assert (tmp_path / "ablations_smoke.png").exists()
