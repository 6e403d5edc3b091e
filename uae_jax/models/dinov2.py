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
import logging
from typing import Any, Mapping, Optional

import flax.linen as nn
import jax
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
def spec_text(spec) -> str:
  """'dim 768, depth 12, 12 heads, MLP 3072' for messages."""
  swiglu = " SwiGLU" if getattr(spec, "swiglu", False) else ""
  return f"dim {spec.dim}, depth {spec.depth}, {spec.heads} heads, MLP {spec.mlp_hidden}{swiglu}"


CUSTOM = "custom"  # size name whose dims come from explicit module fields (e.g. a converted file)


def resolve_spec(owner: str, sizes: Mapping, size: str, explicit: Mapping, spec_cls):
  """The named size's spec, or `spec_cls(**explicit)` for size='custom' (all dims required).

  A named size with explicit dims is refused rather than silently ignoring one of the two.
  """
  given = {k: v for k, v in explicit.items() if v is not None}
  if size != CUSTOM:
    if size not in sizes:
      raise ValueError(f"{owner} size {size!r}: expected one of {sorted(sizes)} or {CUSTOM!r}")
    if given:
      raise ValueError(f"{owner} size={size!r} fixes its dims; set size={CUSTOM!r} to give "
                       f"{sorted(given)} explicitly")
    return sizes[size]
  required = [f.name for f in dataclasses.fields(spec_cls) if f.default is dataclasses.MISSING]
  missing = [k for k in required if k not in given]
  if missing:
    raise ValueError(f"{owner} size={CUSTOM!r} needs {missing} (module fields "
                     f"{'/'.join(FIELD_NAMES.get(k, k) for k in missing)})")
  spec = spec_cls(**given)
  if spec.dim % spec.heads:
    raise ValueError(f"{owner}: width {spec.dim} is not divisible by {spec.heads} heads")
  return spec


# Module field holding each spec entry (`heads` is `num_heads` on the modules).
FIELD_NAMES = {"heads": "num_heads"}


class DinoV2(nn.Module):
  """DINOv2 encoder; `__call__` returns the (B, H, W, C) patch grid (and block outputs if asked)."""
  size: str = "B"                  # a SIZES name, or 'custom' with the five fields below
  dim: Optional[int] = None        # size='custom' only: width, depth, heads, MLP width, SwiGLU
  depth: Optional[int] = None
  num_heads: Optional[int] = None
  mlp_hidden: Optional[int] = None
  swiglu: Optional[bool] = None    # custom default False (only ViT-g uses SwiGLU)
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
  attention: Optional[str] = None  # attention implementation (layers.ATTENTION_IMPLEMENTATIONS)
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @property
  def spec(self) -> DinoV2Size:
    """Width, depth, heads and MLP of this encoder: the named size's or the explicit ones."""
    return resolve_spec("DinoV2", SIZES, self.size, dict(
        dim=self.dim, depth=self.depth, heads=self.num_heads, mlp_hidden=self.mlp_hidden,
        swiglu=self.swiglu), DinoV2Size)

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
          swiglu=spec.swiglu, attention=self.attention, dtype=self.dtype,
          param_dtype=self.param_dtype)
    else:
      block = layers.block_class(self.remat_policy)
      outs = []
      for i in range(spec.depth):
        x = block(dim, spec.heads, spec.mlp_hidden, ln_eps=self.ln_eps,
                  layerscale=self.layerscale_init, swiglu=spec.swiglu, attention=self.attention,
                  dtype=self.dtype, param_dtype=self.param_dtype, name=f"blocks_{i}")(x)
        outs.append(x)
    x = layers.layer_norm(self.ln_eps, "norm", self.dtype, self.param_dtype,
                          affine=self.final_norm_affine)(x)
    n_skip = 1 + self.num_registers
    grid = x[:, n_skip:].reshape(b, gh, gw, dim)
    if return_blocks:
      return grid, outs
    return grid


# ------------------------------------------------------------------------------------------------
# Loading pretrained weights.

# Fields that decide what the weights mean; a converted file must agree with the config on them.
_ARCH_FIELDS = ("num_registers", "pos_embed_grid", "patch_size")
# Fields that change the function but not the shapes: a mismatch is only worth a warning.
_SOFT_FIELDS = ("pos_embed_convention", "ln_eps")


def check_arch(found: Mapping, cfg: Mapping, what: str) -> None:
  """Raises LoadError if converted DinoV2 kwargs `found` are another encoder than `cfg` asks for."""
  from uae_jax.errors import LoadError
  have = DinoV2(**{k: v for k, v in found.items() if k != "input_size"})
  want = DinoV2(**cfg)
  problems = []
  if have.spec != want.spec:
    problems.append(f"size {have.size!r} ({spec_text(have.spec)}) but model.encoder.size="
                    f"{want.size!r} ({spec_text(want.spec)})")
  problems += [f"{k}={getattr(have, k)!r} but model.encoder.{k}={getattr(want, k)!r}"
               for k in _ARCH_FIELDS if getattr(have, k) != getattr(want, k)]
  if problems:
    raise LoadError(f"{what}: the DINOv2 weights do not fit the config: " + "; ".join(problems))
  for k in _SOFT_FIELDS:
    if k in found and getattr(have, k) != getattr(want, k):
      logging.warning("%s was converted with %s=%r but model.encoder.%s=%r", what, k,
                      getattr(have, k), k, getattr(want, k))


def abstract_params(cfg: Mapping):
  """Abstract (shape-only) params of `DinoV2(**cfg)`, via jax.eval_shape."""
  model = DinoV2(**cfg)
  size = model.input_size or model.pos_embed_grid * model.patch_size
  images = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
  return nn.unbox(jax.eval_shape(model.init, jax.random.key(0), images))["params"]


def load(path: str, encoder_cfg: Mapping):
  """Pretrained DINOv2 params for the encoder `encoder_cfg` (config.model.encoder) describes.

  `path`: a directory written by `python -m uae_jax.convert dinov2`, or a raw HF / timm / FAIR
  DINOv2 file or HF model directory (converted on the fly). The params come back in the
  config's block layout (`scan_blocks`), without the final-norm affine when
  `final_norm_affine` is False, and shape-checked against the model the config builds. Another
  architecture (size, registers, position grid) raises LoadError naming `path`.
  """
  from uae_jax.convert import dinov2 as convert_dinov2
  from uae_jax.models import scan_utils, tree_check
  cfg = {k: v for k, v in dict(encoder_cfg).items() if k != "kind"}
  affine = bool(cfg.get("final_norm_affine", False))
  custom_heads = cfg.get("num_heads") if cfg.get("size") == CUSTOM else None
  params, found = convert_dinov2.load_dinov2(path, drop_final_norm=not affine,
                                             num_heads=custom_heads)
  check_arch(found, cfg, path)
  params = scan_utils.to_layout(params, bool(cfg.get("scan_blocks", False)))
  tree_check.check_same_shapes(params, abstract_params(cfg), f"DINOv2 weights {path}")
  return params
