"""DeepSeek-V4 <-> mhc_jax parameter conversion, and a safetensors loader for V4-layout mHC tensors.

V4 (official `inference/model.py` and Hugging Face `DeepseekV4HyperConnection`) stores one packed
parameter set per connection site:

    fn    [(2+n)n, nC]   rows [pre (n) | post (n) | comb (n*n, row-major)]
    base  [(2+n)n]       same row order
    scale [3]            (pre, post, comb)

and applies `x_next[k] = post[k] y + sum_j comb[j, k] x[j]`, i.e. `x_next = comb^T x`. Ours
(DESIGN.md) is `phi [nC, n*n + 2n]`, `b`, `alpha [3]` with `x_next = H_res x`, so

    H_res = comb^T  <=>  phi[:, 2n + i*n + j] = fn[2n + j*n + i, :]      (res block transposed)
    phi = fn[perm].T,   b = base[perm],   alpha = scale,                  perm = packed_permutation(n)

`perm` swaps (i, j) inside the res block and is its own inverse, so the same map converts back.
Our Sinkhorn with `eps > 0` is V4's `comb` iteration in our orientation (softmax over columns of
`H_res` = over rows of `comb`), so the converted site computes the same function exactly in exact
arithmetic; in float32 the outputs agree to ~1e-6 (tests/dsv4).

The learned collapse head (`hc_head`): `fn [n, nC]`, `base [n]`, `scale [1]`
<-> `CollapseHead` params `phi = fn.T [nC, n]`, `b = base`, `alpha = scale`.

Tensor names read by `read_v4_safetensors` (L = layer index):

    ours                              official DeepSeek-V4        Hugging Face transformers
    blocks/attn_conn/{phi,b,alpha}    layers.L.hc_attn_{fn,base,scale}   model.layers.L.attn_hc.{fn,base,scale}
    blocks/mlp_conn/{phi,b,alpha}     layers.L.hc_ffn_{fn,base,scale}    model.layers.L.ffn_hc.{fn,base,scale}
    blocks/attn_conn/norm/scale       layers.L.attn_norm.weight   model.layers.L.input_layernorm.weight
    blocks/mlp_conn/norm/scale        layers.L.ffn_norm.weight    model.layers.L.post_attention_layernorm.weight
    collapse/{phi,b,alpha}            hc_head_{fn,base,scale}     model.hc_head.hc_{fn,base,scale}
    final_norm/scale                  norm.weight                 model.norm.weight

transformers names are also accepted without the `model.` prefix (a bare `DeepseekV4Model`).
(`blocks/...` is the scanned layout, stacked over layers; with `scan_layers=False` it is
`block_L/...`.) Attention, MoE and embedding weights are not converted: V4's attention (compressed
KV, indexer) and MoE are not this library's blocks.
"""
from __future__ import annotations

import functools
import glob
import json
import math
import os
import re
from typing import Any, Mapping

import flax.linen as nn
import jax.numpy as jnp
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

LAYOUTS = ("deepseek", "hf")

_SITE_NAMES = {
    "deepseek": {"attn": "layers.{l}.hc_attn_{k}", "ffn": "layers.{l}.hc_ffn_{k}"},
    "hf": {"attn": "model.layers.{l}.attn_hc.{k}", "ffn": "model.layers.{l}.ffn_hc.{k}"},
}
_NORM_NAMES = {
    "deepseek": {"attn": "layers.{l}.attn_norm.weight", "ffn": "layers.{l}.ffn_norm.weight",
                 "final": "norm.weight"},
    "hf": {"attn": "model.layers.{l}.input_layernorm.weight",
           "ffn": "model.layers.{l}.post_attention_layernorm.weight", "final": "model.norm.weight"},
}
_HEAD_NAMES = {"deepseek": "hc_head_{k}", "hf": "model.hc_head.hc_{k}"}
_OUR_SITE = {"attn": "attn_conn", "ffn": "mlp_conn"}


def n_from_rows(rows: int) -> int:
  """n from the packed width `(2+n)n = rows`; ValueError if `rows` is not of that form."""
  n = int(round(math.sqrt(1 + rows))) - 1
  if n < 1 or (2 + n) * n != rows:
    raise ValueError(f"packed mHC width {rows} is not (2+n)*n for an integer n >= 1 "
                     f"(n=4 gives 24, n=2 gives 8)")
  return n


