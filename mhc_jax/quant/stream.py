"""Models larger than the memory budget: the layers are streamed from disk (`--max-memory SIZE`).

The model's parameters sit in a per-layer layout on disk (`mhc_jax.quant.layout`). `StreamedLM`
keeps the resident part, the KV cache and the first `cached` layers in memory and reads the others
when needed, one background thread reading the next layer while the current one computes. Each
layer runs one jitted `Block.apply` (decode: with its own KV-cache slice; eval: full sequences, no
cache), shared by all layers; prefill, then one token per step with the sampling rule and rng
sequence of `mhc_jax.sample.decode`, so greedy tokens equal the in-memory run's. Quantised layers
run through the qwix PTQ wrapper of `Block` with the rules of `mhc_jax.quant.core.rules`.

MoE blocks read their routed experts only when a token routes to them, through an LRU cache
(`mhc_jax.quant.experts.ExpertStore`). The prompt is prefilled `MOE_PREFILL_CHUNK` tokens per pass,
so that one call needs at most `MOE_PREFILL_CHUNK · k` experts (each token's math is the same as in
one pass).

Budget (`plan`): resident weights + KV cache + activations (`activation_bytes`, an estimate) +
`slots` streamed layer buffers (2 with prefetch, 1 without) + `cached` layers <= budget; for an MoE
model also the experts one block call fetches (`min(E, tokens·k)` records: the host copy, the
device copy and the float32 weights gathered from them) and the expert cache (what is left once
every layer is cached, in records). Not counted: the Python / JAX runtime and compiled code (the
resident set before weights load).
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import qwix

from mhc_jax import ops
from mhc_jax.config import ConfigError, ModelConfig, compute_dtype
from mhc_jax.layers.block import Block
from mhc_jax.layers.connection import CollapseHead
from mhc_jax.layers.norm import RMSNorm
from mhc_jax.model import init_cache
from mhc_jax.quant.core import QuantSpec, rules, tree_bytes
from mhc_jax.quant.experts import ExpertStore
from mhc_jax.quant.io import _from_plain
from mhc_jax.quant.layout import (EXPERT_KERNELS, FORMAT, RESIDENT, Layout, build_layout,
                                  ensure_layout, layout_dir, load_params, split_layers,
                                  write_layout)
from mhc_jax.sample import check_generation, sample_logits
from mhc_jax.train.step import eval_summary

MOE_PREFILL_CHUNK = 4   # prompt tokens per pass when an MoE model streams: at most 4·k experts a call
ACT_SLACK = 1 << 20         # fixed part of the activation allowance, bytes


def fmt_bytes(n: float) -> str:
  return f"{n / 2**20:.1f}MiB"



# ------------------------------------------------------------------ the model's two ends
class Ends(nn.Module):
  """`LM`'s parts outside the blocks, with its parameter names: `stem(tokens) -> x [B, T, n, C]`
  (embedding, stream expansion), `head(x) -> logits` (collapse, final norm, tied or lm_head)."""
  cfg: ModelConfig

  def setup(self):
    cfg = self.cfg
    dtype = compute_dtype(cfg.dtype)
    self.embed = nn.Embed(cfg.vocab_size, cfg.d_model, dtype=dtype, param_dtype=jnp.float32)
    if cfg.collapse == "head":
      self.collapse = CollapseHead(cfg.connection.pre_eps, cfg.connection.norm_eps)
    self.final_norm = RMSNorm(cfg.norm_eps, dtype)
    if not cfg.tie_embeddings:
      self.lm_head = nn.Dense(cfg.vocab_size, use_bias=False, dtype=dtype, param_dtype=jnp.float32)

  def stem(self, tokens_BT):
    return ops.expand_streams(self.embed(tokens_BT), self.cfg.connection.n)

  def head(self, x_BTnC):
    cfg = self.cfg
    h = self.collapse(x_BTnC) if cfg.collapse == "head" else ops.collapse_streams(x_BTnC)
    h = self.final_norm(h)
    logits = self.embed.attend(h) if cfg.tie_embeddings else self.lm_head(h)
    return logits.astype(jnp.float32)

  def __call__(self, tokens_BT):
    return self.head(self.stem(tokens_BT))


def _qwrap(module, cfg: ModelConfig, spec: QuantSpec | None, methods=("__call__",)):
  if spec is None:
    return module
  return qwix.quantize_model(module, qwix.PtqProvider(rules(spec, cfg)), methods=methods)


@functools.lru_cache(maxsize=32)
def _modules(cfg: ModelConfig, spec: QuantSpec | None, experts=None):
  """(`Ends`, {(decode, moe): `Block`}) -- qwix-wrapped for a quantised layout; MoE blocks take
  their routed experts from `experts` (an `ExpertStore`) when given."""
  dtype = compute_dtype(cfg.dtype)
  ends = _qwrap(Ends(cfg), cfg, spec, ("__call__", "stem", "head"))
  kinds = (False, True) if cfg.moe is not None else (False,)
  blk = {(d, m): _qwrap(Block(cfg, dtype, d, m, experts if m else None), cfg, spec)
         for d in (False, True) for m in kinds}
  return ends, blk


@functools.lru_cache(maxsize=32)
def _abstract(cfg: ModelConfig, spec: QuantSpec | None):
  """Abstract params (quantised: WithAux / QArray nodes) of `Ends` and of one `Block`
  ({moe: tree}; an MoE block's tree includes its routed experts)."""
  from mhc_jax.quant.core import _with_raw
  ends, blk = _modules(cfg, spec)
  key = jax.random.PRNGKey(0)
  a_ends = jax.eval_shape(ends.init, key, jnp.zeros((1, 1), jnp.int32))["params"]
  x = jnp.zeros((1, 1, cfg.connection.n, cfg.d_model), compute_dtype(cfg.dtype))
  a_blk = {}
  for (d, m), module in blk.items():
    if not d:
      a = nn.meta.unbox(jax.eval_shape(module.init, key, x, 0)["params"])
      a_blk[m] = a if spec is None else _with_raw(cfg, a, spec)
  return nn.meta.unbox(a_ends), a_blk


@functools.partial(jax.jit, static_argnames=("cfg", "spec"))
def _stem(p, tokens, *, cfg, spec):
  return _modules(cfg, spec)[0].apply({"params": p}, tokens, method="stem")


@functools.partial(jax.jit, static_argnames=("cfg", "spec", "temperature", "top_k"))
def _head_sample(p, x, rng, *, cfg, spec, temperature, top_k):
  logits = _modules(cfg, spec)[0].apply({"params": p}, x, method="head")
  rng, sub = jax.random.split(rng)
  return sample_logits(sub, logits[:, -1], temperature, top_k), rng


@functools.partial(jax.jit, static_argnames=("cfg", "spec"))
def _head_loss(p, x, targets, *, cfg, spec):
  logits = _modules(cfg, spec)[0].apply({"params": p}, x, method="head")
  ce = jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, targets[..., None], -1)[..., 0]
  return jnp.sum(ce), jnp.asarray(ce.size, jnp.float32)


