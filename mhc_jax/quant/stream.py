"""Models larger than the memory budget: the layers are streamed from disk (`--max-memory SIZE`).

Layout, written once beside the checkpoint (`R/stream/<step>/` of a run dir, `Q/stream/` of a
quantised dir): `config.json`, `stream.json` (format, spec, step, and for each group its leaves:
path, shape, dtype, byte offset) and one raw file per group -- `resident.bin` (embedding, collapse
head, final norm, lm_head) and `layer_<l>.bin` (block l: float32 leaves, or a quantised kernel's
`qvalue` / `scale` as stored). A layer is read leaf by leaf into new arrays that go to the device,
so only the layers in use are resident.

`StreamedLM` keeps the resident part, the KV cache and the first `cached` layers in memory and
reads the others when needed, one background thread reading the next layer while the current one
computes. Each layer runs one jitted `Block.apply` (decode: with its own KV-cache slice; eval: full
sequences, no cache), shared by all layers; prefill, then one token per step with the sampling rule
and rng sequence of `mhc_jax.sample.decode`, so greedy tokens equal the in-memory run's. Quantised
layers run through the qwix PTQ wrapper of `Block` with the rules of `mhc_jax.quant.core.rules`.

Budget (`plan`): resident weights + KV cache + activations (`activation_bytes`, an estimate) +
`slots` streamed layer buffers (2 with prefetch, 1 without) + `cached` layers <= budget. Not
counted: the Python / JAX runtime and compiled code (the resident set before weights load).
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import json
import multiprocessing
import os
import shutil
import tempfile

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mhc_jax import ops
from mhc_jax.config import ConfigError, ModelConfig, compute_dtype
from mhc_jax.layers.block import Block
from mhc_jax.layers.connection import CollapseHead
from mhc_jax.layers.norm import RMSNorm
from mhc_jax.model import init_cache
from mhc_jax.quant.core import QuantSpec, rules, tree_bytes
from mhc_jax.quant.io import _from_plain, _to_plain, is_quantized_dir, read_meta
from mhc_jax.sample import check_generation, sample_logits
from mhc_jax.train import run_dir as rd
from mhc_jax.train.step import eval_summary

FORMAT = "mhc_jax.stream/1"
STREAM = "stream"
META = "stream.json"
RESIDENT = "resident"
ALIGN = 64
ACT_SLACK = 1 << 20         # fixed part of the activation allowance, bytes


def fmt_bytes(n: float) -> str:
  return f"{n / 2**20:.1f}MiB"


# ------------------------------------------------------------------ layout on disk
def _flatten(plain) -> dict[str, np.ndarray]:
  flat = flax.traverse_util.flatten_dict(plain, sep="/")
  return {k: np.asarray(v) for k, v in flat.items()}


def split_layers(cfg: ModelConfig, plain) -> tuple[dict, list[dict]]:
  """(resident tree, [layer l tree]) of a plain params tree (float leaves or {qvalue, scale})."""
  plain = dict(plain)
  if cfg.scan_layers:
    stacked = plain.pop("blocks")
    layers = [jax.tree.map(lambda a, l=l: np.asarray(a[l]), stacked) for l in range(cfg.n_layers)]
  else:
    layers = [plain.pop(f"block_{l}") for l in range(cfg.n_layers)]
  return plain, layers


def _write_group(path: str, tree) -> dict:
  leaves, off = [], 0
  with open(path, "wb") as f:
    for name, a in _flatten(tree).items():
      a = np.ascontiguousarray(a)
      pad = -off % ALIGN
      f.write(b"\0" * pad)
      off += pad
      leaves.append({"path": name, "shape": list(a.shape), "dtype": str(a.dtype), "offset": off,
                     "nbytes": a.nbytes})
      f.write(a.tobytes())
      off += a.nbytes
  return {"bytes": off, "leaves": leaves}


def write_layout(out: str, cfg, plain_params, spec: QuantSpec | None, info: dict) -> str:
  """Write the per-layer layout of `plain_params` (float, or quantised as `io._to_plain`) to `out`
  (atomically: temp sibling + rename)."""
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=".stream.tmp-", dir=os.path.dirname(os.path.abspath(out)))
  try:
    rd.write_config(tmp, cfg)
    resident, layers = split_layers(cfg.model, nn.meta.unbox(plain_params))
    groups = {RESIDENT: _write_group(os.path.join(tmp, RESIDENT + ".bin"), resident)}
    for l, tree in enumerate(layers):
      groups[f"layer_{l}"] = _write_group(os.path.join(tmp, f"layer_{l}.bin"), tree)
    meta = {"format": FORMAT, "spec": spec.to_dict() if spec else None, "groups": groups, **info}
    with open(os.path.join(tmp, META), "w", encoding="utf-8") as f:
      json.dump(meta, f, indent=1)
    if os.path.isdir(out):
      shutil.rmtree(out)
    os.replace(tmp, out)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return out


def _steps(run_dir: str) -> list[int]:
  d = os.path.join(run_dir, rd.CHECKPOINTS)
  return sorted(int(s) for s in os.listdir(d) if s.isdigit()) if os.path.isdir(d) else []


def layout_dir(run_dir: str, step: int | None = None) -> str | None:
  """Where the layout of `run_dir` (newest checkpoint, or `step`) lives; None for a run dir without
  checkpoints."""
  if is_quantized_dir(run_dir):
    return os.path.join(run_dir, STREAM)
  steps = _steps(run_dir)
  if step is None and not steps:
    return None
  return os.path.join(run_dir, STREAM, str(steps[-1] if step is None else step))


def build_layout(run_dir: str, step: int | None = None) -> str:
  """Read the checkpoint of `run_dir` (whole, once) and write its layout; returns the layout dir."""
  if is_quantized_dir(run_dir):
    from mhc_jax.quant.io import load_quantized
    cfg, spec, qparams, meta = load_quantized(run_dir)
    plain = jax.device_get(_to_plain(qparams))
    return write_layout(os.path.join(run_dir, STREAM), cfg, plain, spec, {"step": meta.get("step")})
  from mhc_jax.train.loop import load_checkpoint
  trainer = load_checkpoint(run_dir, step)
  plain = jax.device_get(nn.meta.unbox(trainer.state.params))
  out = os.path.join(run_dir, STREAM, str(trainer.step_count))
  return write_layout(out, trainer.cfg, plain, None, {"step": int(trainer.step_count)})


def ensure_layout(run_dir: str, step: int | None = None) -> str:
  """The layout dir of `run_dir`, written first when missing -- in a child process, so that reading
  the whole checkpoint once does not count against this process's memory."""
  if not os.path.isdir(run_dir):
    raise ConfigError(f"--run-dir {run_dir!r} is not allowed: no such directory")
  if getattr(rd.read_config(run_dir).model, "moe", None) is not None:
    raise ConfigError(f"--max-memory is not allowed for {run_dir!r}: streaming the layers of an "
                      f"MoE model (model.moe) is not supported; run it without --max-memory")
  if is_quantized_dir(run_dir):
    read_meta(run_dir)
    if step is not None:
      raise ConfigError(f"--step={step} is not allowed: {run_dir!r} is a quantised checkpoint with "
                        f"one step")
  elif step is not None and step not in _steps(run_dir):
    raise ConfigError(f"--step={step} is not allowed: choose one of {_steps(run_dir)}")
  path = layout_dir(run_dir, step)
  if path and os.path.isfile(os.path.join(path, META)):
    return path
  ctx = multiprocessing.get_context("spawn")
  with concurrent.futures.ProcessPoolExecutor(1, mp_context=ctx) as ex:
    return ex.submit(build_layout, run_dir, step).result()


