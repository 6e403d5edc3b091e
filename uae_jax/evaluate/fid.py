"""Frechet Inception Distance: feature statistics, the Frechet distance, reference-stat files.

* `frechet_distance(mu1, sigma1, mu2, sigma2)`: float64, `scipy.linalg.sqrtm`, with pytorch-fid's
  safeguards: if sqrt(sigma1 sigma2) is not finite (near-singular product) `eps` is added to both
  diagonals and it is recomputed; a complex result whose diagonal has imaginary parts above 1e-3 is
  an error, smaller imaginary parts (round-off) are dropped.
* `FeatureStats`: running float64 sums (n, sum f, sum f f^T) that merge across batches and
  processes; `mean_cov()` gives mu and the unbiased covariance (`np.cov(rowvar=False)`, as
  pytorch-fid).
  `batch_sums` is the jittable per-batch part (masked sums in float32 at HIGHEST precision; the
  batch-to-batch accumulation happens in float64 on the host).
* `save_stats` / `load_stats`: `.npz` with `mu`, `sigma` (the pytorch-fid / ADM layout) and `n`.
* `InceptionFID`: Inception features of [0,1] images under a batch sharding, with their stats;
  `preprocessing='pytorch-fid'` (default) or 'tf1' (ADM / torch-fidelity input transform).

rFID in this project = FID between the Inception statistics of the reconstructions (quantised to
uint8 levels like saved PNGs) and those of the reference images, as the official code does with
torch-fidelity (image set vs image set); `fid-stats` precomputes the reference side once.
"""
from __future__ import annotations

import dataclasses
import os
import zipfile
from typing import Any, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np
import scipy.linalg

from uae_jax.errors import LoadError
from uae_jax.evaluate import inception as inception_lib

_HIGHEST = jax.lax.Precision.HIGHEST


def _trace_sqrt_product_eigh(s1: np.ndarray, s2: np.ndarray) -> float:
  """Tr sqrt(s1 s2) from symmetric eigendecompositions (s1 s2 ~ s1^1/2 s2 s1^1/2, both PSD)."""
  w, v = scipy.linalg.eigh(s1)
  root = (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T
  eig = scipy.linalg.eigvalsh(root @ s2 @ root)
  # Round-off can make zero eigenvalues of a rank-deficient product slightly negative.
  return float(np.sum(np.sqrt(np.clip(eig, 0.0, None))))


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6, method: str = "sqrtm") -> float:
  """d^2 = ||mu1 - mu2||^2 + Tr(sigma1 + sigma2 - 2 sqrt(sigma1 sigma2)), in float64.

  method='sqrtm' (default) is pytorch-fid's computation (`scipy.linalg.sqrtm`, ~20 s for 2048-d on
  2 CPU cores); 'eigh' computes the same trace from two symmetric eigendecompositions (~3x faster
  and free of spurious imaginary parts; equal up to round-off, see tests/test_evaluate.py).
  """
  mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
  s1 = np.atleast_2d(np.asarray(sigma1, np.float64))
  s2 = np.atleast_2d(np.asarray(sigma2, np.float64))
  if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (mu1.size, mu1.size):
    raise ValueError(f"inconsistent statistics: mu {mu1.shape} vs {mu2.shape}, sigma {s1.shape} "
                     f"vs {s2.shape}")
  diff = mu1 - mu2
  if method == "eigh":
    tr_covmean = _trace_sqrt_product_eigh(s1, s2)
  elif method == "sqrtm":
    covmean = scipy.linalg.sqrtm(s1.dot(s2))
    if not np.isfinite(covmean).all():
      # Near-singular product (e.g. fewer samples than dimensions): regularise as pytorch-fid does.
      offset = np.eye(s1.shape[0]) * eps
      covmean = scipy.linalg.sqrtm((s1 + offset).dot(s2 + offset))
    if np.iscomplexobj(covmean):
      if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
        raise ValueError(f"sqrtm has an imaginary component of {np.max(np.abs(covmean.imag)):.3g}")
      covmean = covmean.real
    tr_covmean = float(np.trace(covmean))
  else:
    raise ValueError(f"method must be 'sqrtm' or 'eigh', got {method!r}")
  return float(diff.dot(diff) + np.trace(s1) + np.trace(s2) - 2.0 * tr_covmean)


