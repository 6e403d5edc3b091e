"""QG-VAE, the quantised global autoencoder (Elsner et al., arXiv 2407.11913), and its baselines.

Every token is a learned linear functional of one *whole* encoder feature map ("pseudo-frequency"),
quantised against its own codebook (docs/qgvae.md):

  F   = EncUNet(x) + AvgPool^f(Conv1x1_{3->C}(x))          (B, h, w, C), h = H / 2^f
  z_c = A_{g(c)} vec(F_c) + a_{g(c)}  in R^D                 per-head linear map R^N -> R^D
  q_c = STE(nearest(z_c, E_c)),  E_c in R^{K x D}            one codebook per token
  zh_c = q_c + o_c                                          learned offset, added AFTER quantising
  G_c = B_{g(c)} zh_c + b_{g(c)}  in R^N                     per-head linear map R^D -> R^N
  x_hat = DecUNet(G) + Up_bilinear^f(Conv1x1_{C->3}(G))

with N = h * w and head g(c) = c // (C / heads). The U-Net is a recursive hourglass without skip
concatenations: the input (plus 2-D sinusoidal position channels) conditions every residual block.

`PatchVQVAE` is the local-token baseline of the same U-Net family: the encoder's (h, w, D) grid is
quantised position by position against one shared codebook. `QGDiscriminator` is QGGAN's per-pixel
U-Net discriminator conditioned on the image it judges.

Layout: channels-last (NHWC). Parameters are float32, boxed with logical axis names; convolutions
use PyTorch's default initialisation (uniform +-1/sqrt(fan_in) for kernel and bias) as the original.
"""
from __future__ import annotations

import math
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from uae_jax.losses import vq

Array = jax.Array

POS_LEVELS = 16          # sin/cos(2^l * coord), l = 0..15: 2 coords x 2 fns x 16 = 64 channels
POS_CHANNELS = 4 * POS_LEVELS


# ------------------------------------------------------------------------------ small pieces
def group_count(channels: int, at_most: int = 16) -> int:
  """GroupNorm groups: the largest divisor of `channels` that is <= 16 (as the original)."""
  g = min(at_most, channels)
  while channels % g:
    g -= 1
  return g


def torch_uniform(fan_in: int):
  """PyTorch's default Conv/Linear init, U(-1/sqrt(fan_in), 1/sqrt(fan_in)), for any shape."""
  bound = 1.0 / math.sqrt(max(fan_in, 1))
  return lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound, bound)


def conv(features: int, kernel: int, name: str, use_bias: bool = True, fan_in: int = 0,
         dtype: Any = jnp.float32) -> nn.Conv:
  """SAME-padded stride-1 conv with torch-default init and logical axis names."""
  init = torch_uniform(fan_in)
  return nn.Conv(
      features, (kernel, kernel), padding="SAME", use_bias=use_bias, dtype=dtype,
      param_dtype=jnp.float32, name=name,
      kernel_init=nn.with_logical_partitioning(init, (None, None, "conv_in", "conv_out")),
      bias_init=nn.with_logical_partitioning(init, ("conv_out",)))


def group_norm(channels: int, name: str, dtype: Any) -> nn.GroupNorm:
  """GroupNorm(largest divisor <= 16 groups, eps 1e-5, affine) with logical axis names."""
  return nn.GroupNorm(
      num_groups=group_count(channels), epsilon=1e-5, dtype=dtype, param_dtype=jnp.float32,
      name=name, scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("conv_out",)),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("conv_out",)))


def down2(x: Array) -> Array:
  """Bilinear x0.5 without antialias (torch `Upsample(0.5, 'bilinear')`) = the 2 x 2 mean."""
  b, h, w, c = x.shape
  return x.reshape(b, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4))


def up2(x: Array) -> Array:
  """Bilinear x2 with half-pixel centres and edge clamping (torch align_corners=False)."""
  b, h, w, c = x.shape
  return jax.image.resize(x, (b, 2 * h, 2 * w, c), "bilinear")


def nearest_down2(x: Array) -> Array:
  """Nearest x0.5 (torch `Upsample(0.5, 'nearest')`): every second pixel from the first."""
  return x[:, ::2, ::2, :]


def resize_to(x: Array, size: int) -> Array:
  """Halves (2 x 2 mean) or doubles (bilinear) x until its side is `size` (powers of two apart)."""
  while x.shape[1] > size:
    x = down2(x)
  while x.shape[1] < size:
    x = up2(x)
  return x


