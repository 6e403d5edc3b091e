"""Spectrum Matching: the ESM and DSM regularisers, their spectra, and the latent-spectrum analysis.

Everything is channels-last: images and latents are (B, H, W, C). Images enter in [-1, 1] (the range
the regularisers were defined on; `log1p` below is not scale-invariant, so the range matters).
See docs/spectrum_matching.md for the method, the measured numbers and the options.

Spectra
  `channel_agg_power(x)`     P(u, v) = mean_c DCT2(x)[u, v, c]^2 (orthonormal DCT-II over H, W),
                             optionally per-channel mean removed first, clamped >= eps, DC zeroed.
  `radial_bin_map(h, w, n)`  bin of (u, v) = clip(floor(sqrt(u^2 + v^2) / r_max * n), 0, n - 1),
                             r_max = sqrt((h - 1)^2 + (w - 1)^2), DC at (0, 0) (DCT indexing).
  `radial_band_energy(P)`    mean power per bin: (B, n).

ESM (Encoding Spectrum Matching), `esm_loss(x, z)`:
  1. x -> Gaussian blur (7 x 7, sigma 1.2, zero padding) -> PyTorch bicubic (a = -0.75, no
     antialias) resize to z's grid. Both are fixed per-axis matrices, so the two steps are one
     (h, H) matrix per axis. The original code skips the blur when h == 32 (`blur_skip_height`).
  2. band means of both spectra; the image's are flattened by (j + 1)^delta;
  3. log1p, per-sample normalisation to a distribution over the bins;
  4. KL(p_x || p_z) (or the MSE), mean over the batch; p_x is a constant target.

DSM (Decoding Spectrum Matching), `dsm_mask(x, k)`: 8 x 8 block DCT of each signal, coefficients
with u + v >= 2 (b - 1) - (k - 1) zeroed, inverse DCT. `k` is an array (drawn per step from
{0, 8, 10, 12} by `sample_dsm_k`), so one compiled step serves every k; k = 0 is the identity.

DoG-REPA (experimental, `dog_filter`, `repa_loss`): REPA's negative cosine between projected
diffusion features and frozen encoder features, optionally on a difference-of-Gaussians filtered
target. The paper gives no filter; the two sigmas are configuration (`repa.dog_sigmas` of the DiT
trainer, which uses these as `uae_jax.tasks.dit.repa_term`).
"""
from __future__ import annotations

import functools
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from uae_jax.models import resize as resize_lib

NUM_BINS = 16
EPS = 1e-8
BLUR_SIZE = 7
BLUR_SIGMA = 1.2
# The original ESM code leaves the image unblurred when the latent grid is 32 high (f8 at 256 px).
REFERENCE_BLUR_SKIP_HEIGHT = 32
DSM_BLOCK = 8
DSM_CHOICES = (0, 8, 10, 12)
CENTERS = ("mean", "none")
LOSS_TYPES = ("kl", "l2")
_HI = jax.lax.Precision.HIGHEST


# ------------------------------------------------------------------------------------------------
# DCT spectra and radial bands.


@functools.lru_cache(maxsize=32)
def dct_matrix(n: int) -> np.ndarray:
  """(n, n) orthonormal DCT-II matrix: C[k, i] = sqrt(2/n) c_k cos(pi (2i + 1) k / 2n)."""
  k, i = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
  m = np.sqrt(2.0 / n) * np.cos(np.pi * (2 * i + 1) * k / (2 * n))
  m[0] /= np.sqrt(2.0)
  return m


def _apply_axis(x: jax.Array, m: np.ndarray, axis: int) -> jax.Array:
  """Multiplies axis `axis` of x by the matrix m (out, in)."""
  x = jnp.moveaxis(x, axis, -1)
  x = jnp.einsum("...i,oi->...o", x, jnp.asarray(m, jnp.float32), precision=_HI)
  return jnp.moveaxis(x, -1, axis)


