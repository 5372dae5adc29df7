"""Float64 NumPy oracle for the DeepSeekMoE layer: routing by sorting, then EVERY expert computed
densely for every token and masked by the gates; its VJP written out by hand (checked against
central differences in `test_oracle_vjp_matches_finite_differences`)."""
import numpy as np


def sigmoid(z):
  return 1.0 / (1.0 + np.exp(-z))


def silu(a):
  return a * sigmoid(a)


def dsilu(a):
  s = sigmoid(a)
  return s * (1.0 + a * (1.0 - s))


def f64(params):
  return {k: np.asarray(v, np.float64) for k, v in params.items() if v is not None}


def route(x, p, top_k, routed_scale):
  """-> (ids [T, k] by descending s + b, mask [T, E], s [T, E], gates [T, E])."""
  s = sigmoid(x @ p["router"])
  score = s + p.get("bias", np.zeros(s.shape[1]))
  ids = np.argsort(-score, axis=1, kind="stable")[:, :top_k]
  mask = np.zeros_like(s)
  np.put_along_axis(mask, ids, 1.0, axis=1)
  gates = routed_scale * s * mask / np.sum(s * mask, axis=1, keepdims=True)
  return ids, mask, s, gates


def _swiglu_fwd(x, wg, wu, wd):
  a, b = x @ wg, x @ wu
  h = silu(a) * b
  return a, b, h, h @ wd


def forward(x, params, top_k, routed_scale):
  p = f64(params)
  x = np.asarray(x, np.float64)
  _, _, _, gates = route(x, p, top_k, routed_scale)
  y = np.zeros_like(x)
  for e in range(p["gate"].shape[0]):
    y += gates[:, e:e + 1] * _swiglu_fwd(x, p["gate"][e], p["up"][e], p["down"][e])[3]
  if "shared_gate" in p:
    y += _swiglu_fwd(x, p["shared_gate"], p["shared_up"], p["shared_down"])[3]
  return y


def _swiglu_vjp(x, wg, wu, wd, g_out):
  """Cotangent g_out of (silu(x wg) * (x wu)) wd -> (dx, dwg, dwu, dwd)."""
  a, b, h, _ = _swiglu_fwd(x, wg, wu, wd)
  dwd = h.T @ g_out
  dh = g_out @ wd.T
  da = dh * b * dsilu(a)
  db = dh * silu(a)
  return da @ wg.T + db @ wu.T, x.T @ da, x.T @ db, dwd


def vjp(x, params, g, top_k, routed_scale):
  """Gradients of sum(forward(x, params) * g) w.r.t. x and every weight (bias: zero)."""
  p = f64(params)
  x = np.asarray(x, np.float64)
  g = np.asarray(g, np.float64)
  _, mask, s, gates = route(x, p, top_k, routed_scale)
  E = p["gate"].shape[0]
  grads = {k: np.zeros_like(v) for k, v in p.items()}
  dx = np.zeros_like(x)
  dgates = np.zeros_like(s)
  for e in range(E):
    out = _swiglu_fwd(x, p["gate"][e], p["up"][e], p["down"][e])[3]
    dgates[:, e] = np.sum(g * out, axis=1)
    ddx, dwg, dwu, dwd = _swiglu_vjp(x, p["gate"][e], p["up"][e], p["down"][e],
                                     gates[:, e:e + 1] * g)
    dx += ddx
    grads["gate"][e], grads["up"][e], grads["down"][e] = dwg, dwu, dwd
  # gates = scale * s m / S with S = sum_j s_j m_j  =>  ds = scale * m * (dG - sum_j dG_j q_j) / S
  S = np.sum(s * mask, axis=1, keepdims=True)
  q = s * mask / S
  ds = routed_scale * mask * (dgates - np.sum(dgates * q, axis=1, keepdims=True)) / S
  dz = ds * s * (1.0 - s)
  grads["router"] = x.T @ dz
  dx += dz @ p["router"].T
  if "shared_gate" in p:
    ddx, grads["shared_gate"], grads["shared_up"], grads["shared_down"] = _swiglu_vjp(
        x, p["shared_gate"], p["shared_up"], p["shared_down"], g)
    dx += ddx
  return dx, grads
