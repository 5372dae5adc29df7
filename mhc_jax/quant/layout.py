"""The streaming layout of a checkpoint on disk, written once beside it (`R/stream/<step>/` of a run
dir, `Q/stream/` of a quantised dir): `config.json`, `stream.json` (format, spec, step, and for each
group its leaves: path, shape, dtype, byte offset) and one raw file per group -- `resident.bin`
(embedding, collapse head, final norm, lm_head), `layer_<l>.bin` (block l's `params` -- float32
leaves, or a quantised kernel's `qvalue` / `scale`, int4 values packed two per byte -- and, in an
MoE block, its `moe_state` balance bias) and, in an MoE block, `experts_<l>.bin`: its routed
experts (`moe/gate`, `moe/up`, `moe/down`), one contiguous record per expert (its slice of each
kernel), so that one expert is one read (`Layout.read_experts`).

`Layout.load` reads a group leaf by leaf into new arrays that go to the device (so only the groups
in use are resident); `load_params` reads the whole model back (the in-memory path).
"""
from __future__ import annotations

import concurrent.futures
import json
import mmap
import multiprocessing
import os
import shutil
import tempfile

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mhc_jax.config import ConfigError, ModelConfig
from mhc_jax.quant.core import QuantSpec
from mhc_jax.quant.io import _from_plain, _to_plain, is_quantized_dir, read_meta
from mhc_jax.train import run_dir as rd

FORMAT = "mhc_jax.stream/2"
STREAM = "stream"
META = "stream.json"
RESIDENT = "resident"
EXPERT_KERNELS = ("gate", "up", "down")     # moe/<name>: [E, ...], streamed expert by expert
ALIGN = 64


# ------------------------------------------------------------------ layout on disk
def _flatten(plain) -> dict[str, np.ndarray]:
  flat = flax.traverse_util.flatten_dict(plain, sep="/")
  return {k: np.asarray(v) for k, v in flat.items()}


def _unstack(cfg: ModelConfig, tree) -> tuple[dict, list]:
  """(the rest of `tree`, [block l's subtree]): scanned stacks (`dense_blocks` then `blocks` in an
  MoE model, else `blocks`) cut per layer, or `block_<l>` entries."""
  tree = dict(tree)
  if not cfg.scan_layers:
    return tree, [tree.pop(f"block_{l}", {}) for l in range(cfg.n_layers)]
  layers = []
  names = ("dense_blocks", "blocks") if cfg.moe is not None else ("blocks",)
  counts = (cfg.n_dense_layers, cfg.n_moe_layers) if cfg.moe is not None else (cfg.n_layers,)
  for name, n in zip(names, counts):
    stacked = tree.pop(name, {})
    layers += [jax.tree.map(lambda a, l=l: np.asarray(a[l]), stacked) for l in range(n)]
  return tree, layers


def _restack(cfg: ModelConfig, rest: dict, layers: list) -> dict:
  """Inverse of `_unstack`."""
  out = dict(rest)
  if not cfg.scan_layers:
    out.update({f"block_{l}": t for l, t in enumerate(layers) if t})
    return out
  if cfg.moe is None:
    spans = {"blocks": layers}
  else:
    spans = {"dense_blocks": layers[:cfg.n_dense_layers], "blocks": layers[cfg.n_dense_layers:]}
  for name, part in spans.items():
    if part and part[0]:
      out[name] = jax.tree.map(lambda *a: np.stack(a), *part)
  return out


def split_layers(cfg: ModelConfig, plain, moe_state=None) -> tuple[dict, list[dict], list[dict]]:
  """(resident params, [layer l: {"params", "moe_state"?}], [layer l's routed experts {gate, up,
  down} or {}]) of a plain params tree (float leaves or {qvalue, scale}) and its MoE state."""
  resident, layers = _unstack(cfg, plain)
  _, states = _unstack(cfg, moe_state or {})
  groups, experts = [], []
  for l, p in enumerate(layers):
    p, ex = dict(p), {}
    if cfg.is_moe_layer(l):
      moe = dict(p["moe"])
      ex = {k: moe.pop(k) for k in EXPERT_KERNELS}
      p["moe"] = moe
    groups.append({"params": p, **({"moe_state": states[l]} if l < len(states) and states[l]
                                   else {})})
    experts.append(ex)
  return resident, groups, experts


INT4 = np.dtype(jnp.int4)


def _encode(a: np.ndarray) -> bytes:
  """A leaf's bytes on disk: as in memory, except int4, packed two values per byte (low nibble
  first; numpy holds one int4 per byte)."""
  if a.dtype != INT4:
    return np.ascontiguousarray(a).tobytes()
  v = a.astype(np.int8).reshape(-1)
  if v.size % 2:
    v = np.concatenate([v, np.zeros(1, np.int8)])
  u = v.view(np.uint8) & 0xF
  return (u[0::2] | (u[1::2] << 4)).astype(np.uint8).tobytes()