def dct2(x: jax.Array, axes=(1, 2)) -> jax.Array:
  """Orthonormal 2-D DCT-II over `axes` (float32)."""
  # Two small matmuls: the grids here are at most a few dozen wide, where an FFT-based DCT only
  # adds compile time, and matmuls run on the MXU.
  x = jnp.asarray(x, jnp.float32)
  for a in axes:
    x = _apply_axis(x, dct_matrix(x.shape[a]), a)
  return x


def idct2(x: jax.Array, axes=(1, 2)) -> jax.Array:
  """Inverse of `dct2` (orthonormal DCT-III = the transpose)."""
  x = jnp.asarray(x, jnp.float32)
  for a in axes:
    x = _apply_axis(x, dct_matrix(x.shape[a]).T, a)
  return x


def channel_agg_power(x: jax.Array, center: str = "mean", remove_dc: bool = True,
                      eps: float = EPS) -> jax.Array:
  """Channel-mean DCT power of (B, H, W, C) -> (B, H, W): clamp >= eps, DC zeroed if asked."""
  if center not in CENTERS:
    raise ValueError(f"center={center!r}: expected one of {CENTERS}")
  x = jnp.asarray(x, jnp.float32)
  if center == "mean":
    x = x - jnp.mean(x, axis=(1, 2), keepdims=True)
  p = jnp.maximum(jnp.mean(jnp.square(dct2(x)), axis=-1), eps)
  if remove_dc:
    p = p.at[:, 0, 0].set(0.0)
  return p


@functools.lru_cache(maxsize=32)
def radial_bin_map(h: int, w: int, n_bins: int = NUM_BINS) -> np.ndarray:
  """(h, w) int bin index of each DCT coefficient, DC at (0, 0), r normalised by the corner."""
  u, v = np.meshgrid(np.arange(h, dtype=np.float64), np.arange(w, dtype=np.float64),
                     indexing="ij")
  r_max = max(np.sqrt((h - 1) ** 2 + (w - 1) ** 2), 1e-12)
  return np.clip(np.floor(np.sqrt(u ** 2 + v ** 2) / r_max * n_bins), 0, n_bins - 1).astype(np.int64)


def bin_counts(h: int, w: int, n_bins: int = NUM_BINS) -> np.ndarray:
  """Number of DCT coefficients in each radial bin of an h x w grid."""
  return np.bincount(radial_bin_map(h, w, n_bins).ravel(), minlength=n_bins)


def radial_band_energy(p: jax.Array, n_bins: int = NUM_BINS, eps: float = EPS) -> jax.Array:
  """Mean power per radial bin of (B, H, W) spectra -> (B, n_bins) (empty bins give 0)."""
  _, h, w = p.shape
  bins = radial_bin_map(h, w, n_bins).ravel()
  # A one-hot (HW, n) matmul with the inverse counts folded in: one small MXU op, no scatter.
  counts = np.maximum(np.bincount(bins, minlength=n_bins), 1).astype(np.float64) + eps
  avg = np.eye(n_bins)[bins] / counts[None, :]
  return jnp.einsum("bk,kn->bn", jnp.reshape(p, (p.shape[0], -1)), jnp.asarray(avg, jnp.float32),
                    precision=_HI)


# ------------------------------------------------------------------------------------------------
# Bringing the image to the latent grid.


@functools.lru_cache(maxsize=16)
def gaussian_blur_matrix(size: int, kernel_size: int = BLUR_SIZE,
                         sigma: float = BLUR_SIGMA) -> np.ndarray:
  """(size, size) matrix of a normalised 1-D Gaussian with zero padding kernel_size // 2.

  The original 2-D kernel exp(-(x^2 + y^2) / 2 sigma^2) / sum is the outer product of this 1-D
  kernel with itself, so blurring both axes with it is exactly the depthwise 2-D convolution.
  """
  half = kernel_size // 2
  t = np.arange(kernel_size, dtype=np.float64) - half
  g = np.exp(-t ** 2 / (2.0 * sigma ** 2))
  g /= g.sum()
  m = np.zeros((size, size), np.float64)
  for i in range(size):
    for j, wgt in enumerate(g):
      src = i + j - half
      if 0 <= src < size:
        m[i, src] += wgt
  return m


