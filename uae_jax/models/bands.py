"""Frequency bands of a latent grid: radial FFT band projector and the official DCT low-pass.

Two families live here (the method is described in docs/method.md):

* Paper recipe (docs/method.md#band-split): K smooth radial Fourier masks and the iterative split
  `r_0 = z; b_k = P_k(r_k); r_{k+1} = r_k - b_k; b_{K-1} = r_{K-1}`. By default (`band_split=
  "lowpass"`) each P_k is the low-pass at band k's upper edge, so every band holds its own annulus;
  `"residual_bandpass"` applies the band-pass mask M_k to the residual instead (the literal reading,
  which leaks every edge transition into the last band). There is a literal `jnp.fft` reference
  (`split_bands_fft`) and two matmul fast paths that apply the same fixed real operator: a dense
  (K, H*W, H*W) einsum (`split_bands_matmul`) and a separable real-DFT (Hartley) path
  (`split_bands_separable`), chosen by grid size; plus band-limited noise injection
  (`inject_band_noise`).
* Official-code recipe (docs/method.md#official-frequency-module): orthonormal DCT-II over the
  token grid and a hard zig-zag prefix low-pass (`dct_lowpass`, `official_band_mask`).

Latents are channels-last `z: (B, H, W, C)`; bands are stacked on a new leading axis
`(K, B, H, W, C)`. All constants (masks, operators, DCT matrices) are numpy arrays built once in
float64, not Flax params.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

_HIGHEST = jax.lax.Precision.HIGHEST


# ---------------------------------------------------------------------------------------------
# Paper recipe: radial masks and the iterative split.
# ---------------------------------------------------------------------------------------------


def _validate_band_args(num_bands, edges, tau):
  """Checks the band-layout arguments and returns the edges as a float tuple."""
  if isinstance(num_bands, bool) or not isinstance(num_bands, (int, np.integer)):
    raise TypeError(f"num_bands must be an int, got {num_bands!r}")
  if num_bands < 1:
    raise ValueError(f"num_bands must be >= 1, got {num_bands}")
  if not np.isfinite(tau) or tau <= 0:
    raise ValueError(f"tau must be a positive finite float, got {tau}")
  if edges is None:
    return tuple(k * np.sqrt(2.0) / num_bands for k in range(1, num_bands))
  edges = tuple(float(e) for e in edges)
  if len(edges) != num_bands - 1:
    raise ValueError(
        f"edges must have num_bands - 1 = {num_bands - 1} entries, got {len(edges)}: {edges}")
  if any(not np.isfinite(e) for e in edges):
    raise ValueError(f"edges must be finite, got {edges}")
  if any(b <= a for a, b in zip(edges[:-1], edges[1:])):
    raise ValueError(f"edges must be strictly increasing, got {edges}")
  return edges


def _sigmoid(x):
  """Overflow-free logistic function in numpy."""
  return 0.5 * (1.0 + np.tanh(0.5 * x))


def radial_masks(height: int, width: int, num_bands: int = 4,
                 edges: Sequence[float] | None = None, tau: float = 0.02) -> np.ndarray:
  """Returns the K smooth radial Fourier masks (K, H, W), float64, summing to 1 everywhere."""
  if height < 1 or width < 1:
    raise ValueError(f"grid must be at least 1x1, got {height}x{width}")
  edges = _validate_band_args(num_bands, edges, tau)
  fy = np.fft.fftfreq(height)[:, None]
  fx = np.fft.fftfreq(width)[None, :]
  # Normalised radius: 1 at the Nyquist frequency of one axis, sqrt(2) in the corner.
  rho = np.sqrt(fy ** 2 + fx ** 2) / 0.5
  steps = [_sigmoid((rho - e) / tau) for e in edges]  # s_1 .. s_{K-1}
  # Telescoping differences of 1 >= s_1 >= ... >= s_{K-1} >= 0 give a partition of unity.
  bounds = [np.ones_like(rho)] + steps + [np.zeros_like(rho)]
  return np.stack([bounds[k] - bounds[k + 1] for k in range(num_bands)]).astype(np.float64)


BAND_SPLITS = ("lowpass", "residual_bandpass")


def _check_band_split(band_split):
  """Raises ValueError unless band_split names one of BAND_SPLITS."""
  if band_split not in BAND_SPLITS:
    raise ValueError(f"band_split must be one of {BAND_SPLITS}, got {band_split!r}")


def step_masks(masks, band_split: str = "lowpass"):
  """Returns the multipliers A_k (K, H, W) that step k of the split applies to the residual r_k.

  `masks` are the radial masks M_k of `radial_masks` (numpy or jax). "lowpass": A_k = L_k =
  M_0 + ... + M_k = 1 - s_{k+1}, the low-pass at band k's upper edge. "residual_bandpass":
  A_k = M_k. The last entry is never applied (the last band is the remaining residual).
  """
  _check_band_split(band_split)
  if band_split == "residual_bandpass":
    return masks
  xp = np if isinstance(masks, np.ndarray) else jnp
  return xp.cumsum(masks, axis=0)


def band_multipliers(masks: np.ndarray, band_split: str = "lowpass") -> np.ndarray:
  """Returns the effective Fourier multipliers G_k (K, H, W) of the iterative split, float64.

  G_k = A_k * prod_{j<k}(1 - A_j) and G_{K-1} = prod_{j<K-1}(1 - A_j); they sum to 1. For
  "lowpass", G_k = (1 - s_{k+1}) * prod_{j<=k} s_j, which equals M_k up to the product of two
  neighbouring sigmoid tails; for "residual_bandpass", G_k = M_k * prod_{j<k}(1 - M_j).
  """
  steps = step_masks(np.asarray(masks, np.float64), band_split)
  num_bands = steps.shape[0]
  out = []
  remaining = np.ones_like(steps[0])  # prod_{j<k} (1 - A_j): what r_k keeps of z.
  for k in range(num_bands - 1):
    out.append(steps[k] * remaining)
    remaining = remaining * (1.0 - steps[k])
  out.append(remaining)
  return np.stack(out)


def band_operator(masks: np.ndarray, band_split: str = "lowpass") -> np.ndarray:
  """Returns the real split operator (K, H*W, H*W), float64: b_k[q] = sum_p op[k, q, p] z[p]."""
  mult = band_multipliers(masks, band_split)
  num_bands, height, width = mult.shape
  # All P_k are Fourier-diagonal, so the composed band operator is the circular convolution with
  # kernel g_k = ifft2(G_k). The radial multipliers are even in frequency (rho depends on fy^2 and
  # fx^2, and fftfreq's Nyquist bin maps to itself under negation), hence Hermitian-symmetric and
  # real, so g_k is real (and even): the operator is a real (symmetric) matrix and taking real() in
  # the FFT path only discards rounding error.
  kernels = np.fft.ifft2(mult, axes=(1, 2))
  imag = np.max(np.abs(kernels.imag))
  if imag > 1e-10:
    raise AssertionError(f"band kernels are not real (max imag {imag}); masks not even?")
  kernels = kernels.real
  qy, qx = np.divmod(np.arange(height * width), width)
  dy = (qy[:, None] - qy[None, :]) % height
  dx = (qx[:, None] - qx[None, :]) % width
  return kernels[:, dy, dx]


def split_bands_fft(z: jax.Array, masks, band_split: str = "lowpass") -> jax.Array:
  """Reference split: literal FFT iteration over the H, W axes; (B,H,W,C) -> (K,B,H,W,C)."""
  z = jnp.asarray(z, jnp.float32)
  steps = step_masks(jnp.asarray(masks, jnp.float32), band_split)
  residual = z
  bands = []
  for k in range(steps.shape[0] - 1):
    spec = jnp.fft.fft2(residual, axes=(1, 2))
    band = jnp.real(jnp.fft.ifft2(steps[k][None, :, :, None] * spec, axes=(1, 2)))
    bands.append(band)
    residual = residual - band
  bands.append(residual)
  return jnp.stack(bands)


def split_bands_matmul(z: jax.Array, operator) -> jax.Array:
  """Fast split: one einsum with the precomputed (K, H*W, H*W) operator; z -> (K,B,H,W,C)."""
  z = jnp.asarray(z, jnp.float32)
  batch, height, width, channels = z.shape
  operator = jnp.asarray(operator, jnp.float32)
  if operator.shape[1:] != (height * width, height * width):
    raise ValueError(
        f"operator {operator.shape} does not match a {height}x{width} grid")
  flat = z.reshape(batch, height * width, channels)
  # A plain matmul over the grid positions: on TPU this runs on the MXU; HIGHEST keeps f32
  # accuracy (TPU default would be bf16 passes) so it agrees with the FFT reference to 1e-5.
  bands = jnp.einsum("kqp,bpc->kbqc", operator, flat, precision=_HIGHEST)
  return bands.reshape(operator.shape[0], batch, height, width, channels)


@functools.lru_cache(maxsize=None)
def hartley_matrix(n: int) -> np.ndarray:
  """Orthonormal discrete Hartley matrix cas(2 pi u y / n) / sqrt(n), float64 (n, n).

  It is real, symmetric and its own inverse.
  """
  angle = 2.0 * np.pi * np.outer(np.arange(n), np.arange(n)) / n
  mat = (np.cos(angle) + np.sin(angle)) / np.sqrt(n)
  mat.setflags(write=False)
  return mat


def split_bands_separable(z: jax.Array, multipliers) -> jax.Array:
  """Fast split as separable real transforms; z (B,H,W,C) -> (K,B,H,W,C) for K multipliers.

  A multiplier that is even in each frequency axis (the radial G_k are: they depend on fy^2 and
  fx^2) is diagonalised by the separable Hartley transform T = T_H (x) T_W just as by the DFT:
  T maps cos/sin products to cos/sin products with the same eigenvalue. So band k is
  T diag(G_k) T z with real matmuls. The W-axis transform, the mask and the W-axis inverse are
  one (W, W) matrix per (H-frequency u, band k), so the split is three matmuls: T_H over H, a
  batched (K*W, W) matmul per u, T_H over H again; about 2 H + 2 K (W + H) FLOPs per element
  instead of the dense operator's 2 K H W. `multipliers` are the effective G_k
  (`band_multipliers`). Layout: H leads during the transforms (every matmul is then a plain
  or batched GEMM), with one transpose in and one out.
  """
  z = jnp.asarray(z, jnp.float32)
  mult = np.asarray(multipliers, np.float64)
  batch, height, width, channels = z.shape
  num = mult.shape[0]
  if mult.shape[1:] != (height, width):
    raise ValueError(f"multipliers {mult.shape} do not match a {height}x{width} grid")
  if not (np.allclose(mult, mult[:, (-np.arange(height)) % height], atol=1e-12)
          and np.allclose(mult, mult[:, :, (-np.arange(width)) % width], atol=1e-12)):
    raise ValueError("split_bands_separable needs multipliers even in each frequency axis")
  tw = hartley_matrix(width)
  th = jnp.asarray(hartley_matrix(height), jnp.float32)
  # per_row[u] = stack_k T_W diag(G_k[u, :]) T_W: (H, K*W, W).
  per_row = np.einsum("wv,kuv,vy->ukwy", tw, mult, tw).reshape(height, num * width, width)
  per_row = jnp.asarray(per_row, jnp.float32)
  x = jnp.transpose(z, (1, 2, 0, 3)).reshape(height, width * batch * channels)
  # HIGHEST keeps float32 accuracy on TPU (default would be bf16 passes), as in the dense path.
  spec = jnp.matmul(th, x, precision=_HIGHEST).reshape(height, width, batch * channels)
  out = jnp.einsum("uyw,uwx->uyx", per_row, spec, precision=_HIGHEST)
  out = jnp.matmul(th, out.reshape(height, -1), precision=_HIGHEST)
  out = out.reshape(height, num, width, batch, channels)
  return jnp.transpose(out, (1, 3, 0, 2, 4))


# Grids with at most this many positions use the dense operator; larger ones the separable path.
# The dense einsum costs 2 K (HW)^2 FLOPs per channel against about 2 (H + K (H + W)) HW for the
# separable path, which also makes more passes over memory; see docs/speed.md for measurements.
DENSE_MAX_POSITIONS = 64
METHODS = ("matmul", "dense", "separable", "fft")


def fast_path(height: int, width: int) -> str:
  """The matmul path `method='matmul'` uses for an H x W grid: 'dense' or 'separable'."""
  return "dense" if height * width <= DENSE_MAX_POSITIONS else "separable"


@dataclasses.dataclass(frozen=True)
class BandProjector:
  """Fixed K-band radial split of an H x W grid (hashable; usable as a static jit argument).

  `band_split` chooses the projector of each split step: "lowpass" (default, disjoint annuli) or
  "residual_bandpass" (the literal reading); see docs/method.md#band-split. `method`: "matmul"
  (default: the faster matmul path for the grid size, `fast_path`), "dense", "separable", or
  "fft" (the literal reference).
  """

  height: int
  width: int
  num_bands: int = 4
  edges: tuple[float, ...] | None = None
  tau: float = 0.02
  method: str = "matmul"
  band_split: str = "lowpass"

  def __post_init__(self):
    """Validates the arguments and freezes the edges into a tuple."""
    if self.method not in METHODS:
      raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
    _check_band_split(self.band_split)
    if self.height < 1 or self.width < 1:
      raise ValueError(f"grid must be at least 1x1, got {self.height}x{self.width}")
    edges = _validate_band_args(self.num_bands, self.edges, self.tau)
    object.__setattr__(self, "edges", edges)

  def _masks64(self) -> np.ndarray:
    """Radial masks M_k in float64."""
    return radial_masks(self.height, self.width, self.num_bands, self.edges, self.tau)

  @functools.cached_property
  def masks(self) -> np.ndarray:
    """Radial masks M_k (the nominal annuli), (K, H, W) float32."""
    return self._masks64().astype(np.float32)

  @functools.cached_property
  def multipliers(self) -> np.ndarray:
    """Effective Fourier multipliers G_k of this split, (K, H, W) float64; they sum to 1."""
    return band_multipliers(self._masks64(), self.band_split)

  @functools.cached_property
  def operator(self) -> np.ndarray:
    """Real split operator (K, H*W, H*W) float32, built in float64 then rounded."""
    return band_operator(self._masks64(), self.band_split).astype(np.float32)

  def split(self, z: jax.Array, first_band: int = 0) -> jax.Array:
    """Splits z (B,H,W,C) into bands (K - first_band, B,H,W,C), float32."""
    if z.shape[1:3] != (self.height, self.width):
      raise ValueError(f"latent grid {z.shape[1:3]} != projector grid "
                       f"{(self.height, self.width)}")
    if not 0 <= first_band <= self.num_bands:
      raise ValueError(f"first_band must be in [0, {self.num_bands}], got {first_band}")
    if self.method == "fft":
      return split_bands_fft(z, self.masks, self.band_split)[first_band:]
    method = fast_path(self.height, self.width) if self.method == "matmul" else self.method
    # Only the requested bands are computed (e.g. noise for the high bands).
    if method == "separable":
      return split_bands_separable(z, self.multipliers[first_band:])
    return split_bands_matmul(z, self.operator[first_band:])


def inject_band_noise(bands: jax.Array, rng: jax.Array, projector: BandProjector,
                      tau_noise: float = 0.8, k_base: int = 1, p_band: float = 1.0,
                      deterministic: bool = False) -> jax.Array:
  """Adds band-limited Gaussian noise to bands k >= k_base (training only); (K,B,H,W,C)."""
  num_bands, batch = bands.shape[0], bands.shape[1]
  if num_bands != projector.num_bands:
    raise ValueError(f"{num_bands} bands but projector has {projector.num_bands}")
  if k_base < 0:
    raise ValueError(f"k_base must be >= 0, got {k_base}")
  if not 0.0 <= p_band <= 1.0:
    raise ValueError(f"p_band must be in [0, 1], got {p_band}")
  # Eval mode, or nothing to perturb: hand the bands back untouched.
  if deterministic or k_base >= num_bands:
    return bands
  key_sigma, key_mask, key_eps = jax.random.split(rng, 3)
  sigma = tau_noise * jax.random.uniform(key_sigma, (batch,), jnp.float32)
  keep = jax.random.bernoulli(key_mask, p_band, (num_bands - k_base, batch))
  scale = keep.astype(jnp.float32) * sigma[None, :]
  eps = jax.random.normal(key_eps, bands.shape[1:], jnp.float32)
  # Same projector on the noise, so each band's noise lives in that band's frequency support.
  eps_bands = projector.split(eps, first_band=k_base)
  noisy = bands[k_base:] + (scale[:, :, None, None, None] * eps_bands).astype(bands.dtype)
  # Semantic bands are concatenated back as-is (bit-identical), not perturbed by 0 * noise.
  return jnp.concatenate([bands[:k_base], noisy], axis=0)


# ---------------------------------------------------------------------------------------------
# Official-code recipe: DCT-II and zig-zag low-pass.
# ---------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _dct_matrix_cached(n: int) -> np.ndarray:
  """Cached float64 DCT-II matrix (read-only)."""
  k = np.arange(n)[:, None]
  i = np.arange(n)[None, :]
  mat = np.cos(np.pi / n * (i + 0.5) * k)
  mat[0] *= np.sqrt(1.0 / n)
  mat[1:] *= np.sqrt(2.0 / n)
  mat.setflags(write=False)
  return mat


def dct_matrix(n: int) -> np.ndarray:
  """Returns the orthonormal DCT-II matrix M[k, n] = c_k cos(pi/N (n + 0.5) k), float64 (N, N)."""
  if n < 1:
    raise ValueError(f"n must be >= 1, got {n}")
  return _dct_matrix_cached(int(n)).copy()


def dct2(z: jax.Array) -> jax.Array:
  """Orthonormal 2-D DCT-II over the H, W axes of (B,H,W,C): F = M_h X M_w^T, float32."""
  z = jnp.asarray(z, jnp.float32)
  mh = jnp.asarray(_dct_matrix_cached(z.shape[1]), jnp.float32)
  mw = jnp.asarray(_dct_matrix_cached(z.shape[2]), jnp.float32)
  out = jnp.einsum("kh,bhwc->bkwc", mh, z, precision=_HIGHEST)
  return jnp.einsum("lw,bkwc->bklc", mw, out, precision=_HIGHEST)


def idct2(f: jax.Array) -> jax.Array:
  """Inverse of dct2 over the H, W axes of (B,H,W,C): X = M_h^T F M_w, float32."""
  f = jnp.asarray(f, jnp.float32)
  mh = jnp.asarray(_dct_matrix_cached(f.shape[1]), jnp.float32)
  mw = jnp.asarray(_dct_matrix_cached(f.shape[2]), jnp.float32)
  out = jnp.einsum("kh,bkwc->bhwc", mh, f, precision=_HIGHEST)
  return jnp.einsum("lw,bhlc->bhwc", mw, out, precision=_HIGHEST)


def zigzag_order(height: int, width: int) -> np.ndarray:
  """Returns flat indices ky*W + kx of all DCT positions in the official (transposed) zig-zag."""
  order = []
  for s in range(height + width - 1):
    # Valid rows on the anti-diagonal ky + kx = s (clipped to the grid).
    rows = range(max(0, s - width + 1), min(s, height - 1) + 1)
    # Even s: from (ky=0, kx=s) towards (ky=s, kx=0); odd s: the reverse. Transpose of JPEG.
    rows = rows if s % 2 == 0 else reversed(rows)
    order.extend(ky * width + (s - ky) for ky in rows)
  return np.asarray(order, np.int64)


def zigzag_rank(height: int, width: int) -> np.ndarray:
  """Returns the (H, W) int array giving each DCT position's rank in the zig-zag order."""
  rank = np.empty(height * width, np.int64)
  rank[zigzag_order(height, width)] = np.arange(height * width)
  return rank.reshape(height, width)


