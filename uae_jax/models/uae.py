"""The Unified Autoencoder: semantic encoder -> frequency bands -> fusion -> ViT pixel decoder.

Two recipes, two small modules sharing the encoder and decoder (and the same parameter tree):
- `PaperUAE`: K radial bands from `BandProjector`, band-limited noise on bands >= k_base in train
  mode, `SpectralModulator` fusion q = Delta + sum_k b_k (docs/method.md#paper-recipe).
- `OfficialUAE`: the public PyTorch code: Gaussian noise on every token (train), then a DCT
  zig-zag low-pass (random keep in train, fixed `count` in eval), no learnable frequency path
  (docs/method.md#official-code-recipe).
Forward-pass knobs (noise scale, band probability) are module fields, set from `config.model`.
"""
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from uae_jax.models import bands as bands_lib
from uae_jax.models import decoder as decoder_lib
from uae_jax.models import encoders
from uae_jax.models import modulator as modulator_lib


class _Autoencoder(nn.Module):
  """Encoder and decoder shared by both recipes."""
  encoder: dict             # config.model.encoder (`kind` selects the module, see encoders.py)
  decoder: dict             # PixelDecoder constructor kwargs
  noise_tau: float = 0.0    # train-mode latent noise scale sigma = noise_tau * U(0, 1)
  dtype: Any = jnp.float32

  def setup(self):
    self.enc = encoders.build(self.encoder, self.dtype, name="encoder")
    # The decoder predicts in the encoder's normalised pixel space, so it de-normalises with the
    # encoder's statistics (ImageNet for DINOv2, CLIP's or SigLIP's own for those) unless told.
    mean, std = encoders.normalisation(self.encoder)
    self.dec = decoder_lib.PixelDecoder(**{"mean": mean, "std": std, **self.decoder},
                                        dtype=self.dtype, name="decoder")

  def encode(self, images):
    """[0,1] images (B,S,S,3) -> clean latent grid z (B,H,W,C) in float32."""
    return self.enc(images).astype(jnp.float32)

  def decode(self, q):
    """Latent (B,H,W,C) -> image (B,pH,pW,3) in [0,1] (unclamped)."""
    return self.dec(q)


class PaperUAE(_Autoencoder):
  """The paper recipe: radial band split, band-limited noise, spectral modulator."""
  num_bands: int = 4
  band_edges: Optional[tuple] = None
  band_tau: float = 0.02
  band_method: str = "matmul"      # 'matmul' (MXU fast path) | 'fft' (reference)
  band_split: str = "lowpass"      # 'lowpass' (disjoint annuli) | 'residual_bandpass' (literal)
  use_modulator: bool = True
  k_base: int = 1                  # bands below this are semantic: never noised
  p_band: float = 1.0              # probability that a high band is noised

  def setup(self):
    super().setup()
    if self.use_modulator:
      self.mod = modulator_lib.SpectralModulator(
          features=encoders.latent_dim(self.encoder), num_bands=self.num_bands, dtype=self.dtype,
          name="modulator")

  def projector(self, height: int, width: int) -> bands_lib.BandProjector:
    """The fixed radial band projector for an H x W latent grid."""
    return bands_lib.BandProjector(height, width, self.num_bands,
                                   tuple(self.band_edges) if self.band_edges else None,
                                   self.band_tau, self.band_method, band_split=self.band_split)

  def split(self, z):
    """Latent (B,H,W,C) -> bands (K,B,H,W,C)."""
    return self.projector(*z.shape[1:3]).split(z)

  def fuse(self, band_stack):
    """Bands (K,B,H,W,C) -> fused latent q (B,H,W,C)."""
    return self.mod(band_stack) if self.use_modulator else jnp.sum(band_stack, axis=0)

  def tokenize(self, images):
    """Deterministic latent for downstream use (generation): the fused clean bands."""
    return self.fuse(self.split(self.encode(images)))

  def reconstruct(self, images, apply_band_mask: bool = False):
    """Eval-mode reconstruction (`apply_band_mask` is an official-recipe switch; ignored here)."""
    del apply_band_mask
    return self.decode(self.tokenize(images))

  def __call__(self, images, *, train: bool):
    """Forward for the losses: {'latent': z, 'bands': clean, 'noised_bands', 'recon' (decoded)}.

    Needs an rng stream 'noise' when `train` and `noise_tau > 0`.
    """
    z = self.encode(images)
    clean = self.split(z)
    noisy = clean
    if train and self.noise_tau > 0:
      noisy = bands_lib.inject_band_noise(clean, self.make_rng("noise"),
                                          self.projector(*z.shape[1:3]), self.noise_tau,
                                          self.k_base, self.p_band)
    return {"latent": z, "bands": clean, "noised_bands": noisy,
            "recon": self.decode(self.fuse(noisy))}


class OfficialUAE(_Autoencoder):
  """The official-code recipe: token noise then a DCT zig-zag low-pass; no band split."""
  dct_enabled: bool = False        # False is the official stage-1 config
  dct_count: int = 36
  dct_count_min: int = 32
  dct_count_max: int = 256
  dct_apply_prob: float = 0.5
  clean_pass: bool = False         # also decode the clean latent (the official stage-2 loss)

  def tokenize(self, images):
    """Deterministic latent for downstream use: the eval-mode low-passed z."""
    return bands_lib.official_band_mask(
        self.encode(images), jax.random.key(0), False, self.dct_count, self.dct_count_min,
        self.dct_count_max, self.dct_apply_prob, enabled=self.dct_enabled)

  def reconstruct(self, images, apply_band_mask: bool = False):
    """Eval-mode reconstruction; no band mask unless asked, as the official evaluator."""
    if apply_band_mask:
      return self.decode(self.tokenize(images))
    return self.decode(self.encode(images))

  def __call__(self, images, *, train: bool):
    """Forward for the losses: {'latent', 'recon' (noised/masked), 'recon_clean' if asked}.

    Needs an rng stream 'noise' in train mode when noise or the mask is on.
    """
    z = self.encode(images)
    zn = z
    if train and self.noise_tau > 0:  # every token and channel, before the DCT, as the original
      k_sigma, k_eps = jax.random.split(self.make_rng("noise"))
      sigma = self.noise_tau * jax.random.uniform(k_sigma, (z.shape[0], 1, 1, 1))
      zn = z + sigma * jax.random.normal(k_eps, z.shape)
    if self.dct_enabled:
      mask_rng = self.make_rng("noise") if train else jax.random.key(0)
      zn = bands_lib.official_band_mask(zn, mask_rng, train, self.dct_count, self.dct_count_min,
                                        self.dct_count_max, self.dct_apply_prob)
    out = {"latent": z, "recon": self.decode(zn)}
    if self.clean_pass:
      # The clean pass re-runs the (deterministic) encoder in the official code; its output is z.
      out["recon_clean"] = self.decode(z)
    return out


RECIPES = {"paper": PaperUAE, "official": OfficialUAE}


def load_official(path: str, model_cfg) -> dict:
  """Params of an official PyTorch UAE checkpoint for `config.model`: converted, laid out, checked."""
  from uae_jax.convert import uae as convert_uae  # conversion builds this module to check shapes
  return convert_uae.load_official(path, model_cfg)