@functools.lru_cache(maxsize=None)
def packed_permutation(n: int) -> np.ndarray:
  """Index map between V4's packed rows and our packed columns: identity on pre/post, (i,j)->(j,i)
  on the res block. An involution: `perm[perm] == arange`."""
  i, j = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
  res = 2 * n + (j * n + i).reshape(-1)          # our column 2n + i*n + j <- V4 row 2n + j*n + i
  return np.concatenate([np.arange(2 * n), res]).astype(np.int64)


def _check(name: str, arr, shape) -> None:
  if tuple(arr.shape[-len(shape):]) != tuple(shape) or arr.ndim < len(shape):
    raise ValueError(f"{name} has shape {tuple(arr.shape)}, expected [..., {', '.join(map(str, shape))}]")


def site_from_v4(fn, base, scale) -> dict[str, Any]:
  """V4 `fn [..., (2+n)n, nC]`, `base [..., (2+n)n]`, `scale [..., 3]` -> `{phi, b, alpha}`.

  Leading axes (e.g. stacked layers) are kept. Works on NumPy and JAX arrays; exact (a gather and
  a transpose, no arithmetic).
  """
  n = n_from_rows(fn.shape[-2])
  width = (2 + n) * n
  _check("base", base, (width,))
  _check("scale", scale, (3,))
  perm = packed_permutation(n)
  return {"phi": fn[..., perm, :].swapaxes(-1, -2), "b": base[..., perm], "alpha": scale}


def site_to_v4(params: Mapping[str, Any]) -> dict[str, Any]:
  """Inverse of `site_from_v4`: `{phi [..., nC, (2+n)n], b, alpha}` -> `{fn, base, scale}`."""
  phi, b, alpha = params["phi"], params["b"], params["alpha"]
  n = n_from_rows(phi.shape[-1])
  _check("b", b, (phi.shape[-1],))
  _check("alpha", alpha, (3,))
  perm = packed_permutation(n)
  return {"fn": phi[..., perm].swapaxes(-1, -2), "base": b[..., perm], "scale": alpha}


def head_from_v4(fn, base, scale) -> dict[str, Any]:
  """V4 `hc_head` `fn [n, nC]`, `base [n]`, `scale [1]` -> CollapseHead `{phi [nC, n], b, alpha}`."""
  n = fn.shape[-2]
  _check("hc_head base", base, (n,))
  _check("hc_head scale", scale, (1,))
  return {"phi": fn.swapaxes(-1, -2), "b": base, "alpha": scale}


def head_to_v4(params: Mapping[str, Any]) -> dict[str, Any]:
  """Inverse of `head_from_v4`."""
  return {"fn": params["phi"].swapaxes(-1, -2), "base": params["b"], "scale": params["alpha"]}


# ----------------------------------------------------------------------------------------------
# safetensors


def _files(path: str) -> list[str]:
  if os.path.isdir(path):
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
      with open(index) as f:
        names = sorted(set(json.load(f)["weight_map"].values()))
      return [os.path.join(path, n) for n in names]
    files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
  elif path.endswith(".json"):
    with open(path) as f:
      names = sorted(set(json.load(f)["weight_map"].values()))
    return [os.path.join(os.path.dirname(path), n) for n in names]
  else:
    files = [path]
  if not files or not all(os.path.exists(f) for f in files):
    raise FileNotFoundError(f"no safetensors file at {path!r}")
  return files


_WANTED = re.compile(r"(hc_|_hc\.|hc_head|norm\.weight$|layernorm\.weight$)")


def read_v4_safetensors(path: str) -> dict[str, np.ndarray]:
  """Read the mHC-related tensors (connection, hc_head, norms) of a V4 checkpoint as float32 NumPy.

  `path`: one `.safetensors` file, a directory of shards (with or without
  `model.safetensors.index.json`), or the index file. Other tensors are not read.
  """
  out = {}
  for file in _files(path):
    with safe_open(file, framework="flax") as f:        # flax: bf16 norms load too
      for key in f.keys():
        if _WANTED.search(key):
          out[key] = np.asarray(f.get_tensor(key), dtype=np.float32)
  return out