class Layout:
  """A layout directory: `cfg`, `spec` (None: float), group sizes, `read(group)` (fresh buffers)."""

  def __init__(self, path: str):
    self.path = path
    with open(os.path.join(path, META), encoding="utf-8") as f:
      self.meta = json.load(f)
    if self.meta.get("format") != FORMAT:
      raise ConfigError(f"{path}: not a {FORMAT} layout")
    self.cfg = rd.read_config(path)
    self.spec = QuantSpec(**self.meta["spec"]) if self.meta["spec"] else None
    self.groups = self.meta["groups"]

  def nbytes(self, group: str) -> int:
    return self.groups[group]["bytes"]

  @property
  def layer_bytes(self) -> list[int]:
    return [self.nbytes(f"layer_{l}") for l in range(self.cfg.model.n_layers)]

  @property
  def weight_bytes(self) -> int:
    return sum(g["bytes"] for g in self.groups.values())

  @property
  def max_leaf(self) -> int:
    return max(x["nbytes"] for g in self.groups.values() for x in g["leaves"])

  def load(self, group: str):
    """The plain tree of `group` as device arrays, read leaf by leaf (each into its own new host
    array, handed to `jax.device_put`, which may keep it as the device buffer on CPU)."""
    flat = {}
    with open(os.path.join(self.path, group + ".bin"), "rb", buffering=0) as f:
      for x in self.groups[group]["leaves"]:
        a = np.empty(x["shape"], jnp.dtype(x["dtype"]))
        view = memoryview(a.reshape(-1).view(np.uint8))
        f.seek(x["offset"])
        got = 0
        while got < x["nbytes"]:
          n = f.readinto(view[got:])
          if not n:
            raise OSError(f"{self.path}/{group}.bin: short read")
          got += n
        flat[tuple(x["path"].split("/"))] = jax.device_put(a)
    return flax.traverse_util.unflatten_dict(flat)

  def read(self, group: str):
    """The plain tree of `group` (numpy views of one buffer read from its file)."""
    g = self.groups[group]
    buf = np.empty(g["bytes"], np.uint8)
    with open(os.path.join(self.path, group + ".bin"), "rb", buffering=0) as f:
      view, got = memoryview(buf), 0
      while got < len(buf):
        n = f.readinto(view[got:])
        if not n:
          raise OSError(f"{self.path}/{group}.bin: short read")
        got += n
    flat = {tuple(x["path"].split("/")): buf[x["offset"]:x["offset"] + x["nbytes"]]
            .view(jnp.dtype(x["dtype"])).reshape(x["shape"]) for x in g["leaves"]}
    return flax.traverse_util.unflatten_dict(flat)


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
  import qwix
  return qwix.quantize_model(module, qwix.PtqProvider(rules(spec, cfg)), methods=methods)


