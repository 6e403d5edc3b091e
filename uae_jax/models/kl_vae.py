"""The SD-style KL autoencoder of Spectrum Matching, its VQ variant and the PatchGAN discriminator.

Channels-last throughout; images in [-1, 1] (B, H, W, 3). The architecture is the LDM / Stable
Diffusion first-stage model (docs/spectrum_matching.md#the-kl-vae):

  Encoder  conv_in 3x3 -> per level: 2 ResBlocks, stride-2 3x3 conv (padding 1) except on the last
           level -> mid (ResBlock, single-head attention, ResBlock) -> GroupNorm -> SiLU -> 3x3 conv
           to 2C (mean, logvar) -> 1x1 `post_encoder_conv` (2C -> 2C).
  Decoder  1x1 `pre_decoder_conv` (C -> C) -> conv_in -> mid -> per level (channels reversed):
           3 ResBlocks, nearest x2 + 3x3 conv except on the last -> GroupNorm -> SiLU -> `conv_out`.
  ResBlock GroupNorm(32, 1e-6) -> SiLU -> conv3x3 -> GroupNorm -> SiLU -> conv3x3 (+ 1x1 skip conv
           when the width changes).
  Posterior logvar clamped to [-30, 20]; z = mean + exp(logvar / 2) * eps;
           KL = -0.5 sum_{h,w,c} (1 + logvar - mean^2 - exp(logvar)) per sample.

The VQ variant replaces the posterior by 1x1 projections to and from a codebook (nearest entry,
codebook + beta * commitment loss, straight-through gradient, perplexity); unlike the original
code it keeps the (H, W) order of the quantised grid (the original permutes H and W).
"""
from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any

# channels per level, latent channels C (downsampling factor = 2 ** (levels - 1)).
CONFIGS = {
    "f8d4": dict(channels=(128, 256, 512, 512), latent_channels=4),
    "f16d16": dict(channels=(128, 128, 256, 256, 512), latent_channels=16),
    "f32d64": dict(channels=(128, 128, 256, 256, 512, 512), latent_channels=64),
    "f64d256": dict(channels=(128, 128, 256, 256, 512, 512, 1024), latent_channels=256),
    "vq_f8d4": dict(channels=(128, 256, 512, 512), latent_channels=4, quantize=True,
                    codebook_size=16384, vq_embed_dim=4),
    # CPU-sized: f2, 32 px -> 16 x 16 x 4 (the f16 latent grid at 256 px).
    "tiny": dict(channels=(32, 64), latent_channels=4),
    "tiny_vq": dict(channels=(32, 64), latent_channels=4, quantize=True, codebook_size=256,
                    vq_embed_dim=4),
}
LOGVAR_RANGE = (-30.0, 20.0)
GN_GROUPS = 32
GN_EPS = 1e-6


def conv(features: int, kernel: int, name: str, dtype: Dtype, stride: int = 1,
         padding=None, use_bias: bool = True,
         kernel_init=nn.initializers.lecun_normal()) -> nn.Conv:
  """A Conv with PyTorch-style symmetric padding and logical axis names on its parameters."""
  pad = kernel // 2 if padding is None else padding
  return nn.Conv(features, (kernel, kernel), strides=(stride, stride), padding=((pad, pad),) * 2,
                 use_bias=use_bias, dtype=dtype, name=name,
                 kernel_init=nn.with_logical_partitioning(kernel_init,
                                                          (None, None, "embed", "mlp")),
                 bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("mlp",)))


def group_norm(name: str, dtype: Dtype, groups: int = GN_GROUPS) -> nn.GroupNorm:
  """GroupNorm(32, eps 1e-6) with named affine parameters."""
  return nn.GroupNorm(num_groups=groups, epsilon=GN_EPS, dtype=dtype, name=name,
                      scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("embed",)),
                      bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)))


class ResBlock(nn.Module):
  """GN -> SiLU -> conv3x3 -> GN -> SiLU -> conv3x3, plus the (1x1-projected) input."""
  features: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    h = conv(self.features, 3, "conv1", self.dtype)(nn.silu(group_norm("norm1", self.dtype)(x)))
    h = conv(self.features, 3, "conv2", self.dtype)(nn.silu(group_norm("norm2", self.dtype)(h)))
    if x.shape[-1] != self.features:
      x = conv(self.features, 1, "skip", self.dtype)(x)
    return x + h


class AttnBlock(nn.Module):
  """Single-head self-attention over the grid (head dim = channels) with GN and a residual."""
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    b, h, w, c = x.shape
    y = group_norm("norm", self.dtype)(x).reshape(b, h * w, c)
    q, k, v = (conv(c, 1, n, self.dtype)(y[:, None])[:, 0] for n in ("q", "k", "v"))
    logits = jnp.einsum("bqc,bkc->bqk", q, k) * c ** -0.5
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(v.dtype)
    out = jnp.einsum("bqk,bkc->bqc", probs, v)
    return x + conv(c, 1, "proj", self.dtype)(out[:, None])[:, 0].reshape(b, h, w, c)