def _with_hf_prefix(tensors: Mapping[str, Any]) -> Mapping[str, Any]:
  """A bare `DeepseekV4Model` saves `layers.L.attn_hc.fn` (no `model.`): add the prefix."""
  if "layers.0.attn_hc.fn" in tensors and "model.layers.0.attn_hc.fn" not in tensors:
    return {("model." + k if k.startswith(("layers.", "hc_head.", "norm.")) else k): v
            for k, v in tensors.items()}
  return tensors


def detect_layout(tensors: Mapping[str, Any]) -> str:
  """'deepseek' (official names) or 'hf' (transformers names); ValueError if neither is found."""
  tensors = _with_hf_prefix(tensors)
  for layout in LAYOUTS:
    if _SITE_NAMES[layout]["attn"].format(l=0, k="fn") in tensors:
      return layout
  raise ValueError("no DeepSeek-V4 mHC tensors found: expected 'layers.0.hc_attn_fn' (official) "
                   "or 'model.layers.0.attn_hc.fn' (transformers)")


def v4_to_params(tensors: Mapping[str, Any], *, n_layers: int | None = None, scan_layers: bool = True,
                 layout: str = "auto", norms: bool = True) -> dict[str, Any]:
  """Convert V4-named tensors to our LM's parameter tree (connection, collapse, norm parts only).

  Returns `{"blocks": {"attn_conn": {phi, b, alpha, norm: {scale}}, "mlp_conn": {...}},
  "collapse": {phi, b, alpha}, "final_norm": {scale}}` with layer-stacked arrays (scanned), or
  `block_L` subtrees with `scan_layers=False`. `collapse` and the norms are included when present
  (norms only with `norms=True`). Merge into an initialised tree with `merge_params`.
  """
  tensors = _with_hf_prefix(tensors)
  if layout == "auto":
    layout = detect_layout(tensors)
  if layout not in LAYOUTS:
    raise ValueError(f"layout={layout!r}; allowed: 'auto', 'deepseek', 'hf'")
  names = _SITE_NAMES[layout]
  if n_layers is None:
    n_layers = 0
    while names["attn"].format(l=n_layers, k="fn") in tensors:
      n_layers += 1
  layers = []
  for l in range(n_layers):
    layer = {}
    for site, ours in _OUR_SITE.items():
      keys = [names[site].format(l=l, k=k) for k in ("fn", "base", "scale")]
      missing = [k for k in keys if k not in tensors]
      if missing:
        raise KeyError(f"missing V4 tensor(s) {missing} for layer {l}")
      layer[ours] = site_from_v4(*(np.asarray(tensors[k], np.float32) for k in keys))
      norm_key = _NORM_NAMES[layout][site].format(l=l)
      if norms and norm_key in tensors:
        layer[ours]["norm"] = {"scale": np.asarray(tensors[norm_key], np.float32)}
    layers.append(layer)
  if scan_layers:
    out = {"blocks": _stack(layers)} if layers else {}
  else:
    out = {f"block_{l}": layer for l, layer in enumerate(layers)}
  head_keys = [_HEAD_NAMES[layout].format(k=k) for k in ("fn", "base", "scale")]
  if all(k in tensors for k in head_keys):
    out["collapse"] = head_from_v4(*(np.asarray(tensors[k], np.float32) for k in head_keys))
  final = _NORM_NAMES[layout]["final"]
  if norms and final in tensors:
    out["final_norm"] = {"scale": np.asarray(tensors[final], np.float32)}
  return out


