"""DataConfig validation: each bad field gets a ConfigError naming field, value and what is allowed."""
import pytest

from mhc_jax.config import ConfigError
from mhc_jax.data import DataConfig


def test_defaults_are_the_builtin_corpus():
  cfg = DataConfig()
  assert (cfg.source, cfg.tokenizer, cfg.seq_len, cfg.batch_size) == ("stdlib", "byte", 256, 16)


@pytest.mark.parametrize("kwargs, field", [
    (dict(source="web"), "data.source='web'"),
    (dict(source="files"), "data.path=''"),
    (dict(source="tfds"), "data.tfds_name=''"),
    (dict(tokenizer="gpt2"), "data.tokenizer='gpt2'"),
    (dict(seq_len=0), "data.seq_len=0"),
    (dict(seq_len=8.0), "data.seq_len=8.0"),
    (dict(batch_size=True), "data.batch_size=True"),
    (dict(seed=-1), "data.seed=-1"),
    (dict(val_fraction=1.0), "data.val_fraction=1.0"),
    (dict(val_fraction=-0.1), "data.val_fraction=-0.1"),
    (dict(max_files=-2), "data.max_files=-2"),
    (dict(text_key=""), "data.text_key=''"),
    (dict(path=3), "data.path=3"),
])
def test_bad_fields(kwargs, field):
  with pytest.raises(ConfigError) as e:
    DataConfig(**kwargs)
  msg = str(e.value)
  assert msg.startswith(field) and "\n" not in msg, msg


def test_data_dir_resolution(monkeypatch, tmp_path):
  monkeypatch.delenv("MHC_JAX_DATA_DIR", raising=False)
  assert DataConfig().resolved_data_dir().endswith("/.cache/mhc_jax/tfds")
  monkeypatch.setenv("MHC_JAX_DATA_DIR", str(tmp_path / "env"))
  assert DataConfig().resolved_data_dir() == str(tmp_path / "env")
  assert DataConfig(data_dir=str(tmp_path / "x")).resolved_data_dir() == str(tmp_path / "x")
