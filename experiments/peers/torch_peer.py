"""PyTorch side of the peers comparison: the PyPI `hyper-connections` mHC module, timed on request.

Runs in the torch env (`tests/dsv4/torch_env.py`), driven by `bench_peers.py` over stdin/stdout, one
JSON object per line, so the two frameworks' runs alternate in one process pair:
    {"cmd": "setup", "key": k, "B":, "T":, "C":, "n":, "branch": "identity"|"block", "mode": "eager"|"compile"}
    {"cmd": "step", "key": k}    -> {"ok": true, "s": seconds for one forward+backward}
    {"cmd": "quit"}
The module is `hyper_connections.mHC` (exported name; streams folded into the batch, `(b s) t d`),
wrapping the branch (n = 1: a plain residual `x + branch(x)`, the baseline); forward + backward of `sum(out * cot)` w.r.t. its parameters and the input.
"""
import json
import sys
import time

import torch
import torch.nn.functional as F
from hyper_connections import mHC, __name__ as _hc_name  # noqa: F401

torch.manual_seed(0)


class Block(torch.nn.Module):
  """Pre-norm-free transformer branch: causal MHA (head dim 64) then a GELU MLP (4C), as in ours."""

  def __init__(self, c):
    super().__init__()
    self.h = max(1, c // 64)
    self.qkv = torch.nn.Linear(c, 3 * c, bias=False)
    self.o = torch.nn.Linear(c, c, bias=False)
    self.up = torch.nn.Linear(c, 4 * c, bias=False)
    self.down = torch.nn.Linear(4 * c, c, bias=False)

  def forward(self, x):
    b, t, c = x.shape
    q, k, v = self.qkv(x).view(b, t, 3, self.h, c // self.h).permute(2, 0, 3, 1, 4)
    a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    x = self.o(a.transpose(1, 2).reshape(b, t, c))
    return x + self.down(F.gelu(self.up(x)))


def setup(msg):
  b, t, c, n = msg["B"], msg["T"], msg["C"], msg["n"]
  branch = torch.nn.Identity() if msg["branch"] == "identity" else Block(c)
  if n == 1:     # baseline: plain residual x + branch(x), no hyper-connection
    hc = lambda x: x + branch(x)  # noqa: E731
  else:
    hc = mHC(n, dim=c, branch=branch, layer_index=0, sinkhorn_iters=msg.get("iters", 20))
  x = torch.randn(b * n, t, c, requires_grad=True)
  cot = torch.randn(b * n, t, c)

  def step():
    out = hc(x)
    (out * cot).sum().backward()

  fn = torch.compile(step) if msg["mode"] == "compile" else step
  for _ in range(msg.get("warmup", 2)):
    fn()
  return fn


def main():
  torch.set_num_threads(int(sys.argv[1]) if len(sys.argv) > 1 else 2)
  steps = {}
  for line in sys.stdin:
    msg = json.loads(line)
    try:
      if msg["cmd"] == "setup":
        t0 = time.perf_counter()
        steps[msg["key"]] = setup(msg)
        reply = {"ok": True, "setup_s": time.perf_counter() - t0}
      elif msg["cmd"] == "step":
        t0 = time.perf_counter()
        steps[msg["key"]]()
        reply = {"ok": True, "s": time.perf_counter() - t0}
      elif msg["cmd"] == "versions":
        import importlib.metadata as md
        reply = {"ok": True, "torch": torch.__version__,
                 "hyper_connections": md.version("hyper-connections"),
                 "threads": torch.get_num_threads()}
      else:
        break
    except Exception as e:  # noqa: BLE001 - reported to the driver
      reply = {"ok": False, "error": f"{type(e).__name__}: {e}"[-2000:]}
    sys.stdout.write(json.dumps(reply) + "\n")
    sys.stdout.flush()


if __name__ == "__main__":
  main()
