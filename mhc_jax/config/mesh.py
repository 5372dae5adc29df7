"""`MeshConfig`: the device mesh `("data", "expert", "fsdp", "tensor")` and the sharding strategy over
it (the rules themselves are in `mhc_jax.sharding`).

`MeshConfig.shape` is the 3-tuple (data, fsdp, tensor) of earlier versions; the expert-parallel size
`expert` is carved out of its data entry: mesh data = data / expert (tokens are split over the expert
ranks exactly like data parallelism, so the batch shards are still data · fsdp of `shape`)."""
from __future__ import annotations

import dataclasses
import math

from mhc_jax.config.checks import check_choice, check_int, fail

MESH_AXES = ("data", "expert", "fsdp", "tensor")
BATCH_AXES = ("data", "expert", "fsdp")
STRATEGIES = ("dp", "fsdp", "tp", "fsdp_tp", "hsdp", "ep")
STREAM_SHARDINGS = ("replicated", "feature", "sequence")
LOGICAL_AXES = ("batch", "length", "streams", "embed", "heads", "kv", "mlp", "vocab", "layers",
                "experts", "q_lora", "kv_lora",
                "mhc_in", "mhc_out", "mhc_streams", "mhc_streams_in", "mhc_gates")

# Default mesh shape per strategy when `MeshConfig.shape` is None; -1 takes the remaining devices.
DEFAULT_SHAPES = {"dp": (-1, 1, 1), "fsdp": (1, -1, 1), "tp": (1, 1, -1), "fsdp_tp": (1, -1, 2),
                  "hsdp": (-2, -1, 1),   # -2: the number of slices (1 on a single slice / CPU)
                  "ep": (-1, 1, 1)}      # the whole data entry becomes the expert axis


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  """Device mesh over `MESH_AXES` and the strategy that maps logical axes onto it.

  shape: sizes of (data, fsdp, tensor), one -1 allowed; None takes `DEFAULT_SHAPES[strategy]`.
  stream_sharding: how the mHC residual streams `[B, T, n, C]` sit on the `tensor` axis.
  expert: expert-parallel size, carved out of the data entry (which it must divide); 0 = auto: the
    whole data entry for strategy "ep", 1 otherwise. A positive value combines with any strategy
    (e.g. fsdp_tp, shape (2, 2, 2), expert=2).
  """
  strategy: str = "dp"
  shape: tuple[int, ...] | None = None
  stream_sharding: str = "replicated"
  expert: int = 0

  def __post_init__(self):
    check_choice("mesh.strategy", self.strategy, STRATEGIES)
    check_choice("mesh.stream_sharding", self.stream_sharding, STREAM_SHARDINGS)
    check_int("mesh.expert", self.expert, 0)
    if self.shape is None:
      return
    shape = self.shape
    if isinstance(shape, list):
      object.__setattr__(self, "shape", tuple(shape))
      shape = self.shape
    if (not isinstance(shape, tuple) or len(shape) != 3
        or any(isinstance(s, bool) or not isinstance(s, int) for s in shape)):
      fail("mesh.shape", shape, "a tuple of 3 integers for (data, fsdp, tensor)")
    if any(s == 0 or s < -1 for s in shape):
      fail("mesh.shape", shape, "positive sizes, with at most one -1")
    if sum(s == -1 for s in shape) > 1:
      fail("mesh.shape", shape, "at most one -1")
    if self.expert > 1 and shape[0] > 0 and shape[0] % self.expert:
      fail("mesh.expert", self.expert, f"must divide the data entry {shape[0]} of mesh.shape={shape}")

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

  def expert_size(self, data: int) -> int:
    """The expert-parallel size for a resolved data entry `data` (ConfigError when it does not divide)."""
    expert = self.expert or (data if self.strategy == "ep" else 1)
    if data % expert:
      fail("mesh.expert", self.expert, f"must divide the data entry {data} of the mesh shape")
    return expert

  def mesh_shape(self, n_devices: int, n_slices: int = 1) -> tuple[int, int, int, int]:
    """Concrete sizes of `MESH_AXES` (data / expert, expert, fsdp, tensor) for `n_devices`."""
    data, fsdp, tensor = self.resolved_shape(n_devices, n_slices)
    expert = self.expert_size(data)
    return data // expert, expert, fsdp, tensor
