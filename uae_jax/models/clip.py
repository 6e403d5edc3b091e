"""OpenAI CLIP ViT vision tower (B/16, L/14, ...) returning the patch-token grid, as UAE-CLIP uses it.

Input: images in [0, 1], (B, S, S, 3). The image is resized to `input_size` (224 for CLIP-L/14)
with PyTorch's non-antialiased bicubic as a fixed matrix, normalised with the CLIP statistics,
patchified by a bias-free convolution, a class token is prepended and the position table added,
then `pre_norm` (HF `pre_layrnorm`) and pre-norm blocks with quick-GELU MLPs (LayerNorm eps 1e-5).

Output: the patch tokens of the **last block, without any LayerNorm**. HF `CLIPVisionModel` applies
its `post_layernorm` only to the pooled class token, so `last_hidden_state[:, 1:]` - the official
UAE-CLIP latent (its `normalize` flag strips an affine that never touches the patch tokens) - is the
raw residual stream. The latent therefore has large, uneven per-token norms, unlike DINOv2/SigLIP2.
With `post_norm=True` the module also holds the `post_layernorm` parameters (so an HF checkpoint
round-trips exactly) and `return_pooled=True` gives HF's `pooler_output`.

The position parameter keeps the checkpoint's grid (16 x 16 + class row for 224 px / patch 14);
at other grids the forward pass resizes it with a fixed matrix in HF's convention (PyTorch bicubic,
`size=`, no antialias), so gradients reach the stored table and exports stay exact.

Shared helpers for the other ViT encoders (SigLIP, MAE) live here too: `preprocess`,
`grid_pos_embed` and `run_blocks`.
"""
import dataclasses
from typing import Any, Optional

import flax.linen as nn
import jax.numpy as jnp

from uae_jax.models import layers
from uae_jax.models import resize

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclasses.dataclass(frozen=True)
class VitSize:
  """Width, depth, heads and MLP hidden width of one ViT size."""
  dim: int
  depth: int
  heads: int
  mlp_hidden: int


SIZES = {
    "tiny": VitSize(64, 2, 4, 256),
    "B": VitSize(768, 12, 12, 3072),
    "L": VitSize(1024, 24, 16, 4096),
}


def lookup_size(sizes: dict, size: str, what: str) -> VitSize:
  """The named size, or a ValueError listing the known ones."""
  if size not in sizes:
    raise ValueError(f"{what} size {size!r}: expected one of {sorted(sizes)}")
  return sizes[size]


def preprocess(images, input_size: Optional[int], mean, std):
  """[0,1] images -> resized to input_size (PyTorch bicubic, no antialias), then (x - mean) / std."""
  s_h, s_w = images.shape[1:3]
  if input_size is not None and (s_h, s_w) != (input_size, input_size):
    my = resize.torch_bicubic_matrix(s_h, input_size)
    mx = resize.torch_bicubic_matrix(s_w, input_size)
    images = resize.resize_2d(images.astype(jnp.float32), my, mx)
  return (images - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)


def check_patch_multiple(x, patch_size: int):
  """Refuse inputs that are not a multiple of the patch (HF would silently drop pixels)."""
  if x.shape[1] % patch_size or x.shape[2] % patch_size:
    raise ValueError(f"encoder input {x.shape[1:3]} is not a multiple of patch {patch_size}; "
                     "set input_size so the image is resized first")


def grid_pos_embed(table, grid: int, grid_h: int, grid_w: int, convention: str, matrix_fn=None):
  """Map a stored (grid*grid, C) position table to (grid_h*grid_w, C) with a fixed linear map.

  `matrix_fn(in, out)` builds the per-axis (out, in) matrix; default `resize.resize_matrix` with
  `convention`. At the stored grid the table is used as is (as HF does).
  """
  t = table.reshape(grid, grid, -1)
  if (grid_h, grid_w) != (grid, grid):
    fn = matrix_fn or (lambda i, o: resize.resize_matrix(i, o, convention))
    t = resize.resize_2d(t.astype(jnp.float32), fn(grid, grid_h), fn(grid, grid_w))
  return t.reshape(grid_h * grid_w, -1)


def patch_embed(x, dim: int, patch_size: int, use_bias: bool, dtype, param_dtype):
  """Non-overlapping patchify convolution named `patch_embed`: (B,H,W,3) -> (B,h,w,dim)."""
  kw = {}
  if use_bias:
    kw["bias_init"] = nn.with_logical_partitioning(nn.initializers.zeros, (layers.EMBED,))
  return nn.Conv(dim, (patch_size,) * 2, strides=(patch_size,) * 2, padding="VALID",
                 use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, name="patch_embed",
                 kernel_init=nn.with_logical_partitioning(
                     nn.initializers.lecun_normal(), (None, None, None, layers.EMBED)), **kw)(x)