@functools.partial(jax.jit, static_argnames=("cfg", "spec", "moe", "experts"),
                   donate_argnames=("cache",))
def _block_decode(v, cache, x, layer, *, cfg, spec, moe, experts):
  """One block on the decode path; `v`: the block's variables (params, an MoE block's moe_state)."""
  module = _modules(cfg, spec, experts)[1][(True, moe)]
  (x, _), mut = module.apply({**v, "cache": cache}, x, layer, mutable=["cache"])
  return x, mut["cache"]


@functools.partial(jax.jit, static_argnames=("cfg", "spec", "moe", "experts"))
def _block(v, x, layer, *, cfg, spec, moe, experts):
  return _modules(cfg, spec, experts)[1][(False, moe)].apply(v, x, layer)[0]


# ------------------------------------------------------------------ budget
@dataclasses.dataclass(frozen=True)
class Plan:
  budget: int
  resident: int           # embedding, norms, head
  kv_cache: int
  activations: int
  layer: int              # largest layer (an MoE block: without its routed experts)
  slots: int              # streamed layer buffers (2: current + prefetched next)
  cached: int             # layers 0..cached-1 kept in memory
  n_layers: int
  read_buffer: int = 0    # host copy of one leaf while it is handed to the device (largest leaf)
  expert_record: int = 0  # bytes of one routed expert (0: no MoE layer)
  expert_fetch: int = 0   # experts one block call fetches at most: min(E, tokens · k)
  expert_f32: int = 0     # bytes of one expert dequantised to float32 (what its matmuls read)
  expert_cache: int = 0   # expert records kept (LRU)
  n_experts: int = 0      # routed expert records of all MoE layers

  @property
  def in_memory(self) -> bool:
    """Every layer and every routed expert in memory."""
    return self.cached >= self.n_layers and self.expert_cache >= self.n_experts

  @property
  def fetch_bytes(self) -> int:
    """The experts of one block call: the callback's host arrays, their device copy and the float32
    weights the routed FFN gathers from them."""
    return self.expert_fetch * (2 * self.expert_record + self.expert_f32)

  @property
  def minimum(self) -> int:
    return (self.resident + self.kv_cache + self.activations + self.read_buffer + self.layer
            + self.fetch_bytes)


