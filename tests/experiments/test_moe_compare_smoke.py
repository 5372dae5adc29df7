"""Experiment 6 (MoE + MLA under mHC) end to end at smoke size: one run, its curves and figures."""
import json

import pytest

pytestmark = pytest.mark.slow


def test_moe_compare_smoke(tmp_path):
  from experiments import moe_compare
  r = moe_compare.main(["--smoke", "--out", str(tmp_path)])
  data = json.loads((tmp_path / "moe_compare_smoke.json").read_text())
  for suffix in (".png", "_balance.png", "_heatmaps.png"):
    assert (tmp_path / f"moe_compare_smoke{suffix}").exists()
  assert set(data["runs"]) == {"mhc"}
  mhc = data["runs"]["mhc"][0]
  n_moe = r["runs"]["mhc"][0]["config"]["model"]["n_layers"] - 1
  assert len(mhc["moe/load_cv"][-1]) == n_moe                     # one value per MoE layer
  assert all(0.0 <= v <= 1.0 for v in mhc["moe/load_max"][-1])
  assert mhc["moe/bias_norm"][-1] > 0                              # the balance biases moved
  assert abs(mhc["gain/composite_fwd_max"][-1] - 1.0) < 1e-4       # rows exact: forward gain 1
  assert data["summary"]["mhc"]["final_val_loss"]["mean"] < 5.6
  assert "moe/load_cv" in data["summary"]["mhc"]
