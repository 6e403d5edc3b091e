"""MAE ViT encoder (ViT-B/16 at 224 px by default) returning the patch-token grid, as `MAEwNorm` does.

`MAEwNorm` is the official UAE code's MAE wrapper (marked unused there; no config or checkpoint
of the UAE code uses it). It takes `ViTMAEForPreTraining.vit` with `mask_ratio = 0` and the
identity shuffle (`noise = arange(L)`), always passes `interpolate_pos_encoding=True`, removes the
final LayerNorm's weight and bias, and keeps `last_hidden_state[:, 1:]` (class token dropped).
The wrapper states no input size or pixel statistics; this module uses the standard MAE values that
`facebook/vit-mae-base` ships (224 px, ImageNet mean / std), not values from the UAE code.

Input: images in [0, 1], (B, S, S, 3), resized to `input_size` if needed (PyTorch bicubic, no
antialias, as a fixed matrix), normalised with the ImageNet statistics, patchified by a convolution
with bias, the fixed position table added, a class token prepended, then pre-norm blocks with
exact-GELU MLPs (LayerNorm eps 1e-12, HF `ViTMAEConfig.layer_norm_eps`).
Output: the patch tokens after the final LayerNorm, by default **without** affine (the wrapper's
LN), so each token is standardised like DINOv2's and SigLIP2's latent; `final_norm_affine=True`
keeps HF's `layernorm` weight and bias (HF `last_hidden_state[:, 1:]`, and exact round trips).

Position embeddings are MAE's fixed 2-D sin-cos table (first half encodes the column, class row
zero; the `facebook/vit-mae-*` layout). It is a constant computed here, not a parameter. At a grid
other than `pos_embed_grid` it is resized as HF `interpolate_pos_encoding` does (PyTorch bicubic,
`size=`, no antialias), also as a fixed matrix.
"""
import functools
from typing import Any, Optional

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from uae_jax.models import clip as vit
from uae_jax.models import layers
from uae_jax.models.decoder import sincos_2d
from uae_jax.models.dinov2 import IMAGENET_MEAN, IMAGENET_STD

SIZES = {
    "tiny": vit.VitSize(64, 2, 4, 256),
    "B": vit.VitSize(768, 12, 12, 3072),
    "L": vit.VitSize(1024, 24, 16, 4096),
    "H": vit.VitSize(1280, 32, 16, 5120),
}
LN_EPS = 1e-12  # HF ViTMAEConfig.layer_norm_eps (all facebook/vit-mae-* configs)


@functools.lru_cache(maxsize=16)
def pos_table(dim: int, grid: int) -> np.ndarray:
  """The fixed (1 + grid*grid, dim) MAE sin-cos table, class row first (zeros), float32."""
  return sincos_2d(dim, grid, grid, cls_token=True)


class Mae(nn.Module):
  """MAE ViT encoder; `__call__` returns the (B, H, W, C) final-LayerNorm patch grid."""
  size: str = "B"
  patch_size: int = 16
  input_size: Optional[int] = 224   # the image is resized to this before patchify (None: as given)
  pos_embed_grid: int = 14          # grid of the fixed sin-cos table (14 = 224 px / patch 16)
  final_norm_affine: bool = False   # MAEwNorm removes the final LayerNorm's weight and bias
  ln_eps: float = LN_EPS
  mean: tuple = IMAGENET_MEAN
  std: tuple = IMAGENET_STD
  remat_policy: Optional[str] = None
  scan_blocks: bool = False
  attention: Optional[str] = None   # attention implementation (layers.ATTENTION_IMPLEMENTATIONS)
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @property
  def spec(self) -> vit.VitSize:
    return vit.lookup_size(SIZES, self.size, "Mae")

  @nn.compact
  def __call__(self, images, return_blocks: bool = False, return_cls: bool = False):
    spec = self.spec
    dim = spec.dim
    x = vit.preprocess(images, self.input_size, self.mean, self.std).astype(self.dtype)
    vit.check_patch_multiple(x, self.patch_size)
    x = vit.patch_embed(x, dim, self.patch_size, True, self.dtype, self.param_dtype)
    b, gh, gw, _ = x.shape
    table = jnp.asarray(pos_table(dim, self.pos_embed_grid))
    # HF interpolate_pos_encoding's convention: the patch rows resized, the class row kept.
    patch_pos = vit.grid_pos_embed(table[1:], self.pos_embed_grid, gh, gw, "torch_bicubic")
    cls = self.param("cls_token", nn.with_logical_partitioning(
        nn.initializers.normal(0.02), (None, None, layers.EMBED)), (1, 1, dim), self.param_dtype)
    cls = (cls[0] + table[:1]).astype(self.dtype)
    # mask_ratio 0 with the identity shuffle: every patch is kept, in row-major order.
    x = jnp.concatenate([jnp.broadcast_to(cls, (b, 1, dim)),
                         x.reshape(b, gh * gw, dim) + patch_pos[None].astype(self.dtype)], axis=1)
    x, outs = vit.run_blocks(x, spec, scan=self.scan_blocks, remat_policy=self.remat_policy,
                             collect=return_blocks, ln_eps=self.ln_eps, activation="gelu",
                             dtype=self.dtype, param_dtype=self.param_dtype,
                             attention=self.attention)
    x = layers.layer_norm(self.ln_eps, "norm", self.dtype, self.param_dtype,
                          affine=self.final_norm_affine)(x)
    out = (x[:, 1:].reshape(b, gh, gw, dim),)
    if return_blocks:
      out += (outs,)
    if return_cls:
      out += (x[:, 0],)
    return out[0] if len(out) == 1 else out


def load(path: str, encoder_cfg) -> dict:
  """Converted or HF ViTMAE weights for `encoder_cfg`, in its block layout, shape-checked."""
  from uae_jax.convert import mae as mae_convert
  return mae_convert.load_for_config(path, encoder_cfg)
