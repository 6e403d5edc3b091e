"""Generation metrics as OpenAI's ADM evaluator computes them: FID, sFID, IS, precision, recall.

The ADM suite (guided-diffusion `evaluations/evaluator.py`, used by ADM, DiT, LightningDiT, RAE,
REPA-E and UAE for their ImageNet numbers) scores an `.npz` of uint8 samples (`arr_0`,
(N, H, W, 3)) against a reference batch such as `VIRTUAL_imagenet256_labeled.npz` (10k images in
`arr_0` plus precomputed `mu`/`sigma` and `mu_s`/`sigma_s`). Its definitions, reproduced here:

* features: the TF FID Inception-v3 graph (weights 2015-12-05), its own TF1 bilinear resize to 299
  and `(x - 128) / 128` (our `preprocessing='tf1'`); 'pool' = 2048-d `pool_3`; 'spatial' = the
  first 7 channels of `mixed_6/conv` (17 x 17), flattened in (H, W, C) order -> 2023-d;
  'logits' = pool_3 @ W of `softmax/logits` (1008 classes, no bias).
* FID / sFID: Frechet distance of the pool / spatial statistics (mean, unbiased covariance) of the
  samples against the reference's precomputed ones (computed from its images if absent).
* IS: softmax over the 1008 logits; the samples in consecutive splits of 5000 (10 splits for 50k);
  per split exp(mean_i KL(p_i || mean p)); the mean over splits (we also report the std).
* precision / recall (Kynkaenniemi et al. 2019, k = 3): squared Euclidean distances of pool
  features `max(|u|^2 - 2 u.v + |v|^2, 0)`; the radius of each point is the distance to its k-th
  nearest neighbour within its own set (the (k+1)-th smallest distance of its row, self included,
  so duplicates count as neighbours, as ADM's `np.partition`); a sample is "in" the reference
  manifold if its distance to some reference point is <= that point's radius (ties count as in).
  Precision = fraction of samples in the reference manifold; recall = fraction of reference images
  in the sample manifold. ADM evaluates distances in float16 first and falls back to float32 only
  if a block overflows; we use float32 by default (`distance_dtype='float16'` imitates ADM's first
  attempt), which moves borderline points by float16 rounding only.

Everything runs under `jax.jit` over a 1-D mesh of all devices (all processes): image batches are
split over devices, each process reading only its rows of the `.npz`; the k-NN searches shard
their rows over devices and stream the other set in column chunks (memory O(rows x chunk)).
Per-sample features come back to every host as float32 (~1 GB for 50k samples), and every
statistic is accumulated in float64 on the host. Results do not depend on the number of
processes or devices (tests/test_gen_eval.py runs 2 processes against 1).
"""
from __future__ import annotations

import dataclasses
import os
import time
import zipfile
from typing import Any, Callable, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from uae_jax.errors import LoadError
from uae_jax.evaluate import fid as fid_lib
from uae_jax.evaluate import inception as inception_lib

ADM_IS_SPLIT_SIZE = 5000
ADM_K = 3
AXIS = "batch"
_HIGHEST = jax.lax.Precision.HIGHEST
_NPZ_ERRORS = (OSError, EOFError, ValueError, zipfile.BadZipFile, zipfile.LargeZipFile)


# ------------------------------------------------------------------------------------------------
# Reading .npz files: streamed image arrays and validated statistics.


def _read_npy_header(f) -> tuple:
  """(shape, fortran_order, dtype) of the .npy stream `f` (positioned at its start)."""
  version = np.lib.format.read_magic(f)
  if version == (1, 0):
    return np.lib.format.read_array_header_1_0(f)
  if version == (2, 0):
    return np.lib.format.read_array_header_2_0(f)
  raise ValueError(f"unsupported .npy format version {version}")