def _stored_nbytes(a: np.ndarray) -> int:
  return (a.size + 1) // 2 if a.dtype == INT4 else a.nbytes


MAP_MIN = 1 << 20     # host buffers of at least this many bytes get their own memory map


def host_zeros(shape, dtype) -> np.ndarray:
  """A new zero-filled host array; from `MAP_MIN` bytes up in its own anonymous memory map, so that
  when it is freed its pages go back to the OS at once. (glibc's heap may keep a freed large
  buffer: it raises its mmap threshold after each large free, and the freed layer and expert
  buffers of a streamed model then pile up in the heap, above the budget.)"""
  dtype = np.dtype(dtype)
  count = int(np.prod(shape, dtype=np.int64))
  if count * dtype.itemsize < MAP_MIN:
    return np.zeros(shape, dtype)
  buf = mmap.mmap(-1, count * dtype.itemsize)
  return np.frombuffer(buf, dtype, count=count).reshape(shape)


def _decode(raw: np.ndarray, dtype, shape, alloc=np.empty) -> np.ndarray:
  """`raw` uint8 `[..., nbytes]` (one leaf, or a leading axis of several) -> `[..., *shape]`
  (new arrays from `alloc(shape, dtype)`)."""
  dtype = np.dtype(jnp.dtype(dtype))
  lead = raw.shape[:-1]
  if dtype != INT4:
    out = alloc((*lead, *shape), dtype)
    out.reshape(*lead, -1).view(np.uint8)[...] = raw.reshape(*lead, -1)
    return out
  n = int(np.prod(shape, dtype=np.int64))
  v = alloc((*lead, 2 * raw.shape[-1]), np.int8)
  v[..., 0::2] = raw & 0xF
  v[..., 1::2] = raw >> 4
  np.bitwise_xor(v, 8, out=v)                       # 4-bit two's complement: 8..15 -> -8..-1
  np.subtract(v, 8, out=v)
  out = alloc((*lead, *shape), INT4)
  out.reshape(*lead, -1)[...] = v[..., :n]
  return out


def _write_group(path: str, tree) -> dict:
  leaves, off = [], 0
  with open(path, "wb") as f:
    for name, a in _flatten(tree).items():
      a = np.ascontiguousarray(a)
      pad = -off % ALIGN
      f.write(b"\0" * pad)
      off += pad
      nb = _stored_nbytes(a)
      leaves.append({"path": name, "shape": list(a.shape), "dtype": str(a.dtype), "offset": off,
                     "nbytes": nb})
      f.write(_encode(a))
      off += nb
  return {"bytes": off, "leaves": leaves}


def _write_experts(path: str, tree) -> dict:
  """One record per expert e: `leaf[e]` of each leaf in turn (ALIGN-padded), records ALIGN-padded."""
  flat = {k: np.ascontiguousarray(v) for k, v in _flatten(tree).items()}
  n = len(next(iter(flat.values())))
  leaves, off = [], 0
  for name, a in flat.items():
    off += -off % ALIGN
    nb = _stored_nbytes(a[0])
    leaves.append({"path": name, "shape": list(a.shape[1:]), "dtype": str(a.dtype), "offset": off,
                   "nbytes": nb})
    off += nb
  record = off + (-off % ALIGN)
  with open(path, "wb") as f:
    for e in range(n):
      buf = bytearray(record)
      for x, a in zip(leaves, flat.values()):
        buf[x["offset"]:x["offset"] + x["nbytes"]] = _encode(a[e])
      f.write(buf)
  return {"bytes": n * record, "experts": n, "record": record, "leaves": leaves}


def write_layout(out: str, cfg, plain_params, spec: QuantSpec | None, info: dict,
                 moe_state=None) -> str:
  """Write the per-layer layout of `plain_params` (float, or quantised as `io._to_plain`) and the
  MoE `moe_state` to `out` (atomically: temp sibling + rename)."""
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=".stream.tmp-", dir=os.path.dirname(os.path.abspath(out)))
  try:
    rd.write_config(tmp, cfg)
    resident, layers, experts = split_layers(cfg.model, nn.meta.unbox(plain_params),
                                             nn.meta.unbox(moe_state))
    groups = {RESIDENT: _write_group(os.path.join(tmp, RESIDENT + ".bin"), resident)}
    for l, tree in enumerate(layers):
      groups[f"layer_{l}"] = _write_group(os.path.join(tmp, f"layer_{l}.bin"), tree)
      if experts[l]:
        groups[f"experts_{l}"] = _write_experts(os.path.join(tmp, f"experts_{l}.bin"), experts[l])
    meta = {"format": FORMAT, "spec": spec.to_dict() if spec else None, "groups": groups, **info}
    with open(os.path.join(tmp, META), "w", encoding="utf-8") as f:
      json.dump(meta, f, indent=1)
    if os.path.isdir(out):
      shutil.rmtree(out)
    os.replace(tmp, out)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return out


