"""Pixel reconstruction loss: L1 + w_lpips * LPIPS (docs/method.md#losses).

Images are NHWC float32 in [0, 1]. LPIPS is the frozen VGG16 LPIPS v0.1 of
`uae_jax.models.lpips`, fed with images mapped to [-1, 1] as in the official code
(`LPIPS(2x - 1, 2x_hat - 1)`, mean over the batch).
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from uae_jax.models import lpips as lpips_lib

Array = jax.Array


def l1_loss(x_hat: Array, x: Array) -> Array:
  """Mean absolute error over every element (pixels in [0, 1] units)."""
  return jnp.mean(jnp.abs(x_hat.astype(jnp.float32) - x.astype(jnp.float32)))


def lpips_loss(lpips_params: Any, x_hat: Array, x: Array, dtype: Any = jnp.float32) -> Array:
  """Batch-mean VGG16 LPIPS between x and x_hat given in [0, 1]; params stay frozen."""
  d = lpips_lib.lpips_distance(lpips_params, 2.0 * x - 1.0, 2.0 * x_hat - 1.0, dtype=dtype)
  return jnp.mean(d)


def reconstruction_loss(lpips_params: Any, x_hat: Array, x: Array, w_lpips: float = 1.0,
                        lpips_dtype: Any = jnp.float32) -> tuple[Array, dict[str, Array]]:
  """L_rec = L1 + w_lpips * LPIPS; returns (total, {'l1', 'lpips'}).

  With a Python `w_lpips == 0` the VGG16 pass is skipped entirely (tiny test configs) and the
  parts dict has no 'lpips' entry.
  """
  parts = {"l1": l1_loss(x_hat, x)}
  total = parts["l1"]
  if not (isinstance(w_lpips, (int, float)) and w_lpips == 0):
    parts["lpips"] = lpips_loss(lpips_params, x_hat, x, dtype=lpips_dtype)
    total = total + w_lpips * parts["lpips"]
  return total, parts