def activation_bytes(cfg: ModelConfig, batch: int, seq: int) -> int:
  """Estimated live activations of one block call on `[batch, seq]` tokens (float32): a few copies
  of the streams, the MLP hidden, attention scores over `max_seq_len`, plus `ACT_SLACK`."""
  per_tok = 4 * cfg.connection.n * cfg.d_model + 3 * cfg.ff_dim + 2 * cfg.n_heads * cfg.max_seq_len
  return 4 * max(batch, 1) * seq * per_tok + ACT_SLACK


def plan(layout: Layout, budget: int, kv_cache: int = 0, activations: int | None = None,
         tokens: int | None = None) -> Plan:
  """How many layers stay in memory under `budget`, and how many routed experts are cached (MoE:
  what is left once every layer is cached); ConfigError when not even one layer fits. `tokens`:
  the most tokens one block call routes (default: `max_seq_len`)."""
  cfg = layout.cfg.model
  n = cfg.n_layers
  lb = max(layout.layer_bytes)
  act = activation_bytes(cfg, 1, cfg.max_seq_len) if activations is None else activations
  rec = layout.expert_record
  n_experts = sum(layout.groups[f"experts_{l}"]["experts"] for l in layout.expert_layers)
  fetch = f32 = 0
  if rec:
    fetch = min(cfg.moe.n_routed, (cfg.max_seq_len if tokens is None else tokens) * cfg.moe.top_k)
    g = layout.groups[f"experts_{layout.expert_layers[0]}"]
    f32 = 4 * sum(int(np.prod(x["shape"])) for x in g["leaves"]
                  if not x["path"].endswith(("scale", "zero_point")))
  p = Plan(budget, layout.nbytes(RESIDENT), kv_cache, act, lb, 0, 0, n, layout.max_leaf, rec, fetch,
           f32, 0, n_experts)
  fixed = p.minimum - lb
  # all in memory: no fetched copies, but the routed FFN still gathers float32 weights
  if fixed - 2 * fetch * rec + sum(layout.layer_bytes) + n_experts * rec <= budget:
    return dataclasses.replace(p, cached=n, expert_cache=n_experts)
  free = (budget - fixed) // lb
  if free < 1:
    raise ConfigError(f"--max-memory={fmt_bytes(budget)} is not allowed: below the minimum "
                      f"{fmt_bytes(p.minimum)} = resident weights {fmt_bytes(p.resident)} + KV "
                      f"cache {fmt_bytes(kv_cache)} + activations {fmt_bytes(act)} + read buffer "
                      f"{fmt_bytes(layout.max_leaf)} + one layer {fmt_bytes(lb)}"
                      + (f" + routed experts of one call {fmt_bytes(p.fetch_bytes)}" if rec else ""))
  if not rec:
    slots = min(2, free)
    return dataclasses.replace(p, slots=slots, cached=min(free - slots, n - 1))
  if fixed + sum(layout.layer_bytes) <= budget:       # every layer's dense part stays; experts LRU
    left = budget - fixed - sum(layout.layer_bytes)
    return dataclasses.replace(p, cached=n, expert_cache=min(left // rec, n_experts))
  slots = min(2, free)
  return dataclasses.replace(p, slots=slots, cached=min(free - slots, n - 1))


@functools.lru_cache(maxsize=16)
def _layer_cache_shapes(cfg: ModelConfig, batch: int) -> list:
  full = jax.eval_shape(lambda: init_cache(dataclasses.replace(cfg, scan_layers=False), batch))
  return [full[f"block_{l}"] for l in range(cfg.n_layers)]


def kv_cache_bytes(cfg: ModelConfig, batch: int) -> int:
  """Bytes of the KV cache of `batch` sequences (0: no cache, as in eval)."""
  if batch < 1:
    return 0
  return tree_bytes(jax.eval_shape(lambda: init_cache(cfg, batch)))


# ------------------------------------------------------------------ streamed model
class StreamedLM:
  """The model of a layout run layer by layer under `budget` bytes (see `plan`); an MoE model's
  routed experts come from an `ExpertStore` (read when routed to, LRU-cached)."""

  def __init__(self, layout: Layout, budget: int, batch: int = 1, eval_batch: tuple | None = None):
    """`batch` sequences decoded with a KV cache, or `eval_batch=(B, T)` for eval (no cache)."""
    self.layout, self.cfg, self.spec = layout, layout.cfg.model, layout.spec
    self.plan = budget_plan(layout, budget, batch, eval_batch)
    self.layer_bytes_read = 0
    self.experts = None
    if layout.expert_layers:
      abstract = _abstract(self.cfg, self.spec)[1][True]["moe"]
      self.experts = ExpertStore(layout, self.plan.expert_cache,
                                 {k: abstract[k] for k in EXPERT_KERNELS})
    self.resident = self._to_params(layout.load(RESIDENT), ends=True)
    self.cached = [self._load(l) for l in range(min(self.plan.cached, self.cfg.n_layers))]
    self._pool = concurrent.futures.ThreadPoolExecutor(1) if self.plan.slots > 1 else None
    self._pending = None    # the next pass's first streamed layer, being read

  @property
  def bytes_read(self) -> int:
    """Bytes read from the layout so far: layer files plus routed-expert records."""
    return self.layer_bytes_read + (self.experts.bytes_read if self.experts else 0)

  def _to_params(self, plain, ends=False, layer=0):
    """Device variables of a group: the resident params, or a layer's `{"params", "moe_state"?}`."""
    a_ends, a_blk = _abstract(self.cfg, self.spec)
    if ends:
      return plain if self.spec is None else _from_plain(plain, a_ends)
    if self.spec is not None:
      plain = {**plain, "params": _from_plain(plain["params"],
                                              a_blk[self.cfg.is_moe_layer(layer)])}
    return plain

  def _load(self, l: int):
    self.layer_bytes_read += self.layout.nbytes(f"layer_{l}")
    return self._to_params(self.layout.load(f"layer_{l}"), layer=l)

  def _submit(self, l: int):
    """Read layer `l` in the background (counted in `bytes_read` now)."""
    self.layer_bytes_read += self.layout.nbytes(f"layer_{l}")
    return self._pool.submit(lambda: self._to_params(self.layout.load(f"layer_{l}"), layer=l))

  def _layers(self):
    """(l, variables) for l = 0..L-1: cached ones from memory, the others read from disk; with
    prefetch the next streamed layer (after the last one: the first streamed layer of the next pass)
    is read in the background while the current one computes. The caller finishes each layer's
    compute before asking for the next, so at most two streamed layers are alive."""
    n, k = self.cfg.n_layers, min(self.plan.cached, self.cfg.n_layers)
    fut, self._pending = self._pending, None
    if self._pool and fut is None and k < n:
      fut = self._submit(k)
    for l in range(n):
      if l < k:
        yield l, self.cached[l]
        continue
      p = fut.result() if fut is not None else self._load(l)
      fut = None
      if self._pool:
        if l + 1 < n:
          fut = self._submit(l + 1)
        else:
          self._pending = self._submit(k)
      yield l, p
      del p

  def _kw(self, l=None):
    kw = {"cfg": self.cfg, "spec": self.spec}
    if l is not None:
      moe = self.cfg.is_moe_layer(l)
      kw.update(moe=moe, experts=self.experts if moe else None)
    return kw

  def generate(self, prompt_ids, *, max_new_tokens: int, temperature: float = 0.8, top_k: int = 40,
               seed: int = 0) -> np.ndarray:
    """As `mhc_jax.sample.generate`: `[B, max_new_tokens]` token ids after `prompt_ids`."""
    prompt = check_generation(self.cfg, prompt_ids, max_new_tokens, temperature, seed)
    shapes = _layer_cache_shapes(self.cfg, prompt.shape[0])
    caches = [jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), c) for c in shapes]
    rng = jax.random.PRNGKey(seed)
    samp = {"temperature": float(temperature), "top_k": int(top_k)}
    tok, out = jnp.asarray(prompt), []
    # an MoE model prefills MOE_PREFILL_CHUNK tokens per pass (each pass routes to fewer experts)
    chunk = MOE_PREFILL_CHUNK if self.experts else tok.shape[1]
    for _ in range(int(max_new_tokens)):
      for i in range(0, tok.shape[1], chunk):
        x = _stem(self.resident, tok[:, i:i + chunk], **self._kw())
        for l, v in self._layers():
          x, caches[l] = _block_decode(v, caches[l], x, jnp.int32(l), **self._kw(l))
          x.block_until_ready()   # this layer done before the one after the next is read
          del v
      nxt, rng = _head_sample(self.resident, x, rng, **self._kw(), **samp)
      out.append(nxt)
      tok = nxt[:, None]
    return np.asarray(jnp.stack(out, axis=1))

  def eval_batch(self, inputs, targets):
    x = _stem(self.resident, jnp.asarray(inputs), **self._kw())
    for l, v in self._layers():
      x = _block(v, x, jnp.int32(l), **self._kw(l))
      x.block_until_ready()
      del v
    return _head_loss(self.resident, x, jnp.asarray(targets), **self._kw())

  def evaluate(self, batches, n_bytes=None) -> dict:
    tot = n = 0.0
    for b in batches:
      s, c = self.eval_batch(b["inputs"], b["targets"])
      tot += float(s)
      n += float(c)
    return eval_summary(tot, n, n_bytes)

  def report(self) -> dict:
    """Bytes read and, for an MoE model, the expert cache's hits and misses (records)."""
    out = {"bytes_read": self.bytes_read, "layer_bytes_read": self.layer_bytes_read}
    if self.experts:
      out.update(expert_bytes_read=self.experts.bytes_read, expert_hits=self.experts.hits,
                 expert_misses=self.experts.misses, expert_cache=self.plan.expert_cache,
                 expert_record=self.plan.expert_record)
    return out

  def close(self):
    if self._pool:
      self._pending = None
      self._pool.shutdown()
    if self.experts:
      self.experts.clear()