def _steps(run_dir: str) -> list[int]:
  d = os.path.join(run_dir, rd.CHECKPOINTS)
  return sorted(int(s) for s in os.listdir(d) if s.isdigit()) if os.path.isdir(d) else []


def layout_dir(run_dir: str, step: int | None = None) -> str | None:
  """Where the layout of `run_dir` (newest checkpoint, or `step`) lives; None for a run dir without
  checkpoints."""
  if is_quantized_dir(run_dir):
    return os.path.join(run_dir, STREAM)
  steps = _steps(run_dir)
  if step is None and not steps:
    return None
  return os.path.join(run_dir, STREAM, str(steps[-1] if step is None else step))


def build_layout(run_dir: str, step: int | None = None) -> str:
  """Read the checkpoint of `run_dir` (whole, once) and write its layout; returns the layout dir."""
  if is_quantized_dir(run_dir):
    from mhc_jax.quant.io import load_quantized
    from mhc_jax.quant.io import load_moe_state
    cfg, spec, qparams, meta = load_quantized(run_dir)
    plain = jax.device_get(_to_plain(qparams))
    return write_layout(os.path.join(run_dir, STREAM), cfg, plain, spec, {"step": meta.get("step")},
                        load_moe_state(run_dir))
  from mhc_jax.train.loop import load_checkpoint
  trainer = load_checkpoint(run_dir, step)
  plain = jax.device_get(nn.meta.unbox(trainer.state.params))
  out = os.path.join(run_dir, STREAM, str(trainer.step_count))
  return write_layout(out, trainer.cfg, plain, None, {"step": int(trainer.step_count)},
                      jax.device_get(trainer.state.moe_state))


def ensure_layout(run_dir: str, step: int | None = None) -> str:
  """The layout dir of `run_dir`, written first when missing -- in a child process, so that reading
  the whole checkpoint once does not count against this process's memory."""
  if not os.path.isdir(run_dir):
    raise ConfigError(f"--run-dir {run_dir!r} is not allowed: no such directory")
  if is_quantized_dir(run_dir):
    read_meta(run_dir)
    if step is not None:
      raise ConfigError(f"--step={step} is not allowed: {run_dir!r} is a quantised checkpoint with "
                        f"one step")
  elif step is not None and step not in _steps(run_dir):
    raise ConfigError(f"--step={step} is not allowed: choose one of {_steps(run_dir)}")
  path = layout_dir(run_dir, step)
  if path and os.path.isfile(os.path.join(path, META)) and _format(path) == FORMAT:
    return path
  ctx = multiprocessing.get_context("spawn")
  with concurrent.futures.ProcessPoolExecutor(1, mp_context=ctx) as ex:
    return ex.submit(build_layout, run_dir, step).result()


def _format(path: str):
  try:
    with open(os.path.join(path, META), encoding="utf-8") as f:
      return json.load(f).get("format")
  except (OSError, ValueError):
    return None


