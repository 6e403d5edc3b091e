"""DINO-based GAN discriminator: a frozen DINO v1 ViT with trainable spectral-norm Conv1d heads.

JAX port of the official UAE/RAE `src/disc/dinodisc.py` (see docs/method.md#gan):

* `DinoViTBackbone`: DINO v1 ViT-S/8 (frozen). Input in [-1, 1], NHWC, any size; bilinear resize
  to 224 (PyTorch `align_corners=False`, no antialias), ImageNet normalisation of (x+1)/2,
  patchify 8, CLS + learned position table. Returns 5 patch-token maps (B, N, C): the final block
  output first, then the outputs after blocks 2, 5, 8, 11, so the first and last are the same
  tensor (an official-code quirk, docs/method.md#official-quirks). The final `norm` is kept for
  checkpoint fidelity but never applied; the MLP uses tanh-GELU as the official code does
  (original DINO uses exact GELU).
* `SpectralNormConv1d`, `BatchNormLocal`, `DiscHead`: one head per token map, logits (B, N).
* `Discriminator`: backbone + 5 heads, logits (B, 5 * N).

Variables of `Discriminator.init`:

  params:   {'backbone': {patch_embed{kernel (p,p,3,C), bias}, cls_token (1,1,C),
                          pos_embed (1,1+N,C), blocks_{i}{norm1, attn{query,key,value,proj},
                          norm2, mlp{fc1,fc2}}, norm{scale,bias}},
             'heads': {'head_{j}': {conv_in{weight (1,C,C), bias}, norm_in{scale,bias},
                                    res_conv{weight (9,C,C), bias}, res_norm{scale,bias},
                                    conv_out{weight (1,C,1), bias}}}}
  spectral: {'heads': {'head_{j}': {conv_in{u (C,), v (C,)}, res_conv{u (C,), v (9C,)},
                                    conv_out{u (1,), v (C,)}}}}

Head index j and sub-module names map to the PyTorch state dict as `heads.j.0.0` -> conv_in,
`heads.j.0.1` -> norm_in, `heads.j.1.fn.0` -> res_conv, `heads.j.1.fn.1` -> res_norm,
`heads.j.2` -> conv_out (`weight_orig` (O,I,k) -> `weight` (k,I,O); `weight_u` -> `u`;
`weight_v` -> `v`, unchanged: `v` is stored in PyTorch's (I, k) flattening order).

Usage:

  disc = Discriminator()
  variables = nn.unbox(disc.init(rng, x))            # {'params': ..., 'spectral': ...}
  # D step (train mode: one power iteration per call, as PyTorch's spectral_norm in train()):
  logits, upd = disc.apply(variables, x, train=True, mutable=['spectral'])
  variables = {'params': variables['params'], 'spectral': upd['spectral']}
  # G step / evaluation (eval mode: stored u, v, no update, nothing mutable):
  logits = disc.apply(variables, x)

The reference D step calls the discriminator twice in train mode (fake, then real), so u, v
advance twice per step: thread the 'spectral' state from the first call into the second rather
than concatenating the two batches (BatchNormLocal is per sample, so only the power iteration
would differ). Only `params['heads']` goes to the discriminator's optimiser. The backbone's
params pass through `stop_gradient` inside the module (`freeze_backbone=True`), so no weight
gradient is ever computed for them, while gradients still flow to the input image, which the
generator step needs (a stop_gradient on the backbone *features* would cut the generator's GAN
gradient). In the D step the inputs carry no gradient, so nothing is backpropagated through the
backbone at all.
"""
import functools
import math
from typing import Any, Mapping, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from uae_jax.models import layers
from uae_jax.models import resize

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SPECTRAL = "spectral"  # variable collection holding the power-iteration vectors u, v.
# Full-float32 matvecs for sigma and the power iteration: TPUs default to one bf16 pass, which
# would put ~1e-3 relative noise on every head's weight scale. They are tiny, so this is free.
_HI = jax.lax.Precision.HIGHEST


@functools.lru_cache(maxsize=64)
def torch_bilinear_matrix(in_size: int, out_size: int) -> np.ndarray:
  """(out, in) matrix of `F.interpolate(mode='bilinear', align_corners=False, antialias=False)`."""
  # Mirrors PyTorch's upsample_bilinear2d: a float32 scale in/out, source positions with
  # half-pixel centres evaluated as one fused multiply-add (PyTorch's CPU kernel compiles to an
  # FMA: computing scale * (d + 0.5) - 0.5 exactly in float64 and rounding once reproduces it,
  # where two float32 roundings put lambdas an ulp off), negative positions clamped to 0, the
  # upper tap clamped to the last pixel, float32 lambdas.
  f32 = np.float32
  scale = f32(in_size / out_size)
  src = (np.float64(scale) * (np.arange(out_size) + 0.5) - 0.5).astype(f32)
  src = np.maximum(src, f32(0))
  i0 = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
  i1 = np.minimum(i0 + 1, in_size - 1)
  w1 = (src - i0.astype(f32)).astype(f32)
  w0 = (f32(1) - w1).astype(f32)
  m = np.zeros((out_size, in_size), np.float64)
  rows = np.arange(out_size)
  np.add.at(m, (rows, i0), w0)
  np.add.at(m, (rows, i1), w1)
  return m


