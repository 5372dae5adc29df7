import os

import pytest

from tests.train.helpers import write_corpus


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
  """(corpus_dir, tfds_cache_dir), shared by the session: the dataset is built once."""
  root = tmp_path_factory.mktemp("train_corpus")
  return write_corpus(str(root / "text")), str(root / "cache")
