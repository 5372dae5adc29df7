import pytest

from mhc_jax.config import ConfigError, ConnectionConfig, ModelConfig


@pytest.mark.parametrize("kwargs,field", [
    (dict(n_streams=0), "connection.n_streams"),
    (dict(kind="residual", n_streams=4), "connection.n_streams"),
    (dict(kind="mhc_lite", n_streams=7), "connection.n_streams"),
    (dict(sinkhorn_iters=0), "connection.sinkhorn_iters"),
    (dict(kind="dense"), "connection.kind"),
    (dict(init="xavier"), "connection.init"),
    (dict(gate_init=float("nan")), "connection.gate_init"),
    (dict(implementation="cuda"), "connection.implementation"),
])
def test_connection_errors_name_field_value_and_allowed(kwargs, field):
  with pytest.raises(ConfigError) as e:
    ConnectionConfig(**kwargs)
  msg = str(e.value)
  value = next(iter(kwargs.values())) if len(kwargs) == 1 else kwargs["n_streams"]
  assert field in msg and repr(value) in msg and "\n" not in msg


@pytest.mark.parametrize("kwargs,field", [
    (dict(n_heads=3), "model.n_heads"),
    (dict(d_model=0), "model.d_model"),
    (dict(remat="sometimes"), "model.remat"),
    (dict(dtype="float16"), "model.dtype"),
    (dict(collapse="head", connection=ConnectionConfig(kind="residual", n_streams=1)), "model.collapse"),
])
def test_model_errors(kwargs, field):
  with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
    ModelConfig(**kwargs)


def test_defaults_valid_and_frozen():
  cfg = ModelConfig()
  assert cfg.connection.kind == "mhc" and cfg.ff_dim % 64 == 0 and cfg.n_sites == 8
  with pytest.raises(Exception):
    cfg.d_model = 3
