"""Saving results of the tools and experiments: run metadata (device, jax version, date), JSON, figures.

matplotlib is imported inside the figure functions: it is heavy and only the plotting paths need it.
"""
from __future__ import annotations

import datetime
import json
import os
import pathlib
import platform


def metadata() -> dict:
  """Where and when a result was produced."""
  import jax
  dev = jax.devices()[0]
  return {
      "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      "jax_version": jax.__version__,
      "backend": jax.default_backend(),
      "device": f"{dev.platform}:{getattr(dev, 'device_kind', '')}",
      "device_count": jax.device_count(),
      "cpu": platform.processor() or platform.machine(),
      "cpu_count": os.cpu_count(),
      "python": platform.python_version(),
  }


def save_json(obj: dict, path: pathlib.Path) -> pathlib.Path:
  path.write_text(json.dumps(obj, indent=1, allow_nan=True) + "\n")
  return path


def new_figure(*args, **kwargs):
  """`plt.subplots(...)`; matplotlib picks Agg by itself when there is no display."""
  import matplotlib.pyplot as plt
  return plt.subplots(*args, **kwargs)


def save_figure(fig, path: pathlib.Path, close: bool = True) -> pathlib.Path:
  import matplotlib.pyplot as plt
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  if close:
    plt.close(fig)
  return path