def _status_bytes(key: str) -> int:
  """A kB field of /proc/self/status (e.g. `VmHWM`), in bytes; 0 when absent."""
  with open("/proc/self/status", encoding="ascii") as f:
    for line in f:
      if line.startswith(key + ":"):
        return int(line.split()[1]) * 1024
  return 0


def peak_rss() -> int:
  """This process's peak resident set (VmHWM), bytes."""
  return _status_bytes("VmHWM")


def current_rss() -> int:
  """This process's resident set (VmRSS), bytes."""
  return _status_bytes("VmRSS")


def reset_peak_rss():
  """Reset VmHWM to the current RSS (Linux: write 5 to /proc/self/clear_refs); False if refused."""
  try:
    with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
      f.write("5")
    return True
  except OSError:
    return False


def _say(msg: str):
  import sys
  print(msg, file=sys.stderr, flush=True)


def budget_plan(layout: Layout, budget: int, batch: int = 1,
                eval_batch: tuple | None = None) -> Plan:
  """`plan` for decoding `batch` sequences (KV cache of `max_seq_len`), or for eval on `[B, T]`."""
  cfg = layout.cfg.model
  if eval_batch:
    return plan(layout, budget, 0, activation_bytes(cfg, *eval_batch),
                tokens=eval_batch[0] * eval_batch[1])
  chunk = MOE_PREFILL_CHUNK if cfg.moe is not None else cfg.max_seq_len
  return plan(layout, budget, kv_cache_bytes(cfg, batch),
              activation_bytes(cfg, batch, cfg.max_seq_len), tokens=batch * chunk)