class NpzImages:
  """A uint8 (N, H, W, 3) array inside an .npz, read in row ranges without loading it whole."""

  def __init__(self, path: str, key: str = "arr_0"):
    """Opens `path`, validates the header of `key` and the member size."""
    self.path, self.key = path, key
    if not os.path.exists(path):
      raise LoadError(f"{path}: no such file")
    try:
      self._zip = zipfile.ZipFile(path)
    except _NPZ_ERRORS as e:
      raise LoadError(f"{path}: not a readable .npz (truncated or corrupt zip: {e})") from None
    names = [n[:-4] for n in self._zip.namelist() if n.endswith(".npy")]
    if key not in names:
      self._zip.close()
      raise LoadError(f"{path}: no array '{key}' (found {names}); expected uint8 images "
                      "(N, H, W, 3) under 'arr_0' as written by the ADM/RAE samplers")
    try:
      self._f = self._zip.open(key + ".npy")
      shape, fortran, dtype = _read_npy_header(self._f)
    except _NPZ_ERRORS as e:
      self.close()
      raise LoadError(f"{path}: '{key}' is unreadable ({e})") from None
    self._check(shape, fortran, dtype)
    self.shape = tuple(int(s) for s in shape)
    self._data_start = self._f.tell()
    self._row_bytes = int(np.prod(self.shape[1:]))
    size = self._zip.getinfo(key + ".npy").file_size
    if size < self._data_start + self.shape[0] * self._row_bytes:
      self.close()
      raise LoadError(f"{path}: '{key}' is truncated: its header promises {self.shape} but the "
                      f"member holds only {size - self._data_start} data bytes")

  def _check(self, shape, fortran, dtype):
    """Refuses anything but C-ordered uint8 (N, H, W, 3) with N, H, W > 0."""
    what = f"{self.path}: '{self.key}' has"
    if np.dtype(dtype) != np.uint8:
      self.close()
      raise LoadError(f"{what} dtype {np.dtype(dtype)}; expected uint8 images (0..255) as the "
                      "ADM evaluator reads them")
    if len(shape) != 4 or shape[-1] != 3 or min(shape) <= 0:
      self.close()
      raise LoadError(f"{what} shape {tuple(shape)}; expected (N, H, W, 3) RGB images")
    if fortran:
      self.close()
      raise LoadError(f"{what} Fortran order; expected a C-ordered array")

  def __len__(self) -> int:
    """Number of images."""
    return self.shape[0]

  def read(self, start: int, stop: int) -> np.ndarray:
    """Rows [start, stop) as a (stop - start, H, W, 3) uint8 array."""
    n = stop - start
    try:
      self._f.seek(self._data_start + start * self._row_bytes)
      buf = self._f.read(n * self._row_bytes)
    except _NPZ_ERRORS as e:
      raise LoadError(f"{self.path}: '{self.key}' rows {start}:{stop} are unreadable ({e})") \
          from None
    if len(buf) != n * self._row_bytes:
      raise LoadError(f"{self.path}: '{self.key}' is truncated at row {start}")
    return np.frombuffer(buf, np.uint8).reshape((n,) + self.shape[1:])

  def close(self):
    """Closes the underlying zip file."""
    if getattr(self, "_f", None) is not None:
      self._f.close()
    self._zip.close()


def npz_keys(path: str) -> list:
  """Array names in an .npz, or a LoadError naming the file."""
  if not os.path.exists(path):
    raise LoadError(f"{path}: no such file")
  try:
    with zipfile.ZipFile(path) as z:
      return [n[:-4] for n in z.namelist() if n.endswith(".npy")]
  except _NPZ_ERRORS as e:
    raise LoadError(f"{path}: not a readable .npz (truncated or corrupt zip: {e})") from None


def _read_arrays(path: str, keys: Sequence[str]) -> dict:
  """{key: array} for the given keys of an .npz (no pickles), errors naming the file."""
  try:
    with np.load(path, allow_pickle=False) as z:
      return {k: np.asarray(z[k]) for k in keys}
  except _NPZ_ERRORS as e:
    raise LoadError(f"{path}: arrays {list(keys)} are unreadable ({type(e).__name__}: {e})") \
        from None


