"""Test setup: 8 fake CPU devices before jax starts, so sharding tests can build meshes."""
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["JAX_NUM_CPU_DEVICES"] = "8"
os.environ.setdefault("PYTHONHASHSEED", "0")

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)


import gc  # noqa: E402

import pytest  # noqa: E402

# Every compiled XLA:CPU executable keeps a few memory maps (its JIT code) until JAX's caches drop
# it; a worker that runs hundreds of tests can reach the kernel's vm.max_map_count (65530), and LLVM
# then crashes compiling (SIGSEGV). After a test, past this many maps, the caches are cleared.
MAX_MAPS = 20000


def _n_maps() -> int:
  try:
    with open("/proc/self/maps", "rb") as f:
      return sum(1 for _ in f)
  except OSError:
    return 0


@pytest.fixture(autouse=True)
def _bounded_memory_maps():
  yield
  if _n_maps() > MAX_MAPS:
    jax.clear_caches()
    gc.collect()