def batch_sums(features: jax.Array, mask: Optional[jax.Array] = None) -> dict:
  """Jittable masked sums of one batch: {'n', 'sum' (D,), 'outer' (D, D)} in float32."""
  f = jnp.asarray(features, jnp.float32)
  w = jnp.ones(f.shape[:1], jnp.float32) if mask is None else jnp.asarray(mask, jnp.float32)
  fw = f * w[:, None]
  return {"n": jnp.sum(w), "sum": jnp.sum(fw, axis=0),
          "outer": jnp.einsum("bi,bj->ij", fw, f, precision=_HIGHEST)}


@dataclasses.dataclass
class FeatureStats:
  """Running float64 sums of features; merge() combines shards, mean_cov() finishes them."""
  n: float = 0.0
  total: Optional[np.ndarray] = None
  outer: Optional[np.ndarray] = None

  def add_sums(self, sums: Mapping[str, Any]) -> "FeatureStats":
    """Adds the output of `batch_sums` (host or device arrays)."""
    s = np.asarray(sums["sum"], np.float64)
    o = np.asarray(sums["outer"], np.float64)
    self.n += float(np.asarray(sums["n"]))
    self.total = s if self.total is None else self.total + s
    self.outer = o if self.outer is None else self.outer + o
    return self

  def add_features(self, features, mask=None) -> "FeatureStats":
    """Adds host features (N, D) exactly in float64."""
    f = np.asarray(features, np.float64)
    if mask is not None:
      f = f[np.asarray(mask, bool)]
    return self.add_sums({"n": f.shape[0], "sum": f.sum(0), "outer": f.T @ f})

  def merge(self, other: "FeatureStats") -> "FeatureStats":
    """Sum of two accumulators (e.g. from different processes)."""
    out = FeatureStats(self.n, self.total, self.outer)
    if other.total is not None:
      out.add_sums({"n": other.n, "sum": other.total, "outer": other.outer})
    return out

  def mean_cov(self) -> tuple:
    """(mu (D,), sigma (D, D)) with the unbiased (n - 1) covariance, float64."""
    if self.total is None or self.n < 2:
      raise ValueError(f"need at least 2 feature vectors for a covariance, have {self.n:g}")
    mu = self.total / self.n
    sigma = (self.outer - self.n * np.outer(mu, mu)) / (self.n - 1.0)
    return mu, 0.5 * (sigma + sigma.T)