def mid_block(x, features: int, dtype: Dtype, prefix: str = "mid"):
  """ResBlock -> attention -> ResBlock (called inside a compact module)."""
  x = ResBlock(features, dtype, name=f"{prefix}_res1")(x)
  x = AttnBlock(dtype, name=f"{prefix}_attn")(x)
  return ResBlock(features, dtype, name=f"{prefix}_res2")(x)


class Encoder(nn.Module):
  """Image (B, H, W, 3) -> (B, H / f, W / f, out_channels)."""
  channels: Sequence[int]
  out_channels: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    x = conv(self.channels[0], 3, "conv_in", self.dtype)(x.astype(self.dtype))
    for i, ch in enumerate(self.channels):
      for j in range(2):
        x = ResBlock(ch, self.dtype, name=f"down{i}_res{j}")(x)
      if i < len(self.channels) - 1:
        x = conv(ch, 3, f"down{i}_downsample", self.dtype, stride=2, padding=1)(x)
    x = mid_block(x, self.channels[-1], self.dtype)
    x = nn.silu(group_norm("norm_out", self.dtype)(x))
    return conv(self.out_channels, 3, "conv_out", self.dtype)(x)


class Decoder(nn.Module):
  """Latent (B, h, w, C) -> image (B, h f, w f, 3); no output activation."""
  channels: Sequence[int]
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, z):
    rev = tuple(reversed(self.channels))
    x = conv(rev[0], 3, "conv_in", self.dtype)(z.astype(self.dtype))
    x = mid_block(x, rev[0], self.dtype)
    for i, ch in enumerate(rev):
      for j in range(3):
        x = ResBlock(ch, self.dtype, name=f"up{i}_res{j}")(x)
      if i < len(rev) - 1:
        x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)  # nearest x2
        x = conv(ch, 3, f"up{i}_upsample", self.dtype)(x)
    x = nn.silu(group_norm("norm_out", self.dtype)(x))
    return conv(3, 3, "conv_out", self.dtype)(x)


def kl_divergence(mean, logvar):
  """Per-sample KL(N(mean, exp(logvar)) || N(0, 1)) summed over (h, w, c): (B,)."""
  mean, logvar = mean.astype(jnp.float32), logvar.astype(jnp.float32)
  return -0.5 * jnp.sum(1.0 + logvar - jnp.square(mean) - jnp.exp(logvar), axis=(1, 2, 3))


class VectorQuantizer(nn.Module):
  """Nearest-codeword quantiser: codebook (K, D) ~ U(+-1/K), STE, codebook + beta * commitment."""
  codebook_size: int
  embed_dim: int
  beta: float = 0.25

  @nn.compact
  def __call__(self, z):
    k = self.codebook_size
    init = lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -1 / k, 1 / k)
    book = self.param("codebook", nn.with_logical_partitioning(init, (None, "embed")),
                      (k, self.embed_dim))
    flat = z.astype(jnp.float32).reshape(-1, self.embed_dim)
    dist = (jnp.sum(flat ** 2, 1, keepdims=True) - 2.0 * flat @ book.T
            + jnp.sum(book ** 2, 1)[None])
    idx = jnp.argmin(dist, axis=1)
    q = book[idx].reshape(z.shape)
    codebook_loss = jnp.mean(jnp.square(q - jax.lax.stop_gradient(z)))
    commit_loss = jnp.mean(jnp.square(z - jax.lax.stop_gradient(q)))
    usage = jnp.mean(jax.nn.one_hot(idx, k), axis=0)
    perplexity = jnp.exp(-jnp.sum(usage * jnp.log(usage + 1e-10)))
    q_ste = z + jax.lax.stop_gradient(q - z)
    return q_ste, {"vq_loss": codebook_loss + self.beta * commit_loss,
                   "codebook_loss": codebook_loss, "commit_loss": commit_loss,
                   "perplexity": perplexity, "indices": idx.reshape(z.shape[:-1])}