def label_summary(path: str) -> Optional[dict]:
  """Class-label counts of a sample .npz ('arr_1', as ADM's sampler writes) or None."""
  if "arr_1" not in npz_keys(path):
    return None
  labels = _read_arrays(path, ["arr_1"])["arr_1"]
  if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
    return None
  counts = np.bincount(labels.astype(np.int64) - labels.min()) if labels.size else np.zeros(0)
  counts = counts[counts > 0]
  equal = bool(counts.size and counts.min() == counts.max())
  return {"num_classes": int(counts.size), "min_per_class": int(counts.min(initial=0)),
          "max_per_class": int(counts.max(initial=0)),
          "sampling": (f"equal ({int(counts.max())} per class)" if equal else "unequal")}


@dataclasses.dataclass
class Reference:
  """A reference batch: statistics (precomputed or None) and/or its images."""
  path: str
  pool_stats: Optional[tuple]      # (mu (2048,), sigma) float64, from the file
  spatial_stats: Optional[tuple]   # (mu_s (2023,), sigma_s) float64, from the file
  images: Optional[NpzImages]

  def close(self):
    """Closes the image reader, if any."""
    if self.images is not None:
      self.images.close()


def load_reference(path: str) -> Reference:
  """Reads an ADM reference batch, our `fid-stats` output or a plain image .npz, validated."""
  keys = npz_keys(path)
  pairs = {"pool": ("mu", "sigma", inception_lib.FEATURE_DIM),
           "spatial": ("mu_s", "sigma_s", inception_lib.SPATIAL_DIM)}
  stats = {}
  for kind, (m, s, dim) in pairs.items():
    if (m in keys) != (s in keys):
      have, miss = (m, s) if m in keys else (s, m)
      raise LoadError(f"{path}: has '{have}' but no '{miss}'")
    if m in keys:
      arrays = _read_arrays(path, [m, s])
      stats[kind] = fid_lib.check_stats(path, arrays[m], arrays[s], (m, s), dim)
  images = NpzImages(path, "arr_0") if "arr_0" in keys else None
  if not stats and images is None:
    raise LoadError(f"{path}: neither statistics ('mu'/'sigma') nor images ('arr_0'); found "
                    f"{keys}")
  return Reference(path, stats.get("pool"), stats.get("spatial"), images)


# ------------------------------------------------------------------------------------------------
# Metrics on features (host side): statistics, Inception Score.


def mean_cov(features: np.ndarray, chunk: int = 4096) -> tuple:
  """(mu, sigma) in float64 (unbiased covariance, = np.cov(rowvar=False)), in row chunks."""
  stats = fid_lib.FeatureStats()
  for i in range(0, len(features), chunk):
    stats.add_features(features[i:i + chunk])
  return stats.mean_cov()


def inception_score(logits: np.ndarray, split_size: Optional[int] = ADM_IS_SPLIT_SIZE,
                    num_splits: int = 10) -> tuple:
  """(mean, std) over splits of exp(E_x KL(p(y|x) || p(y))), in float64.

  `split_size` set: consecutive chunks of that many samples (ADM: 5000); None: `num_splits`
  near-equal parts with boundaries i * N // num_splits (improved-GAN / torch-fidelity).
  """
  x = np.asarray(logits, np.float64)
  if x.ndim != 2 or len(x) == 0:
    raise ValueError(f"logits must be (N, classes) with N > 0, got {x.shape}")
  m = x.max(axis=1, keepdims=True)
  logp = x - m - np.log(np.sum(np.exp(x - m), axis=1, keepdims=True))
  n = len(x)
  if split_size:
    bounds = [(i, min(i + split_size, n)) for i in range(0, n, split_size)]
  else:
    bounds = [(i * n // num_splits, (i + 1) * n // num_splits) for i in range(num_splits)]
  scores = []
  for lo, hi in bounds:
    lp = logp[lo:hi]
    p = np.exp(lp)
    with np.errstate(divide="ignore"):
      logq = np.log(p.mean(axis=0, keepdims=True))
    # p log(p / q) with 0 log 0 = 0 (a class no sample of the split predicts has q = 0).
    with np.errstate(invalid="ignore"):
      kl = np.where(p > 0, p * (lp - logq), 0.0).sum(axis=1).mean()
    scores.append(np.exp(kl))
  return float(np.mean(scores)), float(np.std(scores))


# ------------------------------------------------------------------------------------------------
# Device side: the mesh, sharded k-NN precision/recall.


def make_mesh(devices: Optional[Sequence[Any]] = None) -> Mesh:
  """A 1-D ('batch',) mesh over all devices of all processes (Auto axis)."""
  devices = list(devices if devices is not None else jax.devices())
  return Mesh(np.asarray(devices), (AXIS,), axis_types=(AxisType.Auto,))


def _global_from_host(host: np.ndarray, sharding: NamedSharding) -> jax.Array:
  """A global array from a host array that every process holds in full."""
  return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])


