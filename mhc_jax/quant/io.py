"""Quantised checkpoint on disk: `Q/config.json` (the run config, as beside every run),
`Q/quant.json` (mode, group size, source run and step, byte counts) and `Q/params/` (an Orbax
`StandardCheckpointer` tree: float32 leaves as in training, each quantised kernel as
`{"qvalue": int8|int4, "scale": float32}`) and, for an MoE model, `Q/moe_state/` (the float32
balance biases the router selects with).

The directory is written under a temporary sibling name and renamed into place, so a failure leaves
nothing at `--out`.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile

import flax
import jax
import orbax.checkpoint as ocp

from mhc_jax.config import ConfigError, RunConfig

from mhc_jax.quant.core import QuantSpec, WithAux, _is_q, abstract_qparams, check_spec
from mhc_jax.train import run_dir as rd

QUANT_JSON = "quant.json"
PARAMS = "params"
MOE_STATE = "moe_state"
FORMAT = "mhc_jax.quant/1"


def is_quantized_dir(path: str) -> bool:
  return os.path.isfile(os.path.join(path, QUANT_JSON))


def _to_plain(qparams):
  """Quantised kernels (qwix `WithAux` from the PTQ rules, or a raw kernel's `QArray`) as
  `{"qvalue", "scale"[, "zero_point"]}` dicts; float leaves as they are."""
  def conv(x):
    if _is_q(x):
      arr = x.array if isinstance(x, WithAux) else x
      d = {"qvalue": arr.qvalue, "scale": arr.scale}
      if arr.zero_point is not None:
        d["zero_point"] = arr.zero_point
      return d
    return x
  return jax.tree.map(conv, qparams, is_leaf=_is_q)


def _from_plain(plain, abstract):
  """Inverse of `_to_plain` given the abstract tree (`WithAux` / `QArray` / array leaves); paths
  absent from `plain` are left out."""
  flat_abs = flax.traverse_util.flatten_dict(abstract, is_leaf=lambda _, x: _is_q(x))
  out = {}
  for path, a in flat_abs.items():
    node = plain
    for k in path:
      node = node.get(k) if isinstance(node, dict) else None
      if node is None:
        break
    if node is None:
      continue
    if _is_q(a):
      arr = a.array if isinstance(a, WithAux) else a
      arr = arr.replace(qvalue=node["qvalue"], scale=node["scale"],
                        zero_point=node.get("zero_point"))
      out[path] = a.replace(array=arr) if isinstance(a, WithAux) else arr
    else:
      out[path] = node
  return flax.traverse_util.unflatten_dict(out)


def check_out(out: str):
  """`--out` must be a new (or empty) directory in a writable parent."""
  if not out:
    raise ConfigError("--out '' is not allowed: give a directory path for the quantised checkpoint")
  out = os.path.abspath(out)
  if os.path.exists(out) and not (os.path.isdir(out) and not os.listdir(out)):
    raise ConfigError(f"--out {out!r} is not allowed: it exists and is not an empty directory")
  parent = os.path.dirname(out)
  if not os.path.isdir(parent):
    raise ConfigError(f"--out {out!r} is not allowed: its parent directory {parent!r} does not exist")
  if not os.access(parent, os.W_OK | os.X_OK):
    raise ConfigError(f"--out {out!r} is not allowed: its parent directory {parent!r} is not writable")


def save_quantized(out: str, cfg: RunConfig, spec: QuantSpec, qparams, info: dict | None = None,
                   moe_state=None):
  """Write the quantised checkpoint to `out` (atomically: temp sibling + rename); `moe_state`: the
  MoE balance biases (an MoE model)."""
  check_out(out)
  out = os.path.abspath(out)
  tmp = tempfile.mkdtemp(prefix="." + os.path.basename(out) + ".tmp-", dir=os.path.dirname(out))
  try:
    rd.write_config(tmp, cfg)
    ckptr = ocp.StandardCheckpointer()
    ckptr.save(os.path.join(tmp, PARAMS), _to_plain(qparams))
    if moe_state:
      ckptr.save(os.path.join(tmp, MOE_STATE), moe_state)
    ckptr.wait_until_finished()
    ckptr.close()
    meta = {"format": FORMAT, "spec": spec.to_dict(), **(info or {})}
    with open(os.path.join(tmp, QUANT_JSON), "w", encoding="utf-8") as f:
      json.dump(meta, f, indent=1)
      f.write("\n")
    if os.path.isdir(out):
      os.rmdir(out)   # empty (checked)
    os.replace(tmp, out)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return out


def read_meta(path: str) -> dict:
  if not os.path.isdir(path):
    raise ConfigError(f"--run-dir {path!r} is not allowed: no such directory")
  if not is_quantized_dir(path):
    raise ConfigError(f"--run-dir {path!r} is not allowed: it holds no {QUANT_JSON} "
                      f"(not a quantised checkpoint; write one with `mhc-jax quantize`)")
  try:
    with open(os.path.join(path, QUANT_JSON), encoding="utf-8") as f:
      return json.load(f)
  except (OSError, ValueError) as e:
    raise ConfigError(f"{path}/{QUANT_JSON}: unreadable ({e})") from None


def load_quantized(path: str):
  """`(cfg: RunConfig, spec: QuantSpec, qparams, meta)` from a quantised checkpoint directory."""
  meta = read_meta(path)
  cfg = rd.read_config(path)
  spec = QuantSpec(**meta["spec"])
  check_spec(spec, cfg.model)
  abstract = abstract_qparams(cfg.model, spec)
  ckptr = ocp.StandardCheckpointer()
  try:
    plain = ckptr.restore(os.path.abspath(os.path.join(path, PARAMS)), _to_plain(abstract))
  finally:
    ckptr.close()
  return cfg, spec, _from_plain(plain, abstract), meta


def load_moe_state(path: str) -> dict:
  """The MoE balance biases saved beside a quantised checkpoint's params (`{}`: a dense model)."""
  d = os.path.abspath(os.path.join(path, MOE_STATE))
  if not os.path.isdir(d):
    return {}
  ckptr = ocp.StandardCheckpointer()
  try:
    return ckptr.restore(d)
  finally:
    ckptr.close()


def dir_bytes(path: str) -> int:
  tot = 0
  for root, _, files in os.walk(path):
    for f in files:
      tot += os.path.getsize(os.path.join(root, f))
  return tot
