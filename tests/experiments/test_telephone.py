"""Experiment 1 at smoke size: runs, writes JSON + PNG with metadata, and shows the expected physics."""
import json

from experiments import telephone
from mhc_jax.tools.telephone import configs


def test_telephone_smoke(tmp_path):
  r = telephone.main(["--smoke", "--out", str(tmp_path)])
  data = json.loads((tmp_path / "telephone_smoke.json").read_text())
  assert (tmp_path / "telephone_smoke.png").stat().st_size > 1000
  for key in ("jax_version", "device", "date_utc"):
    assert data[key]
  s = data["series"]
  assert len(s) == len(configs())
  # Unconstrained HC compounds; doubly stochastic families stay at gain 1 (log10 0).
  assert s["hc sigma=0.2"]["forward"]["log10_mean"][-1] > 0.3
  assert abs(s["sinkhorn t=20 s=1"]["forward"]["log10_max"][-1]) < 1e-4
  assert abs(s["mhc_lite s=4"]["backward"]["log10_max"][-1]) < 1e-5
  assert s["sinkhorn t=1 s=4"]["backward"]["log10_mean"][-1] > \
      s["sinkhorn t=20 s=4"]["backward"]["log10_mean"][-1]
  assert r["depth"] == 32