def squared_distances(a: jax.Array, b: jax.Array, dtype=jnp.float32) -> jax.Array:
  """ADM's pairwise squared Euclidean distances max(|a|^2 - 2 a.b + |b|^2, 0), as float32."""
  u, v = a.astype(dtype), b.astype(dtype)
  nu = jnp.sum(u * u, axis=1)[:, None]
  nv = jnp.sum(v * v, axis=1)[None, :]
  d = jnp.maximum(nu - 2 * jnp.matmul(u, v.T, precision=_HIGHEST) + nv, 0)
  if dtype != jnp.float32:
    # ADM: the float16 block is used only if it is finite everywhere, else recomputed in float32
    # from the original features.
    d32 = squared_distances(a.astype(jnp.float32), b.astype(jnp.float32))
    d = jnp.where(jnp.all(jnp.isfinite(d)), d.astype(jnp.float32), d32)
  return d


def _kth_smallest(rows, cols, valid, k: int, dtype):
  """Per row: the (k+1)-th smallest squared distance to the valid columns (self included)."""
  def body(best, xs):
    """Merges one column chunk into the running k+1 smallest distances."""
    c, v = xs
    d = jnp.where(v[None, :], squared_distances(rows, c, dtype), jnp.inf)
    best = -jax.lax.top_k(-jnp.concatenate([best, d], axis=1), k + 1)[0]
    return best, None
  init = jnp.full((rows.shape[0], k + 1), jnp.inf, jnp.float32)
  best, _ = jax.lax.scan(body, init, (cols, valid))
  return best[:, k]


def _covered(rows, cols, radii, valid, dtype):
  """Per row: is it within the radius of some valid column point (distance <= radius)?"""
  def body(acc, xs):
    """ORs in the rows covered by one column chunk."""
    c, r, v = xs
    hit = (squared_distances(rows, c, dtype) <= r[None, :]) & v[None, :]
    return acc | jnp.any(hit, axis=1), None
  acc, _ = jax.lax.scan(body, jnp.zeros((rows.shape[0],), bool), (cols, radii, valid))
  return acc


