"""Routed experts of a streamed MoE model, read from disk only when a token routes to them.

Inside the jitted block the MoE layer computes the routing and hands the distinct experts
(`ops.moe.compact_experts`) to `ExpertStore.fetch`, a host callback that serves them from a cache of
the most recently used experts (LRU) or reads their records from the layout's `experts_<l>.bin`
(`mhc_jax.quant.layout`) -- as the CPU runners of DeepSeek-V3/R1 do.
"""
from __future__ import annotations

import collections
import functools
import os

import flax
import jax
import jax.numpy as jnp
import numpy as np

from mhc_jax.quant.io import _from_plain
from mhc_jax.quant.layout import Layout

class ExpertStore:
  """The routed experts of a layout's MoE blocks, read from `experts_<l>.bin` only when routed to,
  through an LRU cache of `capacity` expert records (0: no cache).

  `fetch(layer, slots)` is traceable (the MoE layer's `ops.moe.moe_ffn(fetch=...)` calls it inside
  the jitted block): a host callback returns `{gate, up, down}` for the `S` slots (slot value E:
  unused, zeros). Counts `bytes_read`, `hits` and `misses` (expert records).

  Stores of one layout compare equal (they are a static argument of the jitted blocks, so a new
  store reuses the compiled code); the callback serves the store opened last for that layout
  (`_OPEN`), so open one store per layout at a time."""

  def __init__(self, layout: Layout, capacity: int, abstract: dict):
    """`abstract`: `{gate, up, down}` of one MoE block's abstract params (QArrays when quantised)."""
    self.layout, self.capacity = layout, int(capacity)
    self.key = os.path.realpath(layout.path)
    _OPEN[self.key] = self
    l0 = layout.expert_layers[0]
    g = layout.groups[f"experts_{l0}"]
    self.n, self.leaves = g["experts"], g["leaves"]
    self._abstract = abstract
    self.cache = collections.OrderedDict()       # (layer, expert) -> [per-leaf arrays]
    self.bytes_read = self.hits = self.misses = 0

  def _host_dtype(self, x):
    dt = jnp.dtype(x["dtype"])
    return np.dtype(np.int8) if dt == jnp.int4 else dt   # int4 crosses the callback as int8

  def host_fetch(self, layer, slots):
    layer = int(layer)
    out = [np.zeros((len(slots), *x["shape"]), self._host_dtype(x)) for x in self.leaves]
    need = []
    for i, e in enumerate(np.asarray(slots).tolist()):
      if e >= self.n:
        continue
      rec = self.cache.get((layer, e))
      if rec is None:
        need.append((i, e))
        continue
      self.cache.move_to_end((layer, e))
      self.hits += 1
      for o, a in zip(out, rec):
        o[i] = a
    if need:
      arrays, nbytes = self.layout.read_experts(layer, [e for _, e in need])
      self.bytes_read += nbytes
      self.misses += len(need)
      for j, (i, e) in enumerate(need):
        rec = [a[j].copy() for a in arrays]
        for o, a in zip(out, rec):
          o[i] = a
        if self.capacity:
          self.cache[(layer, e)] = rec
          while len(self.cache) > self.capacity:
            self.cache.popitem(last=False)
    return tuple(out)

  def __eq__(self, other):
    return isinstance(other, ExpertStore) and other.key == self.key

  def __hash__(self):
    return hash(("ExpertStore", self.key))

  def fetch(self, layer, slots_S):
    S = slots_S.shape[0]
    shapes = tuple(jax.ShapeDtypeStruct((S, *x["shape"]), self._host_dtype(x)) for x in self.leaves)
    arrays = jax.pure_callback(functools.partial(_host_fetch, self.key), shapes, layer, slots_S)
    flat = {tuple(x["path"].split("/")): a.astype(jnp.dtype(x["dtype"]))
            for x, a in zip(self.leaves, arrays)}
    return _from_plain(flax.traverse_util.unflatten_dict(flat), self._abstract)

  def clear(self):
    self.cache.clear()
    if _OPEN.get(self.key) is self:
      del _OPEN[self.key]


_OPEN: dict[str, ExpertStore] = {}     # layout path -> the store its compiled blocks call


def _host_fetch(key, layer, slots):
  store = _OPEN.get(key)
  if store is None:
    raise RuntimeError(f"no open ExpertStore for {key} (the StreamedLM was closed)")
  return store.host_fetch(layer, slots)
