"""`MeshConfig`: the device mesh `("data", "fsdp", "tensor")` and the sharding strategy over it
(the rules themselves are in `mhc_jax.sharding`)."""
from __future__ import annotations

import dataclasses
import math

from mhc_jax.config.checks import check_choice, fail

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")
STRATEGIES = ("dp", "fsdp", "tp", "fsdp_tp", "hsdp")
STREAM_SHARDINGS = ("replicated", "feature", "sequence")
LOGICAL_AXES = ("batch", "length", "streams", "embed", "heads", "kv", "mlp", "vocab", "layers",
                "experts", "q_lora", "kv_lora",
                "mhc_in", "mhc_out", "mhc_streams", "mhc_streams_in", "mhc_gates")

# Default mesh shape per strategy when `MeshConfig.shape` is None; -1 takes the remaining devices.
DEFAULT_SHAPES = {"dp": (-1, 1, 1), "fsdp": (1, -1, 1), "tp": (1, 1, -1), "fsdp_tp": (1, -1, 2),
                  "hsdp": (-2, -1, 1)}   # -2: the number of slices (1 on a single slice / CPU)


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  """Device mesh over `("data", "fsdp", "tensor")` and the strategy that maps logical axes onto it.

  shape: sizes of (data, fsdp, tensor), one -1 allowed; None takes `DEFAULT_SHAPES[strategy]`.
  stream_sharding: how the mHC residual streams `[B, T, n, C]` sit on the `tensor` axis.
  """
  strategy: str = "dp"
  shape: tuple[int, ...] | None = None
  stream_sharding: str = "replicated"

  def __post_init__(self):
    check_choice("mesh.strategy", self.strategy, STRATEGIES)
    check_choice("mesh.stream_sharding", self.stream_sharding, STREAM_SHARDINGS)
    if self.shape is None:
      return
    shape = self.shape
    if isinstance(shape, list):
      object.__setattr__(self, "shape", tuple(shape))
      shape = self.shape
    if (not isinstance(shape, tuple) or len(shape) != len(MESH_AXES)
        or any(isinstance(s, bool) or not isinstance(s, int) for s in shape)):
      fail("mesh.shape", shape, f"a tuple of {len(MESH_AXES)} integers for {MESH_AXES}")
    if any(s == 0 or s < -1 for s in shape):
      fail("mesh.shape", shape, "positive sizes, with at most one -1")
    if sum(s == -1 for s in shape) > 1:
      fail("mesh.shape", shape, "at most one -1")

  def resolved_shape(self, n_devices: int, n_slices: int = 1) -> tuple[int, int, int]:
    """Concrete (data, fsdp, tensor) sizes for `n_devices`; ConfigError when they do not fit."""
    shape = list(self.shape if self.shape is not None else DEFAULT_SHAPES[self.strategy])
    shape = [n_slices if s == -2 else s for s in shape]
    known = math.prod(s for s in shape if s != -1)
    if -1 in shape:
      if n_devices % known:
        fail("mesh.shape", tuple(self.shape or shape),
             f"the fixed sizes multiply to {known}, which does not divide {n_devices} devices")
      shape[shape.index(-1)] = n_devices // known
    elif known != n_devices:
      fail("mesh.shape", tuple(shape),
           f"sizes must multiply to the {n_devices} devices (got {known}); use -1 for one axis")
    return tuple(shape)
