"""Every run setting as a frozen, validated dataclass; a bad value raises `ConfigError` naming the
field, the value and what is allowed.

  RunConfig(model=ModelConfig(connection=ConnectionConfig), data=DataConfig, train=TrainConfig,
            mesh=MeshConfig)

`checks` holds the field checks, `model` / `data` / `mesh` / `train` / `moe` / `mla` one section each (rules that cross
sections sit on `RunConfig`), `io` the dict / JSON round trip and `--set` overrides. Named presets are
in `mhc_jax.configs`.
"""
from mhc_jax.config.checks import (SEED_LIMIT, ConfigError, check_choice, check_float, check_int,
                                   check_seed, fail)
from mhc_jax.config.data import DATA_DIR_ENV, SOURCES, DataConfig
from mhc_jax.config.io import (apply_overrides, diff, from_dict, run_config_from_dict, to_dict,
                               to_json)
from mhc_jax.config.mesh import (BATCH_AXES, DEFAULT_SHAPES, LOGICAL_AXES, MESH_AXES, STRATEGIES,
                                 STREAM_SHARDINGS, MeshConfig)
from mhc_jax.config.model import (COLLAPSE, DTYPES, IMPLEMENTATIONS, INITS, KINDS, REMAT,
                                  ConnectionConfig, ModelConfig, compute_dtype, dsv4,
                                  with_connection)
from mhc_jax.config.mla import MLAConfig
from mhc_jax.config.moe import MoEConfig
from mhc_jax.config.train import SCHEDULES, RunConfig, TrainConfig
