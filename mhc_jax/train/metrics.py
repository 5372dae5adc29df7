"""Run-directory metric writers: `metrics.jsonl` (one JSON object per record) and TensorBoard events.

Records: `{"step": int, "kind": "train"|"eval"|"diag", ...scalars, ...lists}`. Lists (per-layer gradient
norms, per-site gains) go to JSONL as lists and to TensorBoard as `name/<i>` scalars.
"""
from __future__ import annotations

import json
import math
import os
import sys

from tensorboardX import SummaryWriter


def _clean(v):
  if isinstance(v, float) and not math.isfinite(v):
    return str(v)            # JSON has no NaN/Inf; keep them readable
  if isinstance(v, (list, tuple)):
    return [_clean(x) for x in v]
  return v


class MetricsWriter:
  """Append-only JSONL + TensorBoard; `enabled=False` on non-main processes."""

  def __init__(self, run_dir: str, enabled: bool = True, tensorboard: bool = True):
    self.enabled = enabled
    self.path = os.path.join(run_dir, "metrics.jsonl")
    self._tb = None
    if enabled and tensorboard:
      self._tb = SummaryWriter(os.path.join(run_dir, "tb"), flush_secs=10)
    self._f = open(self.path, "a", encoding="utf-8") if enabled else None

  def write(self, step: int, kind: str, values: dict):
    if not self.enabled:
      return
    rec = {"step": int(step), "kind": kind}
    rec.update({k: _clean(v) for k, v in values.items()})
    self._f.write(json.dumps(rec) + "\n")
    self._f.flush()
    if self._tb is not None:
      for k, v in values.items():
        tag = f"{kind}/{k}"
        if isinstance(v, (list, tuple)):
          for i, x in enumerate(v):
            if isinstance(x, (int, float)):
              self._tb.add_scalar(f"{tag}/{i}", x, step)
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
          self._tb.add_scalar(tag, v, step)

  def close(self):
    if self._f is not None:
      self._f.close()
      self._f = None
    if self._tb is not None:
      self._tb.close()
      self._tb = None


def read_jsonl(path: str, warn: bool = True) -> list[dict]:
  """The records of a metrics file; lines that are not a record (a torn last line of a killed
  process, stray text) are skipped, and counted in one warning on stderr."""
  out, bad = [], 0
  with open(path, encoding="utf-8", errors="replace") as f:
    for line in f:
      line = line.strip()
      if not line:
        continue
      try:
        rec = json.loads(line)
      except ValueError:
        rec = None
      if isinstance(rec, dict) and isinstance(rec.get("step"), int) and isinstance(rec.get("kind"), str):
        out.append(rec)
      else:
        bad += 1
  if bad and out and warn:
    print(f"warning: {path}: skipped {bad} line(s) that are not metric records", file=sys.stderr,
          flush=True)
  return out


def truncate_after(path: str, step: int):
  """Drop records with `step > step` (a resumed run re-does those steps); atomic rewrite."""
  if not os.path.exists(path):
    return
  keep = [r for r in read_jsonl(path) if r["step"] <= step]
  tmp = path + ".tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    for r in keep:
      f.write(json.dumps(r) + "\n")
  os.replace(tmp, path)
