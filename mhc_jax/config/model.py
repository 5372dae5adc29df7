"""Model side: `ConnectionConfig` (the residual connection around each sublayer) and `ModelConfig`."""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from mhc_jax.config.checks import check_choice, check_float, check_int, fail
from mhc_jax.config.mla import MLAConfig
from mhc_jax.config.moe import MoEConfig


KINDS = ("residual", "hc", "mhc", "mhc_lite")
INITS = ("hc_like", "uniform", "identity")
IMPLEMENTATIONS = ("auto", "xla", "pallas", "interpret")
DTYPES = ("auto", "float32", "bfloat16")
REMAT = ("none", "full", "dots", "mhc_paper")
COLLAPSE = ("sum", "head")
KV_CACHE = ("float", "int8")


@dataclasses.dataclass(frozen=True)
class ConnectionConfig:
  """Residual connection around each sublayer: `u = pre(x); y = branch(norm(u)); x = post(x, y)`.

  kind: residual (n=1, plain pre-norm residual) | hc | mhc | mhc_lite.
  dynamic: HC only; False gives static HC (theta fixed at 0).
  init: mHC/mHC-lite initial parameters; see `mhc_jax.layers.init` for the presets.
  sinkhorn_eps / pre_eps / mix_dtype: 0, 0, "float32" for the paper; `dsv4()` for DeepSeek-V4.
  implementation: stream-op backend (`auto|xla|pallas|interpret`, see `mhc_jax.kernels`). `auto`
    takes the Pallas kernels on TPU and GPU where they support the shape, dtype and numerics, else
    XLA (always on CPU; the rules: `mhc_jax.kernels.api.resolve`);
    `pallas` / `interpret` need kind mhc or mhc_lite and `mix_dtype="float32"`.
  """
  kind: str = "mhc"
  n_streams: int = 4
  dynamic: bool = True
  sinkhorn_iters: int = 20
  sinkhorn_eps: float = 0.0
  pre_eps: float = 0.0
  norm_eps: float = 1e-6
  gate_init: float = 0.01
  init: str = "hc_like"
  mix_dtype: str = "float32"
  implementation: str = "auto"

  def __post_init__(self):
    check_choice("connection.kind", self.kind, KINDS)
    check_int("connection.n_streams", self.n_streams, 1)
    if self.kind == "residual" and self.n_streams != 1:
      fail("connection.n_streams", self.n_streams, "kind='residual' needs n_streams=1")
    if self.kind == "mhc_lite" and self.n_streams > 6:
      fail("connection.n_streams", self.n_streams,
           "kind='mhc_lite' needs n_streams <= 6 (it has n! parameters per site)")
    if not isinstance(self.dynamic, bool):
      fail("connection.dynamic", self.dynamic, "true or false")
    check_int("connection.sinkhorn_iters", self.sinkhorn_iters, 1)
    check_float("connection.sinkhorn_eps", self.sinkhorn_eps)
    check_float("connection.pre_eps", self.pre_eps)
    check_float("connection.norm_eps", self.norm_eps)
    check_float("connection.gate_init", self.gate_init)
    check_choice("connection.init", self.init, INITS)
    check_choice("connection.mix_dtype", self.mix_dtype, ("float32", "activation"))
    check_choice("connection.implementation", self.implementation, IMPLEMENTATIONS)
    if self.implementation in ("pallas", "interpret"):
      if self.kind not in ("mhc", "mhc_lite"):
        fail("connection.implementation", self.implementation,
             f"kernels exist for kind 'mhc' and 'mhc_lite' (kind={self.kind!r}): use 'auto' or 'xla'")
      if self.mix_dtype != "float32":
        fail("connection.implementation", self.implementation,
             f"kernels mix streams in float32: needs connection.mix_dtype='float32' "
             f"(got {self.mix_dtype!r}); use 'auto' or 'xla'")
      if self.kind == "mhc_lite" and self.n_streams > 5:
        fail("connection.implementation", self.implementation,
             f"the mhc_lite kernel takes n_streams <= 5 (n! lanes; got {self.n_streams}); "
             "use 'auto' or 'xla'")

  @property
  def n(self) -> int:
    return self.n_streams


