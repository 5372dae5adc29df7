"""Pure helpers of the LM experiments (`mhc_jax.tools.lm_runs`, fast), and config checks."""
import json
import math

import numpy as np
import pytest

from mhc_jax.tools import lm_runs as lc


def test_max_spike():
  assert lc.max_spike([5.0, 4.0, 3.0]) == 0.0
  assert lc.max_spike([5.0, 3.0, 4.5, 2.0, 2.5]) == pytest.approx(1.5)
  assert lc.max_spike([5.0, float("nan")]) == math.inf


def test_aggregate_mean_std_over_seeds():
  recs = [{"final_val_loss": v} for v in (2.0, 2.2, 2.4)]
  a = lc.aggregate(recs)
  assert a["mean"] == pytest.approx(2.2)
  assert a["std"] == pytest.approx(np.std([2.0, 2.2, 2.4], ddof=1))
  assert a["n_seeds"] == 3


def test_read_record_parses_metrics(tmp_path):
  lines = [
      {"step": 10, "kind": "train", "loss": 3.0, "grad_norm": 1.5},
      {"step": 20, "kind": "train", "loss": "nan", "grad_norm": "inf"},
      {"step": 20, "kind": "eval", "loss": 2.9},
      {"step": 20, "kind": "diag", "gain/composite_bwd_max": 1.25, "gain/composite_bwd_max/sites": [1.25, 1.1]},
  ]
  (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in lines) + "\n{torn")
  r = lc.read_record(str(tmp_path))
  assert r["train_loss"][0] == 3.0 and math.isnan(r["train_loss"][1])
  assert math.isinf(r["grad_norm"][1])
  assert r["eval_loss"] == [2.9]
  assert r["gain/composite_bwd_max"] == [1.25]
  assert r["sites"]["gain/composite_bwd_max"] == [1.25, 1.1]
  assert math.isnan(r["gain/fwd_max"][0])


def test_make_config_same_model_for_every_kind():
  cfgs = {k: lc.make_config(k, "lm_smoke", seed=1) for k in ("residual", "hc", "mhc", "mhc_lite")}
  assert cfgs["residual"].model.connection.n_streams == 1
  assert {c.model.connection.n_streams for k, c in cfgs.items() if k != "residual"} == {4}
  assert len({(c.model.d_model, c.model.n_layers, c.train.steps, c.train.seed, c.data.seq_len)
              for c in cfgs.values()}) == 1


def test_bad_data_flag_is_one_clear_line():
  from mhc_jax.config import ConfigError
  with pytest.raises(ConfigError, match="--data='nope'"):
    lc.data_config(lc.preset("lm_smoke").data, "nope")


def test_scale_and_description_of_a_preset():
  cfg = lc.preset("lm_compare", steps=300)
  assert lc.scale(cfg) == {"d_model": 64, "n_layers": 4, "n_heads": 4, "seq_len": 64,
                           "batch_size": 8, "steps": 300, "lr": 3e-3, "warmup_steps": 30,
                           "eval_every": 100, "eval_batches": 4, "log_every": 10, "clip_norm": 1.0}
  assert lc.describe(cfg).startswith("d_model=64, 4 layers (8 connection sites), 4 heads, seq 64")