@functools.lru_cache(maxsize=32)
def _modules(cfg: ModelConfig, spec: QuantSpec | None):
  dtype = compute_dtype(cfg.dtype)
  ends = _qwrap(Ends(cfg), cfg, spec, ("__call__", "stem", "head"))
  blk = {d: _qwrap(Block(cfg, dtype, d), cfg, spec) for d in (False, True)}
  return ends, blk


@functools.lru_cache(maxsize=32)
def _abstract(cfg: ModelConfig, spec: QuantSpec):
  """Quantised abstract params (WithAux nodes) of `Ends` and of one `Block`."""
  ends, blk = _modules(cfg, spec)
  key = jax.random.PRNGKey(0)
  a_ends = jax.eval_shape(ends.init, key, jnp.zeros((1, 1), jnp.int32))["params"]
  x = jnp.zeros((1, 1, cfg.connection.n, cfg.d_model), compute_dtype(cfg.dtype))
  a_blk = jax.eval_shape(blk[False].init, key, x, 0)["params"]
  return nn.meta.unbox(a_ends), nn.meta.unbox(a_blk)


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


@functools.partial(jax.jit, static_argnames=("cfg", "spec"), donate_argnames=("cache",))
def _block_decode(p, cache, x, layer, *, cfg, spec):
  (x, _), mut = _modules(cfg, spec)[1][True].apply({"params": p, "cache": cache}, x, layer,
                                                   mutable=["cache"])
  return x, mut["cache"]


