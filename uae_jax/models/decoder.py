"""MAE-style ViT pixel decoder: latent grid (B, H, W, C) -> image (B, 16H, 16W, 3).

Linear C -> D, a zero-initialised trainable CLS token, fixed 2-D sin-cos position embeddings
(first half of the channels encodes the column index), pre-LN blocks (LayerNorm eps 1e-12, exact
GELU), final LayerNorm, Linear D -> p*p*3, unpatchify, then x * std + mean: the decoder predicts in
the encoder's normalised pixel space.

Sizes: a name from SIZES, or size='custom' with explicit dim/depth/num_heads/mlp_hidden (what a
converted checkpoint of a non-standard decoder records). `weight_init` chooses the Linear init:
'jax' (LeCun normal kernels, zero biases) or 'torch_default' (PyTorch's nn.Linear default,
kernel and bias uniform in +-1/sqrt(fan_in)), which the official recipe uses to reproduce the
official training trajectories. LayerNorms (ones/zeros) and the zero CLS token are the same in both.
"""
import dataclasses
from typing import Any, Optional

import einops
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from uae_jax.models import layers
from uae_jax.models.dinov2 import IMAGENET_MEAN, IMAGENET_STD, resolve_spec


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
WEIGHT_INITS = ("jax", "torch_default")


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


def torch_default_linears(params, rng):
  """Redraws every Dense kernel and bias in `params` uniform in +-1/sqrt(fan_in) (nn.Linear).

  A Dense is a dict holding a 'kernel' whose second-to-last axis is the input (fan_in); stacked
  (scanned) kernels carry a leading layers axis, which changes nothing. Boxed (logically
  partitioned) leaves keep their metadata. Everything else is returned unchanged.
  """
  is_box = lambda x: isinstance(x, nn.meta.AxisMetadata)
  unbox = lambda x: x.unbox() if is_box(x) else x
  rebox = lambda old, new: old.replace_boxed(new) if is_box(old) else new
  paths = [p for p, _ in jax.tree_util.tree_flatten_with_path(params, is_leaf=is_box)[0]]
  dense = [p for p in paths if p[-1].key == "kernel"]
  out = jax.tree.map(lambda x: x, params, is_leaf=is_box)
  for i, path in enumerate(dense):
    node = out
    for k in path[:-1]:
      node = node[k.key]
    kernel = unbox(node["kernel"])
    bound = 1.0 / np.sqrt(kernel.shape[-2])
    k_w, k_b = jax.random.split(jax.random.fold_in(rng, i))
    uniform = lambda key, like: jax.random.uniform(key, like.shape, like.dtype, -bound, bound)
    node["kernel"] = rebox(node["kernel"], uniform(k_w, kernel))
    if "bias" in node:
      node["bias"] = rebox(node["bias"], uniform(k_b, unbox(node["bias"])))
  return out


def unpatchify(tokens, grid_h: int, grid_w: int, patch: int):
  """(B, H*W, p*p*3) -> (B, pH, pW, 3); token (r, c), entry (p, q, ch) lands at (pr+p, pc+q)."""
  return einops.rearrange(tokens, "b (h w) (p q c) -> b (h p) (w q) c", h=grid_h, w=grid_w,
                          p=patch, q=patch)


def patchify(images, patch: int):
  """Inverse of `unpatchify`: (B, pH, pW, 3) -> (B, H*W, p*p*3)."""
  return einops.rearrange(images, "b (h p) (w q) c -> b (h w) (p q c)", p=patch, q=patch)


class PixelDecoder(nn.Module):
  """ViT decoder from a latent grid to pixels in [0, 1] (unclamped)."""
  size: str = "XL"                 # a SIZES name, or 'custom' with the four fields below
  dim: Optional[int] = None
  depth: Optional[int] = None
  num_heads: Optional[int] = None
  mlp_hidden: Optional[int] = None
  weight_init: str = "jax"         # 'jax' | 'torch_default' (see the module docstring)
  patch_size: int = 16
  ln_eps: float = 1e-12
  mean: tuple = IMAGENET_MEAN
  std: tuple = IMAGENET_STD
  remat_policy: Optional[str] = None
  scan_blocks: bool = False        # one nn.scan over stacked `blocks` params (see scan_utils)
  attention: Optional[str] = None  # attention implementation (layers.ATTENTION_IMPLEMENTATIONS)
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @property
  def spec(self) -> DecoderSize:
    """Width, depth, heads and MLP of this decoder: the named size's or the explicit ones."""
    return resolve_spec("PixelDecoder", SIZES, self.size, dict(
        dim=self.dim, depth=self.depth, heads=self.num_heads, mlp_hidden=self.mlp_hidden),
        DecoderSize)

  @nn.compact
  def __call__(self, z):
    spec = self.spec
    b, gh, gw, _ = z.shape
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    blk = dict(ln_eps=self.ln_eps, attention=self.attention, **kw)
    x = layers.dense(spec.dim, (None, layers.EMBED), "embed", **kw)(
        z.reshape(b, gh * gw, -1).astype(self.dtype))
    cls = self.param("cls_token", nn.with_logical_partitioning(
        nn.initializers.zeros, (None, None, layers.EMBED)), (1, 1, spec.dim), self.param_dtype)
    x = jnp.concatenate([jnp.broadcast_to(cls.astype(self.dtype), (b, 1, spec.dim)), x], axis=1)
    x = x + jnp.asarray(sincos_2d(spec.dim, gh, gw), self.dtype)[None]
    if self.scan_blocks:
      x, _ = layers.scanned_blocks(x, spec.depth, self.remat_policy, dim=spec.dim,
                                   num_heads=spec.heads, mlp_hidden=spec.mlp_hidden, **blk)
    else:
      block = layers.block_class(self.remat_policy)
      for i in range(spec.depth):
        x = block(spec.dim, spec.heads, spec.mlp_hidden, name=f"blocks_{i}", **blk)(x)
    x = layers.layer_norm(self.ln_eps, "norm", **kw)(x)
    x = layers.dense(self.patch_size**2 * 3, (layers.EMBED, None), "pred", **kw)(x)
    img = unpatchify(x[:, 1:].astype(jnp.float32), gh, gw, self.patch_size)
    if self.is_initializing():
      self._apply_weight_init()
    return img * jnp.asarray(self.std, jnp.float32) + jnp.asarray(self.mean, jnp.float32)

  def _apply_weight_init(self):
    """At init, replaces the Dense params just created when weight_init='torch_default'."""
    if self.weight_init not in WEIGHT_INITS:
      raise ValueError(f"PixelDecoder weight_init={self.weight_init!r}: expected one of "
                       f"{WEIGHT_INITS}")
    if self.weight_init == "jax":
      return
    # Flax's put_variable merges a dict into the child scope's variables, so the blocks'
    # (and the scanned stack's) params can be rewritten from here after they were created.
    redrawn = torch_default_linears(dict(self.variables["params"]), self.make_rng("params"))
    for name, value in redrawn.items():
      self.put_variable("params", name, value)
