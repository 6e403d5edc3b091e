"""The Unified Autoencoder: DINOv2 encoder -> frequency bands -> fusion -> ViT pixel decoder.

Two recipes share this module (`recipe`):
- 'paper': K radial bands from `BandProjector`, band-limited noise on bands >= k_base (when the
  stage enables it), `SpectralModulator` fusion q = Delta + sum_k b_k.
- 'official': the public PyTorch code: Gaussian noise on every token (train), then a DCT zig-zag
  low-pass (random keep in train, fixed `count` in eval), no learnable frequency path.
"""
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from uae_jax.models import bands as bands_lib
from uae_jax.models import decoder as decoder_lib
from uae_jax.models import encoders
from uae_jax.models import modulator as modulator_lib


class UAE(nn.Module):
  """Encoder, band split, fusion and decoder; `__call__` returns everything the losses need."""
  encoder: dict             # config.model.encoder (`kind` selects the module, see encoders.py)
  decoder: dict             # PixelDecoder constructor kwargs
  recipe: str = "paper"     # 'paper' | 'official'
  num_bands: int = 4
  band_edges: Optional[tuple] = None
  band_tau: float = 0.02
  band_method: str = "matmul"  # 'matmul' (MXU fast path) | 'fft' (reference)
  use_modulator: bool = True
  # Official-code DCT low-pass (reference §1.5); `dct_enabled=False` is the stage-1 config.
  dct_enabled: bool = False
  dct_count: int = 36
  dct_count_min: int = 32
  dct_count_max: int = 256
  dct_apply_prob: float = 0.5
  dtype: Any = jnp.float32

  def setup(self):
    if self.recipe not in ("paper", "official"):
      raise ValueError(f"recipe={self.recipe!r}: expected 'paper' or 'official'")
    self.enc = encoders.build(self.encoder, self.dtype, name="encoder")
    self.dec = decoder_lib.PixelDecoder(**self.decoder, dtype=self.dtype, name="decoder")
    if self.recipe == "paper" and self.use_modulator:
      self.mod = modulator_lib.SpectralModulator(
          features=encoders.latent_dim(self.encoder), num_bands=self.num_bands, dtype=self.dtype,
          name="modulator")

  def projector(self, height: int, width: int) -> bands_lib.BandProjector:
    """The fixed radial band projector for an H x W latent grid."""
    return bands_lib.BandProjector(height, width, self.num_bands,
                                   tuple(self.band_edges) if self.band_edges else None,
                                   self.band_tau, self.band_method)

  def encode(self, images):
    """[0,1] images (B,S,S,3) -> clean latent grid z (B,H,W,C) in float32."""
    return self.enc(images).astype(jnp.float32)

  def split(self, z):
    """Latent (B,H,W,C) -> bands (K,B,H,W,C) (paper recipe)."""
    return self.projector(*z.shape[1:3]).split(z)

  def fuse(self, band_stack):
    """Bands (K,B,H,W,C) -> fused latent q (B,H,W,C)."""
    if self.recipe == "paper" and self.use_modulator:
      return self.mod(band_stack)
    return jnp.sum(band_stack, axis=0)

  def decode(self, q):
    """Latent (B,H,W,C) -> image (B,16H,16W,3) in [0,1] (unclamped)."""
    return self.dec(q)

  def tokenize(self, images):
    """Deterministic (eval) latent for downstream use: fused bands (paper) or low-passed z."""
    z = self.encode(images)
    if self.recipe == "paper":
      return self.fuse(self.split(z))
    return bands_lib.official_band_mask(
        z, jax.random.key(0), False, self.dct_count, self.dct_count_min, self.dct_count_max,
        self.dct_apply_prob, enabled=self.dct_enabled)

  def reconstruct(self, images, apply_band_mask: bool = False):
    """Eval-mode reconstruction; official recipe: no band mask unless asked (as its evaluator)."""
    z = self.encode(images)
    if self.recipe == "paper":
      return self.decode(self.fuse(self.split(z)))
    if apply_band_mask:
      return self.decode(self.tokenize(images))
    return self.decode(z)

  def __call__(self, images, *, train: bool, noise_tau: float = 0.0, k_base: int = 1,
               p_band: float = 1.0, clean_pass: bool = False):
    """Forward for the losses. Needs an rng stream 'noise' when train and noise/mask are on.

    Returns a dict: 'latent' (clean z), 'bands' (clean bands; paper), 'recon' (from the noised
    and/or masked latent in train mode), and 'recon_clean' (official clean pass, if asked).
    """
    z = self.encode(images)
    out = {"latent": z}
    if self.recipe == "paper":
      clean = self.split(z)
      out["bands"] = clean
      noisy = clean
      if train and noise_tau > 0:
        noisy = bands_lib.inject_band_noise(clean, self.make_rng("noise"), self.projector(*z.shape[1:3]),
                                            noise_tau, k_base, p_band)
      out["recon"] = self.decode(self.fuse(noisy))
      return out
    # Official recipe: noise on every token and channel, before the DCT (reference §1.4).
    zn = z
    if train and noise_tau > 0:
      k_sigma, k_eps = jax.random.split(self.make_rng("noise"))
      sigma = noise_tau * jax.random.uniform(k_sigma, (z.shape[0], 1, 1, 1))
      zn = z + sigma * jax.random.normal(k_eps, z.shape)
    if self.dct_enabled:
      mask_rng = self.make_rng("noise") if train else jax.random.key(0)
      zn = bands_lib.official_band_mask(zn, mask_rng, train, self.dct_count, self.dct_count_min,
                                        self.dct_count_max, self.dct_apply_prob)
    out["recon"] = self.decode(zn)
    if clean_pass:
      # The clean pass re-runs the (deterministic) encoder in the official code; its output is z.
      out["recon_clean"] = self.decode(z)
    return out