def open_budgeted(run_dir: str, budget: int, *, step: int | None = None, batch: int = 1,
                  for_eval: bool = False):
  """(layout, StreamedLM or None) for decoding `batch` sequences, or for eval on the run's data
  batches (`for_eval`); None when the whole model fits `budget` (run it in memory)."""
  layout = Layout(ensure_layout(run_dir, step))
  eval_batch = (layout.cfg.data.batch_size, layout.cfg.data.seq_len) if for_eval else None
  p = budget_plan(layout, budget, batch, eval_batch)
  if p.in_memory:
    _say(f"--max-memory={fmt_bytes(budget)}: the model ({fmt_bytes(layout.weight_bytes)} of "
         f"weights) fits; running in memory")
    return layout, None
  m = StreamedLM(layout, budget, batch, eval_batch)
  what = f"{p.n_layers - p.cached} of {p.n_layers} layers ({fmt_bytes(p.layer)} each)"
  if p.expert_record:
    what += (f" and the routed experts ({fmt_bytes(p.expert_record)} each, {p.expert_cache} "
             f"cached)")
  _say(f"--max-memory={fmt_bytes(budget)}: weights {fmt_bytes(layout.weight_bytes)}; streaming "
       f"{what} from {layout.path}")
  return layout, m


__all__ = ["Layout", "StreamedLM", "ExpertStore", "Plan", "FORMAT", "layout_dir", "split_layers", "plan", "ensure_layout", "build_layout",
           "write_layout", "load_params", "open_budgeted", "peak_rss", "current_rss",
           "reset_peak_rss", "kv_cache_bytes", "activation_bytes", "budget_plan", "Ends"]
