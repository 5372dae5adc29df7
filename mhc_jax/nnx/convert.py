"""NNX model state <-> Linen `params` tree. The NNX modules mirror the Linen parameter tree, so the
conversion is the identity on paths and values (no rename, no copy of the math):

    params = to_linen_params(model)                 # == LM(cfg).init(...)["params"] layout
    from_linen_params(model, params)                # in place; shapes and paths checked
    to_linen_moe_state(model) / from_linen_moe_state(model, moe_state)   # the MoE balance biases
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
from flax import nnx

from mhc_jax.nnx.moe import MoEState


def to_linen_params(model: nnx.Module) -> dict[str, Any]:
  """The model's `nnx.Param`s as a plain nested dict, the Linen `variables["params"]`."""
  return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def from_linen_params(model: nnx.Module, params) -> nnx.Module:
  """Load a Linen `params` tree (boxed or not) into `model` in place and return it.

  Raises ValueError naming the first parameter whose path is missing or extra or whose shape or
  dtype differs from the model's.
  """
  return _load(model, params, nnx.Param)


def to_linen_moe_state(model: nnx.Module) -> dict[str, Any]:
  """The model's MoE balance biases (`MoEState`) as a plain nested dict, the Linen
  `variables["moe_state"]` (empty for a dense model)."""
  return nnx.to_pure_dict(nnx.state(model, MoEState))


def from_linen_moe_state(model: nnx.Module, moe_state) -> nnx.Module:
  """Load a Linen `moe_state` tree (boxed or not) into `model` in place and return it (checked as
  `from_linen_params`)."""
  return _load(model, moe_state, MoEState)


def _load(model, tree, kind):
  tree = nn.meta.unbox(tree)
  _check(nnx.to_pure_dict(nnx.state(model, kind)), tree, ())
  state = nnx.state(model, kind)
  nnx.replace_by_pure_dict(state, tree)
  nnx.update(model, state)
  return model


def _check(want, got, path):
  name = "/".join(path) or "params"
  if isinstance(want, dict):
    if not isinstance(got, dict):
      raise ValueError(f"params {name}: expected a sub-tree with keys {sorted(want)}, got {type(got).__name__}")
    missing, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
    if missing or extra:
      raise ValueError(f"params {name}: missing {missing}, unexpected {extra}")
    for k in want:
      _check(want[k], got[k], path + (str(k),))
    return
  shape, dtype = getattr(got, "shape", None), getattr(got, "dtype", None)
  if shape != want.shape or dtype != want.dtype:
    raise ValueError(f"params {name}: shape {shape} {dtype} does not match the model's "
                     f"{want.shape} {want.dtype}")