@functools.partial(jax.jit, static_argnames=("cfg", "spec"))
def _block(p, x, layer, *, cfg, spec):
  return _modules(cfg, spec)[1][False].apply({"params": p}, x, layer)[0]


# ------------------------------------------------------------------ budget
@dataclasses.dataclass(frozen=True)
class Plan:
  budget: int
  resident: int           # embedding, norms, head
  kv_cache: int
  activations: int
  layer: int              # largest layer
  slots: int              # streamed layer buffers (2: current + prefetched next)
  cached: int             # layers 0..cached-1 kept in memory
  n_layers: int
  read_buffer: int = 0    # host copy of one leaf while it is handed to the device (largest leaf)

  @property
  def in_memory(self) -> bool:
    return self.cached >= self.n_layers

  @property
  def minimum(self) -> int:
    return self.resident + self.kv_cache + self.activations + self.read_buffer + self.layer


def activation_bytes(cfg: ModelConfig, batch: int, seq: int) -> int:
  """Estimated live activations of one block call on `[batch, seq]` tokens (float32): a few copies
  of the streams, the MLP hidden, attention scores over `max_seq_len`, plus `ACT_SLACK`."""
  per_tok = 4 * cfg.connection.n * cfg.d_model + 3 * cfg.ff_dim + 2 * cfg.n_heads * cfg.max_seq_len
  return 4 * max(batch, 1) * seq * per_tok + ACT_SLACK


def plan(layout: Layout, budget: int, kv_cache: int = 0, activations: int | None = None) -> Plan:
  """How many layers stay in memory under `budget`; ConfigError when not even one layer fits."""
  cfg = layout.cfg.model
  n = cfg.n_layers
  lb = max(layout.layer_bytes)
  act = activation_bytes(cfg, 1, cfg.max_seq_len) if activations is None else activations
  fixed = layout.nbytes(RESIDENT) + kv_cache + act + layout.max_leaf
  p = Plan(budget, layout.nbytes(RESIDENT), kv_cache, act, lb, 0, 0, n, layout.max_leaf)
  if fixed + sum(layout.layer_bytes) <= budget:
    return dataclasses.replace(p, cached=n)
  free = (budget - fixed) // lb
  if free < 1:
    raise ConfigError(f"--max-memory={fmt_bytes(budget)} is not allowed: below the minimum "
                      f"{fmt_bytes(p.minimum)} = resident weights {fmt_bytes(p.resident)} + KV "
                      f"cache {fmt_bytes(kv_cache)} + activations {fmt_bytes(act)} + read buffer "
                      f"{fmt_bytes(layout.max_leaf)} + one layer {fmt_bytes(lb)}")
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
  """The model of a layout run layer by layer under `budget` bytes (see `plan`)."""

  def __init__(self, layout: Layout, budget: int, batch: int = 1, eval_batch: tuple | None = None):
    """`batch` sequences decoded with a KV cache, or `eval_batch=(B, T)` for eval (no cache)."""
    self.layout, self.cfg, self.spec = layout, layout.cfg.model, layout.spec
    self.plan = budget_plan(layout, budget, batch, eval_batch)
    self.bytes_read = 0
    self.resident = self._to_params(layout.load(RESIDENT), ends=True)
    self.cached = [self._load(l) for l in range(self.plan.cached)]
    self._pool = concurrent.futures.ThreadPoolExecutor(1) if self.plan.slots > 1 else None
    self._pending = None    # the next pass's first streamed layer, being read

  def _to_params(self, plain, ends=False):
    if self.spec is None:
      return plain
    return _from_plain(plain, _abstract(self.cfg, self.spec)[0 if ends else 1])

  def _load(self, l: int):
    self.bytes_read += self.layout.nbytes(f"layer_{l}")
    return self._to_params(self.layout.load(f"layer_{l}"))

  def _submit(self, l: int):
    """Read layer `l` in the background (counted in `bytes_read` now)."""
    self.bytes_read += self.layout.nbytes(f"layer_{l}")
    return self._pool.submit(lambda: self._to_params(self.layout.load(f"layer_{l}")))

  def _layers(self):
    """(l, params) for l = 0..L-1: cached ones from memory, the others read from disk; with
    prefetch the next streamed layer (after the last one: the first streamed layer of the next pass)
    is read in the background while the current one computes. The caller finishes each layer's
    compute before asking for the next, so at most two streamed layers are alive."""
    n, k = self.cfg.n_layers, self.plan.cached
    fut, self._pending = self._pending, None
    if self._pool and fut is None:
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

  def _kw(self):
    return {"cfg": self.cfg, "spec": self.spec}

  def generate(self, prompt_ids, *, max_new_tokens: int, temperature: float = 0.8, top_k: int = 40,
               seed: int = 0) -> np.ndarray:
    """As `mhc_jax.sample.generate`: `[B, max_new_tokens]` token ids after `prompt_ids`."""
    prompt = check_generation(self.cfg, prompt_ids, max_new_tokens, temperature, seed)
    shapes = _layer_cache_shapes(self.cfg, prompt.shape[0])
    caches = [jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), c) for c in shapes]
    rng = jax.random.PRNGKey(seed)
    samp = {"temperature": float(temperature), "top_k": int(top_k)}
    tok, out = jnp.asarray(prompt), []
    for _ in range(int(max_new_tokens)):
      x = _stem(self.resident, tok, **self._kw())
      for l, p in self._layers():
        x, caches[l] = _block_decode(p, caches[l], x, jnp.int32(l), **self._kw())
        x.block_until_ready()   # this layer done before the one after the next is read
        del p
      nxt, rng = _head_sample(self.resident, x, rng, **self._kw(), **samp)
      out.append(nxt)
      tok = nxt[:, None]
    return np.asarray(jnp.stack(out, axis=1))

  def eval_batch(self, inputs, targets):
    x = _stem(self.resident, jnp.asarray(inputs), **self._kw())
    for l, p in self._layers():
      x = _block(p, x, jnp.int32(l), **self._kw())
      x.block_until_ready()
      del p
    return _head_loss(self.resident, x, jnp.asarray(targets), **self._kw())

  def evaluate(self, batches, n_bytes=None) -> dict:
    tot = n = 0.0
    for b in batches:
      s, c = self.eval_batch(b["inputs"], b["targets"])
      tot += float(s)
      n += float(c)
    return eval_summary(tot, n, n_bytes)

  def close(self):
    if self._pool:
      self._pending = None
      self._pool.shutdown()


