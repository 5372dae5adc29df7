"""Expert-parallel DeepSeekMoE FFN: `moe_ffn` (`mhc_jax.ops.moe`) with the routed experts split over
the ranks of a mesh axis, run INSIDE `shard_map`.

Each device holds its local tokens `x_TC` (tokens are split over the expert ranks like data
parallelism) and E_loc = E / ep of the routed experts (rank r owns experts r·E_loc .. (r+1)·E_loc − 1);
the router, the balance bias and the shared experts are replicated. Dropless, no capacity factor:

  1. route locally (the same `route` as `moe_ffn`): expert ids [T, k], gates [T, k];
  2. sort the M = T·k (token, expert) pairs by expert (so also by destination rank r = e // E_loc);
     pair m goes to row r·cap + (m − start_r) of a send buffer [ep·cap, C], with its local expert
     id e % E_loc beside it (E_loc marks an empty row);
  3. `all_to_all` the rows and ids (tiled over the first axis): rank r receives the ≤ cap rows every
     source sends it;
  4. sort the received rows by local expert and apply the local experts with `lax.ragged_dot`
     (empty rows fall outside every group and come out zero); unsort;
  5. `all_to_all` the results back (the reverse exchange), gather each pair's row and combine:
     y_t = Σ_j g_{t,j} FFN_{e_{t,j}}(x_t) (+ the shared experts, computed locally).

cap = T · min(k, E_loc) is the worst case for one destination (a token's k experts are distinct, so
at most min(k, E_loc) of them live on one rank): no token is ever dropped, however skewed the router.
Collective: dense `lax.all_to_all` with this worst-case buffer, i.e. ep × cap · C rows sent per
device (ep times the single-device slab when E_loc ≥ k). The preferred
`lax.ragged_all_to_all` (send exactly the routed rows after exchanging counts) exists in jax 0.12 but
XLA:CPU cannot run it ("HLO opcode `ragged-all-to-all` is not supported by XLA:CPU ThunkEmitter"),
so the tests on fake CPU devices could not check it; steps 2 and 5 are where it would slot in.

Statistics are those of `moe_ffn` on the whole batch: `counts [E]` psum-ed over `batch_axes` (every
mesh axis the tokens are split over), `load = counts / (T_global · k)`; the per-token `expert_ids`,
`weights`, `affinity` are the local tokens' (shard_map's out_specs reassemble them).
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
from jax import lax

from mhc_jax.ops.moe import _swiglu, route


def _inverse(order_M):
  return jnp.zeros_like(order_M).at[order_M].set(jnp.arange(order_M.shape[0], dtype=order_M.dtype))


def moe_ffn_ep(x_TC, params, *, top_k: int, routed_scale: float = 1.0, dtype=None,
               axis_name: str = "expert", batch_axes: Sequence[str] | str | None = None):
  """Expert-parallel `moe_ffn` on this device's tokens → `(y_TC, stats)`; call inside `shard_map`.

  params: as `moe_ffn`'s, with `gate`/`up`/`down` holding this rank's E_loc experts (the global E is
  E_loc · ep); the rest whole. axis_name: the mesh axis the experts are split over. batch_axes: every
  mesh axis the tokens are split over (default: `axis_name` alone), for the global `counts`/`load`.
  """
  dtype = jnp.dtype(dtype or x_TC.dtype)
  batch_axes = (axis_name,) if batch_axes is None else batch_axes
  ep = lax.axis_size(axis_name)
  T, C = x_TC.shape
  E_loc = params["gate"].shape[0]
  E = E_loc * ep
  bias_E = params.get("bias")
  if bias_E is None:
    bias_E = jnp.zeros((E,), jnp.float32)
  expert_ids_Tk, weights_Tk, affinity_TE = route(x_TC, params["router"], bias_E, top_k=top_k,
                                                 routed_scale=routed_scale)
  k = top_k
  M = T * k
  cap = T * min(k, E_loc)

  # 2. pairs in expert (= destination) order, placed in per-destination blocks of cap rows
  flat_e = expert_ids_Tk.reshape(-1)                                 # pair p = t·k + j
  order_M = jnp.argsort(flat_e, stable=True)
  e_M = flat_e[order_M]
  dest_M = e_M // E_loc
  per_dest_R = jnp.bincount(flat_e // E_loc, length=ep).astype(jnp.int32)
  start_R = jnp.cumsum(per_dest_R) - per_dest_R
  pos_M = dest_M * cap + (jnp.arange(M, dtype=jnp.int32) - start_R[dest_M])
  send_NC = jnp.zeros((ep * cap, C), dtype).at[pos_M].set(x_TC.astype(dtype)[order_M // k])
  send_e_N = jnp.full((ep * cap,), E_loc, jnp.int32).at[pos_M].set((e_M % E_loc).astype(jnp.int32))

  # 3. exchange: block r of the send buffer goes to rank r; received blocks in source order
  recv_NC = lax.all_to_all(send_NC, axis_name, 0, 0, tiled=True)
  recv_e_N = lax.all_to_all(send_e_N, axis_name, 0, 0, tiled=True)

  # 4. local experts, grouped (empty rows: id E_loc, after every group, zero output)
  order_N = jnp.argsort(recv_e_N, stable=True)
  group_sizes = jnp.bincount(recv_e_N, length=E_loc).astype(jnp.int32)   # drops the E_loc marks
  xs_NC = recv_NC[order_N]

  def gmm(lhs, w):
    return lax.ragged_dot(lhs, w.astype(dtype), group_sizes)

  h_NF = jax.nn.silu(gmm(xs_NC, params["gate"])) * gmm(xs_NC, params["up"])
  ys_NC = gmm(h_NF, params["down"])[_inverse(order_N)]

  # 5. results back to their sources (same blocks, same rows), then to (token, slot) order
  back_NC = lax.all_to_all(ys_NC, axis_name, 0, 0, tiled=True)
  ys_MC = back_NC[pos_M]
  ys_TkC = ys_MC[_inverse(order_M)].reshape(T, k, C).astype(jnp.float32)
  y_TC = jnp.einsum("tkc,tk->tc", ys_TkC, weights_Tk)
  if params.get("shared_gate") is not None:
    y_TC = y_TC + _swiglu(x_TC.astype(dtype), params["shared_gate"], params["shared_up"],
                          params["shared_down"], dtype).astype(jnp.float32)

  counts_E = lax.psum(jnp.bincount(flat_e, length=E).astype(jnp.int32), batch_axes)
  T_global = lax.psum(T, batch_axes)
  stats = {"counts": counts_E, "load": counts_E.astype(jnp.float32) / (T_global * k),
           "expert_ids": expert_ids_Tk, "weights": weights_Tk, "affinity": affinity_TE}
  return y_TC.astype(x_TC.dtype), stats
