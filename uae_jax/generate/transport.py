"""Flow-matching transport on latents: the linear path, training times, the time shift, the loss.

Time convention: t = 0 is data, t = 1 is noise.
  x_t = (1 - t) * x1 + t * x0,   x1 = data (normalised latent),  x0 ~ N(0, I)
  velocity target u = dx_t/dt = x0 - x1
  loss = mean over (H, W, C) of (v_theta(x_t, t, y) - u)^2, averaged over the batch.
Training t is uniform on [0, t1) or logit-normal(0, 1) truncated to [0, t1] (t1 = 1 - 1/1000),
then moved toward noise by the dimension-dependent shift
  alpha = sqrt(dim / base),  t' = alpha t / (1 + (alpha - 1) t)
with dim = H * W * C of the latent and base 4096 (alpha = 6.928 at 16 x 16 x 768). The same
shift maps the sampling grid (`samplers.time_grid`).
With `prediction='x'` the network predicts the clean latent x1; it is turned into a velocity
through eps = (x_t - (1 - t) x1) / t, v = eps - x1 and the loss stays the velocity MSE.
"""
import math

import jax
import jax.numpy as jnp
from jax.scipy.special import ndtr, ndtri

T1 = 1.0 - 1.0 / 1000.0     # largest training / sampling time (velocity on the linear path)
SHIFT_BASE = 4096
TIME_DISTS = ("uniform", "logit_normal")
PREDICTIONS = ("velocity", "x")
X_PRED_MIN_T = 1e-3          # x-prediction: eps = (x_t - (1-t) x1) / t is clamped at small t


def shift_alpha(dim: int, base: int = SHIFT_BASE) -> float:
  """alpha = sqrt(dim / base) of the dimension-dependent time shift."""
  return math.sqrt(dim / base)


def shift_time(t, alpha: float):
  """t' = alpha t / (1 + (alpha - 1) t): pushes t toward noise for alpha > 1."""
  return alpha * t / (1.0 + (alpha - 1.0) * t)


def interpolate(x1, x0, t):
  """x_t = (1 - t) x1 + t x0 with t (B,) broadcast over the latent axes."""
  tb = t.reshape((-1,) + (1,) * (x1.ndim - 1)).astype(x1.dtype)
  return (1.0 - tb) * x1 + tb * x0


def sample_t(rng, batch: int, dist: str, alpha: float = 1.0, t1: float = T1):
  """Training times (B,): uniform [0, t1) or logit-normal(0, 1) truncated to [0, t1], shifted."""
  if dist == "uniform":
    t = jax.random.uniform(rng, (batch,), minval=0.0, maxval=t1)
  elif dist == "logit_normal":
    # Inverse-CDF sampling of sigmoid(N(0, 1)) restricted to t <= t1.
    hi = ndtr(math.log(t1 / (1.0 - t1)))
    u = jax.random.uniform(rng, (batch,), minval=0.0, maxval=hi)
    t = jax.nn.sigmoid(ndtri(u))
  else:
    raise ValueError(f"time distribution {dist!r}: expected one of {TIME_DISTS}")
  return shift_time(t, alpha) if alpha != 1.0 else t


def x_to_velocity(x1_hat, x_t, t):
  """Velocity of an x1 (clean-latent) prediction: eps = (x_t - (1 - t) x1) / t, v = eps - x1."""
  tb = jnp.maximum(t, X_PRED_MIN_T).reshape((-1,) + (1,) * (x_t.ndim - 1)).astype(x_t.dtype)
  eps = (x_t - (1.0 - tb) * x1_hat) / tb
  return eps - x1_hat


def as_velocity(out, x_t, t, prediction: str):
  """The network output as a velocity for `prediction` in {'velocity', 'x'}."""
  if prediction == "velocity":
    return out
  if prediction == "x":
    return x_to_velocity(out, x_t, t)
  raise ValueError(f"prediction {prediction!r}: expected one of {PREDICTIONS}")


def mean_flat(x):
  """Mean over every axis but the first."""
  return jnp.mean(x, axis=tuple(range(1, x.ndim)))


def flow_matching_loss(apply_fn, x1, rng, time_dist: str, alpha: float, prediction: str):
  """(loss, per-sample MSE, t) of one flow-matching batch; `apply_fn(x_t, t) -> network output`."""
  k_t, k_noise = jax.random.split(rng)
  t = sample_t(k_t, x1.shape[0], time_dist, alpha)
  x0 = jax.random.normal(k_noise, x1.shape, x1.dtype)
  x_t = interpolate(x1, x0, t)
  v = as_velocity(apply_fn(x_t, t).astype(jnp.float32), x_t, t, prediction)
  per_sample = mean_flat(jnp.square(v - (x0 - x1)))
  return jnp.mean(per_sample), per_sample, t