def _normalize(x, eps: float):
  """x / max(||x||, eps), as `torch.nn.functional.normalize`."""
  return x / jnp.maximum(jnp.linalg.norm(x), eps)


class DinoViTBackbone(nn.Module):
  """DINO v1 ViT (default S/8) returning the patch-token maps the discriminator heads read."""
  dim: int = 384
  depth: int = 12
  num_heads: int = 6
  mlp_hidden: int = 1536
  patch_size: int = 8
  image_size: int = 224          # input is bilinearly resized to this before patchify
  key_depths: Sequence[int] = (2, 5, 8, 11)
  ln_eps: float = 1e-6
  mean: tuple = IMAGENET_MEAN
  std: tuple = IMAGENET_STD
  remat_policy: Optional[str] = None
  scan_blocks: bool = False      # one nn.scan over stacked `blocks` params (see scan_utils)
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @property
  def num_tokens(self) -> int:
    return (self.image_size // self.patch_size) ** 2

  def preprocess(self, x):
    """[-1,1] NHWC -> bilinear resize to image_size -> ImageNet-normalised (x+1)/2."""
    x = x.astype(jnp.float32)
    s_h, s_w = x.shape[1:3]
    if (s_h, s_w) != (self.image_size, self.image_size):
      x = resize.resize_2d(x, torch_bilinear_matrix(s_h, self.image_size),
                           torch_bilinear_matrix(s_w, self.image_size))
    mean = np.asarray(self.mean, np.float32)
    std = np.asarray(self.std, np.float32)
    # The reference's fused form of ((x + 1) / 2 - mean) / std.
    return x * (0.5 / std) + (0.5 - mean) / std

  @nn.compact
  def __call__(self, x):
    if self.image_size % self.patch_size:
      raise ValueError(f"image_size {self.image_size} is not a multiple of patch {self.patch_size}")
    dim = self.dim
    x = self.preprocess(x).astype(self.dtype)
    x = nn.Conv(dim, (self.patch_size,) * 2, strides=(self.patch_size,) * 2, padding="VALID",
                dtype=self.dtype, param_dtype=self.param_dtype, name="patch_embed",
                kernel_init=nn.with_logical_partitioning(
                    nn.initializers.lecun_normal(), (None, None, None, layers.EMBED)),
                bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (layers.EMBED,)))(x)
    b, gh, gw, _ = x.shape
    x = x.reshape(b, gh * gw, dim)
    tok_init = nn.initializers.truncated_normal(0.02)
    axes3 = (None, None, layers.EMBED)
    cls = self.param("cls_token", nn.with_logical_partitioning(tok_init, axes3),
                     (1, 1, dim), self.param_dtype)
    pos = self.param("pos_embed", nn.with_logical_partitioning(tok_init, axes3),
                     (1, 1 + gh * gw, dim), self.param_dtype)
    x = jnp.concatenate([jnp.broadcast_to(cls.astype(self.dtype), (b, 1, dim)), x], axis=1)
    x = x + pos.astype(self.dtype)

    key_depths = set(d for d in self.key_depths if d < self.depth)
    feats = []
    if self.scan_blocks:
      x, outs = layers.scanned_blocks(
          x, self.depth, self.remat_policy, collect=True, dim=dim, num_heads=self.num_heads,
          mlp_hidden=self.mlp_hidden, ln_eps=self.ln_eps, layerscale=None, gelu_approximate=True,
          dtype=self.dtype, param_dtype=self.param_dtype)
      feats = [outs[i][:, 1:] for i in sorted(key_depths)]
    else:
      block = layers.block_class(self.remat_policy)
      for i in range(self.depth):
        x = block(dim, self.num_heads, self.mlp_hidden, ln_eps=self.ln_eps, layerscale=None,
                  gelu_approximate=True, dtype=self.dtype, param_dtype=self.param_dtype,
                  name=f"blocks_{i}")(x)
        if i in key_depths:
          feats.append(x[:, 1:])
    # The final norm is in the checkpoint but the reference never applies it; create its
    # parameters at init only so the tree round-trips to the PyTorch layout.
    if self.is_initializing():
      layers.layer_norm(self.ln_eps, "norm", self.dtype, self.param_dtype)(x[:, :1])
    return [x[:, 1:]] + feats


