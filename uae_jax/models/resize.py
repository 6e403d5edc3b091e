"""Fixed per-axis resampling matrices that reproduce PyTorch's and JAX's bicubic resizes exactly.

`jax.image.resize('bicubic')` uses the Keys kernel with a = -0.5 and antialiases when downsampling,
while `torch.nn.functional.interpolate(mode='bicubic', align_corners=False)` uses a = -0.75 and
no antialiasing (jax-ml/jax #15768). No maintained library builds PyTorch's operator in JAX, so it
is written here by hand, once, in numpy float64: a resize along one axis is a fixed (out, in)
matrix, it stays differentiable and runs on the MXU.
"""
import functools
from typing import Optional

import jax
import numpy as np

CONVENTIONS = ("torch_bicubic", "torch_bicubic_offset", "antialiased_bicubic")


def _cubic_weights(t: np.ndarray, a: float) -> np.ndarray:
  """Keys cubic-convolution weights of the 4 taps at offsets -1, 0, 1, 2 for fraction t."""
  def near(x):  # |x| <= 1
    return ((a + 2) * x - (a + 3)) * x * x + 1
  def far(x):  # 1 < |x| < 2
    return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
  return np.stack([far(t + 1), near(t), near(1 - t), far(2 - t)], axis=-1)


@functools.lru_cache(maxsize=64)
def torch_bicubic_matrix(in_size: int, out_size: int, scale: Optional[float] = None,
                         a: float = -0.75) -> np.ndarray:
  """(out, in) matrix of `F.interpolate(mode='bicubic', align_corners=False, antialias=False)`.

  `scale` is the source step per output pixel; PyTorch uses in/out when `size` is given and
  1/scale_factor when `scale_factor` is given (the FAIR hub's +0.1 offset convention).
  """
  # PyTorch computes source positions and tap weights in float32 (its opmath type for float
  # inputs); doing the same here makes the matrix match it to the last bits.
  f32 = np.float32
  scale = f32(in_size / out_size) if scale is None else f32(scale)
  src = scale * (np.arange(out_size, dtype=f32) + f32(0.5)) - f32(0.5)  # half-pixel centres
  base = np.floor(src)
  w = _cubic_weights(src - base, f32(a))
  m = np.zeros((out_size, in_size), np.float64)
  for tap in range(4):
    idx = np.clip(base.astype(np.int64) - 1 + tap, 0, in_size - 1)  # edge-clamped taps
    np.add.at(m, (np.arange(out_size), idx), w[:, tap])
  return m


@functools.lru_cache(maxsize=64)
def antialiased_bicubic_matrix(in_size: int, out_size: int) -> np.ndarray:
  """(out, in) matrix of `jax.image.resize(..., 'bicubic', antialias=True)`.

  That resize equals PyTorch's bicubic with `antialias=True` (used by DINOv2 with registers and
  timm) exactly; resizing the identity gives its matrix.
  """
  eye = np.eye(in_size, dtype=np.float64)
  # Evaluated eagerly on the host even when called while tracing a jitted function.
  with jax.ensure_compile_time_eval(), jax.default_device(jax.devices("cpu")[0]):
    m = jax.image.resize(eye.astype(np.float32), (out_size, in_size), "bicubic", antialias=True)
  return np.asarray(m, np.float64)


def resize_matrix(in_size: int, out_size: int, convention: str) -> np.ndarray:
  """The (out, in) resampling matrix of one of the supported position-embedding conventions."""
  if convention == "torch_bicubic":
    return torch_bicubic_matrix(in_size, out_size)
  if convention == "torch_bicubic_offset":
    # FAIR hub DINOv2 without registers: scale_factor=(out + 0.1) / in, so the step is in/(out+.1).
    return torch_bicubic_matrix(in_size, out_size, scale=in_size / (out_size + 0.1))
  if convention == "antialiased_bicubic":
    return antialiased_bicubic_matrix(in_size, out_size)
  raise ValueError(f"unknown resize convention {convention!r}; expected one of {CONVENTIONS}")


def resize_2d(x, my: np.ndarray, mx: np.ndarray):
  """Apply per-axis matrices to the two spatial axes of a (..., H, W, C) array."""
  import jax.numpy as jnp
  hi = jax.lax.Precision.HIGHEST
  x = jnp.einsum("oh,...hwc->...owc", my.astype(np.float32), x, precision=hi)
  return jnp.einsum("pw,...owc->...opc", mx.astype(np.float32), x, precision=hi)