def to_grid_matrix(in_size: int, out_size: int, blur: bool, kernel_size: int = BLUR_SIZE,
                   sigma: float = BLUR_SIGMA) -> np.ndarray:
  """(out, in) matrix of [blur then] PyTorch bicubic resize (identity when sizes match)."""
  m = gaussian_blur_matrix(in_size, kernel_size, sigma) if blur else np.eye(in_size)
  if in_size != out_size:
    m = resize_lib.torch_bicubic_matrix(in_size, out_size) @ m
  return m


def image_to_latent_grid(x: jax.Array, hw: Sequence[int], *,
                         blur_skip_height: int = REFERENCE_BLUR_SKIP_HEIGHT,
                         blur_size: int = BLUR_SIZE, blur_sigma: float = BLUR_SIGMA) -> jax.Array:
  """Blur (7 x 7, sigma 1.2) and bicubic-resize images (B, H, W, C) to the latent grid hw.

  `blur_skip_height`: the original code skips the blur when the latent height equals 32; 0 never
  skips (always blur), any other value reproduces the quirk for that height.
  """
  h, w = int(hw[0]), int(hw[1])
  blur = not (blur_skip_height and h == blur_skip_height)
  my = to_grid_matrix(x.shape[1], h, blur, blur_size, blur_sigma)
  mx = to_grid_matrix(x.shape[2], w, blur, blur_size, blur_sigma)
  return resize_lib.resize_2d(jnp.asarray(x, jnp.float32), my, mx)


# ------------------------------------------------------------------------------------------------
# ESM.


def band_distribution(bands: jax.Array, delta: float = 0.0, log1p: bool = True,
                      eps: float = EPS) -> jax.Array:
  """(B, n) band means -> per-sample distribution: * (j + 1)^delta, log1p, normalise."""
  n = bands.shape[-1]
  s = bands * jnp.asarray((np.arange(n) + 1.0) ** delta, jnp.float32)
  if log1p:
    s = jnp.log(s + eps + 1.0)
  return s / (jnp.sum(s, axis=-1, keepdims=True) + eps)


def distribution_loss(p_target: jax.Array, p: jax.Array, loss_type: str = "kl",
                      eps: float = EPS) -> jax.Array:
  """KL(p_target || p) summed over bins and averaged over samples, or the MSE ('l2')."""
  if loss_type == "kl":
    kl = jnp.sum(p_target * (jnp.log(p_target + eps) - jnp.log(p + eps)), axis=-1)
    return jnp.mean(kl)
  if loss_type == "l2":
    return jnp.mean(jnp.square(p - p_target))
  raise ValueError(f"loss_type={loss_type!r}: expected one of {LOSS_TYPES}")


def spectra_distributions(x: jax.Array, z: jax.Array, delta: float = 1.0, *,
                          center: str = "mean", remove_dc: bool = True, log1p: bool = True,
                          n_bins: int = NUM_BINS, eps: float = EPS,
                          blur_skip_height: int = REFERENCE_BLUR_SKIP_HEIGHT,
                          blur_size: int = BLUR_SIZE, blur_sigma: float = BLUR_SIGMA) -> tuple:
  """(p_x flattened by delta, p_z): (B, n) band distributions of image x and latent z."""
  x_ds = image_to_latent_grid(x, z.shape[1:3], blur_skip_height=blur_skip_height,
                              blur_size=blur_size, blur_sigma=blur_sigma)
  sx = radial_band_energy(channel_agg_power(x_ds, center, remove_dc, eps), n_bins, eps)
  sz = radial_band_energy(channel_agg_power(z, center, remove_dc, eps), n_bins, eps)
  return band_distribution(sx, delta, log1p, eps), band_distribution(sz, 0.0, log1p, eps)