def position_channels(size: int) -> np.ndarray:
  """(size, size, 64) sin/cos(2^l * (i/size, j/size)), l = 0..15, ordered [sin r, sin c, cos r, cos c] per l."""
  grid = np.stack(np.meshgrid(np.arange(size), np.arange(size), indexing="ij"), -1) / size
  parts = []
  for level in range(POS_LEVELS):
    parts += [np.sin((2.0 ** level) * grid), np.cos((2.0 ** level) * grid)]
  return np.concatenate(parts, -1).astype(np.float32)


# ------------------------------------------------------------------------------ U-Net
class ResBlock(nn.Module):
  """Imagen-style residual block conditioned on `cond` (no skip concatenations anywhere)."""
  inner: int
  out: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, cond: Array) -> Array:
    """x + 1x1(cond) -> SiLU(GN) -> 3x3 -> SiLU(GN) -> 3x3, plus a bias-free 1x1 of x."""
    c_in = x.shape[-1]
    skip = conv(self.out, 1, "conv_res", use_bias=False, fan_in=c_in, dtype=self.dtype)(x)
    x = x + conv(c_in, 1, "conv_cond", use_bias=False, fan_in=cond.shape[-1], dtype=self.dtype)(cond)
    x = nn.silu(group_norm(c_in, "norm1", self.dtype)(x))
    x = conv(self.inner, 3, "conv1", fan_in=9 * c_in, dtype=self.dtype)(x)
    x = nn.silu(group_norm(self.inner, "norm2", self.dtype)(x))
    x = conv(self.out, 3, "conv2", fan_in=9 * self.inner, dtype=self.dtype)(x)
    return x + skip


def res_stack(x: Array, cond: Array, inner: int, out: int, n: int, prefix: str, dtype) -> Array:
  """`n` ResBlocks: the last maps to `out` channels, the others keep `inner`."""
  for i in range(n):
    x = ResBlock(inner, out if i == n - 1 else inner, dtype, name=f"{prefix}{i}")(x, cond)
  return x


def level_plan(c_in: int, c_int: int, width: int, level: int, skip_up: int, skip_down: int,
               ch_min: int, ch_max: int, target_out: Optional[int]) -> dict:
  """Channel plan of one hourglass level: {'next', 'child', 'out', 'out_inner'} (pure Python)."""
  c_next = min(2 * c_int, ch_max)
  has_child = width > 8 or skip_up > level or level < skip_down
  child_out = None
  if has_child:
    child_out = level_plan(c_next, c_next, width // 2, level + 1, skip_up, skip_down, ch_min,
                           ch_max, None)["out"]
  next_in = child_out if has_child else c_next
  if level < skip_down:
    # Decoder levels that do not downsample shrink the width on the way out (16 * 2^level).
    out = min(ch_min * 2 ** level, next_in)
    out = target_out if (level == 0 and target_out is not None) else out
    inner = next_in
  else:
    out = child_out if skip_up > level else c_int
    out = target_out if (level == 0 and target_out is not None) else out
    inner = max(c_int, out)
  return {"next": c_next, "child": has_child, "out": out, "out_inner": inner}


class HourglassLevel(nn.Module):
  """One level of the recursive hourglass: in conv + blocks, (down, child, up), blocks + out conv."""
  c_int: int
  width: int
  level: int
  skip_up: int = 0
  skip_down: int = 0
  target_out: Optional[int] = None
  res_blocks: int = 1
  ch_min: int = 16
  ch_max: int = 128
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, cond: Array) -> Array:
    """x at this level's resolution, `cond` = input and positions (resized per level)."""
    plan = level_plan(x.shape[-1], self.c_int, self.width, self.level, self.skip_up,
                      self.skip_down, self.ch_min, self.ch_max, self.target_out)
    x = conv(self.c_int, 3, "in_conv", fan_in=9 * x.shape[-1], dtype=self.dtype)(x)
    x = res_stack(x, cond, self.c_int, plan["next"], self.res_blocks, "in_res", self.dtype)
    if plan["child"] and x.shape[1] > 1:
      if self.skip_down <= self.level:
        x = down2(x)
      c = cond
      while x.shape[1] < c.shape[1]:
        c = nearest_down2(c)
      x = HourglassLevel(plan["next"], self.width // 2, self.level + 1, self.skip_up,
                         self.skip_down, None, self.res_blocks, self.ch_min, self.ch_max,
                         self.dtype, name="child")(x, c)
      if self.skip_up <= self.level:
        x = up2(x)
    cond = resize_to(cond, x.shape[1])
    x = res_stack(x, cond, plan["out_inner"], plan["out"], self.res_blocks, "out_res", self.dtype)
    return conv(plan["out"], 3, "out_conv", fan_in=9 * plan["out"], dtype=self.dtype)(x)


