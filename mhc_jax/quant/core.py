"""Post-training weight-only quantisation of the LM with qwix.

What is quantised (qwix `PtqProvider` rules matched on Linen module paths):
  * attention projections `attn/{query,key,value,out}` (`nn.Einsum`, intercepted as `jnp.einsum`),
  * MLP projections `mlp/{wi_0,wi_1,wo}` (`nn.Dense`, intercepted as `lax.dot_general`),
  * optionally the untied output head `lm_head` (`nn.Dense`).
and the kernels the ops read themselves (`RAW`: not `nn.Dense`/`nn.Einsum`, so qwix's interception
does not see them), quantised with qwix's own quantiser by the same recipe and stored as `QArray`s
that `mhc_jax.ops.weights` dequantises where they are used (W = q · s):
  * the MoE routed experts `moe/{gate,up,down}` [E, C, F] / [E, F, C] (one scale per expert and
    output channel; int4 groups along the contraction) and the shared experts `moe/shared_*`,
  * the MLA projections `attn/{q,q_down,q_up,kv_down,k_rope,k_up,v_up,out}`.
The MoE router stays float32 (routing decisions; C·E values per layer).
Everything else stays float32 and bit-identical: the HC/mHC connection parameters (`*_conn/phi`,
`b`, `alpha`, HC thetas/biases, static mappings), the norms, the collapse head and the token
embedding. The embedding lookup is a gather (`jnp.take`), which qwix's PTQ provider does not
intercept, so qwix cannot quantise it; a tied head (`embed.attend`) shares that table and stays
float32 too.

Modes (symmetric absmax calibration, qwix defaults):
  * `int8`: per output channel -- one float32 scale per column of each kernel (every
    non-contracting axis is a channel axis; for the attention out projection `[H, D, C]`, both
    contracting axes H and D share one scale per output feature).
  * `int4`: group-wise along the (last) contracting axis with `group_size` rows per scale
    (qwix `tile_size`). For `attn/out` the last contracting axis is `head_dim`; when
    `group_size > head_dim` its groups are one head (`head_dim` rows) -- qwix tiles only the last
    contracting axis.

Stacked (`scan_layers=True`) parameters: qwix derives how to quantise a kernel from the op inside
`nn.scan`, i.e. for one layer's slice, and `qwix.quantize_params` would apply that per-layer recipe
to the whole `[L, ...]` stack (wrong axes). We therefore call qwix's own quantiser
(`qwix.quantize` with the recipe recorded in the abstract PTQ tree) under `jax.vmap` over the
layer axis. Unstacked kernels go through `qwix.quantize` directly.
"""
from __future__ import annotations

import dataclasses
import functools

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import qwix
from qwix._src.providers.ptq import WithAux

from mhc_jax.config import ConfigError, ModelConfig
from mhc_jax.model import LM

MODES = ("int8", "int4")
QTYPES = {"int8": jnp.int8, "int4": jnp.int4}
ATTN = r"attn/(query|key|value)"
ATTN_OUT = r"attn/out"
MLP = r"mlp/(wi_0|wi_1|wo)"
HEAD = r"lm_head"
# Raw kernels: parent module name -> {param: its contracting axes (one layer's shape)}.
RAW = {
    "moe": {"gate": (1,), "up": (1,), "down": (1,),
            "shared_gate": (0,), "shared_up": (0,), "shared_down": (0,)},
    "attn": {"q": (0,), "q_down": (0,), "q_up": (0,), "kv_down": (0,), "k_rope": (0,),
             "k_up": (0,), "v_up": (0,), "out": (0, 1)},                               # MLA
}
STACKS = ("blocks", "dense_blocks")


@dataclasses.dataclass(frozen=True)
class QuantSpec:
  """`mode` int8 (per channel) | int4 (group-wise along the contraction, `group_size` rows)."""
  mode: str = "int8"
  group_size: int = 128
  head: bool = False      # also quantise an untied lm_head

  def __post_init__(self):
    if self.mode not in MODES:
      raise ConfigError(f"--mode={self.mode!r} is not allowed: choose one of 'int8', 'int4'")
    if isinstance(self.group_size, bool) or not isinstance(self.group_size, int) or self.group_size < 1:
      raise ConfigError(f"--group-size={self.group_size!r} is not allowed: an integer >= 1")

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)