def esm_loss(x: jax.Array, z: jax.Array, delta: float = 1.0, loss_type: str = "kl",
             **kwargs) -> jax.Array:
  """ESM: distance of the latent's band distribution to the image's flattened one (scalar).

  x: images in [-1, 1] (B, H, W, 3); z: the sampled latent (B, h, w, C), before any scale factor.
  The image side is a constant target: gradients reach z only. `kwargs`: `spectra_distributions`.
  """
  p_x, p_z = spectra_distributions(jax.lax.stop_gradient(x), z, delta, **kwargs)
  return distribution_loss(jax.lax.stop_gradient(p_x), p_z, loss_type, kwargs.get("eps", EPS))


# ------------------------------------------------------------------------------------------------
# DSM.


def dsm_keep_mask(k, block: int = DSM_BLOCK) -> jax.Array:
  """(block, block) float mask keeping coefficient (u, v) iff u + v < 2 (block - 1) - (k - 1).

  k may be traced; k = 0 keeps everything. Kept per 8 x 8 block: 64 / 28 / 15 / 6 for k = 0, 8,
  10, 12 (k is the number of highest anti-diagonals removed, out of 15).
  """
  u, v = np.meshgrid(np.arange(block), np.arange(block), indexing="ij")
  thresh = 2 * (block - 1) - (jnp.asarray(k, jnp.int32) - 1)
  return (jnp.asarray(u + v) < thresh).astype(jnp.float32)


