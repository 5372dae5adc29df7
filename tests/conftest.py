"""Test setup: 8 fake CPU devices before jax starts, so sharding tests can build meshes."""
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["JAX_NUM_CPU_DEVICES"] = "8"
os.environ.setdefault("PYTHONHASHSEED", "0")

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)