def check_spec(spec: QuantSpec, cfg: ModelConfig):
  """One clear error when `group_size` does not divide a contraction width (int4 only)."""
  if spec.mode != "int4":
    return
  g = spec.group_size
  widths = {"model.d_model": cfg.d_model, "model.ff_dim": cfg.ff_dim}
  if cfg.moe is not None:
    widths["model.moe.d_expert"] = cfg.moe.d_expert
    if cfg.moe.n_shared:
      widths["model.moe.n_shared * model.moe.d_expert"] = cfg.moe.n_shared * cfg.moe.d_expert
  for field, w in widths.items():
    if w % g:
      raise ConfigError(f"--group-size={g} is not allowed: it must divide {field}={w} "
                        f"(the contraction width of the quantised projections)")
  small = {"head_dim": cfg.d_model // cfg.n_heads}        # groups of min(g, width) rows
  if cfg.mla is not None:
    small = {"model.mla.q_rank": cfg.mla.q_rank, "model.mla.kv_rank": cfg.mla.kv_rank,
             "model.mla.v_dim": cfg.mla.v_dim}
  for field, w in small.items():
    if w and g < w and w % g:
      raise ConfigError(f"--group-size={g} is not allowed: below {field}={w} it must divide it "
                        f"(groups along {field})")


def raw_recipe(path: tuple, shape: tuple, spec: QuantSpec) -> dict | None:
  """qwix.quantize keyword arguments for the raw kernel at `path` (one layer's `shape`), or None
  when `path` is not a raw kernel. int8: every non-contracting axis is a channel axis; int4: plus
  groups of min(group_size, width) rows along the last contracting axis."""
  if len(path) < 2 or path[-1] not in RAW.get(path[-2], {}):
    return None
  contract = RAW[path[-2]][path[-1]]
  if len(contract) and max(contract) >= len(shape):
    return None
  kw = {"qtype": QTYPES[spec.mode],
        "channelwise_axes": tuple(a for a in range(len(shape)) if a not in contract)}
  if spec.mode == "int4":
    last = contract[-1]
    kw["tiled_axes"] = {last: min(spec.group_size, shape[last])}
  return kw


def rules(spec: QuantSpec, cfg: ModelConfig) -> list[qwix.QuantizationRule]:
  """qwix PTQ rules (first match wins) for `spec`; weight-only."""
  qt = QTYPES[spec.mode]
  if spec.mode == "int8":
    tile = tile_out = None
  else:
    hd = cfg.d_model // cfg.n_heads
    tile, tile_out = spec.group_size, min(spec.group_size, hd)
  out = [qwix.QuantizationRule(module_path=rf"(.*/)?{ATTN_OUT}$", weight_qtype=qt, tile_size=tile_out),
         qwix.QuantizationRule(module_path=rf"(.*/)?({ATTN}|{MLP})$", weight_qtype=qt, tile_size=tile)]
  if spec.head and not cfg.tie_embeddings:
    out.append(qwix.QuantizationRule(module_path=rf"^{HEAD}$", weight_qtype=qt, tile_size=tile))
  return out


def quantized_lm(cfg: ModelConfig, spec: QuantSpec, decode: bool = False):
  """The qwix PTQ wrapper of `LM(cfg, decode)`: `apply({"params": qparams, ...}, tokens)`."""
  return qwix.quantize_model(LM(cfg, decode=decode), qwix.PtqProvider(rules(spec, cfg)))


def _is_aux(x):
  return isinstance(x, WithAux)


@functools.lru_cache(maxsize=16)
def _abstract_cached(cfg: ModelConfig, spec: QuantSpec):
  tok = jnp.zeros((1, 1), jnp.int32)
  abstract = nn.meta.unbox(jax.eval_shape(quantized_lm(cfg, spec).init, jax.random.PRNGKey(0),
                                          tok)["params"])
  return _with_raw(cfg, abstract, spec)


def abstract_qparams(cfg: ModelConfig, spec: QuantSpec):
  """The quantised parameter tree of `cfg` with `ShapeDtypeStruct` leaves (WithAux/QArray nodes)."""
  return _abstract_cached(cfg, spec)


def quantize_params(cfg: ModelConfig, params, spec: QuantSpec):
  """Float params (unboxed dict) -> quantised params (WithAux(QArray) at the quantised kernels;
  every other leaf is the same array object, untouched)."""
  check_spec(spec, cfg)
  params = nn.meta.unbox(params)
  abstract = abstract_qparams(cfg, spec)
  flat = flax.traverse_util.flatten_dict(params)
  flat_abs = flax.traverse_util.flatten_dict(abstract, is_leaf=lambda _, x: _is_aux(x))
  if set(flat) != set(flat_abs):
    raise ConfigError("params do not match the model config (parameter paths differ)")
  out = {}
  for path, w in flat.items():
    a = flat_abs[path]
    if isinstance(a, qwix.QArray):
      out[path] = _quantize_raw(cfg, path, w, spec)
      continue
    if not _is_aux(a):
      out[path] = w
      continue
    h = a.how
    quant = functools.partial(qwix.quantize, qtype=h.qtype, channelwise_axes=h.channelwise_axes,
                              tiled_axes=h.tiled_axes, calibration_method=h.calibration_method)
    target = a.array.qvalue.shape
    if tuple(w.shape) == tuple(target) and _stacked(cfg, path):
      # stacked over layers: the recipe is per layer -> vmap over the layer axis
      q = jax.vmap(quant)(w)
    else:
      q = quant(w)
    got = jax.tree.map(jnp.shape, q)
    want = jax.tree.map(jnp.shape, a.array)
    if got != want:
      raise AssertionError(f"quantised {path}: shapes {got} != abstract {want}")
    out[path] = a.replace(array=q)
  return flax.traverse_util.unflatten_dict(out)


def _stacked(cfg: ModelConfig, path: tuple) -> bool:
  return cfg.scan_layers and path[0] in STACKS


def _quantize_raw(cfg: ModelConfig, path: tuple, w, spec: QuantSpec):
  """A raw kernel through `qwix.quantize` by `raw_recipe` (vmapped over a scanned layer stack)."""
  stacked = _stacked(cfg, path)
  kw = raw_recipe(path, tuple(w.shape[1:] if stacked else w.shape), spec)
  quant = functools.partial(qwix.quantize, **kw)
  return jax.vmap(quant)(w) if stacked else quant(w)


def _with_raw(cfg: ModelConfig, abstract, spec: QuantSpec):
  """The PTQ abstract tree with each raw kernel's float leaf replaced by its abstract QArray."""
  flat = flax.traverse_util.flatten_dict(abstract, is_leaf=lambda _, x: _is_aux(x))
  for path, a in flat.items():
    if _is_aux(a):
      continue
    shape = tuple(a.shape[1:] if _stacked(cfg, path) else a.shape)
    if raw_recipe(path, shape, spec) is not None:
      flat[path] = jax.eval_shape(lambda w, p=path: _quantize_raw(cfg, p, w, spec), a)
  return flax.traverse_util.unflatten_dict(flat)


def _is_q(x):
  return _is_aux(x) or isinstance(x, qwix.QArray)


def dequantize_params(qparams):
  """Float32 tree with every QArray dequantised (for checks and the NumPy reference)."""
  def deq(x):
    if _is_aux(x):
      x = x.array
    return qwix.dequantize(x).astype(jnp.float32) if isinstance(x, qwix.QArray) else x
  return jax.tree.map(deq, qparams, is_leaf=_is_q)


def tree_bytes(tree) -> int:
  """In-memory bytes of the array leaves; int4 counted at 4 bits per value."""
  tot = 0
  for leaf in jax.tree.leaves(tree):
    bits = 4 if leaf.dtype == jnp.int4 else np.dtype(leaf.dtype).itemsize * 8
    tot += (int(np.prod(leaf.shape)) * bits + 7) // 8
  return tot


def quantized_kernel_bytes(qparams) -> tuple[int, int]:
  """(bytes of the quantised kernels incl. scales, float32 bytes of the same kernels)."""
  q = f = 0
  for leaf in jax.tree.leaves(qparams, is_leaf=_is_q):
    if _is_q(leaf):
      arr = leaf.array if _is_aux(leaf) else leaf
      q += tree_bytes(arr)
      f += int(np.prod(arr.qvalue.shape)) * 4
  return q, f