class ManifoldPR:
  """Kynkaenniemi precision/recall with ADM's conventions, rows sharded over the mesh."""

  def __init__(self, mesh: Mesh, k: int = ADM_K, chunk: int = 1024,
               distance_dtype: str = "float32"):
    """Builds the two jitted kernels (radii, coverage) for `mesh`."""
    if distance_dtype not in ("float32", "float16"):
      raise ValueError(f"distance_dtype must be 'float32' or 'float16', got {distance_dtype!r}")
    self.mesh, self.k, self.chunk = mesh, int(k), int(chunk)
    self.distance_dtype = distance_dtype
    dtype = jnp.float16 if distance_dtype == "float16" else jnp.float32
    self.rows_sh = NamedSharding(mesh, P(AXIS))
    self.rep = NamedSharding(mesh, P())
    self._radii = jax.jit(lambda r, c, v: _kth_smallest(r, c, v, self.k, dtype),
                          out_shardings=self.rep)
    self._covered = jax.jit(lambda r, c, rad, v: _covered(r, c, rad, v, dtype),
                            out_shardings=self.rep)

  def _rows(self, x: np.ndarray) -> tuple:
    """Rows padded to a multiple of the device count, as a row-sharded global array."""
    n = len(x)
    pad = -n % self.mesh.size
    x = np.concatenate([x, np.zeros((pad, x.shape[1]), x.dtype)]) if pad else x
    return _global_from_host(np.ascontiguousarray(x, np.float32), self.rows_sh), n

  def _cols(self, x: np.ndarray, extra: Optional[np.ndarray] = None) -> tuple:
    """Columns padded to whole chunks and reshaped (chunks, chunk, ...), replicated; + mask."""
    n = len(x)
    chunk = min(self.chunk, max(n, 1))
    pad = -n % chunk
    valid = np.arange(n + pad) < n
    xs = [np.concatenate([a, np.zeros((pad,) + a.shape[1:], a.dtype)]) for a in (x, extra)
          if a is not None]
    out = [_global_from_host(a.reshape((-1, chunk) + a.shape[1:]), self.rep)
           for a in xs + [valid]]
    return out

  def radii(self, features: np.ndarray) -> np.ndarray:
    """(N,) float32 k-NN radii (squared distances) of a feature set within itself."""
    f = np.asarray(features, np.float32)
    if len(f) <= self.k:
      raise ValueError(f"precision/recall need more than k={self.k} points, got {len(f)}")
    rows, n = self._rows(f)
    cols, valid = self._cols(f)
    return np.asarray(jax.device_get(self._radii(rows, cols, valid)))[:n]

  def coverage(self, rows: np.ndarray, cols: np.ndarray, col_radii: np.ndarray) -> np.ndarray:
    """(len(rows),) bool: row i lies within the radius of some column point."""
    r, n = self._rows(np.asarray(rows, np.float32))
    c, rad, valid = self._cols(np.asarray(cols, np.float32), np.asarray(col_radii, np.float32))
    return np.asarray(jax.device_get(self._covered(r, c, rad, valid)))[:n]

  def __call__(self, real: np.ndarray, fake: np.ndarray) -> tuple:
    """(precision, recall) of samples `fake` against reference features `real`."""
    r_real, r_fake = self.radii(real), self.radii(fake)
    precision = float(np.mean(self.coverage(fake, real, r_real)))
    recall = float(np.mean(self.coverage(real, fake, r_fake)))
    return precision, recall


# ------------------------------------------------------------------------------------------------
# Sharded Inception features of an image .npz.