def load_params(layout: Layout):
  """The whole parameter tree of a layout, as `LM` (or the qwix PTQ LM) takes it (in memory)."""
  cfg = layout.cfg.model
  plain = layout.read(RESIDENT)
  layers = [layout.read(f"layer_{l}") for l in range(cfg.n_layers)]
  if cfg.scan_layers:
    plain["blocks"] = jax.tree.map(lambda *a: np.stack(a), *layers)
  else:
    plain.update({f"block_{l}": t for l, t in enumerate(layers)})
  if layout.spec is None:
    return plain
  from mhc_jax.quant.core import abstract_qparams
  return _from_plain(plain, abstract_qparams(cfg, layout.spec))


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
    return plan(layout, budget, 0, activation_bytes(cfg, *eval_batch))
  return plan(layout, budget, kv_cache_bytes(cfg, batch), activation_bytes(cfg, batch,
                                                                            cfg.max_seq_len))


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
  _say(f"--max-memory={fmt_bytes(budget)}: weights {fmt_bytes(layout.weight_bytes)}; streaming "
       f"{p.n_layers - p.cached} of {p.n_layers} layers ({fmt_bytes(p.layer)} each) from "
       f"{layout.path}")
  return layout, m


__all__ = ["Layout", "StreamedLM", "Plan", "plan", "ensure_layout", "build_layout",
           "write_layout", "load_params", "open_budgeted", "peak_rss", "current_rss",
           "reset_peak_rss", "kv_cache_bytes", "activation_bytes", "budget_plan", "Ends"]