def save_stats(path: str, mu, sigma, n: Optional[int] = None) -> None:
  """Writes {'mu', 'sigma'[, 'n']} to an .npz (loadable by pytorch-fid as well)."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  extra = {} if n is None else {"n": np.int64(n)}
  with open(path, "wb") as f:  # a file object: np.savez would otherwise append '.npz'
    np.savez(f, mu=np.asarray(mu, np.float64), sigma=np.asarray(sigma, np.float64), **extra)


def check_stats(path: str, mu, sigma, names=("mu", "sigma"), dim: Optional[int] = None) -> tuple:
  """Validated float64 (mu, sigma): 1-D mu, square sigma of matching size, all finite."""
  mu, sigma = np.asarray(mu), np.asarray(sigma)
  for name, a in zip(names, (mu, sigma)):
    if not (np.issubdtype(a.dtype, np.floating) or np.issubdtype(a.dtype, np.integer)):
      raise LoadError(f"{path}: '{name}' has dtype {a.dtype}; expected floating point statistics")
  if mu.ndim != 1 or sigma.shape != (mu.size, mu.size):
    raise LoadError(f"{path}: '{names[1]}' {sigma.shape} does not match '{names[0]}' {mu.shape} "
                    f"(expected (D,) and (D, D))")
  if dim is not None and mu.size != dim:
    raise LoadError(f"{path}: '{names[0]}' has {mu.size} dimensions; expected {dim}")
  for name, a in zip(names, (mu, sigma)):
    if not np.all(np.isfinite(a)):
      raise LoadError(f"{path}: '{name}' contains {int(np.sum(~np.isfinite(a)))} NaN/inf values")
  return mu.astype(np.float64), sigma.astype(np.float64)


def load_stats(path: str) -> tuple:
  """(mu, sigma) from an .npz written by `save_stats`, pytorch-fid or ADM (`mu`, `sigma` keys)."""
  if not os.path.exists(path):
    raise LoadError(f"{path}: no such statistics file")
  try:
    with np.load(path, allow_pickle=False) as z:
      if "mu" not in z.files or "sigma" not in z.files:
        raise LoadError(f"{path}: expected arrays 'mu' and 'sigma', found {z.files}")
      mu, sigma = z["mu"], z["sigma"]
  except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
    if isinstance(e, LoadError):
      raise
    raise LoadError(f"{path}: not a readable .npz ({type(e).__name__}: {e})") from None
  return check_stats(path, mu, sigma)


def _as_model_input(x):
  """uint8 images stay uint8 (the Inception preprocessing scales them); floats -> float32."""
  x = jnp.asarray(x)
  return x if x.dtype == jnp.uint8 else x.astype(jnp.float32)


class InceptionFID:
  """FID Inception features and statistics of [0,1] image batches, under an optional sharding.

  `reference`: (mu, sigma) of the reference set (e.g. from `load_stats`) or None, in which case the
  caller accumulates reference statistics itself (the evaluator does so from its eval images).
  """

  def __init__(self, variables: Mapping, reference: Optional[tuple] = None,
               replicated: Optional[jax.sharding.Sharding] = None, method: str = "sqrtm",
               preprocessing: str = "pytorch-fid"):
    """Places the variables (replicated if given a sharding) and jits the feature functions."""
    self.method = method
    self.preprocessing = inception_lib.check_preprocessing(preprocessing)
    self.variables = variables if replicated is None else jax.device_put(variables, replicated)
    self.reference = reference
    model = inception_lib.FIDInception(preprocessing=preprocessing,
                                       with_logits=inception_lib.has_logits(variables))
    self.features = jax.jit(lambda v, x: model.apply(v, _as_model_input(x)))
    # The sums are their own small program on the features: the network compiles once, as
    # `features`, whether a caller wants features or statistics.
    self._sums = jax.jit(batch_sums, out_shardings=replicated)

  @classmethod
  def from_files(cls, inception_path: str, stats_path: Optional[str] = None,
                 replicated: Optional[jax.sharding.Sharding] = None,
                 method: str = "sqrtm", preprocessing: str = "pytorch-fid") -> "InceptionFID":
    """Loads Inception weights (and reference statistics, if a path is given).

    `preprocessing`: 'pytorch-fid' (today's default) or 'tf1' (the ADM / torch-fidelity input
    transform, i.e. the official UAE rFID); see `inception.preprocess`.
    """
    ref = load_stats(stats_path) if stats_path else None
    return cls(inception_lib.load_inception(inception_path), ref, replicated, method,
               preprocessing)

  def batch_sums(self, images: jax.Array, mask: jax.Array) -> dict:
    """Masked feature sums of one (global) batch (uint8, or float in [0, 1]), replicated."""
    return self._sums(self.features(self.variables, images), mask)

  def distance(self, stats: FeatureStats, reference: Optional[tuple] = None) -> float:
    """FID of accumulated statistics against `reference` (default: the stored one)."""
    ref = reference if reference is not None else self.reference
    if ref is None:
      raise ValueError("no reference statistics")
    mu, sigma = stats.mean_cov()
    return frechet_distance(mu, sigma, *ref, method=self.method)