class GenFeatureExtractor:
  """Pool (2048), spatial (2023) and logits (1008) features of uint8 images, batch-sharded."""

  def __init__(self, variables: Mapping, preprocessing: str = "tf1",
               per_device_batch: int = 32, mesh: Optional[Mesh] = None):
    """Places the variables replicated and jits the forward for `mesh` (default: all)."""
    self.mesh = mesh if mesh is not None else make_mesh()
    self.preprocessing = inception_lib.check_preprocessing(preprocessing)
    self.with_logits = inception_lib.has_logits(variables)
    self.batch = int(per_device_batch) * self.mesh.size
    self.batch_sh = NamedSharding(self.mesh, P(AXIS))
    self.rep = NamedSharding(self.mesh, P())
    self.variables = jax.tree.map(lambda a: _global_from_host(np.asarray(a), self.rep),
                                  variables)
    model = inception_lib.FIDInception(preprocessing=preprocessing, with_logits=self.with_logits)

    def forward(v, images):
      """The three feature sets of one global batch."""
      out = model.apply(v, images, return_blocks=True)
      res = {"pool": out["pool"], "spatial": out["spatial"].reshape(images.shape[0], -1)}
      if self.with_logits:
        res["logits"] = out["logits"]
      return res

    # Replicated outputs: every process receives the whole batch's features, in sample order.
    self._forward = jax.jit(forward, in_shardings=(self.rep, self.batch_sh),
                            out_shardings=self.rep)

  def local_rows(self, image_shape: tuple) -> tuple:
    """[lo, hi) of a global batch that this process's devices hold (contiguous)."""
    idx = self.batch_sh.addressable_devices_indices_map((self.batch,) + tuple(image_shape))
    starts = [s[0].start or 0 for s in idx.values()]
    stops = [self.batch if s[0].stop is None else s[0].stop for s in idx.values()]
    lo, hi = min(starts), max(stops)
    if hi - lo != sum(b - a for a, b in set(zip(starts, stops))):
      raise RuntimeError("this process's devices do not hold a contiguous part of the batch")
    return lo, hi

  def lower(self, image_shape: tuple):
    """The jitted forward lowered for one global batch of `image_shape` (for cost analysis)."""
    x = jax.ShapeDtypeStruct((self.batch,) + tuple(image_shape), jnp.uint8,
                             sharding=self.batch_sh)
    return self._forward.lower(self.variables, x)

  def _global_batch(self, images: NpzImages, start: int, lo: int, hi: int) -> jax.Array:
    """Global batch starting at sample `start`; this process reads only its rows (zero pad)."""
    n = len(images)
    local = np.zeros((hi - lo,) + images.shape[1:], np.uint8)
    a, b = min(start + lo, n), min(start + hi, n)
    if b > a:
      local[:b - a] = images.read(a, b)
    return jax.make_array_from_process_local_data(self.batch_sh, local,
                                                  (self.batch,) + images.shape[1:])

  def __call__(self, images: NpzImages, desc: str = "features", progress: bool = True,
               limit: int = 0) -> dict:
    """{'pool', 'spatial'[, 'logits']}: float32 host arrays of the first `limit` (0 = all)."""
    from tqdm.auto import tqdm
    n = len(images) if not limit else min(limit, len(images))
    lo, hi = self.local_rows(images.shape[1:])
    out = {k: [] for k in ("pool", "spatial") + (("logits",) if self.with_logits else ())}
    bar = tqdm(total=n, desc=desc, unit="img", disable=not progress or jax.process_index() != 0)
    pending = None

    def collect(result, count):
      """Appends the valid rows of a finished batch to the host lists."""
      for k, v in jax.device_get(result).items():
        out[k].append(np.asarray(v[:count], np.float32))
      bar.update(count)

    for start in range(0, n, self.batch):
      result = self._forward(self.variables, self._global_batch(images, start, lo, hi))
      if pending is not None:  # fetch the previous batch while this one runs (async dispatch)
        collect(*pending)
      pending = (result, min(self.batch, n - start))
    if pending is not None:
      collect(*pending)
    bar.close()
    return {k: np.concatenate(v) if v else np.zeros((0, 1), np.float32) for k, v in out.items()}


# ------------------------------------------------------------------------------------------------
# Reference features: computed once per (file, weights, preprocessing) and cached.


def reference_cache_path(ref_path: str, fingerprint: str, preprocessing: str,
                         cache_dir: str = "") -> str:
  """Where the features of a reference batch are cached (next to it unless `cache_dir`)."""
  folder = cache_dir or os.path.dirname(os.path.abspath(ref_path))
  return os.path.join(folder, f"{os.path.basename(ref_path)}.{preprocessing}.{fingerprint}"
                              ".uae_features.npz")


def _load_cache(path: str, ref_path: str) -> Optional[dict]:
  """The cached reference features if they exist and belong to this reference file."""
  if not path or not os.path.exists(path):
    return None
  try:
    with np.load(path, allow_pickle=False) as z:
      cached = {k: z[k] for k in z.files}
  except _NPZ_ERRORS:
    return None  # a damaged cache is recomputed, not an error
  if int(cached.get("source_size", -1)) != os.path.getsize(ref_path):
    return None
  return cached