class SpectralNormConv1d(nn.Module):
  """Conv1d over tokens (B, N, C) with PyTorch `spectral_norm` semantics (dim=0, eps 1e-12).

  Flax's `nn.SpectralNorm` is not used because it differs from PyTorch: it reshapes the kernel
  as (prod(in dims), out) with a different flattening, keeps only u, updates in the opposite
  order and is not a drop-in for `weight_orig/weight_u/weight_v` checkpoints. Here W is
  transposed to PyTorch's (out, in, k) layout and flattened to (out, in*k); in train mode one
  power iteration v = normalize(W^T u), u = normalize(W v) runs (no gradient) and sigma =
  u^T W v uses the updated vectors; in eval mode the stored u, v are used as is. The gradient
  flows through W in sigma, as in PyTorch.
  """
  features: int
  kernel_size: int = 1
  n_power_iterations: int = 1
  eps: float = 1e-12
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, update_stats: bool = False):
    k, c_in, c_out = self.kernel_size, x.shape[-1], self.features
    # PyTorch's default Conv1d init: kaiming_uniform(a=sqrt(5)) and bias U(+-1/sqrt(fan_in)),
    # both of which reduce to U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
    bound = 1.0 / math.sqrt(c_in * k)
    uniform = lambda key, shape, dtype: jax.random.uniform(key, shape, dtype, -bound, bound)
    weight = self.param("weight", nn.with_logical_partitioning(uniform, (None, layers.EMBED, None)),
                        (k, c_in, c_out), self.param_dtype)
    bias = self.param("bias", nn.with_logical_partitioning(uniform, (None,)), (c_out,),
                      self.param_dtype)
    w_mat = jnp.transpose(weight, (2, 1, 0)).reshape(c_out, c_in * k).astype(jnp.float32)
    u_var = self.variable(SPECTRAL, "u", lambda: _normalize(
        jax.random.normal(self.make_rng("params"), (c_out,), jnp.float32), self.eps))
    v_var = self.variable(SPECTRAL, "v", lambda: _normalize(
        jax.random.normal(self.make_rng("params"), (c_in * k,), jnp.float32), self.eps))
    u, v = u_var.value, v_var.value
    # PyTorch does no power iteration when the module is constructed; mirror that at init.
    if update_stats and not self.is_initializing():
      w_ng = jax.lax.stop_gradient(w_mat)
      for _ in range(self.n_power_iterations):
        v = _normalize(jnp.dot(w_ng.T, u, precision=_HI), self.eps)
        u = _normalize(jnp.dot(w_ng, v, precision=_HI), self.eps)
      u_var.value, v_var.value = u, v
    u, v = jax.lax.stop_gradient(u), jax.lax.stop_gradient(v)
    sigma = jnp.dot(u, jnp.dot(w_mat, v, precision=_HI), precision=_HI)
    w = (weight.astype(jnp.float32) / sigma).astype(self.dtype)

    pad = k // 2
    if pad:
      x = jnp.pad(x, ((0, 0), (pad, pad), (0, 0)), mode="wrap")  # circular padding
    y = jax.lax.conv_general_dilated(x.astype(self.dtype), w, (1,), "VALID",
                                     dimension_numbers=("NWC", "WIO", "NWC"))
    return y + bias.astype(self.dtype)


class BatchNormLocal(nn.Module):
  """Per-sample, per-channel normalisation over the token axis (virtual batch size 1) + affine."""
  eps: float = 1e-6
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    c = x.shape[-1]
    scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, (None,)), (c,),
                       self.param_dtype)
    bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, (None,)), (c,),
                      self.param_dtype)
    # Statistics in float32 whatever the compute dtype, as the reference (`x.float()`).
    x = x.astype(jnp.float32)
    mean = x.mean(axis=1, keepdims=True)
    var = jnp.square(x - mean).mean(axis=1, keepdims=True)  # biased
    x = (x - mean) * jax.lax.rsqrt(var + self.eps)
    return x * scale.astype(jnp.float32) + bias.astype(jnp.float32)


class DiscHead(nn.Module):
  """One head: [SNConv1, BN, LReLU] -> residual [SNConv k circular, BN, LReLU] -> SNConv to 1."""
  kernel_size: int = 9
  norm_eps: float = 1e-6
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, update_stats: bool = False):
    c = x.shape[-1]
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    lrelu = lambda t: jax.nn.leaky_relu(t, 0.2)
    h = SpectralNormConv1d(c, 1, name="conv_in", **kw)(x, update_stats)
    h = lrelu(BatchNormLocal(self.norm_eps, self.param_dtype, name="norm_in")(h))
    r = SpectralNormConv1d(c, self.kernel_size, name="res_conv", **kw)(h, update_stats)
    r = lrelu(BatchNormLocal(self.norm_eps, self.param_dtype, name="res_norm")(r))
    h = (r + h) * (1.0 / np.sqrt(2.0))
    out = SpectralNormConv1d(1, 1, name="conv_out", **kw)(h, update_stats)
    return out[..., 0].astype(jnp.float32)


