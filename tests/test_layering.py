"""Imports run one way: from a higher layer of the package to a lower one, never back up.

    config -> ops, sharding, data, checkpoint, paths, configs -> kernels, analysis, distributed
      -> layers -> remat -> model, nnx, convert -> sample -> train -> quant -> tools -> cli
      -> __main__

A module may import its own sub-package and any unit of a lower rank, nothing of the same or a higher
rank. Imports inside functions count too (read with `ast`, nothing executed).
"""
import pathlib

from tests.test_layers_imports import PKG, _module_name, imported_modules

RANK = {
    "config": 0,
    "ops": 1, "sharding": 1, "data": 1, "checkpoint": 1, "paths": 1, "configs": 1,
    "kernels": 2, "analysis": 2, "distributed": 2,
    "layers": 3,
    "remat": 4,
    "model": 5, "nnx": 5, "convert": 5,
    "sample": 6,
    "train": 7,
    "quant": 8,
    "tools": 9,
    "cli": 10,
    "__main__": 11,
}
ENTRY_POINTS = {"quant/cli.py"}     # the quantize command: an entry point inside `quant`


def _unit(module: str) -> str | None:
  parts = module.split(".")
  return parts[1] if parts[0] == "mhc_jax" and len(parts) > 1 else None


def _unit_of(path: pathlib.Path) -> str:
  return _unit(_module_name(path)) or "__init__"


def test_every_unit_has_a_rank():
  units = {_unit_of(p) for p in PKG.rglob("*.py")} - {"__init__"}
  assert units <= set(RANK), f"give these a rank in RANK: {sorted(units - set(RANK))}"


def test_imports_only_go_down():
  bad = []
  for path in sorted(PKG.rglob("*.py")):
    unit = _unit_of(path)
    rel = path.relative_to(PKG).as_posix()
    if unit == "__init__" or rel in ENTRY_POINTS:
      continue
    for line, module in imported_modules(path):
      other = _unit(module)
      if other is None or other == unit or other not in RANK:
        continue
      if RANK[other] >= RANK[unit]:
        bad.append(f"{path.relative_to(PKG.parent)}:{line}: {unit} (rank {RANK[unit]}) imports "
                   f"{module} (rank {RANK[other]})")
  assert not bad, "imports that run up the layers:\n" + "\n".join(bad)


def test_the_check_would_see_an_upward_import():
  """The rank table is not vacuous: the model importing the train loop would be caught."""
  assert RANK["model"] < RANK["train"] and RANK["config"] < RANK["ops"]
  assert _unit("mhc_jax.train.loop") == "train" and _unit("jax.numpy") is None
