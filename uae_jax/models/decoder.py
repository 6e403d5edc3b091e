"""MAE-style ViT pixel decoder: latent grid (B, H, W, C) -> image (B, 16H, 16W, 3).

Linear C -> D, a zero-initialised trainable CLS token, fixed 2-D sin-cos position embeddings
(first half of the channels encodes the column index), pre-LN blocks (LayerNorm eps 1e-12, exact
GELU), final LayerNorm, Linear D -> p*p*3, unpatchify, then x * std + mean: the decoder predicts in
the encoder's normalised pixel space.
"""
import dataclasses
from typing import Any, Optional

import einops
import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from uae_jax.models import layers
from uae_jax.models.dinov2 import IMAGENET_MEAN, IMAGENET_STD


@dataclasses.dataclass(frozen=True)
class DecoderSize:
  """Width, depth, heads and MLP width of one decoder size."""
  dim: int
  depth: int
  heads: int
  mlp_hidden: int


SIZES = {
    "tiny": DecoderSize(64, 2, 4, 128),
    "small": DecoderSize(256, 4, 4, 1024),
    "B": DecoderSize(768, 12, 12, 3072),
    "L": DecoderSize(1024, 24, 16, 4096),
    "XL": DecoderSize(1152, 28, 16, 4096),  # MLP 4096, not 4 x 1152 (official config)
}


def sincos_1d(dim: int, pos: np.ndarray) -> np.ndarray:
  """MAE 1-D sin-cos embedding: [sin(p w_i), cos(p w_i)], w_i = 10000^(-i/(dim/2))."""
  omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
  out = np.einsum("m,d->md", pos.reshape(-1).astype(np.float64), omega)
  return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def sincos_2d(dim: int, grid_h: int, grid_w: int, cls_token: bool = True) -> np.ndarray:
  """MAE 2-D sin-cos table (1 + H*W, dim), row 0 = CLS zeros; first half encodes the column."""
  if dim % 4:
    raise ValueError(f"sin-cos embedding needs a width divisible by 4, got {dim}")
  cols, rows = np.meshgrid(np.arange(grid_w), np.arange(grid_h))  # each (H, W), row-major
  emb = np.concatenate([sincos_1d(dim // 2, cols), sincos_1d(dim // 2, rows)], axis=1)
  if cls_token:
    emb = np.concatenate([np.zeros((1, dim)), emb], axis=0)
  return emb.astype(np.float32)


def unpatchify(tokens, grid_h: int, grid_w: int, patch: int):
  """(B, H*W, p*p*3) -> (B, pH, pW, 3); token (r, c), entry (p, q, ch) lands at (pr+p, pc+q)."""
  return einops.rearrange(tokens, "b (h w) (p q c) -> b (h p) (w q) c", h=grid_h, w=grid_w,
                          p=patch, q=patch)


def patchify(images, patch: int):
  """Inverse of `unpatchify`: (B, pH, pW, 3) -> (B, H*W, p*p*3)."""
  return einops.rearrange(images, "b (h p) (w q) c -> b (h w) (p q c)", p=patch, q=patch)


class PixelDecoder(nn.Module):
  """ViT decoder from a latent grid to pixels in [0, 1] (unclamped)."""
  size: str = "XL"
  patch_size: int = 16
  ln_eps: float = 1e-12
  mean: tuple = IMAGENET_MEAN
  std: tuple = IMAGENET_STD
  remat_policy: Optional[str] = None
  scan_blocks: bool = False        # one nn.scan over stacked `blocks` params (see scan_utils)
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @property
  def spec(self) -> DecoderSize:
    if self.size not in SIZES:
      raise ValueError(f"PixelDecoder size {self.size!r}: expected one of {sorted(SIZES)}")
    return SIZES[self.size]

  @nn.compact
  def __call__(self, z):
    spec = self.spec
    b, gh, gw, _ = z.shape
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x = layers.dense(spec.dim, (None, layers.EMBED), "embed", **kw)(
        z.reshape(b, gh * gw, -1).astype(self.dtype))
    cls = self.param("cls_token", nn.with_logical_partitioning(
        nn.initializers.zeros, (None, None, layers.EMBED)), (1, 1, spec.dim), self.param_dtype)
    x = jnp.concatenate([jnp.broadcast_to(cls.astype(self.dtype), (b, 1, spec.dim)), x], axis=1)
    x = x + jnp.asarray(sincos_2d(spec.dim, gh, gw), self.dtype)[None]
    if self.scan_blocks:
      x, _ = layers.scanned_blocks(x, spec.depth, self.remat_policy, dim=spec.dim,
                                   num_heads=spec.heads, mlp_hidden=spec.mlp_hidden,
                                   ln_eps=self.ln_eps, **kw)
    else:
      block = layers.block_class(self.remat_policy)
      for i in range(spec.depth):
        x = block(spec.dim, spec.heads, spec.mlp_hidden, ln_eps=self.ln_eps,
                  name=f"blocks_{i}", **kw)(x)
    x = layers.layer_norm(self.ln_eps, "norm", **kw)(x)
    x = layers.dense(self.patch_size**2 * 3, (layers.EMBED, None), "pred", **kw)(x)
    img = unpatchify(x[:, 1:].astype(jnp.float32), gh, gw, self.patch_size)
    return img * jnp.asarray(self.std, jnp.float32) + jnp.asarray(self.mean, jnp.float32)
