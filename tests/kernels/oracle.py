"""Float64 NumPy oracle for the fused pre / post ops (written from DESIGN.md, not from the code)."""
import itertools
import math

import numpy as np


def _sigmoid(z):
  return 1.0 / (1.0 + np.exp(-z))


def _sinkhorn(l, iters, eps):
  """One token: column softmax (+eps), then rows; (iters - 1) x (columns, rows); eps in denominators."""
  m = np.exp(l - l.max(0, keepdims=True))
  m = m / m.sum(0, keepdims=True) + eps
  m = m / (m.sum(1, keepdims=True) + eps)
  for _ in range(iters - 1):
    m = m / (m.sum(0, keepdims=True) + eps)
    m = m / (m.sum(1, keepdims=True) + eps)
  return m


def pre(x, phi, b, alpha, kind="mhc", iters=20, eps=0.0, norm_eps=1e-6, pre_eps=0.0):
  """`(u, h_pre, h_post, h_res)` for x `[T, n, C]`."""
  x = np.asarray(x, np.float64)
  phi, b, alpha = (np.asarray(a, np.float64) for a in (phi, b, alpha))
  t, n, c = x.shape
  xf = x.reshape(t, n * c)
  h = (xf @ phi) / np.sqrt(np.mean(xf ** 2, axis=1, keepdims=True) + norm_eps)
  h_pre = _sigmoid(alpha[0] * h[:, :n] + b[:n]) + pre_eps
  h_post = 2 * _sigmoid(alpha[1] * h[:, n:2 * n] + b[n:2 * n])
  z = alpha[2] * h[:, 2 * n:] + b[2 * n:]
  if kind == "mhc":
    h_res = np.stack([_sinkhorn(zt.reshape(n, n), iters, eps) for zt in z])
  else:
    perms = list(itertools.permutations(range(n)))
    assert z.shape[1] == math.factorial(n)
    w = np.exp(z - z.max(1, keepdims=True))
    w = w / w.sum(1, keepdims=True)
    p = np.stack([np.eye(n)[list(pm)] for pm in perms])
    h_res = np.einsum("tk,kij->tij", w, p)
  u = np.einsum("tj,tjc->tc", h_pre, x)
  return u, h_pre, h_post, h_res


def post(x, y, h_res, h_post):
  x, y, h_res, h_post = (np.asarray(a, np.float64) for a in (x, y, h_res, h_post))
  return np.einsum("tij,tjc->tic", h_res, x) + h_post[:, :, None] * y[:, None, :]