class HourglassUNet(nn.Module):
  """The hourglass U-Net with its 3x3 'mega residual' from the input and a bias-free projection.

  Encoder use: skip_up = f (output at 1/2^f). Decoder use: skip_down = f (input at 1/2^f, output
  2^f larger).
  """
  c_int: int
  c_out: int
  width: int
  skip_up: int = 0
  skip_down: int = 0
  res_blocks: int = 1
  ch_min: int = 16
  ch_max: int = 128
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    """(B, W, W, c_in) -> (B, W', W', c_out)."""
    pos = jnp.broadcast_to(jnp.asarray(position_channels(self.width), x.dtype),
                           x.shape[:3] + (POS_CHANNELS,))
    cond = jnp.concatenate([x, pos], -1)
    mega = conv(self.c_out, 3, "mega_residual", use_bias=False, fan_in=9 * x.shape[-1],
                dtype=self.dtype)(x)
    out = HourglassLevel(self.c_int, self.width, 0, self.skip_up, self.skip_down, self.c_out,
                         self.res_blocks, self.ch_min, self.ch_max, self.dtype,
                         name="level0")(x, cond)
    out = out + resize_to(mega, out.shape[1])
    return conv(self.c_out, 3, "out_projection", use_bias=False, fan_in=9 * self.c_out,
                dtype=self.dtype)(out)


# ------------------------------------------------------------------------------ token maps
def _param(module: nn.Module, name: str, shape: tuple, init, names: tuple) -> Array:
  """A float32 parameter boxed with logical axis names."""
  return module.param(name, nn.with_logical_partitioning(init, names), shape, jnp.float32)


def uniform_half(key, shape, dtype=jnp.float32):
  """U(-0.5, 0.5): the original init of the codebooks and the offsets."""
  return jax.random.uniform(key, shape, dtype, -0.5, 0.5)


def unet_with_residual(m: nn.Module, x: Array, out_ch: int, encode: bool) -> Array:
  """U-Net(x) + the 1 x 1 "mega residual" path resized to its output, inside module `m`.

  The encoder's U-Net goes down by 2^f from the image; the decoder's comes up from the token grid.
  Both submodules take `m`'s scope ('unet', 'residual'), so the param layout is that of `m`.
  """
  kw = dict(res_blocks=m.res_blocks, ch_min=m.ch_min, ch_max=m.ch_max, dtype=m.dtype, name="unet")
  side = x.shape[1]
  if encode:
    out = HourglassUNet(m.ch_min, out_ch, side, skip_up=m.f, **kw)(x)
  else:
    out = HourglassUNet(m.ch_max, out_ch, side, skip_down=m.f, **kw)(x)
  res = conv(out_ch, 1, "residual", fan_in=x.shape[-1], dtype=m.dtype)(x)
  return out + resize_to(res, out.shape[1])