def reference_features(ref: Reference, extractor: GenFeatureExtractor, cache: str = "",
                       progress: bool = True) -> dict:
  """{'pool' (M, 2048), 'spatial_mu', 'spatial_sigma'} of the reference images (cached)."""
  cached = _load_cache(cache, ref.path)
  if cached is not None:
    return cached
  feats = extractor(ref.images, desc="reference", progress=progress)
  mu_s, sigma_s = mean_cov(feats["spatial"])
  out = {"pool": feats["pool"], "spatial_mu": mu_s, "spatial_sigma": sigma_s,
         "source_size": np.int64(os.path.getsize(ref.path))}
  if cache and jax.process_index() == 0:
    try:
      os.makedirs(os.path.dirname(cache), exist_ok=True)
      with open(cache + ".tmp", "wb") as f:
        np.savez(f, **out)
      os.replace(cache + ".tmp", cache)
    except OSError as e:  # a read-only folder only costs the recomputation next time
      print(f"warning: could not write the reference feature cache {cache}: {e}")
  return out


# ------------------------------------------------------------------------------------------------
# The whole suite.

PROTOCOLS = {
    "adm": ("tf1", "OpenAI ADM evaluator (guided-diffusion evaluations/evaluator.py, TF graph "
                   "classify_image_graph_def.pb 2015-12-05): TF1 legacy bilinear resize of 0..255 "
                   "pixels to 299 x 299 (align_corners=False, no half-pixel offset), "
                   "(x - 128) / 128"),
    "torch-fidelity": ("tf1", "torch-fidelity 0.4 inception-v3-compat: the same TF1 bilinear "
                              "resize and (x - 128) / 128 as the ADM graph"),
    "pytorch-fid": ("pytorch-fid", "pytorch-fid 0.3.0: x / 255, PyTorch bilinear "
                                   "(align_corners=False) to 299 x 299, 2x - 1"),
}


@dataclasses.dataclass
class GenEvalOptions:
  """Knobs of `evaluate_generation`; the defaults are the ADM evaluator's."""
  protocol: str = "adm"
  per_device_batch: int = 32
  cache_dir: str = ""
  use_cache: bool = True
  fid_method: str = "sqrtm"
  k: int = ADM_K
  is_split_size: int = ADM_IS_SPLIT_SIZE
  distance_dtype: str = "float32"
  pr_chunk: int = 1024
  label_sampling: str = ""
  max_samples: int = 0
  progress: bool = True


def _reference_stats(ref: Reference, ref_feats: Optional[dict]) -> tuple:
  """((mu, sigma) or None, (mu_s, sigma_s) or None, where they came from)."""
  pool, spatial = ref.pool_stats, ref.spatial_stats
  source = "precomputed in the reference file" if pool is not None else ""
  if ref_feats is not None:
    n = len(ref_feats["pool"])
    if pool is None:
      pool = mean_cov(ref_feats["pool"])
      source = f"computed from the reference's {n} images"
    if spatial is None:
      spatial = (np.asarray(ref_feats["spatial_mu"]), np.asarray(ref_feats["spatial_sigma"]))
  return pool, spatial, source


def compute_metrics(fake: dict, ref: Reference, ref_feats: Optional[dict],
                    opts: GenEvalOptions, mesh: Mesh) -> tuple:
  """(metrics dict, notes dict) from sample features and the reference."""
  if len(fake["pool"]) < 2:
    raise LoadError(f"need at least 2 samples for FID statistics, got {len(fake['pool'])}")
  pool_ref, spatial_ref, source = _reference_stats(ref, ref_feats)
  notes = {"reference_statistics": source}
  mu, sigma = mean_cov(fake["pool"])
  metrics = {"fid": fid_lib.frechet_distance(mu, sigma, *pool_ref, method=opts.fid_method)}
  metrics["sfid"] = None
  if spatial_ref is not None:
    mu_s, sigma_s = mean_cov(fake["spatial"])
    metrics["sfid"] = fid_lib.frechet_distance(mu_s, sigma_s, *spatial_ref,
                                               method=opts.fid_method)
  else:
    notes["sfid"] = "reference has neither mu_s/sigma_s nor images"
  metrics["inception_score"] = metrics["inception_score_std"] = None
  if "logits" in fake:
    metrics["inception_score"], metrics["inception_score_std"] = inception_score(
        fake["logits"], opts.is_split_size or None)
  else:
    notes["inception_score"] = ("Inception weights without the 1008-way classifier fc.weight "
                                "(pytorch-fid wrapper layout); pass the full Inception3 .pth")
  metrics["precision"] = metrics["recall"] = None
  if ref_feats is not None:
    pr = ManifoldPR(mesh, opts.k, opts.pr_chunk, opts.distance_dtype)
    metrics["precision"], metrics["recall"] = pr(np.asarray(ref_feats["pool"]), fake["pool"])
  else:
    notes["precision_recall"] = "reference has no images ('arr_0')"
  return metrics, notes