def split_blocks(x: jax.Array, block: int) -> jax.Array:
  """(B, H, W, C) -> (B, H/b, W/b, b, b, C) non-overlapping tiles, row-major tile order."""
  b, h, w, c = x.shape
  if h % block or w % block:
    raise ValueError(f"grid {h}x{w} is not divisible by the DSM block size {block}")
  return x.reshape(b, h // block, block, w // block, block, c).transpose(0, 1, 3, 2, 4, 5)


def combine_blocks(t: jax.Array) -> jax.Array:
  """Inverse of `split_blocks`."""
  b, nh, nw, bh, bw, c = t.shape
  return t.transpose(0, 1, 3, 2, 4, 5).reshape(b, nh * bh, nw * bw, c)


def dsm_mask(x: jax.Array, k, block: int = DSM_BLOCK) -> jax.Array:
  """Block-DCT low-pass of (B, H, W, C): the shared DSM mask of `dsm_keep_mask(k)`, k traced.

  Linear in x, so gradients flow through it; not clamped. k = 0 returns x itself (no DCT), as the
  original code does.
  """
  tiles = split_blocks(jnp.asarray(x, jnp.float32), block)
  coef = dct2(tiles, axes=(3, 4)) * dsm_keep_mask(k, block)[:, :, None]
  out = combine_blocks(idct2(coef, axes=(3, 4)))
  return jnp.where(jnp.asarray(k) == 0, jnp.asarray(x, jnp.float32), out)


def sample_dsm_k(rng: jax.Array, choices: Sequence[int] = DSM_CHOICES) -> jax.Array:
  """One k per step, uniform over `choices`, as an int32 array (no recompilation per k)."""
  return jax.random.choice(rng, jnp.asarray(choices, jnp.int32))


def dsm_pair(x: jax.Array, z: jax.Array, k, block: int = DSM_BLOCK) -> tuple:
  """(x_bar, z_bar): the same mask on image and latent; x_bar is the reconstruction target."""
  return dsm_mask(x, k, block), dsm_mask(z, k, block)


# ------------------------------------------------------------------------------------------------
# Latent-spectrum analysis (the analysis settings differ from the loss settings).

ANALYSIS = dict(center="none", remove_dc=False, log1p=True)


def analysis_distributions(x: jax.Array, z: jax.Array, delta: float = 1.0, *,
                           blur_skip_height: int = REFERENCE_BLUR_SKIP_HEIGHT) -> dict:
  """Per-image {'image', 'target', 'latent', 'kl'} band distributions with the analysis settings.

  'image' is delta = 0 (the raw image spectrum on the latent grid), 'target' flattened by delta,
  'kl' = KL(target || latent) per image. Settings: no centring, DC kept, log1p, 16 bins.
  """
  kw = dict(ANALYSIS, blur_skip_height=blur_skip_height)
  p_rgb, p_z = spectra_distributions(x, z, 0.0, **kw)
  p_t, _ = spectra_distributions(x, z, delta, **kw)
  kl = jnp.sum(p_t * (jnp.log(p_t + EPS) - jnp.log(p_z + EPS)), axis=-1)
  return {"image": p_rgb, "target": p_t, "latent": p_z, "kl": kl}


def pca_rgb(latents: np.ndarray, num_fit_pixels: int = 4096, seed: int = 0) -> np.ndarray:
  """Latents (N, h, w, C) -> (N, h, w, 3) in [0, 1]: 3-component PCA, min-max per image."""
  from sklearn.decomposition import PCA
  n, h, w, c = latents.shape
  flat = np.asarray(latents, np.float64).reshape(-1, c)
  rs = np.random.default_rng(seed)
  fit = flat[rs.choice(flat.shape[0], min(num_fit_pixels, flat.shape[0]), replace=False)]
  comps = min(3, c)
  proj = PCA(comps, random_state=seed).fit(fit).transform(flat).reshape(n, h * w, comps)
  if comps < 3:
    proj = np.concatenate([proj, np.zeros((n, h * w, 3 - comps))], axis=-1)
  lo, hi = proj.min(axis=1, keepdims=True), proj.max(axis=1, keepdims=True)
  return ((proj - lo) / np.maximum(hi - lo, 1e-12)).reshape(n, h, w, 3)


# ------------------------------------------------------------------------------------------------
# DoG-REPA (experimental).


def gaussian_blur(x: jax.Array, sigma: float) -> jax.Array:
  """Separable Gaussian blur of (B, H, W, C), kernel 2 ceil(3 sigma) + 1, zero padding."""
  if sigma <= 0:
    return jnp.asarray(x, jnp.float32)
  size = 2 * int(np.ceil(3.0 * sigma)) + 1
  my = gaussian_blur_matrix(x.shape[1], size, float(sigma))
  mx = gaussian_blur_matrix(x.shape[2], size, float(sigma))
  return resize_lib.resize_2d(jnp.asarray(x, jnp.float32), my, mx)


def dog_filter(x: jax.Array, sigma_low: float, sigma_high: float) -> jax.Array:
  """Difference of Gaussians G_{sigma_low} * x - G_{sigma_high} * x on a (B, H, W, C) grid.

  sigma_low < sigma_high gives a band-pass; sigma_low = 0 keeps x minus its sigma_high blur
  (a high-pass). Experimental: the paper states no filter (docs/spectrum_matching.md).
  """
  return gaussian_blur(x, sigma_low) - gaussian_blur(x, sigma_high)


def repa_loss(projected: jax.Array, target: jax.Array, dog_sigmas: Optional[tuple] = None,
              grid: Optional[tuple] = None) -> jax.Array:
  """REPA alignment: -mean cosine(projected token, target token), target frozen.

  projected, target: (B, N, D) tokens. With `dog_sigmas=(s_low, s_high)` the target is DoG
  filtered on its (h, w) `grid` first (N = h * w, row-major).
  """
  target = jax.lax.stop_gradient(jnp.asarray(target, jnp.float32))
  if dog_sigmas is not None:
    h, w = grid
    b, n, d = target.shape
    target = dog_filter(target.reshape(b, h, w, d), *dog_sigmas).reshape(b, n, d)
  p = jnp.asarray(projected, jnp.float32)
  num = jnp.sum(p * target, axis=-1)
  den = jnp.linalg.norm(p, axis=-1) * jnp.linalg.norm(target, axis=-1)
  return -jnp.mean(num / jnp.maximum(den, 1e-8))
