"""Float64 NumPy oracles, written independently of the library code."""
import itertools
import math

import numpy as np


def sinkhorn(logits, iters, eps=0.0):
  """Eq. 9 literally: M = exp(L - max L); iters x (columns, then rows). eps>0: DeepSeek-V4 order."""
  L = np.asarray(logits, np.float64)
  out = np.empty_like(L)
  for idx in np.ndindex(L.shape[:-2]):
    l = L[idx]
    if eps == 0:
      m = np.exp(l - l.max())
      for _ in range(iters):
        m = m / m.sum(0, keepdims=True)
        m = m / m.sum(1, keepdims=True)
    else:   # V4 kernel on comb = A^T: row softmax + eps, column norm, (row, column) x (iters-1)
      c = l.T
      c = np.exp(c - c.max(1, keepdims=True))
      c = c / c.sum(1, keepdims=True) + eps
      c = c / (c.sum(0, keepdims=True) + eps)
      for _ in range(iters - 1):
        c = c / (c.sum(1, keepdims=True) + eps)
        c = c / (c.sum(0, keepdims=True) + eps)
      m = c.T
    out[idx] = m
  return out


def sigmoid(z):
  return 1.0 / (1.0 + np.exp(-z))


def mhc(x, phi, b, alpha, iters, eps=0.0, norm_eps=1e-6):
  x = np.asarray(x, np.float64)
  n, c = x.shape[-2:]
  xf = x.reshape(*x.shape[:-2], n * c)
  r = np.sqrt((xf ** 2).mean(-1, keepdims=True) + norm_eps)
  h = xf @ np.asarray(phi, np.float64) / r
  b = np.asarray(b, np.float64)
  a = np.asarray(alpha, np.float64)
  pre = sigmoid(a[0] * h[..., :n] + b[:n])
  post = 2 * sigmoid(a[1] * h[..., n:2 * n] + b[n:2 * n])
  res = (a[2] * h[..., 2 * n:] + b[2 * n:]).reshape(*h.shape[:-1], n, n)
  return pre, post, sinkhorn(res, iters, eps)


def mhc_lite(x, phi, b, alpha, norm_eps=1e-6):
  x = np.asarray(x, np.float64)
  n, c = x.shape[-2:]
  xf = x.reshape(*x.shape[:-2], n * c)
  h = xf @ np.asarray(phi, np.float64) / np.sqrt((xf ** 2).mean(-1, keepdims=True) + norm_eps)
  b = np.asarray(b, np.float64)
  a = np.asarray(alpha, np.float64)
  pre = sigmoid(a[0] * h[..., :n] + b[:n])
  post = 2 * sigmoid(a[1] * h[..., n:2 * n] + b[n:2 * n])
  z = a[2] * h[..., 2 * n:] + b[2 * n:]
  w = np.exp(z - z.max(-1, keepdims=True))
  w = w / w.sum(-1, keepdims=True)
  res = np.zeros((*h.shape[:-1], n, n))
  for k, perm in enumerate(itertools.permutations(range(n))):
    res += w[..., k, None, None] * np.eye(n)[list(perm)]
  assert len(list(itertools.permutations(range(n)))) == math.factorial(n)
  return pre, post, res


def hc(x, p, norm_eps=1e-6):
  x = np.asarray(x, np.float64)
  n, c = x.shape[-2:]
  xt = x / np.sqrt((x ** 2).mean(-1, keepdims=True) + norm_eps)        # per stream
  a = np.asarray(p["alpha"], np.float64)
  pre = a[0] * np.tanh(xt @ np.asarray(p["theta_pre"], np.float64)) + p["b_pre"]
  post = a[1] * np.tanh(xt @ np.asarray(p["theta_post"], np.float64)) + p["b_post"]
  res = np.zeros((*x.shape[:-2], n, n))
  for i in range(n):
    for j in range(n):
      res[..., i, j] = a[2] * np.tanh(xt[..., j, :] @ np.asarray(p["theta_res"][i], np.float64)) \
          + p["b_res"][i, j]
  return pre, post, res


def stream_pre(x, h_pre):
  x = np.asarray(x, np.float64)
  return sum(np.asarray(h_pre, np.float64)[..., j, None] * x[..., j, :] for j in range(x.shape[-2]))


def stream_post(x, y, h_res, h_post):
  x = np.asarray(x, np.float64)
  n = x.shape[-2]
  out = np.zeros_like(x)
  for i in range(n):
    out[..., i, :] = np.asarray(h_post, np.float64)[..., i, None] * np.asarray(y, np.float64)
    for j in range(n):
      out[..., i, :] += np.asarray(h_res, np.float64)[..., i, j, None] * x[..., j, :]
  return out
