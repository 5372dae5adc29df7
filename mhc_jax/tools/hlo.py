"""Reading compiled programs: collectives from HLO text (trip-count weighted), array bytes of HLO
types, and XLA's cost model where `cost_analysis()` has none (GPU ahead of time).

Used by `compare_sharding`, `h100` and the tests that count collectives.
"""
from __future__ import annotations

import collections
import math
import re

KINDS = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
_DTYPE_BYTES = {"f64": 8, "s64": 8, "u64": 8, "c64": 8, "f32": 4, "s32": 4, "u32": 4, "bf16": 2,
                "f16": 2, "s16": 2, "u16": 2, "s8": 1, "u8": 1, "pred": 1}
_COMP_RE = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s*\(.*\)\s*->\s*.*\{\s*$")
_OP_RE = re.compile(r"=\s*(.*?)\s+(" + "|".join(KINDS) + r")(-start)?\(")
_ARRAY_RE = re.compile(r"\b([a-z]+[0-9]*)\[([0-9,]*)\]")
_CALL_RE = re.compile(r"\b(body|condition|to_apply|calls|true_computation|false_computation)="
                      r"%?([\w.\-]+)")
_BRANCHES_RE = re.compile(r"branch_computations=\{([^}]*)\}")
_TRIP_RE = re.compile(r'"known_trip_count":\{"n":"(\d+)"')
_CHANNEL_RE = re.compile(r"\bchannel_id=(\d+)")


def array_bytes(type_text: str) -> list[int]:
  """Bytes of each array in an HLO type (`f32[4,8]`, tuples: every array in order)."""
  out = []
  for dtype, dims in _ARRAY_RE.findall(type_text):
    if dtype in _DTYPE_BYTES:
      out.append(math.prod(int(d) for d in dims.split(",") if d) * _DTYPE_BYTES[dtype])
  return out


def _result_bytes(kind: str, is_async: bool, type_text: str) -> int:
  """Per-device bytes an op moves, from its result type.

  Sync ops: the result (all arrays of a combined op). Async `*-start` results are tuples: all-reduce
  returns its operands' shape (sum them); all-gather / collective-permute / all-to-all return
  `(operands, outputs, [context scalars])` (the second half of the non-scalar arrays).
  """
  sizes = array_bytes(type_text)
  if not is_async or kind == "all-reduce":
    return sum(sizes)
  arrays = [s for s in sizes if s > 4] or sizes
  half = len(arrays) // 2
  return sum(arrays[half:]) if half else sum(arrays)


def _split_computations(hlo: str):
  comps: dict[str, list[str]] = {}
  entry = current = None
  for line in hlo.splitlines():
    m = _COMP_RE.match(line)
    if m:
      current = m.group(2)
      comps[current] = []
      entry = current if m.group(1) else entry
    elif current is not None:
      if line.startswith("}"):
        current = None
      else:
        comps[current].append(line)
  return comps, entry


def _cond_trip_count(comps, while_line: str) -> int | None:
  """Trip count of a `while` without `known_trip_count` (TPU): its condition is `i < constant(N)`
  on the counter (scan loops start at 0, step 1)."""
  if " while(" not in while_line:
    return None
  m = re.search(r"condition=%?([\w.\-]+)", while_line)
  body = comps.get(m.group(1), []) if m else []
  consts = [int(c) for c in re.findall(r"s32\[\][^=]*constant\((\d+)\)", "\n".join(body))]
  lt = any("compare(" in line and "direction=LT" in line for line in body)
  return consts[0] if lt and len(consts) == 1 else None


def collective_stats(hlo: str) -> dict[str, dict[str, float]]:
  """`{kind: {"count": executions per step, "bytes": per-device bytes per step}}`.

  Each computation's multiplicity is the sum over its call sites of the caller's multiplicity times
  the loop's trip count (`known_trip_count`, or the `i < N` bound of its condition; 1 for non-loop
  calls), so collectives in a scanned layer body count L times.
  """
  comps, entry = _split_computations(hlo)
  stats = {k: {"count": 0, "bytes": 0} for k in KINDS}
  if entry is None:
    return stats
  edges = collections.defaultdict(list)
  for name, lines in comps.items():
    for line in lines:
      trip = _TRIP_RE.search(line)
      trip_n = int(trip.group(1)) if trip else (_cond_trip_count(comps, line) or 1)
      for role, callee in _CALL_RE.findall(line):
        factor = trip_n if role in ("body", "condition") else 1
        edges[name].append((callee, factor))
      b = _BRANCHES_RE.search(line)
      if b:
        edges[name] += [(c.strip().lstrip("%"), 1) for c in b.group(1).split(",") if c.strip()]
  order, seen = [], set()

  def visit(name):
    if name not in seen:
      seen.add(name)
      for callee, _ in edges.get(name, ()):
        visit(callee)
      order.append(name)
  visit(entry)
  mult = collections.Counter({entry: 1})
  for name in reversed(order):                   # callers before callees
    for callee, factor in edges.get(name, ()):
      mult[callee] += mult[name] * factor
  seen_channels = set()
  for name, lines in comps.items():
    if not mult.get(name):
      continue
    for line in lines:
      op = _OP_RE.search(line)
      if not op:
        continue
      channel = _CHANNEL_RE.search(line)
      if channel:                # TPU clones one collective into several fusions: count it once
        if channel.group(1) in seen_channels:
          continue
        seen_channels.add(channel.group(1))
      kind, is_async = op.group(2), bool(op.group(3))
      if kind == "all-reduce" and name.startswith("all-reduce-scatter"):
        kind = "reduce-scatter"  # TPU lowers reduce-scatter as a fused all-reduce + slice
      stats[kind]["count"] += mult[name]
      stats[kind]["bytes"] += mult[name] * _result_bytes(kind, is_async, op.group(1))
  return stats


def cpu_cost_model(compiled) -> dict:
  """`cost_analysis()`, or (GPU ahead-of-time, where it returns None) XLA's CPU cost model over the
  optimized module: a private API, so any failure gives `{}`."""
  cost = compiled.cost_analysis() or {}
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else {}
  if cost.get("bytes accessed"):
    return dict(cost)
  try:
    from jax._src import xla_bridge
    from jax._src.lib import _jax
    module = compiled.runtime_executable().hlo_modules()[0]
    return dict(_jax.hlo_module_cost_analysis(xla_bridge.get_backend("cpu"), module))
  except Exception:  # noqa: BLE001 - private API moved
    return {}
