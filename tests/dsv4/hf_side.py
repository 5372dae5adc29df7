"""PyTorch side of the DeepSeek-V4 parity tests; runs in the torch env (`torch_env.py`), not pytest.

    python hf_side.py cases in.npz out.npz     run DeepseekV4HyperConnection / DeepseekV4HyperHead
    python hf_side.py checkpoint out.safetensors n C L x.npz out.npz
                                               save the mHC tensors of a tiny real DeepseekV4Model
                                               and run its own hc modules on `x`

`cases`: `in.npz` holds `meta` (a JSON list of cases) and, per case `name`, arrays `name/<key>`.
A "site" case runs one decoder-layer sublayer exactly as `DeepseekV4DecoderLayer.forward` does:
    post, comb, collapsed = hc(x)
    y = tanh(input_layernorm(collapsed) @ W)                     (a stand-in branch)
    x_next = post[..., None] * y[..., None, :] + comb^T @ x
and back-propagates `sum(x_next * cot)` to x, fn, base, scale, the norm weight and W.
A "head" case runs `norm(hc_head(x))` and back-propagates `sum(out * cot)`.
"""
import json
import sys

import numpy as np
import torch
from transformers.models.deepseek_v4.configuration_deepseek_v4 import DeepseekV4Config
from transformers.models.deepseek_v4.modeling_deepseek_v4 import (DeepseekV4HyperConnection,
                                                                  DeepseekV4HyperHead,
                                                                  DeepseekV4RMSNorm)

torch.set_num_threads(2)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def config(c):
  return DeepseekV4Config(hidden_size=c["C"], hc_mult=c["n"], hc_sinkhorn_iters=c["iters"],
                          hc_eps=c["eps"], rms_norm_eps=c["rms_eps"])


def site(c, a):
  dtype = DTYPES[c.get("dtype", "float32")]
  hc = DeepseekV4HyperConnection(config(c))
  norm = DeepseekV4RMSNorm(c["C"], eps=c["rms_eps"])
  with torch.no_grad():
    hc.fn.copy_(torch.from_numpy(a["fn"]))
    hc.base.copy_(torch.from_numpy(a["base"]))
    hc.scale.copy_(torch.from_numpy(a["scale"]))
    norm.weight.copy_(torch.from_numpy(a["norm_w"]))
  norm.to(dtype)
  w = torch.from_numpy(a["W"]).to(dtype).requires_grad_(True)
  x = torch.from_numpy(a["x"]).to(dtype).requires_grad_(True)
  post, comb, collapsed = hc(x)
  y = torch.tanh(norm(collapsed) @ w)
  # As in DeepseekV4DecoderLayer.forward: mix in the activation dtype, comb consumed transposed.
  out = post.to(dtype).unsqueeze(-1) * y.unsqueeze(-2) + torch.matmul(comb.to(dtype).transpose(-1, -2), x)
  (out.float() * torch.from_numpy(a["cot"])).sum().backward()
  f = lambda t: t.detach().float().numpy()  # noqa: E731
  return {"post": f(post), "comb": f(comb), "collapsed": f(collapsed), "out": f(out),
          "g_x": f(x.grad), "g_fn": f(hc.fn.grad), "g_base": f(hc.base.grad),
          "g_scale": f(hc.scale.grad), "g_norm_w": f(norm.weight.grad), "g_W": f(w.grad)}


def head(c, a):
  dtype = DTYPES[c.get("dtype", "float32")]
  hh = DeepseekV4HyperHead(config(c))
  norm = DeepseekV4RMSNorm(c["C"], eps=c["rms_eps"])
  with torch.no_grad():
    hh.hc_fn.copy_(torch.from_numpy(a["fn"]))
    hh.hc_base.copy_(torch.from_numpy(a["base"]))
    hh.hc_scale.copy_(torch.from_numpy(a["scale"]))
    norm.weight.copy_(torch.from_numpy(a["norm_w"]))
  norm.to(dtype)
  x = torch.from_numpy(a["x"]).to(dtype).requires_grad_(True)
  collapsed = hh(x)
  out = norm(collapsed)
  (out.float() * torch.from_numpy(a["cot"])).sum().backward()
  f = lambda t: t.detach().float().numpy()  # noqa: E731
  return {"collapsed": f(collapsed), "out": f(out), "g_x": f(x.grad), "g_fn": f(hh.hc_fn.grad),
          "g_base": f(hh.hc_base.grad), "g_scale": f(hh.hc_scale.grad),
          "g_norm_w": f(norm.weight.grad)}


def cases(inp, outp):
  data = np.load(inp)
  meta = json.loads(str(data["meta"]))
  out = {}
  for c in meta:
    a = {k.split("/", 1)[1]: data[k] for k in data.files if k.startswith(c["name"] + "/")}
    res = (site if c["kind"] == "site" else head)(c, a)
    out.update({f"{c['name']}/{k}": v for k, v in res.items()})
  np.savez(outp, **out)


def checkpoint(path, n, c, n_layers, x_path, out_path):
  """A tiny real `DeepseekV4Model` with random mHC weights; save its mHC + norm tensors and the
  outputs of its own `attn_hc` / `ffn_hc` / `hc_head` (+ `norm`) modules on `x [B, T, n, C]`."""
  from safetensors.torch import save_file
  from transformers.models.deepseek_v4.modeling_deepseek_v4 import DeepseekV4Model
  cfg = DeepseekV4Config(hidden_size=c, hc_mult=n, hc_sinkhorn_iters=20, hc_eps=1e-6,
                         rms_norm_eps=1e-6, num_hidden_layers=n_layers, vocab_size=64,
                         intermediate_size=32, moe_intermediate_size=16, n_routed_experts=4,
                         num_experts_per_tok=2, num_attention_heads=2, num_key_value_heads=1)
  torch.manual_seed(0)
  model = DeepseekV4Model(cfg)
  sd = model.state_dict()
  keep = {}
  for k, v in sd.items():
    if "_hc." in k or "hc_head" in k or k.endswith("layernorm.weight") or k == "norm.weight":
      t = v.detach().clone().float()
      if k.endswith(("base", "scale", "weight")):
        t = t + 0.3 * torch.randn_like(t)          # away from the init values 0 / 1
      keep["model." + k] = t.contiguous()
  save_file(keep, path)
  model.load_state_dict({k[len("model."):]: v for k, v in keep.items()}, strict=False)
  x = torch.from_numpy(np.load(x_path)["x"])
  out = {}
  with torch.no_grad():
    for l, layer in enumerate(model.layers):
      for name in ("attn_hc", "ffn_hc"):
        post, comb, collapsed = getattr(layer, name)(x)
        out.update({f"{l}/{name}/post": post.numpy(), f"{l}/{name}/comb": comb.numpy(),
                    f"{l}/{name}/collapsed": collapsed.numpy()})
    out["head"] = model.norm(model.hc_head(x)).numpy()
  np.savez(out_path, **out)


if __name__ == "__main__":
  if sys.argv[1] == "cases":
    cases(sys.argv[2], sys.argv[3])
  elif sys.argv[1] == "checkpoint":
    checkpoint(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), sys.argv[6],
               sys.argv[7])
  else:
    raise SystemExit(f"unknown mode {sys.argv[1]!r}")
