"""SigLIP / SigLIP2 ViT vision tower (B/16 at 256 px for UAE-SigLIP2) returning the patch-token grid.

Input: images in [0, 1], (B, S, S, 3), resized to `input_size` only if needed (PyTorch bicubic, no
antialias; SigLIP2-B/16-256 takes the 256 px tokenizer image as is), normalised with mean = std =
0.5, patchified (with bias), the position table added - there is **no class token** - and run
through pre-norm blocks with tanh-GELU MLPs (LayerNorm eps 1e-6). Output: all patch tokens after
the final LayerNorm (HF `post_layernorm`, which SigLIP applies to the whole sequence); the UAE
wrapper strips its affine, so by default the latent is a parameter-free LayerNorm of the last block,
per-token standardised like DINOv2's (`final_norm_affine=True` keeps HF's weight and bias).

The attention-pool (MAP) head is not part of the latent. With `head=True` the module also holds
its parameters (HF `head.*`, so HF and official UAE-SigLIP2 checkpoints round-trip exactly) and
`return_pooled=True` computes HF's `pooler_output`.

Position embeddings: the stored table keeps the checkpoint's grid (16 x 16); other grids are
reached with a fixed per-axis matrix in the convention of the matching reference:
  'torch_bicubic'         HF `SiglipVisionModel(..., interpolate_pos_encoding=True)` - the
                          fixed-resolution checkpoints, incl. google/siglip2-base-patch16-256 as
                          the official UAE code loads it (through `SiglipModel`);
  'antialiased_bilinear'  HF `Siglip2VisionModel` (NaFlex): bilinear, antialias=True.
"""
import functools
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from uae_jax.models import clip as vit
from uae_jax.models import layers
from uae_jax.models import resize

SIGLIP_MEAN = (0.5, 0.5, 0.5)
SIGLIP_STD = (0.5, 0.5, 0.5)

SIZES = {
    "tiny": vit.VitSize(64, 2, 4, 256),
    "B": vit.VitSize(768, 12, 12, 3072),
    "L": vit.VitSize(1024, 24, 16, 4096),
    "So400m": vit.VitSize(1152, 27, 16, 4304),
}
CONVENTIONS = ("torch_bicubic", "antialiased_bilinear")


@functools.lru_cache(maxsize=64)
def antialiased_bilinear_matrix(in_size: int, out_size: int) -> np.ndarray:
  """(out, in) matrix of PyTorch `F.interpolate(mode='bilinear', antialias=True)` (= JAX's linear)."""
  eye = np.eye(in_size, dtype=np.float32)
  with jax.ensure_compile_time_eval(), jax.default_device(jax.devices("cpu")[0]):
    m = jax.image.resize(eye, (out_size, in_size), "linear", antialias=True)
  return np.asarray(m, np.float64)


def pos_matrix(convention: str):
  """The per-axis matrix builder of a SigLIP position-embedding convention."""
  if convention == "antialiased_bilinear":
    return antialiased_bilinear_matrix
  if convention == "torch_bicubic":
    return resize.torch_bicubic_matrix
  raise ValueError(f"pos_embed_convention={convention!r}: expected one of {CONVENTIONS}")


