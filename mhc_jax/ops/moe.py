"""DeepSeekMoE feed-forward layer (DeepSeek-V3, arXiv 2412.19437 §2.1.2), as pure functions.

For a token x (row of `x_TC`), routed experts e = 0..E-1 and shared experts:

    s_e   = sigmoid(x · W_r[:, e])                          affinity, float32            (V3 Eq. 15)
    K     = TopK_k(s_e + b_e)                               b: balance bias, selection only (Eq. 16)
    g_e   = routed_scale · s_e / Σ_{j∈K} s_j   for e ∈ K, else 0                         (Eq. 13)
    FFN_e(x) = (silu(x W_gate[e]) ⊙ (x W_up[e])) W_down[e]                         SwiGLU expert
    y     = Σ_{e∈K} g_e FFN_e(x) + FFN_shared(x)                                           (Eq. 12)

`FFN_shared` is one dense SwiGLU of width n_shared·F (the n_shared shared experts side by side: the
sum of n_shared SwiGLUs of width F equals one SwiGLU of width n_shared·F with stacked weights).

Dropless dispatch (`implementation="ragged"`): the T·k (token, expert) pairs are sorted by expert,
the tokens gathered into one [T·k, C] slab in expert order, each weight applied as ONE grouped matmul
`jax.lax.ragged_dot(slab, W[E, ...], group_sizes[E])`, the rows put back in (token, slot) order by
the inverse permutation and summed over the k slots with their gates (the same as a scatter-add to
the tokens, without a scatter). No capacity factor: every token gets exactly its k experts.
`implementation="tiled"` (block-sparse grouped matmul in plain XLA, MegaBlocks-style; the fastest on
CPU, where XLA expands `ragged_dot` into E masked copies of the slab): the same expert-sorted pairs,
each expert's group padded up to a multiple of a tile of m rows (padding rows read a zero row), the
slab cut into `[N, m, C]` tiles each owned by one expert (`N = ⌊(T·k + min(E, T·k)·(m−1)) / m⌋`, a
static bound; spare tiles are all padding), every tile multiplied by its own expert's weights in one
batched dot (`einsum('nmc,ncf->nmf', tiles, W[tile_expert])`), and each pair read back from its
padded row and combined with the gates. `implementation="dense"` computes every expert for every
token and masks by the gates (the same result, E/k times the FLOPs; a reference and a fallback for
tiny E). `"auto"` (the default) is `default_implementation()`: "tiled" on CPU, "ragged" on GPU/TPU,
where ragged_dot lowers to a grouped-GEMM kernel.

Auxiliary-loss-free balancing (V3 §2.1.2): after each step, with load_e the tokens routed to e,
    b_e ← b_e + γ · sign(mean(load) − load_e)                 (`balance_bias_update`, not a gradient)
Complementary sequence-wise balance loss (V3 Eqs. 17–20), per sequence of T tokens:
    f_i = E / (k·T) · Σ_t 1[i ∈ K_t],   P_i = 1/T · Σ_t s_{i,t} / Σ_j s_{j,t},   L = α Σ_i f_i P_i

Params (a dict; float32): `router [C, E]`, `gate [E, C, F]`, `up [E, C, F]`, `down [E, F, C]`,
optional `bias [E]` (zeros when absent) and, when there are shared experts, `shared_gate [C, S·F]`,
`shared_up [C, S·F]`, `shared_down [S·F, C]`.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from mhc_jax.ops.weights import leading, materialize, take

IMPLEMENTATIONS = ("auto", "ragged", "tiled", "dense")
TILE = 64     # rows per "tiled" tile: fastest of 16/32/64/128 on CPU (T=512, C=128, F=64, E=16, k=2)


def default_implementation(backend: str | None = None) -> str:
  """What `implementation="auto"` runs: "tiled" on CPU (no grouped-GEMM kernel there), else
  "ragged". The platform is `backend`, else the active mesh's devices' (so an ahead-of-time compile
  for a TPU or GPU topology from a CPU host takes that platform's path), else the default backend's."""
  if backend is None:
    device = getattr(jax.sharding.get_abstract_mesh(), "abstract_device", None)
    backend = device.platform if device is not None else jax.default_backend()
  return "tiled" if backend == "cpu" else "ragged"


def route(x_TC, w_router_CE, bias_E, *, top_k: int, routed_scale: float = 1.0):
  """DeepSeek-V3 routing. Returns `(expert_ids [T, k] int32, weights [T, k] f32, affinity [T, E] f32)`.

  affinity `s = sigmoid(x @ W_r)` in float32; the k experts with the largest `s + bias` are chosen
  (the bias gets no gradient and never enters the gates); `weights = routed_scale · s_K / Σ s_K`
  over the chosen experts, ordered as `expert_ids` (descending `s + bias`).
  """
  logits_TE = jnp.dot(x_TC.astype(jnp.float32), w_router_CE.astype(jnp.float32),
                      precision=lax.Precision.HIGHEST)
  affinity_TE = jax.nn.sigmoid(logits_TE)
  score_TE = lax.stop_gradient(affinity_TE + bias_E.astype(jnp.float32))
  _, expert_ids_Tk = lax.top_k(score_TE, top_k)
  chosen_Tk = jnp.take_along_axis(affinity_TE, expert_ids_Tk, axis=-1)
  weights_Tk = routed_scale * chosen_Tk / jnp.sum(chosen_Tk, axis=-1, keepdims=True)
  return expert_ids_Tk.astype(jnp.int32), weights_Tk, affinity_TE


def _swiglu(x, w_gate, w_up, w_down, dtype):
  h = jax.nn.silu(x @ materialize(w_gate, dtype)) * (x @ materialize(w_up, dtype))
  return h @ materialize(w_down, dtype)


def _routed_ragged(x_TC, params, expert_ids_Tk, weights_Tk, dtype):
  T, k = expert_ids_Tk.shape
  E = leading(params["gate"])
  flat_e = expert_ids_Tk.reshape(-1)                               # pair p = t·k + j
  order_M = jnp.argsort(flat_e, stable=True)                       # pairs in expert order
  token_M = order_M // k
  group_sizes_E = jnp.bincount(flat_e, length=E).astype(jnp.int32)
  xs_MC = x_TC.astype(dtype)[token_M]

  def gmm(lhs, w):
    return lax.ragged_dot(lhs, materialize(w, dtype), group_sizes_E)

  h_MF = jax.nn.silu(gmm(xs_MC, params["gate"])) * gmm(xs_MC, params["up"])
  ys_MC = gmm(h_MF, params["down"])
  # back to token order: row p of the unsorted slab is pair p = t·k + j (the inverse permutation
  # turns the scatter-add into a gather plus a k-term sum: deterministic, no scatter)
  inverse_M = jnp.zeros_like(order_M).at[order_M].set(jnp.arange(order_M.shape[0], dtype=order_M.dtype))
  ys_TkC = ys_MC[inverse_M].reshape(T, k, -1).astype(jnp.float32)
  return jnp.einsum("tkc,tk->tc", ys_TkC, weights_Tk)


def _routed_tiled(x_TC, params, expert_ids_Tk, weights_Tk, dtype, tile=TILE):
  """Block-sparse grouped matmul: expert-sorted pairs, each group padded to whole tiles of m rows.

  With sizes s_e, unpadded group starts a_e = Σ_{j<e} s_j, tiles per expert n_e = ⌈s_e/m⌉ and padded
  starts b_e = m·Σ_{j<e} n_j: sorted pair i of expert e sits at padded row b_e + i − a_e. Padded
  row r of tile n (owner e = the expert whose tile range holds n) is valid iff r − b_e < s_e; it
  reads token order[a_e + r − b_e] // k, else the zero row T. All gathers, no scatter in the forward.
  """
  T, k = expert_ids_Tk.shape
  C = x_TC.shape[-1]
  E = leading(params["gate"])
  M = T * k
  m = max(1, min(tile, M))
  N = (M + min(E, M) * (m - 1)) // m                               # Σ_e n_e <= N (static)
  flat_e = expert_ids_Tk.reshape(-1)                               # pair p = t·k + j
  order_M = jnp.argsort(flat_e, stable=True)
  sizes_E = jnp.bincount(flat_e, length=E).astype(jnp.int32)
  start_E = jnp.cumsum(sizes_E) - sizes_E
  tiles_E = (sizes_E + m - 1) // m
  cum_tiles_E = jnp.cumsum(tiles_E)
  pstart_E = (cum_tiles_E - tiles_E) * m
  # owner of each tile (spare tiles past Σ n_e: the last expert, on zero rows only)
  tile_e_N = jnp.minimum(jnp.searchsorted(cum_tiles_E, jnp.arange(N), side="right"), E - 1)
  r = jnp.arange(N * m)
  e_R = tile_e_N[r // m]
  off_R = r - pstart_E[e_R]
  src_R = jnp.where(off_R < sizes_E[e_R],
                    order_M[jnp.minimum(start_E[e_R] + off_R, M - 1)] // k, T)
  xz = jnp.concatenate([x_TC.astype(dtype), jnp.zeros((1, C), dtype)])
  tiles_NmC = xz[src_R].reshape(N, m, C)

  def mm(a, w):
    return jnp.einsum("nmc,ncf->nmf", a, materialize(take(w, tile_e_N), dtype))

  h_NmF = jax.nn.silu(mm(tiles_NmC, params["gate"])) * mm(tiles_NmC, params["up"])
  y_RC = mm(h_NmF, params["down"]).reshape(N * m, C)
  # pair p's padded row: its rank in the sorted order (inverse permutation), shifted by b_e − a_e
  inverse_M = jnp.zeros_like(order_M).at[order_M].set(jnp.arange(M, dtype=order_M.dtype))
  dest_M = pstart_E[flat_e] + inverse_M - start_E[flat_e]
  ys_TkC = y_RC[dest_M].reshape(T, k, C).astype(jnp.float32)
  return jnp.einsum("tkc,tk->tc", ys_TkC, weights_Tk)


def _routed_dense(x_TC, params, expert_ids_Tk, weights_Tk, dtype):
  E = leading(params["gate"])
  combine_TE = jnp.sum(jax.nn.one_hot(expert_ids_Tk, E, dtype=jnp.float32)
                       * weights_Tk[..., None], axis=1)
  xd = x_TC.astype(dtype)
  h_ETF = (jax.nn.silu(jnp.einsum("tc,ecf->etf", xd, materialize(params["gate"], dtype)))
           * jnp.einsum("tc,ecf->etf", xd, materialize(params["up"], dtype)))
  y_ETC = jnp.einsum("etf,efc->etc", h_ETF, materialize(params["down"], dtype))
  return jnp.einsum("etc,te->tc", y_ETC.astype(jnp.float32), combine_TE)


def compact_experts(expert_ids_Tk, n_experts: int):
  """The experts a batch routes to, in `S = min(E, T·k)` slots: `(slots [S], local_ids [T, k])`
  with `slots` the distinct ids ascending, padded with the sentinel `E` (an unused slot), and
  `slots[local_ids] == expert_ids`."""
  flat = expert_ids_Tk.reshape(-1)
  S = min(n_experts, flat.shape[0])
  slots_S = jnp.unique(flat, size=S, fill_value=n_experts).astype(jnp.int32)
  local = jnp.searchsorted(slots_S, flat).astype(jnp.int32)
  return slots_S, local.reshape(expert_ids_Tk.shape)


def moe_ffn(x_TC, params, *, top_k: int, routed_scale: float = 1.0, dtype=None,
            implementation: str = "auto", tile: int = TILE, fetch=None):
  """DeepSeekMoE FFN on tokens `x_TC` → `(y_TC, stats)` (see the module docstring for the math).

  dtype: matmul dtype of the experts (default: x's dtype); routing and the gated combine run in
  float32. implementation: "ragged" (sorted dispatch + `lax.ragged_dot`), "tiled" (sorted dispatch,
  tiles of `tile` rows, one batched dot), "dense", or "auto" (`default_implementation()`); all dropless.
  stats: `counts [E]` int32 tokens per expert, `load [E]` = counts / (T·k), and the routing
  `expert_ids [T, k]`, `weights [T, k]`, `affinity [T, E]` (for `sequence_balance_loss`).
  Kernels may be qwix `QArray`s (`mhc_jax.ops.weights`: W = q · s); the router stays float.

  fetch: None (the routed experts are `params["gate"/"up"/"down"]`), or a traceable function
  `slots [S] -> {"gate": [S, C, F], "up": [S, C, F], "down": [S, F, C]}` giving only the experts
  this batch routes to (`compact_experts`: slot value E = unused, any weights): the layer-streaming
  path reads just those from disk. The result is the same.
  """
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f"implementation={implementation!r}: choose one of {IMPLEMENTATIONS}")
  dtype = jnp.dtype(dtype or x_TC.dtype)
  T = x_TC.shape[0]
  E = params["router"].shape[-1]
  bias_E = params.get("bias")
  if bias_E is None:
    bias_E = jnp.zeros((E,), jnp.float32)
  expert_ids_Tk, weights_Tk, affinity_TE = route(x_TC, params["router"], bias_E, top_k=top_k,
                                                 routed_scale=routed_scale)
  if implementation == "auto":
    implementation = default_implementation()
  experts, ids_Tk = params, expert_ids_Tk
  if fetch is not None:
    slots_S, ids_Tk = compact_experts(expert_ids_Tk, E)
    experts = fetch(slots_S)
  if implementation == "tiled":
    y_TC = _routed_tiled(x_TC, experts, ids_Tk, weights_Tk, dtype, tile)
  else:
    routed = _routed_ragged if implementation == "ragged" else _routed_dense
    y_TC = routed(x_TC, experts, ids_Tk, weights_Tk, dtype)
  if params.get("shared_gate") is not None:
    y_TC = y_TC + _swiglu(x_TC.astype(dtype), params["shared_gate"], params["shared_up"],
                          params["shared_down"], dtype).astype(jnp.float32)
  counts_E = jnp.bincount(expert_ids_Tk.reshape(-1), length=E).astype(jnp.int32)
  stats = {"counts": counts_E, "load": counts_E.astype(jnp.float32) / (T * top_k),
           "expert_ids": expert_ids_Tk, "weights": weights_Tk, "affinity": affinity_TE}
  return y_TC.astype(x_TC.dtype), stats


def balance_bias_update(bias_E, load_E, gamma):
  """Auxiliary-loss-free balancing step: `bias + gamma · sign(mean(load) − load)`.

  Overloaded experts (load above the mean) lose gamma, underloaded ones gain gamma, experts at the
  mean keep their bias. `load` may be counts or fractions (same signs); any leading dims (e.g. a
  scanned layer axis) are kept, the mean is over the last axis. Not a gradient: apply it outside
  the optimizer.
  """
  load = jnp.asarray(load_E, jnp.float32)
  delta = jnp.sign(jnp.mean(load, axis=-1, keepdims=True) - load)
  return (bias_E + gamma * delta).astype(bias_E.dtype)


def sequence_balance_loss(affinity_TE, expert_ids_Tk, *, alpha: float):
  """DeepSeek-V3's complementary sequence-wise balance loss `alpha · Σ_i f_i P_i` (Eqs. 17–20).

  Per sequence (the second-to-last axis is the sequence's T tokens; leading axes are sequences and
  the result is their mean): `f_i = E/(k·T) · #{t : i chosen for t}` (no gradient) and
  `P_i = mean_t s_{i,t} / Σ_j s_{j,t}`. Perfect balance with uniform affinities gives `alpha`.
  """
  E = affinity_TE.shape[-1]
  k = expert_ids_Tk.shape[-1]
  T = affinity_TE.shape[-2]
  chosen = jnp.sum(jax.nn.one_hot(expert_ids_Tk, E, dtype=jnp.float32), axis=-2)   # [..., T, E]
  f_E = lax.stop_gradient(jnp.sum(chosen, axis=-2) * (E / (k * T)))
  s = affinity_TE.astype(jnp.float32)
  p_E = jnp.mean(s / jnp.sum(s, axis=-1, keepdims=True), axis=-2)
  return alpha * jnp.mean(jnp.sum(f_E * p_E, axis=-1))