def dct_lowpass(z: jax.Array, keep) -> jax.Array:
  """Keeps the first `keep` (int or per-sample (B,) ints) zig-zag DCT coefficients of z."""
  z = jnp.asarray(z, jnp.float32)
  rank = jnp.asarray(zigzag_rank(z.shape[1], z.shape[2]), jnp.int32)
  keep = jnp.asarray(keep, jnp.int32)
  if keep.ndim == 0:
    keep = keep[None]
  elif keep.shape != (z.shape[0],):
    raise ValueError(f"keep must be a scalar or shape ({z.shape[0]},), got {keep.shape}")
  # Hard binary mask, identical for every channel (official `reorder_1d` low mode).
  mask = (rank[None, :, :] < keep[:, None, None]).astype(jnp.float32)[..., None]
  return idct2(dct2(z) * mask)


def official_keep_counts(rng: jax.Array, batch_size: int, train: bool, count: int,
                         count_min: int, count_max: int, apply_prob: float,
                         per_sample: bool = True, uniform: bool = True):
  """Draws the official mask decision: (apply: bool scalar, keep: (B,) int32)."""
  if count_min > count_max:
    raise ValueError(f"count_min {count_min} > count_max {count_max}")
  if not train:
    # Eval mode: no coin, deterministic keep = count; the official code does this in every eval-mode
    # forward (docs/method.md#official-quirks).
    return jnp.asarray(True), jnp.full((batch_size,), count, jnp.int32)
  key_coin, key_keep = jax.random.split(rng)
  # One coin per batch: the official code skips the mask iff rand(()) >= apply_prob.
  apply = jax.random.uniform(key_coin, ()) < apply_prob
  if uniform:
    shape = (batch_size,) if per_sample else ()
    keep = jax.random.randint(key_keep, shape, count_min, count_max + 1, jnp.int32)
    keep = jnp.broadcast_to(keep, (batch_size,))
  else:
    # Not used by any official config; assumed to fall back to the fixed count.
    keep = jnp.full((batch_size,), count, jnp.int32)
  return apply, keep


def official_band_mask(z: jax.Array, rng: jax.Array, train: bool, count: int, count_min: int,
                       count_max: int, apply_prob: float, per_sample: bool = True,
                       uniform: bool = True, enabled: bool = True) -> jax.Array:
  """Official-code frequency module on z (B,H,W,C): random (train) or fixed (eval) DCT low-pass."""
  if not enabled:
    return z
  apply, keep = official_keep_counts(rng, z.shape[0], train, count, count_min, count_max,
                                     apply_prob, per_sample, uniform)
  out = dct_lowpass(z, keep)
  if not train:
    return out
  # A select (not a cond) keeps it vmap/sharding friendly; the skipped branch is exactly z.
  return jnp.where(apply, out, jnp.asarray(z, jnp.float32))
