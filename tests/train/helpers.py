"""Tiny generated corpus and configs for the training tests."""
import os
import random

from mhc_jax.configs import tiny
from mhc_jax.config import apply_overrides

WORDS = ("def", "return", "self", "value", "import", "class", "for", "in", "if", "else", "x", "y",
         "list", "dict", "print", "(", ")", ":", "=", "+", "1", "0", "None", "True")


def write_corpus(root: str, n_files: int = 8, lines: int = 60, seed: int = 0) -> str:
  """`n_files` files of pseudo-code lines (deterministic); returns `root`."""
  rng = random.Random(seed)
  os.makedirs(root, exist_ok=True)
  for i in range(n_files):
    with open(os.path.join(root, f"f{i:02d}.txt"), "w") as f:
      for _ in range(lines):
        f.write("    " * rng.randint(0, 2) + " ".join(rng.choice(WORDS) for _ in range(8)) + "\n")
  return root


def tiny_config(corpus: str, cache: str, *overrides: str):
  """The `tiny` preset on `corpus`, caching the built dataset under `cache`."""
  return apply_overrides(tiny(), [f"data.path={corpus}", f"data.data_dir={cache}", *overrides])


def tiny_args(corpus: str, cache: str, *overrides: str) -> list[str]:
  out = ["--preset", "tiny", "--set", f"data.path={corpus}", "--set", f"data.data_dir={cache}"]
  for o in overrides:
    out += ["--set", o]
  return out