def run_blocks(x, spec: VitSize, *, scan: bool, remat_policy: Optional[str], collect: bool,
               ln_eps: float, activation: str, dtype, param_dtype,
               attention: Optional[str] = None):
  """The transformer blocks (`blocks_{i}`, or one scanned `blocks`); returns (x, block outputs)."""
  kw = dict(dim=spec.dim, num_heads=spec.heads, mlp_hidden=spec.mlp_hidden, ln_eps=ln_eps,
            activation=activation, attention=attention, dtype=dtype, param_dtype=param_dtype)
  if scan:
    return layers.scanned_blocks(x, spec.depth, remat_policy, collect=collect, **kw)
  block = layers.block_class(remat_policy)
  outs = []
  for i in range(spec.depth):
    x = block(name=f"blocks_{i}", **kw)(x)
    outs.append(x)
  return x, outs


class Clip(nn.Module):
  """CLIP vision tower; `__call__` returns the (B, H, W, C) raw last-block patch grid."""
  size: str = "L"
  patch_size: int = 14
  input_size: Optional[int] = 224   # the image is resized to this before patchify (None: as given)
  pos_embed_grid: int = 16          # grid of the stored position table (16 = 224 px / patch 14)
  pos_embed_convention: str = "torch_bicubic"  # HF CLIP interpolate_pos_encoding
  post_norm: bool = False           # hold HF `post_layernorm` (pooled output only; not the latent)
  ln_eps: float = 1e-5
  mean: tuple = CLIP_MEAN
  std: tuple = CLIP_STD
  remat_policy: Optional[str] = None
  scan_blocks: bool = False
  attention: Optional[str] = None   # attention implementation (layers.ATTENTION_IMPLEMENTATIONS)
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @property
  def spec(self) -> VitSize:
    return lookup_size(SIZES, self.size, "Clip")

  @nn.compact
  def __call__(self, images, return_blocks: bool = False, return_pooled: bool = False):
    spec = self.spec
    dim = spec.dim
    x = preprocess(images, self.input_size, self.mean, self.std).astype(self.dtype)
    check_patch_multiple(x, self.patch_size)
    x = patch_embed(x, dim, self.patch_size, False, self.dtype, self.param_dtype)
    b, gh, gw, _ = x.shape
    x = x.reshape(b, gh * gw, dim)
    init = nn.initializers.normal(0.02)
    cls = self.param("cls_token", nn.with_logical_partitioning(init, (layers.EMBED,)), (dim,),
                     self.param_dtype)
    pos = self.param("pos_embed", nn.with_logical_partitioning(init, (None, layers.EMBED)),
                     (1 + self.pos_embed_grid**2, dim), self.param_dtype)
    patch_pos = grid_pos_embed(pos[1:], self.pos_embed_grid, gh, gw, self.pos_embed_convention)
    cls = (cls + pos[0]).astype(self.dtype)
    x = jnp.concatenate([jnp.broadcast_to(cls, (b, 1, dim)),
                         x + patch_pos[None].astype(self.dtype)], axis=1)
    x = layers.layer_norm(self.ln_eps, "pre_norm", self.dtype, self.param_dtype)(x)
    x, outs = run_blocks(x, spec, scan=self.scan_blocks, remat_policy=self.remat_policy,
                         collect=return_blocks, ln_eps=self.ln_eps, activation="quick_gelu",
                         dtype=self.dtype, param_dtype=self.param_dtype, attention=self.attention)
    grid = x[:, 1:].reshape(b, gh, gw, dim)
    out = (grid,)
    if return_blocks:
      out += (outs,)
    if return_pooled:
      if not self.post_norm:
        raise ValueError("return_pooled needs post_norm=True (the post_layernorm parameters)")
      out += (layers.layer_norm(self.ln_eps, "post_norm", self.dtype, self.param_dtype)(x[:, 0]),)
    elif self.post_norm:
      # Create the parameters even when unused, so params always match the checkpoint.
      layers.layer_norm(self.ln_eps, "post_norm", self.dtype, self.param_dtype)(x[:1, 0])
    return out[0] if len(out) == 1 else out


def load(path: str, encoder_cfg) -> dict:
  """Converted or HF CLIP weights for `encoder_cfg`, in its block layout, shape-checked."""
  from uae_jax.convert import clip as clip_convert
  return clip_convert.load_for_config(path, encoder_cfg)