class MapHead(nn.Module):
  """SigLIP's multi-head attention pooling: a learned probe attends to the tokens, then LN + MLP."""
  dim: int
  num_heads: int
  mlp_hidden: int
  ln_eps: float = 1e-6
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    b = x.shape[0]
    probe = self.param("probe", nn.with_logical_partitioning(
        nn.initializers.normal(0.02), (None, None, layers.EMBED)), (1, 1, self.dim),
        self.param_dtype)
    mk = lambda n, axes: layers.dense(self.dim, axes, n, self.dtype, self.param_dtype)
    q = mk("query", (layers.EMBED, layers.HEADS))(jnp.broadcast_to(probe.astype(self.dtype),
                                                                   (b, 1, self.dim)))
    k = mk("key", (layers.EMBED, layers.HEADS))(x)
    v = mk("value", (layers.EMBED, layers.HEADS))(x)
    split = lambda t: t.reshape(b, t.shape[1], self.num_heads, -1)
    q, k, v = split(q), split(k), split(v)
    scale = (self.dim // self.num_heads) ** -0.5
    logits = jnp.einsum("bqhd,bkhd->bhqk", q * scale, k).astype(jnp.float32)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    h = jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(b, 1, self.dim)
    h = mk("proj", (layers.HEADS, layers.EMBED))(h)
    y = layers.layer_norm(self.ln_eps, "norm", self.dtype, self.param_dtype)(h)
    y = layers.Mlp(self.dim, self.mlp_hidden, activation="gelu_tanh", dtype=self.dtype,
                   param_dtype=self.param_dtype, name="mlp")(y)
    return (h + y)[:, 0]


class Siglip(nn.Module):
  """SigLIP(2) vision tower; `__call__` returns the (B, H, W, C) final-LayerNorm patch grid."""
  size: str = "B"
  patch_size: int = 16
  input_size: Optional[int] = 256
  pos_embed_grid: int = 16
  pos_embed_convention: str = "torch_bicubic"
  final_norm_affine: bool = False   # the UAE wrapper drops post_layernorm's weight and bias
  head: bool = False                # hold the attention-pool head (not part of the latent)
  ln_eps: float = 1e-6
  mean: tuple = SIGLIP_MEAN
  std: tuple = SIGLIP_STD
  remat_policy: Optional[str] = None
  scan_blocks: bool = False
  attention: Optional[str] = None   # attention implementation (layers.ATTENTION_IMPLEMENTATIONS)
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @property
  def spec(self) -> vit.VitSize:
    return vit.lookup_size(SIZES, self.size, "Siglip")

  @nn.compact
  def __call__(self, images, return_blocks: bool = False, return_pooled: bool = False):
    spec = self.spec
    dim = spec.dim
    x = vit.preprocess(images, self.input_size, self.mean, self.std).astype(self.dtype)
    vit.check_patch_multiple(x, self.patch_size)
    x = vit.patch_embed(x, dim, self.patch_size, True, self.dtype, self.param_dtype)
    b, gh, gw, _ = x.shape
    pos = self.param("pos_embed", nn.with_logical_partitioning(
        nn.initializers.normal(0.02), (None, layers.EMBED)), (self.pos_embed_grid**2, dim),
        self.param_dtype)
    patch_pos = vit.grid_pos_embed(pos, self.pos_embed_grid, gh, gw, self.pos_embed_convention,
                                   pos_matrix(self.pos_embed_convention))
    x = x.reshape(b, gh * gw, dim) + patch_pos[None].astype(self.dtype)
    x, outs = vit.run_blocks(x, spec, scan=self.scan_blocks, remat_policy=self.remat_policy,
                             collect=return_blocks, ln_eps=self.ln_eps, activation="gelu_tanh",
                             dtype=self.dtype, param_dtype=self.param_dtype,
                             attention=self.attention)
    x = layers.layer_norm(self.ln_eps, "norm", self.dtype, self.param_dtype,
                          affine=self.final_norm_affine)(x)
    out = (x.reshape(b, gh, gw, dim),)
    if return_blocks:
      out += (outs,)
    if self.head or return_pooled:
      if not self.head:
        raise ValueError("return_pooled needs head=True (the attention-pool head parameters)")
      pooled = MapHead(dim, spec.heads, spec.mlp_hidden, self.ln_eps, self.dtype,
                       self.param_dtype, name="head")(x if return_pooled else x[:1, :1])
      if return_pooled:
        out += (pooled,)
    return out[0] if len(out) == 1 else out


def load(path: str, encoder_cfg) -> dict:
  """Converted or HF SigLIP/SigLIP2 weights for `encoder_cfg`, in its block layout, shape-checked."""
  from uae_jax.convert import siglip as siglip_convert
  return siglip_convert.load_for_config(path, encoder_cfg)