class GlobalEncoder(nn.Module):
  """Image -> continuous global tokens z (B, C, D): U-Net + 1x1 path, transpose, per-head maps."""
  image_size: int
  tokens: int
  heads: int
  code_dim: int
  f: int
  res_blocks: int = 1
  ch_min: int = 16
  ch_max: int = 128
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    """(B, S, S, 3) -> (B, C, D)."""
    c, h, d = self.tokens, self.heads, self.code_dim
    feat = unet_with_residual(self, x, c, encode=True)  # the 1x1 path AvgPooled by 2^f
    b, side, _, _ = feat.shape
    n = side * side
    # The channel-to-token transpose: token c sees the whole map F_c as a vector of N pixels
    # (row-major, as torch's view(B, C, N)). Channels are grouped into heads of C / heads.
    feat = feat.reshape(b, n, h, c // h).astype(jnp.float32)
    kernel = _param(self, "kernel", (h, n, d), torch_uniform(n), ("heads", "pixels", "code_dim"))
    bias = _param(self, "bias", (h, d), torch_uniform(n), ("heads", "code_dim"))
    z = jnp.einsum("bnhg,hnd->bhgd", feat, kernel) + bias[None, :, None, :]
    return z.reshape(b, c, d)


class GlobalDecoder(nn.Module):
  """Tokens (B, C, D) -> image: per-head maps back to N pixels, transpose, U-Net + 1x1 path."""
  image_size: int
  tokens: int
  heads: int
  code_dim: int
  f: int
  res_blocks: int = 1
  ch_min: int = 16
  ch_max: int = 128
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, zh: Array) -> Array:
    """(B, C, D) -> (B, S, S, 3)."""
    c, h, d = self.tokens, self.heads, self.code_dim
    side = self.image_size // 2 ** self.f
    n = side * side
    kernel = _param(self, "kernel", (h, d, n), torch_uniform(d), ("heads", "code_dim", "pixels"))
    bias = _param(self, "bias", (h, n), torch_uniform(d), ("heads", "pixels"))
    b = zh.shape[0]
    g = jnp.einsum("bhgd,hdn->bnhg", zh.reshape(b, h, c // h, d), kernel) + bias.T[None, :, :, None]
    g = g.reshape(b, side, side, c).astype(self.dtype)
    return unet_with_residual(self, g, 3, encode=False).astype(jnp.float32)


class LocalEncoder(nn.Module):
  """Patch-VQ baseline encoder: the same U-Net (+ 1x1 path) to a (h, w, D) grid of local tokens."""
  image_size: int
  code_dim: int
  f: int
  res_blocks: int = 1
  ch_min: int = 16
  ch_max: int = 128
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    """(B, S, S, 3) -> (B, h * w, D) in raster order."""
    feat = unet_with_residual(self, x, self.code_dim, encode=True).astype(jnp.float32)
    return feat.reshape(feat.shape[0], -1, self.code_dim)


class LocalDecoder(nn.Module):
  """Patch-VQ baseline decoder: (h * w, D) tokens back on their grid, the same decoder U-Net."""
  image_size: int
  code_dim: int
  f: int
  res_blocks: int = 1
  ch_min: int = 16
  ch_max: int = 128
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, zh: Array) -> Array:
    """(B, h * w, D) -> (B, S, S, 3)."""
    side = self.image_size // 2 ** self.f
    g = zh.reshape(zh.shape[0], side, side, self.code_dim).astype(self.dtype)
    return unet_with_residual(self, g, 3, encode=False).astype(jnp.float32)


# ------------------------------------------------------------------------------ autoencoders
class QuantisedAE(nn.Module):
  """Encoder -> nearest code (STE) -> + offset -> decoder; `kind` 'global' (QG-VAE) or 'patch'.

  QG-VAE: `tokens` global tokens, one codebook (K, D) per token, learned offsets (C, D).
  Patch baseline: (S / 2^f)^2 local tokens, ONE shared codebook stored as (1, K, D), no offsets.
  The `vq_stats/grad_mag` variable (codebooks x K) holds the reset statistic between resets.
  """
  kind: str
  image_size: int
  tokens: int
  heads: int
  code_dim: int
  codebook_size: int
  f: int
  res_blocks: int = 1
  ch_min: int = 16
  ch_max: int = 128
  dtype: Any = jnp.float32

  def setup(self):
    """Builds the encoder, codebook(s), offsets, decoder and the reset accumulator."""
    kw = dict(image_size=self.image_size, f=self.f, res_blocks=self.res_blocks, ch_min=self.ch_min,
              ch_max=self.ch_max, dtype=self.dtype)
    k, d = self.codebook_size, self.code_dim
    if self.kind == "global":
      tk = dict(tokens=self.tokens, heads=self.heads, code_dim=d)
      self.encoder = GlobalEncoder(**tk, **kw)
      self.decoder = GlobalDecoder(**tk, **kw)
      books = self.tokens
      self.offset = _param(self, "offset", (self.tokens, d), uniform_half, ("tokens", "code_dim"))
    elif self.kind == "patch":
      self.encoder = LocalEncoder(code_dim=d, **kw)
      self.decoder = LocalDecoder(code_dim=d, **kw)
      books = 1
      self.offset = None
    else:
      raise ValueError(f"kind={self.kind!r}: expected 'global' or 'patch'")
    self.codebook = _param(self, "codebook", (books, k, d), uniform_half,
                           ("tokens", "codes", "code_dim"))
    if self.is_initializing():  # the task carries it in its state; apply() never reads it
      self.variable(
          "vq_stats", "grad_mag",
          lambda: nn.LogicallyPartitioned(jnp.zeros((books, k), jnp.float32), ("tokens", "codes")))

  def _book(self) -> Array:
    """(C, K, D) per-token codebooks, or the shared (K, D) one."""
    return self.codebook if self.kind == "global" else self.codebook[0]

  def encode(self, x: Array) -> Array:
    """Continuous tokens z (B, T, D)."""
    return self.encoder(x)

  def quantize(self, z: Array) -> dict:
    """Nearest code per token (STE) plus offset: {'zh', 'indices', 'codebook_loss', 'commit_loss'}."""
    out = vq.quantize(z, self._book())
    zh = out["q_st"] if self.offset is None else out["q_st"] + self.offset[None]
    return dict(out, zh=zh)

  def embed(self, indices: Array) -> Array:
    """Token inputs of the decoder for integer indices (B, T): code + offset."""
    zh = vq.lookup(self._book(), indices)
    return zh if self.offset is None else zh + self.offset[None]

  def decode(self, zh: Array) -> Array:
    """Decoder on token vectors (B, T, D) -> (B, S, S, 3)."""
    return self.decoder(zh)

  def __call__(self, x: Array, token_mask: Optional[Array] = None) -> dict:
    """Forward: {'recon', 'indices', 'z', 'codebook_loss', 'commit_loss'}; mask (B, T) zeroes tokens."""
    z = self.encode(x)
    out = self.quantize(z)
    zh = out["zh"] if token_mask is None else out["zh"] * token_mask[:, :, None]
    return {"recon": self.decode(zh), "indices": out["indices"], "z": z,
            "codebook_loss": out["codebook_loss"], "commit_loss": out["commit_loss"]}

  def reconstruct(self, x: Array) -> Array:
    """Eval-mode reconstruction (all tokens)."""
    return self.decode(self.quantize(self.encode(x))["zh"])

  def indices(self, x: Array) -> Array:
    """Integer code index per token (B, T) (int32)."""
    return self.quantize(self.encode(x))["indices"]

  def decode_indices(self, indices: Array, keep: Optional[int] = None) -> Array:
    """Images from indices; with `keep`, only the first `keep` tokens (a progressive prefix)."""
    zh = self.embed(indices)
    if keep is not None:
      zh = zh * (jnp.arange(zh.shape[1]) < keep).astype(zh.dtype)[None, :, None]
    return self.decode(zh)


class QGDiscriminator(nn.Module):
  """QGGAN's discriminator: ResBlock(3->16), an hourglass level, ResBlock(16->1), all conditioned
  on the judged image itself; returns a per-pixel logit map (B, S, S, 1)."""
  width: int
  c_int: int = 16
  res_blocks: int = 2
  ch_max: int = 128
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    """(B, S, S, 3) in [0, 1] -> logits (B, S, S, 1)."""
    h = ResBlock(self.c_int, self.c_int, self.dtype, name="block_in")(x, x)
    h = HourglassLevel(self.c_int, self.width, 0, res_blocks=self.res_blocks, ch_max=self.ch_max,
                       dtype=self.dtype, name="unet")(h, x)
    return ResBlock(self.c_int, 1, self.dtype, name="block_out")(h, x).astype(jnp.float32)


def build(model_cfg, image_size: int, dtype: Any = jnp.float32) -> QuantisedAE:
  """The autoencoder described by a `config.model` section."""
  m = model_cfg
  return QuantisedAE(kind=m.kind, image_size=image_size, tokens=m.tokens, heads=m.heads,
                     code_dim=m.code_dim, codebook_size=m.codebook_size, f=m.f,
                     res_blocks=m.res_blocks, ch_min=m.ch_min, ch_max=m.ch_max, dtype=dtype)


def num_tokens(model_cfg, image_size: int) -> int:
  """Tokens per image: C (global) or (S / 2^f)^2 (patch)."""
  if model_cfg.kind == "global":
    return int(model_cfg.tokens)
  return (image_size // 2 ** model_cfg.f) ** 2


def bits_per_image(model_cfg, image_size: int) -> float:
  """Fixed-length code size: tokens * log2(K) bits."""
  return num_tokens(model_cfg, image_size) * math.log2(model_cfg.codebook_size)
