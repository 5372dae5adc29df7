"""SwiGLU MLP: `y = W_o (silu(x W_0) * (x W_1))`."""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp


class MLP(nn.Module):
  hidden: int
  init_std: float = 0.02
  out_std: float = 0.02
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x_BTC):
    def dense(features, name, axes, std):
      return nn.Dense(features, use_bias=False, dtype=self.dtype, param_dtype=jnp.float32,
                      name=name,
                      kernel_init=nn.with_logical_partitioning(nn.initializers.normal(std), axes))
    gate = dense(self.hidden, "wi_0", ("embed", "mlp"), self.init_std)(x_BTC)
    up = dense(self.hidden, "wi_1", ("embed", "mlp"), self.init_std)(x_BTC)
    h = nn.with_logical_constraint(jax.nn.silu(gate) * up, ("batch", "length", "mlp"))
    return dense(x_BTC.shape[-1], "wo", ("mlp", "embed"), self.out_std)(h)
