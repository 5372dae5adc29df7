"""Post-training weight-only quantisation of the LM with qwix.

What is quantised (qwix `PtqProvider` rules matched on Linen module paths):
  * attention projections `attn/{query,key,value,out}` (`nn.Einsum`, intercepted as `jnp.einsum`),
  * MLP projections `mlp/{wi_0,wi_1,wo}` (`nn.Dense`, intercepted as `lax.dot_general`),
  * optionally the untied output head `lm_head` (`nn.Dense`).
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
  """One clear error for a model the rules do not cover (MoE experts and MLA projections are
  raw parameters, not the `nn.Einsum` / `nn.Dense` layers qwix intercepts), and when `group_size`
  does not divide a contraction width (int4 only)."""
  for field, value in (("model.moe", cfg.moe), ("model.mla", cfg.mla)):
    if value is not None:
      raise ConfigError(f"{field}={value} is not allowed: quantisation covers the dense attention "
                        "and SwiGLU projections; MoE and MLA models are not supported yet")
  if spec.mode != "int4":
    return
  g = spec.group_size
  widths = {"model.d_model": cfg.d_model, "model.ff_dim": cfg.ff_dim}
  for field, w in widths.items():
    if w % g:
      raise ConfigError(f"--group-size={g} is not allowed: it must divide {field}={w} "
                        f"(the contraction width of the quantised projections)")
  hd = cfg.d_model // cfg.n_heads
  if g < hd and hd % g:
    raise ConfigError(f"--group-size={g} is not allowed: below head_dim={hd} it must divide "
                      f"head_dim (attn/out groups along head_dim)")


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
  return nn.meta.unbox(jax.eval_shape(quantized_lm(cfg, spec).init, jax.random.PRNGKey(0),
                                      tok)["params"])


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
    if not _is_aux(a):
      out[path] = w
      continue
    h = a.how
    quant = functools.partial(qwix.quantize, qtype=h.qtype, channelwise_axes=h.channelwise_axes,
                              tiled_axes=h.tiled_axes, calibration_method=h.calibration_method)
    target = a.array.qvalue.shape
    if tuple(w.shape) == tuple(target) and cfg.scan_layers and path[0] == "blocks":
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


def dequantize_params(qparams):
  """Float32 tree with every QArray dequantised (for checks and the NumPy reference)."""
  return jax.tree.map(lambda x: qwix.dequantize(x.array).astype(jnp.float32) if _is_aux(x) else x,
                      qparams, is_leaf=_is_aux)


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
  for leaf in jax.tree.leaves(qparams, is_leaf=_is_aux):
    if _is_aux(leaf):
      q += tree_bytes(leaf.array)
      f += int(np.prod(leaf.array.qvalue.shape)) * 4
  return q, f