def dsv4(**overrides) -> ConnectionConfig:
  """DeepSeek-V4 numerics (`hc_mult=4`, `hc_sinkhorn_iters=20`, `hc_eps=rms_norm_eps=1e-6`).

  Softmax-start Sinkhorn with `+eps` in every denominator (`sinkhorn_eps`), `H_pre = sigmoid(.) + eps`
  (`pre_eps`), unweighted RMSNorm of the flattened streams with `norm_eps`, float32 mapping math,
  streams mixed in the activation dtype (`mix_dtype="activation"`). With `mhc_jax.convert` the
  sites match transformers' `DeepseekV4HyperConnection` to ~1e-6 in float32 (tests/dsv4).
  Overrides go to `ConnectionConfig` (e.g. `dsv4(n_streams=2, sinkhorn_iters=3)`).
  """
  base = dict(kind="mhc", n_streams=4, sinkhorn_iters=20, sinkhorn_eps=1e-6, pre_eps=1e-6,
              norm_eps=1e-6, mix_dtype="activation")
  base.update(overrides)
  return ConnectionConfig(**base)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Decoder LM: embed -> expand to n streams -> L x (attention, FFN) -> collapse -> norm -> head.

  mla: None = multi-head attention with RoPE; an `MLAConfig` = Multi-head Latent Attention.
  moe: None = every FFN a dense SwiGLU of width `ff_dim`; a `MoEConfig` = DeepSeekMoE FFNs in every
    layer after the first `n_dense_layers` (which stay dense, of width `ff_dim`).
  kv_cache: the decode cache of multi-head attention: "float" (the compute dtype) or "int8" (one
    float32 scale per cached key/value vector: `mhc_jax.ops.kv_cache`); training is unaffected.
  """
  vocab_size: int = 256
  d_model: int = 256
  n_layers: int = 4
  n_heads: int = 4
  d_ff: int = 0                 # 0: round(8/3 * d_model) up to a multiple of 64
  max_seq_len: int = 256
  rope_theta: float = 10000.0
  norm_eps: float = 1e-6
  init_std: float = 0.02
  tie_embeddings: bool = True
  dtype: str = "auto"           # compute dtype; "auto" = bfloat16 on GPU/TPU, float32 on CPU
  scan_layers: bool = True
  remat: str = "none"
  remat_group: int = 0          # remat="mhc_paper": blocks per recompute group; 0 = Eq. 20 optimum
  collapse: str = "sum"
  connection: ConnectionConfig = dataclasses.field(default_factory=ConnectionConfig)
  mla: MLAConfig | None = None
  moe: MoEConfig | None = None
  n_dense_layers: int = 0       # with moe: leading layers that keep a dense FFN
  kv_cache: str = "float"       # decode KV cache: "float" | "int8"

  def __post_init__(self):
    check_int("model.vocab_size", self.vocab_size, 2)
    check_int("model.d_model", self.d_model, 1)
    check_int("model.n_layers", self.n_layers, 1)
    check_int("model.n_heads", self.n_heads, 1)
    if self.d_model % self.n_heads:
      fail("model.n_heads", self.n_heads, f"must divide model.d_model={self.d_model}")
    if (self.d_model // self.n_heads) % 2:
      fail("model.n_heads", self.n_heads,
           f"head_dim = d_model/n_heads = {self.d_model // self.n_heads} must be even for RoPE")
    check_int("model.d_ff", self.d_ff, 0)
    check_int("model.max_seq_len", self.max_seq_len, 1)
    check_float("model.rope_theta", self.rope_theta, 0.0, strict=True)
    check_float("model.norm_eps", self.norm_eps)
    check_float("model.init_std", self.init_std, 0.0, strict=True)
    check_choice("model.dtype", self.dtype, DTYPES)
    check_choice("model.remat", self.remat, REMAT)
    check_int("model.remat_group", self.remat_group, 0)
    if self.remat_group > self.n_layers:
      fail("model.remat_group", self.remat_group, f"0 (auto) or at most model.n_layers={self.n_layers}")
    check_choice("model.collapse", self.collapse, COLLAPSE)
    check_choice("model.kv_cache", self.kv_cache, KV_CACHE)
    if self.kv_cache == "int8" and self.mla is not None:
      fail("model.kv_cache", self.kv_cache, "'float' with model.mla (the MLA latent cache is float)")
    if not isinstance(self.connection, ConnectionConfig):
      fail("model.connection", self.connection, "a ConnectionConfig")
    if self.collapse == "head" and self.connection.kind == "residual":
      fail("model.collapse", self.collapse, "'head' needs a multi-stream connection, not 'residual'")
    if self.mla is not None and not isinstance(self.mla, MLAConfig):
      fail("model.mla", self.mla, "None or an MLAConfig")
    if self.moe is not None and not isinstance(self.moe, MoEConfig):
      fail("model.moe", self.moe, "None or a MoEConfig")
    check_int("model.n_dense_layers", self.n_dense_layers, 0)
    if self.moe is None and self.n_dense_layers:
      fail("model.n_dense_layers", self.n_dense_layers, "0 without model.moe (every layer is dense)")
    if self.moe is not None and self.n_dense_layers >= self.n_layers:
      fail("model.n_dense_layers", self.n_dense_layers,
           f"an integer in [0, model.n_layers - 1 = {self.n_layers - 1}] (at least one MoE layer)")

  @property
  def head_dim(self) -> int:
    return self.d_model // self.n_heads

  @property
  def ff_dim(self) -> int:
    """Dense FFN width: `d_ff`, else for MoE models `(n_shared + top_k) * d_expert` (the routed
    layers' active width; with it the Table 5 parameter totals come out), else 8/3 d_model rounded
    up to a multiple of 64."""
    if self.d_ff:
      return self.d_ff
    if self.moe is not None:
      return (self.moe.n_shared + self.moe.top_k) * self.moe.d_expert
    return 64 * math.ceil(8 * self.d_model / 3 / 64)

  def is_moe_layer(self, layer: int) -> bool:
    return self.moe is not None and layer >= self.n_dense_layers

  @property
  def n_moe_layers(self) -> int:
    return 0 if self.moe is None else self.n_layers - self.n_dense_layers

  @property
  def n_sites(self) -> int:
    """Connection sites: attention and MLP of each block (2L)."""
    return 2 * self.n_layers


def with_connection(model: ModelConfig, kind: str, n_streams: int, **connection) -> ModelConfig:
  """`model` with a `kind` connection of `n_streams` streams; `residual` means one stream and the
  plain sum collapse (the rule every sweep over connection kinds needs)."""
  residual = kind == "residual"
  conn = dataclasses.replace(model.connection, kind=kind, n_streams=1 if residual else n_streams,
                             **connection)
  return dataclasses.replace(model, connection=conn, collapse="sum" if residual else model.collapse)


def compute_dtype(name: str):
  """`model.dtype` as a jnp dtype: "auto" is float32 on CPU and bfloat16 on GPU/TPU."""
  if name == "auto":
    return jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16
  return {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[name]
