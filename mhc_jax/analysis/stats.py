"""Small statistics helpers shared by the experiments."""
from __future__ import annotations

import math
from typing import Sequence


def mean_std(values: Sequence[float]) -> tuple[float, float]:
  """Mean and sample standard deviation (ddof=1; 0.0 for a single value). NaN/inf propagate."""
  vals = [float(v) for v in values]
  if not vals:
    raise ValueError("mean_std: needs at least one value")
  mean = sum(vals) / len(vals)
  if len(vals) == 1:
    return mean, 0.0
  var = sum((v - mean) ** 2 for v in vals) / (len(vals) - 1)
  return mean, math.sqrt(var) if math.isfinite(var) else var
