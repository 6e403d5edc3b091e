"""Reconstruction metrics: PSNR, SSIM and LPIPS per image, and their dataset means.

Conventions (docs/method.md#evaluation; reference values in docs/method.md#reference-values):

* Images are NHWC in [0, 1] (float) or uint8. Metrics are computed on uint8 *levels*: a
  reconstruction is clipped to [0, 1], scaled by 255 and quantised before scoring, as when PNGs
  are written. Our default quantiser rounds (`floor(255 x + 0.5)`, like torchvision `save_image`
  and PIL); the official UAE code truncates (`(x.clamp(0, 1) * 255).to(torch.uint8)`), which
  biases every pixel down by half a level on average and lowers PSNR slightly. Pass
  `uint8_mode='truncate'` to reproduce the official numbers.
* PSNR: per image, MSE over H, W, C on [0, 1] values clamped at >= 1e-10, `20 log10(1/sqrt(MSE))`;
  the dataset value is the mean of per-image PSNRs (the official convention; torchmetrics' default
  PSNR of the pooled MSE is a different, lower number).
* SSIM: `dm_pix.ssim`, Gaussian 11x11, sigma 1.5, K1 0.01, K2 0.03, per channel, mean over the
  *valid* (unpadded) map and the channels. This equals scikit-image
  `structural_similarity(data_range=1, channel_axis=-1, gaussian_weights=True, sigma=1.5,
  use_sample_covariance=False)`. The official code uses torchmetrics (>= 1.x), which reflect-pads by
  5 px and averages the full map; that is 0.001-0.005 higher or lower on real photos, available as
  `ssim_torchmetrics_convention`.
* LPIPS: VGG16 LPIPS v0.1 (`uae_jax.models.lpips`) on the same quantised images mapped to [-1, 1].
"""

from typing import Any

import dm_pix
import flax
import jax
import jax.numpy as jnp
from clu import metrics as clu_metrics

from uae_jax.models import lpips as lpips_lib

Array = jax.Array

# SSIM settings shared by both conventions (Wang et al. 2004 defaults).
SSIM_KWARGS = dict(max_val=1.0, filter_size=11, filter_sigma=1.5, k1=0.01, k2=0.03)
UINT8_MODES = ("round", "truncate")


def to_uint8(x: Array, mode: str = "round") -> Array:
  """Quantises [0, 1] images to uint8: clip, *255, then round half up or truncate."""
  if mode not in UINT8_MODES:
    raise ValueError(f"mode must be one of {UINT8_MODES}, got {mode!r}")
  x = jnp.asarray(x)
  if x.dtype == jnp.uint8:
    return x
  scaled = jnp.clip(x.astype(jnp.float32), 0.0, 1.0) * 255.0
  # Round half up (not jnp.round's half-to-even) to match torchvision/PIL PNG writing.
  levels = jnp.floor(scaled + 0.5) if mode == "round" else jnp.floor(scaled)
  return levels.astype(jnp.uint8)


def quantize(x: Array, mode: str = "round") -> Array:
  """Snaps [0, 1] images to the nearest representable uint8 level, as float32 in [0, 1]."""
  return to_uint8(x, mode).astype(jnp.float32) / 255.0


def _as_unit_float(x: Array) -> Array:
  """uint8 -> float32 / 255; floats -> float32 unchanged."""
  x = jnp.asarray(x)
  if x.dtype == jnp.uint8:
    return x.astype(jnp.float32) / 255.0
  return x.astype(jnp.float32)


def psnr(x: Array, y: Array) -> Array:
  """Per-image PSNR in dB for [0, 1] floats or uint8, (..., H, W, C) -> (...)."""
  x, y = _as_unit_float(x), _as_unit_float(y)
  mse = jnp.mean(jnp.square(x - y), axis=(-3, -2, -1))
  # The clamp caps identical images at 100 dB instead of inf, as in the official code.
  mse = jnp.maximum(mse, 1e-10)
  return 20.0 * jnp.log10(1.0 / jnp.sqrt(mse))


def ssim(x: Array, y: Array) -> Array:
  """Per-image SSIM (Gaussian 11x11, sigma 1.5, valid-region mean = scikit-image gaussian mode)."""
  return dm_pix.ssim(_as_unit_float(x), _as_unit_float(y), **SSIM_KWARGS)


def ssim_torchmetrics_convention(x: Array, y: Array) -> Array:
  """Per-image SSIM as torchmetrics >= 1.x computes it: reflect-pad 5 px, mean of the full map."""
  x, y = _as_unit_float(x), _as_unit_float(y)
  pad = SSIM_KWARGS["filter_size"] // 2
  widths = [(0, 0)] * (x.ndim - 3) + [(pad, pad), (pad, pad), (0, 0)]
  x = jnp.pad(x, widths, mode="reflect")
  y = jnp.pad(y, widths, mode="reflect")
  ssim_map = dm_pix.ssim(x, y, return_map=True, **SSIM_KWARGS)
  # torchmetrics also clamps the two variances at 0; that only matters at float round-off level.
  return jnp.mean(ssim_map, axis=(-3, -2, -1))


def reconstruction_metrics(lpips_params: Any, x_hat: Array, x: Array,
                           uint8_mode: str = "round",
                           lpips_dtype: Any = jnp.float32) -> dict[str, Array]:
  """Jittable per-image {'psnr', 'ssim', 'lpips'} of reconstructions x_hat vs references x.

  x_hat is quantised with `uint8_mode`. The reference x is uint8 or a float image that came from
  uint8 data, so it is snapped to its level by rounding regardless of the mode (truncating a
  float k/255 could drop it a level to k-1, which the official uint8 references never suffer).
  """
  x_hat_q = quantize(x_hat, uint8_mode)
  x_q = quantize(x, "round")
  return {
      "psnr": psnr(x_hat_q, x_q),
      "ssim": ssim(x_hat_q, x_q),
      "lpips": lpips_lib.lpips_distance(lpips_params, 2.0 * x_q - 1.0, 2.0 * x_hat_q - 1.0,
                                        dtype=lpips_dtype),
  }


@flax.struct.dataclass
class ReconstructionMetrics(clu_metrics.Collection):
  """Dataset means of per-image PSNR, SSIM and LPIPS (clu Averages; pass `mask` for padding).

  Usage:
    m = ReconstructionMetrics.empty()
    m = m.merge(ReconstructionMetrics.single_from_model_output(**per_image, mask=valid))
    m.compute()  # {'psnr': ..., 'ssim': ..., 'lpips': ...}
  """
  psnr: clu_metrics.Average.from_output("psnr")
  ssim: clu_metrics.Average.from_output("ssim")
  lpips: clu_metrics.Average.from_output("lpips")