def params_to_v4(params: Mapping[str, Any], *, layout: str = "deepseek") -> dict[str, np.ndarray]:
  """Our LM params (connection, collapse, norm parts) -> V4-named float32 NumPy tensors."""
  if layout not in LAYOUTS:
    raise ValueError(f"layout={layout!r}; allowed: 'deepseek', 'hf'")
  params = _unbox(params)
  if "blocks" in params:
    blocks = params["blocks"]
    n_layers = np.shape(blocks["attn_conn"]["phi"])[0]
    layers = [_tree_index(blocks, l) for l in range(n_layers)]
  else:
    layers = [params[f"block_{l}"] for l in range(sum(k.startswith("block_") for k in params))]
  out = {}
  for l, layer in enumerate(layers):
    for site, ours in _OUR_SITE.items():
      conv = site_to_v4({k: np.asarray(layer[ours][k], np.float32) for k in ("phi", "b", "alpha")})
      for k, v4k in (("fn", "fn"), ("base", "base"), ("scale", "scale")):
        out[_SITE_NAMES[layout][site].format(l=l, k=v4k)] = np.ascontiguousarray(conv[k])
      if "norm" in layer[ours]:
        out[_NORM_NAMES[layout][site].format(l=l)] = np.asarray(layer[ours]["norm"]["scale"],
                                                                 np.float32)
  if "collapse" in params:
    head = head_to_v4({k: np.asarray(params["collapse"][k], np.float32) for k in ("phi", "b", "alpha")})
    for k in ("fn", "base", "scale"):
      out[_HEAD_NAMES[layout].format(k=k)] = np.ascontiguousarray(head[k])
  if "final_norm" in params:
    out[_NORM_NAMES[layout]["final"]] = np.asarray(params["final_norm"]["scale"], np.float32)
  return out


def save_v4_safetensors(path: str, params: Mapping[str, Any], *, layout: str = "deepseek") -> None:
  """Write our LM's mHC parameters as a V4-layout safetensors file (`params_to_v4`)."""
  save_file(params_to_v4(params, layout=layout), path)


def merge_params(params: Mapping[str, Any], converted: Mapping[str, Any]) -> dict[str, Any]:
  """Return `params` with every leaf present in `converted` replaced (shape and dtype checked).

  Flax `Partitioned` boxes (logical axis metadata) are kept. Keys of `converted` absent from
  `params` raise KeyError (e.g. `collapse` for a model built with `collapse='sum'`).
  """
  def merge(p, c, path):
    if isinstance(c, Mapping):
      if not isinstance(p, Mapping):
        raise KeyError(f"{'/'.join(path)}: converted tree has a subtree where the model has a leaf")
      out = dict(p)
      for k, v in c.items():
        if k not in p:
          raise KeyError(f"{'/'.join(path + (k,))} is not in the model's params "
                         f"(has: {', '.join(sorted(p))})")
        out[k] = merge(p[k], v, path + (k,))
      return out
    boxed = isinstance(p, nn.meta.AxisMetadata)
    old = p.unbox() if boxed else p
    if tuple(np.shape(old)) != tuple(np.shape(c)):
      raise ValueError(f"{'/'.join(path)}: converted shape {tuple(np.shape(c))} != model shape "
                       f"{tuple(np.shape(old))}")
    new = jnp.asarray(c, dtype=old.dtype)
    return p.replace_boxed(new) if boxed else new

  return merge(params, converted, ())


def load_v4_safetensors(path: str, params: Mapping[str, Any], *, layout: str = "auto",
                        norms: bool = True) -> dict[str, Any]:
  """Load V4-layout mHC tensors from safetensors into an initialised params tree of our `LM`.

  `params` is `LM(cfg).init(...)["params"]` for a config with the checkpoint's n and width (e.g.
  `connection=dsv4()`, `collapse="head"`). The layer count and layout (scanned or not) are read
  from `params`.
  """
  tensors = read_v4_safetensors(path)
  unboxed = _unbox(params)
  scan = "blocks" in unboxed
  n_layers = (np.shape(unboxed["blocks"]["attn_conn"]["phi"])[0] if scan
              else sum(k.startswith("block_") for k in unboxed))
  converted = v4_to_params(tensors, n_layers=n_layers, scan_layers=scan, layout=layout, norms=norms)
  return merge_params(params, converted)


def _stack(layers: list[dict]) -> dict:
  if isinstance(layers[0], Mapping):
    return {k: _stack([layer[k] for layer in layers]) for k in layers[0]}
  return np.stack(layers)


def _tree_index(tree, i):
  if isinstance(tree, Mapping):
    return {k: _tree_index(v, i) for k, v in tree.items()}
  return np.asarray(tree)[i]


def _unbox(tree):
  if isinstance(tree, Mapping):
    return {k: _unbox(v) for k, v in tree.items()}
  unbox = getattr(tree, "unbox", None)
  return unbox() if callable(unbox) else tree