class DiscHeads(nn.Module):
  """One `DiscHead` per token map; logits concatenated along tokens."""
  kernel_size: int = 9
  norm_eps: float = 1e-6
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, feats, update_stats: bool = False):
    outs = [DiscHead(self.kernel_size, self.norm_eps, self.dtype, self.param_dtype,
                     name=f"head_{j}")(f, update_stats) for j, f in enumerate(feats)]
    return jnp.concatenate(outs, axis=1)


def _stop_gradient_tree(tree):
  return jax.tree.map(jax.lax.stop_gradient, tree)


class Discriminator(nn.Module):
  """Frozen DINO ViT backbone + trainable heads: [-1,1] NHWC images -> (B, 5 * N) logits."""
  dim: int = 384
  depth: int = 12
  num_heads: int = 6
  mlp_hidden: int = 1536
  patch_size: int = 8
  image_size: int = 224
  key_depths: Sequence[int] = (2, 5, 8, 11)
  ln_eps: float = 1e-6
  head_kernel_size: int = 9
  norm_eps: float = 1e-6
  freeze_backbone: bool = True
  remat_policy: Optional[str] = None
  scan_blocks: bool = False
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @property
  def num_logits(self) -> int:
    n_maps = 1 + len([d for d in self.key_depths if d < self.depth])
    return n_maps * (self.image_size // self.patch_size) ** 2

  @nn.compact
  def __call__(self, x, train: bool = False):
    backbone_cls = DinoViTBackbone
    if self.freeze_backbone:
      # stop_gradient on the backbone *parameters*: no weight gradients, but d logits / d x
      # still flows through the backbone for the generator's GAN term. `init` only while
      # initialising: with init=True, map_variables re-runs the module to create variables
      # whenever any collection is mutable, which fails in apply(..., mutable=['spectral']).
      backbone_cls = nn.map_variables(DinoViTBackbone, "params", trans_in_fn=_stop_gradient_tree,
                                      init=self.is_initializing())
    feats = backbone_cls(
        dim=self.dim, depth=self.depth, num_heads=self.num_heads, mlp_hidden=self.mlp_hidden,
        patch_size=self.patch_size, image_size=self.image_size, key_depths=tuple(self.key_depths),
        ln_eps=self.ln_eps, remat_policy=self.remat_policy, scan_blocks=self.scan_blocks,
        dtype=self.dtype, param_dtype=self.param_dtype, name="backbone")(x)
    return DiscHeads(self.head_kernel_size, self.norm_eps, self.dtype, self.param_dtype,
                     name="heads")(feats, update_stats=train)


# Discriminator fields that describe its frozen backbone (the rest are the heads' or compute's).
_BACKBONE_ARCH = ("dim", "depth", "num_heads", "mlp_hidden", "patch_size", "image_size")
_BACKBONE_FIELDS = _BACKBONE_ARCH + ("key_depths", "ln_eps", "remat_policy", "scan_blocks")


def load_backbone(path: str, disc_kwargs: Mapping) -> dict:
  """Frozen DINO ViT backbone params for `Discriminator(**disc_kwargs)`, shape-checked.

  `path`: a directory written by `python -m uae_jax.convert dino-disc`, or the PyTorch /
  safetensors DINO ViT file (`dino_vit_small_patch8_224.pth` for the default ViT-S/8). The
  params come back in the backbone's block layout (`scan_blocks`). Raises LoadError naming `path`
  when the file is another architecture than `disc_kwargs` asks for.
  """
  from uae_jax.convert import discriminator as convert_disc
  from uae_jax.models import scan_utils, tree_check
  kwargs = {k: v for k, v in dict(disc_kwargs).items() if k in _BACKBONE_FIELDS}
  backbone = DinoViTBackbone(**kwargs)
  expect = {k: getattr(backbone, k) for k in _BACKBONE_ARCH}
  params, _ = convert_disc.load_dino_disc(path, expect=expect)
  params = scan_utils.to_layout(params, backbone.scan_blocks)
  images = jax.ShapeDtypeStruct((1, backbone.image_size, backbone.image_size, 3), jnp.float32)
  target = jax.eval_shape(backbone.init, jax.random.key(0), images)["params"]
  tree_check.check_same_shapes(params, target, f"discriminator backbone {path}")
  return params