def _protocol(opts: GenEvalOptions, samples_path: str, labels: str) -> dict:
  """The protocol block of the report."""
  preprocessing, resize = PROTOCOLS[opts.protocol]
  return {
      "name": opts.protocol, "preprocessing": preprocessing, "resize_and_normalise": resize,
      "features": "Inception-v3 TF-FID weights; FID/precision/recall: 2048-d pool_3; sFID: "
                  "mixed_6/conv[..., :7] (17x17x7 = 2023-d, HWC order); IS: softmax over the "
                  "1008 logits pool_3 @ fc.weight^T (no bias)",
      "inception_score_splits": (f"consecutive splits of {opts.is_split_size} samples"
                                 if opts.is_split_size else "10 equal splits"),
      "precision_recall": f"k={opts.k} nearest neighbours, squared Euclidean distances in "
                          f"{opts.distance_dtype}, ties inside",
      "frechet": f"float64 statistics, unbiased covariance, {opts.fid_method}",
      "label_sampling": labels,
  }


def evaluate_generation(samples_path: str, ref_path: str, variables: Mapping,
                        opts: Optional[GenEvalOptions] = None,
                        mesh: Optional[Mesh] = None) -> dict:
  """FID, sFID, IS, precision and recall of a sample .npz against a reference .npz."""
  opts = opts or GenEvalOptions()
  if opts.protocol not in PROTOCOLS:
    raise ValueError(f"unknown protocol {opts.protocol!r}; expected one of {list(PROTOCOLS)}")
  t0 = time.time()
  mesh = mesh if mesh is not None else make_mesh()
  samples = NpzImages(samples_path)
  try:
    ref = load_reference(ref_path)
  except LoadError:
    samples.close()
    raise
  try:
    extractor = GenFeatureExtractor(variables, PROTOCOLS[opts.protocol][0],
                                    opts.per_device_batch, mesh)
    fake = extractor(samples, "samples", opts.progress, opts.max_samples)
    ref_feats = None
    if ref.images is not None:
      cache = (reference_cache_path(ref_path, inception_lib.weights_fingerprint(variables),
                                    extractor.preprocessing, opts.cache_dir)
               if opts.use_cache else "")
      ref_feats = reference_features(ref, extractor, cache, opts.progress)
  finally:
    samples.close()
    ref.close()
  metrics, notes = compute_metrics(fake, ref, ref_feats, opts, mesh)
  summary = label_summary(samples_path)
  labels = opts.label_sampling or (summary["sampling"] if summary else "unknown (no labels)")
  return {
      **metrics,
      "num_samples": int(len(fake["pool"])),
      "num_reference_images": None if ref_feats is None else int(len(ref_feats["pool"])),
      "protocol": _protocol(opts, samples_path, labels),
      "labels": summary, "notes": notes,
      "samples": os.path.abspath(samples_path), "reference": os.path.abspath(ref_path),
      "image_size": list(samples.shape[1:3]),
      "devices": mesh.size, "processes": jax.process_count(),
      "seconds": round(time.time() - t0, 2),
  }