class Layout:
  """A layout directory: `cfg`, `spec` (None: float), group sizes, `read(group)` (fresh buffers)."""

  def __init__(self, path: str):
    self.path = path
    with open(os.path.join(path, META), encoding="utf-8") as f:
      self.meta = json.load(f)
    if self.meta.get("format") != FORMAT:
      raise ConfigError(f"{path}: not a {FORMAT} layout")
    self.cfg = rd.read_config(path)
    self.spec = QuantSpec(**self.meta["spec"]) if self.meta["spec"] else None
    self.groups = self.meta["groups"]

  def nbytes(self, group: str) -> int:
    return self.groups[group]["bytes"]

  @property
  def layer_bytes(self) -> list[int]:
    """Bytes of each layer file (in an MoE block: without its routed experts)."""
    return [self.nbytes(f"layer_{l}") for l in range(self.cfg.model.n_layers)]

  @property
  def expert_layers(self) -> list[int]:
    return [l for l in range(self.cfg.model.n_layers) if f"experts_{l}" in self.groups]

  @property
  def expert_record(self) -> int:
    """Bytes of one routed expert's record (0: no MoE layer)."""
    return max((self.groups[f"experts_{l}"]["record"] for l in self.expert_layers), default=0)

  @property
  def weight_bytes(self) -> int:
    return sum(g["bytes"] for g in self.groups.values())

  @property
  def max_leaf(self) -> int:
    return max(x["nbytes"] for g in self.groups.values() if "record" not in g
               for x in g["leaves"])

  def read_records(self, layer: int, ids, rows) -> int:
    """Read the raw records of experts `ids` of `layer` into the uint8 `rows[i]`; bytes read."""
    rec = self.groups[f"experts_{layer}"]["record"]
    with open(os.path.join(self.path, f"experts_{layer}.bin"), "rb", buffering=0) as f:
      for i, e in enumerate(ids):
        f.seek(int(e) * rec)
        view, got = memoryview(rows[i]), 0
        while got < rec:
          n = f.readinto(view[got:])
          if not n:
            raise OSError(f"{self.path}/experts_{layer}.bin: short read")
          got += n
    return len(ids) * rec

  def decode_records(self, layer: int, raw, alloc=np.empty) -> list[np.ndarray]:
    """`raw` uint8 records `[n, record]` -> `[n, ...]` arrays, one per leaf (in the order of
    `groups["experts_<l>"]["leaves"]`)."""
    return [_decode(raw[:, x["offset"]:x["offset"] + x["nbytes"]], x["dtype"], x["shape"], alloc)
            for x in self.groups[f"experts_{layer}"]["leaves"]]

  def read_experts(self, layer: int, ids) -> tuple[list[np.ndarray], int]:
    """The records of experts `ids` of `layer` as `[len(ids), ...]` arrays, one per leaf, and the
    bytes read."""
    buf = np.empty((len(ids), self.groups[f"experts_{layer}"]["record"]), np.uint8)
    nbytes = self.read_records(layer, ids, buf)
    return self.decode_records(layer, buf), nbytes

  def load(self, group: str):
    """The plain tree of `group` as device arrays, read leaf by leaf (each into its own new host
    array, handed to `jax.device_put`, which may keep it as the device buffer on CPU)."""
    flat = {}
    with open(os.path.join(self.path, group + ".bin"), "rb", buffering=0) as f:
      for x in self.groups[group]["leaves"]:
        packed = np.dtype(jnp.dtype(x["dtype"])) == INT4
        a = np.empty(x["nbytes"] if packed else x["shape"], np.uint8 if packed else
                     jnp.dtype(x["dtype"]))
        view = memoryview(a.reshape(-1).view(np.uint8))
        f.seek(x["offset"])
        got = 0
        while got < x["nbytes"]:
          n = f.readinto(view[got:])
          if not n:
            raise OSError(f"{self.path}/{group}.bin: short read")
          got += n
        if packed:
          a = _decode(a, x["dtype"], x["shape"])
        flat[tuple(x["path"].split("/"))] = jax.device_put(a)
    return flax.traverse_util.unflatten_dict(flat)

  def read(self, group: str):
    """The plain tree of `group` (numpy views of one buffer read from its file)."""
    g = self.groups[group]
    buf = np.empty(g["bytes"], np.uint8)
    with open(os.path.join(self.path, group + ".bin"), "rb", buffering=0) as f:
      view, got = memoryview(buf), 0
      while got < len(buf):
        n = f.readinto(view[got:])
        if not n:
          raise OSError(f"{self.path}/{group}.bin: short read")
        got += n
    flat = {tuple(x["path"].split("/")): _decode(buf[x["offset"]:x["offset"] + x["nbytes"]],
                                                 x["dtype"], x["shape"]) for x in g["leaves"]}
    return flax.traverse_util.unflatten_dict(flat)


def load_params(layout: Layout):
  """`(params, moe_state)` of a whole layout, as `LM` (or the qwix PTQ LM) takes them (in memory;
  `moe_state` is `{}` for a dense model)."""
  cfg = layout.cfg.model
  plain = layout.read(RESIDENT)
  groups = [layout.read(f"layer_{l}") for l in range(cfg.n_layers)]
  layers, states = [], []
  for l, g in enumerate(groups):
    p = dict(g["params"])
    if f"experts_{l}" in layout.groups:
      x = layout.groups[f"experts_{l}"]
      arrays, _ = layout.read_experts(l, range(x["experts"]))
      ex = flax.traverse_util.unflatten_dict(
          {tuple(leaf["path"].split("/")): a for leaf, a in zip(x["leaves"], arrays)})
      p["moe"] = {**p["moe"], **ex}
    layers.append(p)
    states.append(g.get("moe_state", {}))
  params = _restack(cfg, plain, layers)
  moe_state = _restack(cfg, {}, states) if cfg.moe is not None else {}
  if layout.spec is None:
    return params, moe_state
  from mhc_jax.quant.core import abstract_qparams
  return _from_plain(params, abstract_qparams(cfg, layout.spec)), moe_state
