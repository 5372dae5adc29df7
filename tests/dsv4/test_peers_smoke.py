"""Smoke run of the peers comparison (experiments/peers): both sides run and a JSON is written."""
from __future__ import annotations

import json

import pytest

from tests.dsv4 import torch_env

pytestmark = [pytest.mark.torch, pytest.mark.slow, pytest.mark.xdist_group("dsv4")]


def test_peers_smoke(tmp_path):
  py, msg = torch_env.ensure()
  if py is None:
    pytest.skip("peers comparison NOT RUN: " + msg)
  if torch_env.peers_missing():
    pytest.skip("peers comparison NOT RUN: pip could not install hyper-connections into the torch "
                "env: " + torch_env.peers_missing()[-300:])
  from experiments.peers import bench_peers
  out = tmp_path / "peers_smoke.json"
  res = bench_peers.main(["--smoke", "--branches", "identity,block", "--baseline", "--out", str(out)])
  saved = json.loads(out.read_text())
  assert saved["rows"] and saved == json.loads(json.dumps(res))
  assert {(r["branch"], r["n"]) for r in saved["rows"]} == {("identity", 4), ("block", 4), ("block", 1)}
  for row in saved["rows"]:
    assert row["ours_median_s"] > 0 and row["peer_median_s"] > 0
    assert row["ratio_peer_over_ours"] > 0
  assert "per-stream" in saved["math_differences"]
  assert saved["peer_versions"]["hyper_connections"] == "0.4.9"
