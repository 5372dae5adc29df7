"""A kernel `implementation` the platform, shape, dtype or kind cannot take is one `ConfigError` line
from `mhc-jax train`, before the run directory is written."""
import pytest

from mhc_jax import cli
from tests.train.helpers import tiny_args, write_corpus


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  root = tmp_path_factory.mktemp("kernel_cfg_corpus")
  return write_corpus(str(root / "text")), str(root / "cache")


@pytest.mark.parametrize("overrides, words", [
    (["model.connection.implementation=pallas"], ["implementation='pallas'", "not available", "cpu"]),
    (["model.connection.implementation=interpret", "model.connection.mix_dtype=activation"],
     ["implementation='interpret'", "mix_dtype='float32'"]),
    (["model.connection.kind=hc", "model.connection.implementation=pallas"],
     ["implementation='pallas'", "kind 'mhc' and 'mhc_lite'"]),
])
def test_bad_kernel_implementation_is_one_line_before_the_run_dir(overrides, words, corpus,
                                                                  tmp_path, capsys):
  run_dir = tmp_path / "run"
  rc = cli.main(["train", *tiny_args(*corpus, *overrides), "--run-dir", str(run_dir)])
  err = [l for l in capsys.readouterr().err.strip().splitlines()
         if not l.startswith("mhc_jax.data:")]
  assert rc == 2
  assert len(err) == 1 and err[0].startswith("error: "), err
  for w in words:
    assert w in err[0], (w, err)
  assert not run_dir.exists()
