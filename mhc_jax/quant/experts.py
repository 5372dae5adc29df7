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
from mhc_jax.quant.layout import Layout, host_zeros

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
    self.n, self.leaves, self.record = g["experts"], g["leaves"], g["record"]
    self._abstract = abstract
    # the cache: raw records in one slab (pages are touched as it fills), LRU over its rows
    self.slab = host_zeros((self.capacity, self.record), np.uint8) if self.capacity else None
    self.cache = collections.OrderedDict()       # (layer, expert) -> slab row
    self.bytes_read = self.hits = self.misses = 0

  def _host_dtype(self, x):
    dt = jnp.dtype(x["dtype"])
    return np.dtype(np.int8) if dt == jnp.int4 else dt   # int4 crosses the callback as int8

  def host_fetch(self, layer, slots):
    """`{gate, up, down}` leaves `[S, ...]` of the experts `slots` of `layer` (numpy, host)."""
    layer = int(layer)
    raw = host_zeros((len(slots), self.record), np.uint8)      # unused slots stay zero
    need = []
    for i, e in enumerate(np.asarray(slots).tolist()):
      if e >= self.n:
        continue
      row = self.cache.get((layer, e))
      if row is None:
        need.append((i, e))
        continue
      self.cache.move_to_end((layer, e))
      self.hits += 1
      raw[i] = self.slab[row]
    if need:
      self.bytes_read += self.layout.read_records(layer, [e for _, e in need],
                                                  [raw[i] for i, _ in need])
      self.misses += len(need)
      for i, e in need:
        if not self.capacity:
          break
        if len(self.cache) < self.capacity:
          row = len(self.cache)
        else:
          _, row = self.cache.popitem(last=False)          # least recently used
        self.slab[row] = raw[i]
        self.cache[(layer, e)] = row
    out = self.layout.decode_records(layer, raw, host_zeros)
    return tuple(a.astype(np.int8) if a.dtype != self._host_dtype(x) else a
                 for x, a in zip(self.leaves, out))

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
