"""RunConfig overrides, JSON round trip and their error messages."""
import dataclasses
import json

import pytest

from mhc_jax.config import (ConfigError, RunConfig, apply_overrides, diff, run_config_from_dict,
                            to_dict, to_json)
from mhc_jax.configs import PRESETS, get_preset


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_round_trip_through_json(name):
  cfg = get_preset(name)
  back = run_config_from_dict(json.loads(to_json(cfg)))
  assert back == cfg


def test_default_preset_is_a_4_stream_mhc_on_the_stdlib_corpus():
  cfg = get_preset("default")
  assert cfg.model.connection.kind == "mhc" and cfg.model.connection.n_streams == 4
  assert cfg.data.source == "stdlib"


def test_overrides_coerce_types_and_nest():
  cfg = apply_overrides(get_preset("tiny"), [
      "model.connection.n_streams=2", "train.lr=0.5", "model.tie_embeddings=false",
      "train.schedule=paper_step", "mesh.shape=1,-1,1", "model.connection.kind=hc"])
  assert cfg.model.connection.n_streams == 2 and isinstance(cfg.model.connection.n_streams, int)
  assert cfg.train.lr == 0.5 and isinstance(cfg.train.lr, float)
  assert cfg.model.tie_embeddings is False
  assert cfg.train.schedule == "paper_step"
  assert cfg.mesh.shape == (1, -1, 1)
  assert cfg.model.connection.kind == "hc"
  assert diff(get_preset("tiny"), cfg) == [
      "mesh.shape", "model.connection.kind", "model.connection.n_streams", "model.tie_embeddings",
      "train.lr", "train.schedule"]


def test_float_field_accepts_int_text():
  assert apply_overrides(get_preset("tiny"), ["train.lr=1"]).train.lr == 1.0


@pytest.mark.parametrize("item, words", [
    ("model.n_streams=4", ["n_streams", "unknown key", "connection"]),
    ("train.nope=1", ["nope", "unknown key"]),
    ("bogus.x=1", ["bogus", "unknown key"]),
    ("model.connection.n_streams=four", ["model.connection.n_streams", "'four'", "integer"]),
    ("train.lr=fast", ["train.lr", "'fast'", "number"]),
    ("model.tie_embeddings=maybe", ["model.tie_embeddings", "true or false"]),
    ("model.connection.kind=lstm", ["connection.kind", "'lstm'", "choose one of"]),
    ("train.schedule=linear", ["train.schedule", "'linear'", "cosine"]),
    ("model.connection=3", ["model.connection", "section"]),
    ("train.steps", ["key=value"]),
    ("data.seq_len=999", ["data.seq_len", "999", "max_seq_len"]),
    ("train.grad_accum=3", ["train.grad_accum", "divide"]),
])
def test_bad_overrides_raise_one_line_config_errors(item, words):
  with pytest.raises(ConfigError) as e:
    apply_overrides(get_preset("tiny"), [item])
  msg = str(e.value)
  assert "\n" not in msg
  for w in words:
    assert w in msg, (w, msg)


def test_unknown_preset():
  with pytest.raises(ConfigError, match="'nope'.*default"):
    get_preset("nope")


def test_from_dict_rejects_unknown_and_mistyped_keys():
  d = to_dict(get_preset("tiny"))
  d["train"]["warp"] = 9
  with pytest.raises(ConfigError, match="train.warp"):
    run_config_from_dict(d)
  d = to_dict(get_preset("tiny"))
  d["model"]["n_layers"] = "2"      # JSON strings are coerced like CLI text
  assert run_config_from_dict(d).model.n_layers == 2
  d["model"]["n_layers"] = [2]
  with pytest.raises(ConfigError, match="model.n_layers"):
    run_config_from_dict(d)


def test_configs_are_frozen():
  cfg = get_preset("tiny")
  with pytest.raises(dataclasses.FrozenInstanceError):
    cfg.train.steps = 3
  assert isinstance(cfg, RunConfig)