class KLVAE(nn.Module):
  """The SD-style autoencoder: `encode` -> moments, `sample`, `decode`; VQ when `quantize`."""
  channels: Sequence[int]
  latent_channels: int
  quantize: bool = False
  codebook_size: int = 16384
  vq_embed_dim: int = 4
  vq_beta: float = 0.25
  dtype: Dtype = jnp.float32

  def setup(self):
    c = self.latent_channels
    moments = c if self.quantize else 2 * c
    self.encoder = Encoder(self.channels, moments, self.dtype)
    self.post_encoder_conv = conv(moments, 1, "post_encoder_conv", self.dtype)
    self.pre_decoder_conv = conv(c, 1, "pre_decoder_conv", self.dtype)
    self.decoder = Decoder(self.channels, self.dtype)
    if self.quantize:
      self.quant_proj = conv(self.vq_embed_dim, 1, "quant_proj", self.dtype)
      self.quantizer = VectorQuantizer(self.codebook_size, self.vq_embed_dim, self.vq_beta)
      self.post_quant_proj = conv(c, 1, "post_quant_proj", self.dtype)

  def encode(self, x):
    """Moments (B, h, w, 2C) = (mean, raw logvar) of the KL model; (B, h, w, C) for VQ."""
    return self.post_encoder_conv(self.encoder(x)).astype(jnp.float32)

  def posterior(self, moments):
    """(mean, clamped logvar) of the moments."""
    mean, logvar = jnp.split(moments, 2, axis=-1)
    return mean, jnp.clip(logvar, *LOGVAR_RANGE)

  def quantize_latent(self, h):
    """VQ only: (z_q with STE, stats) of the encoder output."""
    q, stats = self.quantizer(self.quant_proj(h).astype(jnp.float32))
    return self.post_quant_proj(q).astype(jnp.float32), stats

  def decode(self, z):
    """Latent (B, h, w, C) -> image in [-1, 1] units (not clamped)."""
    return self.decoder(self.pre_decoder_conv(z)).astype(jnp.float32)

  def latent(self, x, sample: bool = False):
    """The latent the decoder sees: the posterior mean (or a sample) / the quantised grid."""
    h = self.encode(x)
    if self.quantize:
      return self.quantize_latent(h)[0]
    mean, logvar = self.posterior(h)
    if not sample:
      return mean
    return mean + jnp.exp(0.5 * logvar) * jax.random.normal(self.make_rng("sample"), mean.shape)

  def __call__(self, x, sample: bool = True):
    """Encode -> (sample) -> decode: {'z', 'recon', 'kl' (B,) | VQ stats}."""
    h = self.encode(x)
    if self.quantize:
      z, stats = self.quantize_latent(h)
      return dict(stats, z=z, recon=self.decode(z))
    mean, logvar = self.posterior(h)
    z = mean
    if sample:
      z = mean + jnp.exp(0.5 * logvar) * jax.random.normal(self.make_rng("sample"), mean.shape)
    return {"z": z, "mean": mean, "logvar": logvar, "kl": kl_divergence(mean, logvar),
            "recon": self.decode(z)}


class KLVAETokenizer(KLVAE):
  """The same autoencoder (same params) behind the [0, 1] tokenizer interface of the generators.

  `tokenize(images)` -> the posterior mean (or the quantised grid) of images in [0, 1];
  `decode(z)` -> images in [0, 1] (unclamped); `__call__(images, train=False)` reconstructs.
  """

  def tokenize(self, images):
    """Deterministic latent of [0, 1] images."""
    return self.latent(2.0 * images - 1.0)

  def decode(self, z):
    """Latent -> image in [0, 1] units."""
    return (super().decode(z) + 1.0) / 2.0

  def __call__(self, images, train: bool = False):
    """Eval-mode reconstruction in [0, 1] (`train` is accepted for interface parity)."""
    del train
    return self.decode(self.tokenize(images))


def build(name: str = "f16d16", dtype: Dtype = jnp.float32, **overrides) -> KLVAE:
  """A KLVAE of one of the named `CONFIGS` (keyword overrides win)."""
  if name not in CONFIGS:
    raise ValueError(f"unknown KL-VAE size {name!r}; expected one of {sorted(CONFIGS)}")
  return KLVAE(**dict(CONFIGS[name], **overrides), dtype=dtype)


class PatchDiscriminator(nn.Module):
  """pix2pix PatchGAN: k4 convs (s2, s2, ..., s1, s1), BatchNorm, LeakyReLU 0.2; patch logits.

  Init as the original: conv weights N(0, conv_init_std) (0.2 there), BatchNorm scale N(1, 0.02).
  BatchNorm always uses the batch's statistics (the original trains it in train mode only; under
  jit the statistics are over the global batch, i.e. synchronised).
  """
  base_channels: int = 64
  depth: int = 3
  conv_init_std: float = 0.2
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    init = nn.initializers.normal(self.conv_init_std)
    bn_init = lambda key, shape, dtype=jnp.float32: 1.0 + 0.02 * jax.random.normal(key, shape, dtype)

    def bn(name):
      return nn.BatchNorm(use_running_average=False, momentum=0.9, epsilon=1e-5, dtype=self.dtype,
                          name=name,
                          scale_init=nn.with_logical_partitioning(bn_init, ("embed",)),
                          bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)))

    x = conv(self.base_channels, 4, "conv0", self.dtype, stride=2, padding=1,
             kernel_init=init)(x.astype(self.dtype))
    x = nn.leaky_relu(x, 0.2)
    for n in range(1, self.depth + 1):
      ch = self.base_channels * min(2 ** n, 8)
      stride = 2 if n < self.depth else 1
      x = conv(ch, 4, f"conv{n}", self.dtype, stride=stride, padding=1, use_bias=False,
               kernel_init=init)(x)
      x = nn.leaky_relu(bn(f"bn{n}")(x), 0.2)
    return conv(1, 4, "conv_out", self.dtype, padding=1, kernel_init=init)(x).astype(jnp.float32)
