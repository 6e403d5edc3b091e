"""DINOv2 ViT encoder (S/B/L/g, patch 14, optional registers) returning the patch-token grid.

Input: images in [0, 1], (B, S, S, 3). The image is resized to `input_size` with PyTorch's
non-antialiased bicubic as a fixed matrix (the official UAE preprocessing), normalised with the
ImageNet statistics, patchified, and run through pre-norm blocks. Output: patch tokens only (CLS
and registers dropped), after the final LayerNorm (optionally without affine parameters), as a
row-major (B, H, W, C) grid.

The position-embedding parameter keeps the checkpoint's grid (37 x 37 for the public 518 px
weights); the forward pass maps it to the input grid with a fixed linear operator in the
convention of the reference implementation, so gradients reach the original table and a
fine-tuned encoder exports back to the PyTorch layout exactly.
"""
import dataclasses
from typing import Any, Optional

import flax.linen as nn
import jax.numpy as jnp

from uae_jax.models import layers
from uae_jax.models import resize

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclasses.dataclass(frozen=True)
class DinoV2Size:
  """Width, depth, heads and MLP of one DINOv2 size."""
  dim: int
  depth: int
  heads: int
  mlp_hidden: int
  swiglu: bool = False


# ViT-g uses a SwiGLU FFN whose hidden width is round_up_8(int(4 * 1536 * 2 / 3)) = 4096.
SIZES = {
    "tiny": DinoV2Size(64, 2, 4, 256),
    "S": DinoV2Size(384, 12, 6, 1536),
    "B": DinoV2Size(768, 12, 12, 3072),
    "L": DinoV2Size(1024, 24, 16, 4096),
    "g": DinoV2Size(1536, 40, 24, 4096, swiglu=True),
}


class DinoV2(nn.Module):
  """DINOv2 encoder; `__call__` returns the (B, H, W, C) patch grid (and block outputs if asked)."""
  size: str = "B"
  patch_size: int = 14
  num_registers: int = 4
  input_size: int = 224            # the image is resized to this before patchify (None: as given)
  pos_embed_grid: int = 37         # grid of the stored position table (37 = 518 px checkpoints)
  pos_embed_convention: str = "antialiased_bicubic"  # see resize.CONVENTIONS
  final_norm_affine: bool = False  # UAE drops the final LayerNorm's weight and bias
  layerscale_init: float = 1.0
  ln_eps: float = 1e-6
  mean: tuple = IMAGENET_MEAN
  std: tuple = IMAGENET_STD
  remat_policy: Optional[str] = None
  scan_blocks: bool = False        # one nn.scan over stacked `blocks` params (see scan_utils)
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @property
  def spec(self) -> DinoV2Size:
    if self.size not in SIZES:
      raise ValueError(f"DinoV2 size {self.size!r}: expected one of {sorted(SIZES)}")
    return SIZES[self.size]

  def preprocess(self, images):
    """[0,1] images -> resized (PyTorch bicubic, no antialias) and ImageNet-normalised."""
    s_h, s_w = images.shape[1:3]
    if self.input_size is not None and (s_h, s_w) != (self.input_size, self.input_size):
      my = resize.torch_bicubic_matrix(s_h, self.input_size)
      mx = resize.torch_bicubic_matrix(s_w, self.input_size)
      images = resize.resize_2d(images.astype(jnp.float32), my, mx)
    mean = jnp.asarray(self.mean, jnp.float32)
    std = jnp.asarray(self.std, jnp.float32)
    return (images - mean) / std

  def grid_pos_embed(self, pos_patch, grid_h: int, grid_w: int):
    """Map the stored (G*G, C) patch position table to a (grid_h*grid_w, C) table."""
    g = self.pos_embed_grid
    table = pos_patch.reshape(g, g, -1)
    if (grid_h, grid_w) != (g, g):
      my = resize.resize_matrix(g, grid_h, self.pos_embed_convention)
      mx = resize.resize_matrix(g, grid_w, self.pos_embed_convention)
      table = resize.resize_2d(table.astype(jnp.float32), my, mx)
    return table.reshape(grid_h * grid_w, -1)

  @nn.compact
  def __call__(self, images, return_blocks: bool = False):
    spec = self.spec
    dim = spec.dim
    x = self.preprocess(images).astype(self.dtype)
    if x.shape[1] % self.patch_size or x.shape[2] % self.patch_size:
      # PyTorch DINOv2 raises here too; silently flooring (as HF does) would drop pixels.
      raise ValueError(f"encoder input {x.shape[1:3]} is not a multiple of patch {self.patch_size};"
                       " set input_size (e.g. 224) so the image is resized first")
    x = nn.Conv(dim, (self.patch_size,) * 2, strides=(self.patch_size,) * 2, padding="VALID",
                dtype=self.dtype, param_dtype=self.param_dtype, name="patch_embed",
                kernel_init=nn.with_logical_partitioning(
                    nn.initializers.lecun_normal(), (None, None, None, layers.EMBED)),
                bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (layers.EMBED,)))(x)
    b, gh, gw, _ = x.shape
    x = x.reshape(b, gh * gw, dim)

    tok_init = nn.initializers.truncated_normal(0.02)
    axes3 = (None, None, layers.EMBED)
    cls = self.param("cls_token", nn.with_logical_partitioning(tok_init, axes3), (1, 1, dim),
                     self.param_dtype)
    pos = self.param("pos_embed", nn.with_logical_partitioning(tok_init, axes3),
                     (1, 1 + self.pos_embed_grid**2, dim), self.param_dtype)
    # Kept only so checkpoints round-trip; DINOv2's masked-token path is unused here.
    self.param("mask_token", nn.with_logical_partitioning(nn.initializers.zeros, (None, layers.EMBED)),
               (1, dim), self.param_dtype)
    patch_pos = self.grid_pos_embed(pos[0, 1:], gh, gw)
    x = x + patch_pos[None].astype(self.dtype)
    cls = (cls + pos[:, :1]).astype(self.dtype)
    parts = [jnp.broadcast_to(cls, (b, 1, dim))]
    if self.num_registers:
      # Registers are inserted after the position embedding: they get none.
      reg = self.param("register_tokens", nn.with_logical_partitioning(tok_init, axes3),
                       (1, self.num_registers, dim), self.param_dtype)
      parts.append(jnp.broadcast_to(reg.astype(self.dtype), (b, self.num_registers, dim)))
    x = jnp.concatenate(parts + [x], axis=1)

    if self.scan_blocks:
      x, outs = layers.scanned_blocks(
          x, spec.depth, self.remat_policy, collect=return_blocks, dim=dim, num_heads=spec.heads,
          mlp_hidden=spec.mlp_hidden, ln_eps=self.ln_eps, layerscale=self.layerscale_init,
          swiglu=spec.swiglu, dtype=self.dtype, param_dtype=self.param_dtype)
    else:
      block = layers.block_class(self.remat_policy)
      outs = []
      for i in range(spec.depth):
        x = block(dim, spec.heads, spec.mlp_hidden, ln_eps=self.ln_eps,
                  layerscale=self.layerscale_init, swiglu=spec.swiglu, dtype=self.dtype,
                  param_dtype=self.param_dtype, name=f"blocks_{i}")(x)
        outs.append(x)
    x = layers.layer_norm(self.ln_eps, "norm", self.dtype, self.param_dtype,
                          affine=self.final_norm_affine)(x)
    n_skip = 1 + self.num_registers
    grid = x[:, n_skip:].reshape(b, gh, gw, dim)
    if return_blocks:
      return grid, outs
    return grid
