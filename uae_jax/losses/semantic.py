"""Semantic alignment losses between a trainable encoder and its frozen teacher.

* `band_semantic_mse`: paper recipe, MSE on the lowest K_base radial bands.
* `zigzag_lowfreq_mse`: official-code recipe, MSE on the first K zig-zag DCT-II coefficients
  (docs/method.md#official-losses).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from uae_jax.models import bands as bands_lib


@functools.lru_cache(maxsize=None)
def _zigzag_dct_rows(height: int, width: int, first_k: int) -> np.ndarray:
  """Rows of the 2-D DCT-II matrix for the first K zig-zag positions, float64 (K, H*W)."""
  full = np.kron(bands_lib.dct_matrix(height), bands_lib.dct_matrix(width))  # [ky*W+kx, h*W+w]
  rows = full[bands_lib.zigzag_order(height, width)[:first_k]]
  rows.setflags(write=False)
  return rows


def zigzag_lowfreq_mse(student: jax.Array, teacher: jax.Array, first_k: int = 64) -> jax.Array:
  """Official semantic loss: mean over (B, C, first K zig-zag positions) of (DCT s - DCT t)^2."""
  if student.shape != teacher.shape:
    raise ValueError(f"shape mismatch: {student.shape} vs {teacher.shape}")
  batch, height, width, channels = student.shape
  if not 1 <= first_k <= height * width:
    raise ValueError(f"first_k must be in [1, {height * width}], got {first_k}")
  # The DCT is linear, so DCT(s) - DCT(t) = DCT(s - t); only the K kept coefficients are computed,
  # as one (K, H*W) matmul instead of the full transform.
  rows = jnp.asarray(_zigzag_dct_rows(height, width, first_k), jnp.float32)
  diff = (jnp.asarray(student, jnp.float32) - jnp.asarray(teacher, jnp.float32))
  coeffs = jnp.einsum("kp,bpc->bkc", rows, diff.reshape(batch, height * width, channels),
                      precision=jax.lax.Precision.HIGHEST)
  return jnp.mean(jnp.square(coeffs))


def band_semantic_mse(student_bands: jax.Array, teacher_bands: jax.Array,
                      k_base: int = 1) -> jax.Array:
  """Paper semantic loss (1/k_base) sum_{k<k_base} mean((b_k^s - b_k^t)^2) on (K,B,H,W,C) bands."""
  if student_bands.shape != teacher_bands.shape:
    raise ValueError(f"shape mismatch: {student_bands.shape} vs {teacher_bands.shape}")
  if not 1 <= k_base <= student_bands.shape[0]:
    raise ValueError(f"k_base must be in [1, {student_bands.shape[0]}], got {k_base}")
  diff = (jnp.asarray(student_bands[:k_base], jnp.float32)
          - jnp.asarray(teacher_bands[:k_base], jnp.float32))
  # Every band has the same element count, so the mean of per-band means is the overall mean.
  return jnp.mean(jnp.square(diff))
