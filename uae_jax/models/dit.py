"""Diffusion transformers on latent grids: DiT^DH (DiT with a wide DDT head) and LightningDiT.

Both predict the flow-matching velocity `v(x_t, t, y)` of a channels-last latent grid
`x_t: (B, H, W, C)` at transport time `t` in [0, 1] (t = 0 data, t = 1 noise) for class `y`
(`num_classes` is the null class used by classifier-free guidance). docs/generation.md has the
full description; the pieces, exactly:

* Time: Gaussian-Fourier features `[sin(2 pi t W), cos(2 pi t W)]` of 256 fixed frequencies
  `W ~ N(0, 1)` drawn once at init and kept in the params (`t_embedder/freqs`, never trained; the
  DiT task freezes it), then Linear -> SiLU -> Linear.
* Class: a (num_classes + 1)-row table; in train mode each label becomes the null class with
  probability `class_dropout_prob` (rng stream 'label_dropout').
* Blocks: `x += g1 * Attn(mod(RMSNorm(x), sh1, sc1))`, `x += g2 * SwiGLU(mod(RMSNorm(x), sh2, sc2))`
  with `mod(u) = u * (1 + sc) + sh` and (sh1, sc1, g1, sh2, sc2, g2) = Linear(SiLU(cond)) (zero
  initialised). RMSNorm eps 1e-6 in float32; SwiGLU hidden int(2/3 * 4 H) with biases;
  attention with qkv bias, optional q/k RMSNorm and 2-D RoPE on q and k (first half of each
  head's channels rotates with the row, second half with the column; interleaved pairs).
* LightningDiT: cond = t_e + y_e per sample; fixed 2-D sin-cos position embedding; final layer
  RMSNorm -> mod(shift, scale from cond) -> Linear (zero initialised).
* DiT^DH: cond = silu(t_e + y_e); body on the sin-cos-embedded input; then s = Linear(silu(t_e + s))
  to the head width; the head re-embeds the *noisy input* x_t (no absolute position embedding)
  and runs its blocks with adaLN conditioned per token on s; final layer conditioned on s.

Parameter init follows the reference implementations: DiT^DH keeps PyTorch's default Linear
init (uniform +-1/sqrt(fan_in)) except xavier patch embeddings, N(0, 0.02) label table and time
MLP, zero adaLN and output layers; LightningDiT uses xavier everywhere with the same exceptions.
"""
import dataclasses
from typing import Any, Optional

import einops
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from uae_jax.models import layers
from uae_jax.models.decoder import sincos_2d

EMBED, MLP, HEADS, LAYERS = layers.EMBED, layers.MLP, layers.HEADS, layers.LAYERS
Dtype = Any


@dataclasses.dataclass(frozen=True)
class DiTSize:
  """Width, depth and heads of a stack of blocks."""
  dim: int
  depth: int
  heads: int


# Body sizes (DiT / SiT naming) and head sizes ("DH": the 2048-wide, 2-block DDT head).
SIZES = {
    "tiny": DiTSize(64, 2, 4),
    "small_cpu": DiTSize(128, 4, 4),
    "S": DiTSize(384, 12, 6),
    "B": DiTSize(768, 12, 12),
    "L": DiTSize(1024, 24, 16),
    "XL": DiTSize(1152, 28, 16),
}
HEAD_SIZES = {
    "tiny": DiTSize(128, 1, 4),
    "small_cpu": DiTSize(256, 2, 4),
    "DH": DiTSize(2048, 2, 16),
}
KINDS = ("ddt", "lightning")
FREQS = "freqs"  # name of the fixed Fourier frequency array (frozen by the DiT task)


# ------------------------------------------------------------------------------ initialisers
def _torch_bias_init(fan_in: int):
  """PyTorch nn.Linear bias init: uniform in +-1/sqrt(fan_in)."""
  bound = 1.0 / np.sqrt(fan_in)
  return lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound, bound)


def _inits(style: str, fan_in: int):
  """(kernel_init, bias_init) for an init style: torch | xavier | zeros | normal02."""
  zeros = nn.initializers.zeros
  if style == "torch":  # kaiming_uniform(a=sqrt(5)) == uniform(+-1/sqrt(fan_in))
    return nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform"), _torch_bias_init(fan_in)
  if style == "xavier":
    return nn.initializers.xavier_uniform(), zeros
  if style == "zeros":
    return zeros, zeros
  if style == "normal02":
    return nn.initializers.normal(0.02), zeros
  raise ValueError(f"init style {style!r}: expected torch | xavier | zeros | normal02")


def linear(features: int, fan_in: int, axes: tuple, name: str, style: str, dtype: Dtype,
           param_dtype: Dtype) -> nn.Dense:
  """A Dense with logical axis names `axes` (in, out) and one of the reference init styles."""
  k_init, b_init = _inits(style, fan_in)
  return layers.dense(features, axes, name, dtype, param_dtype, kernel_init=k_init,
                      bias_init=b_init)


# ------------------------------------------------------------------------------ fixed tables
def rope_tables(head_dim: int, grid: int, theta: float = 10000.0):
  """(cos, sin) of the 2-D interleaved-pair RoPE, each (grid*grid, head_dim), row-major tokens.

  Per axis the rotated width is head_dim/2 with frequencies 1/theta^(arange(0, d, 2)/d); each
  frequency covers one (2i, 2i+1) pair. The first half of the head encodes the row, the second
  half the column.
  """
  if head_dim % 4:
    raise ValueError(f"2-D RoPE needs a head dim divisible by 4, got {head_dim}")
  d = head_dim // 2
  freqs = 1.0 / theta ** (np.arange(0, d, 2, dtype=np.float64) / d)         # (d/2,)
  ang = np.repeat(np.arange(grid, dtype=np.float64)[:, None] * freqs, 2, 1)  # (grid, d) pairs
  rows = np.broadcast_to(ang[:, None, :], (grid, grid, d))
  cols = np.broadcast_to(ang[None, :, :], (grid, grid, d))
  full = np.concatenate([rows, cols], -1).reshape(grid * grid, head_dim)
  return np.cos(full).astype(np.float32), np.sin(full).astype(np.float32)


def rotate_pairs(x):
  """(x0, x1, x2, x3, ...) -> (-x1, x0, -x3, x2, ...) on the last axis."""
  pairs = x.reshape(x.shape[:-1] + (-1, 2))
  return jnp.stack([-pairs[..., 1], pairs[..., 0]], -1).reshape(x.shape)


def apply_rope(x, cos, sin):
  """RoPE on (B, heads, N, head_dim) with (N, head_dim) tables."""
  return x * cos.astype(x.dtype) + rotate_pairs(x) * sin.astype(x.dtype)


def modulate(x, shift, scale):
  """adaLN modulation u * (1 + scale) + shift."""
  return x * (1 + scale) + shift


# ------------------------------------------------------------------------------ modules
class RMSNorm(nn.Module):
  """RMSNorm over the last axis with a learnable weight, computed in float32."""
  dim: int
  eps: float = 1e-6
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    w = self.param("weight", nn.with_logical_partitioning(nn.initializers.ones, (EMBED,)),
                   (self.dim,), self.param_dtype)
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return y.astype(x.dtype) * w.astype(x.dtype)


class RopeAttention(nn.Module):
  """Multi-head self-attention: fused qkv with bias, optional q/k RMSNorm, 2-D RoPE, proj."""
  dim: int
  num_heads: int
  qk_norm: bool = False
  init: str = "torch"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, cos, sin):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    qkv = linear(3 * self.dim, self.dim, (EMBED, HEADS), "qkv", self.init, **kw)(x)
    q, k, v = einops.rearrange(qkv, "b n (three h d) -> three b h n d", three=3, h=self.num_heads)
    hd = self.dim // self.num_heads
    if self.qk_norm:
      q = RMSNorm(hd, param_dtype=self.param_dtype, name="q_norm")(q)
      k = RMSNorm(hd, param_dtype=self.param_dtype, name="k_norm")(k)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    logits = jnp.einsum("bhqd,bhkd->bhqk", q, k) * jnp.asarray(hd**-0.5, q.dtype)
    # Softmax in float32 even under bf16 compute.
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(v.dtype)
    out = einops.rearrange(jnp.einsum("bhqk,bhkd->bhqd", probs, v), "b h n d -> b n (h d)")
    return linear(self.dim, self.dim, (HEADS, EMBED), "proj", self.init, **kw)(out)


def swiglu_hidden(dim: int, mlp_ratio: float = 4.0) -> int:
  """SwiGLU hidden width int(2/3 * mlp_ratio * dim): 3072 at 1152, 5461 at 2048, 1024 at 384."""
  return int(2 / 3 * int(dim * mlp_ratio))


class SwiGLU(nn.Module):
  """silu(x1) * x2 with (x1, x2) = w12(x) split in halves, then w3; all with biases."""
  dim: int
  hidden: int
  init: str = "torch"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    h = linear(2 * self.hidden, self.dim, (EMBED, MLP), "w12", self.init, **kw)(x)
    x1, x2 = jnp.split(h, 2, axis=-1)
    return linear(self.dim, self.hidden, (MLP, EMBED), "w3", self.init, **kw)(jax.nn.silu(x1) * x2)


class AdaLNBlock(nn.Module):
  """Transformer block with six-vector adaLN from `cond` (B, 1, Dc) per sample or (B, N, Dc) per token."""
  dim: int
  num_heads: int
  cond_dim: int
  mlp_ratio: float = 4.0
  qk_norm: bool = False
  init: str = "torch"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, cond, cos, sin):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    mod = linear(6 * self.dim, self.cond_dim, (EMBED, MLP), "adaLN", "zeros", **kw)(
        jax.nn.silu(cond))
    sh1, sc1, g1, sh2, sc2, g2 = jnp.split(mod, 6, axis=-1)
    h = modulate(RMSNorm(self.dim, param_dtype=self.param_dtype, name="norm1")(x), sh1, sc1)
    x = x + g1 * RopeAttention(self.dim, self.num_heads, self.qk_norm, self.init, name="attn",
                               **kw)(h, cos, sin)
    h = modulate(RMSNorm(self.dim, param_dtype=self.param_dtype, name="norm2")(x), sh2, sc2)
    return x + g2 * SwiGLU(self.dim, swiglu_hidden(self.dim, self.mlp_ratio), self.init,
                           name="mlp", **kw)(h)


REMAT_POLICIES = {
    "full": None,  # save nothing, recompute the whole block
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def block_class(remat_policy: Optional[str], prevent_cse: bool = True):
  """AdaLNBlock, optionally wrapped in `nn.remat` with a named checkpoint policy."""
  if not remat_policy or remat_policy == "none":
    return AdaLNBlock
  if remat_policy not in REMAT_POLICIES:
    raise ValueError(f"remat_policy={remat_policy!r}: expected one of {sorted(REMAT_POLICIES)} "
                     "or 'none'")
  return nn.remat(AdaLNBlock, policy=REMAT_POLICIES[remat_policy], prevent_cse=prevent_cse)


def run_blocks(x, cond, rope, depth: int, name: str, scan: bool, remat_policy: Optional[str],
               capture: int = 0, **block_kwargs):
  """`depth` AdaLNBlocks (call from a compact method): unrolled `{name}_{i}` or one `nn.scan`.

  Scanned params are stacked under `name` with a leading LAYERS axis
  (`uae_jax.models.scan_utils` converts between the layouts). With `capture` = k > 0 the result
  is (output, hidden state after block k) (REPA); capture = 0 is the plain forward.
  """
  cos, sin = (jnp.asarray(a) for a in rope)
  if not scan:
    block, kept = block_class(remat_policy), None
    for i in range(depth):
      x = block(name=f"{name}_{i}", **block_kwargs)(x, cond, cos, sin)
      kept = x if i + 1 == capture else kept
    return (x, kept) if capture else x
  block = block_class(remat_policy, prevent_cse=False)(name=name, **block_kwargs)
  scan_kw = dict(variable_axes={"params": 0}, split_rngs={"params": True}, length=depth,
                 metadata_params={nn.PARTITION_NAME: LAYERS})
  if not capture:
    body = lambda mdl, carry, c, co, si: (mdl(carry, c, co, si), None)
    scan_fn = nn.scan(body, in_axes=(nn.broadcast,) * 3, **scan_kw)
    return scan_fn(block, x, cond, cos, sin)[0]
  # REPA: carry the hidden state of block `capture` along (O(1) memory, not a stack of depth).
  def body_capture(mdl, carry, c, co, si, i):
    """One scanned block; keeps its output when it is block `capture`."""
    h, kept = carry
    h = mdl(h, c, co, si)
    return (h, jnp.where(i + 1 == capture, h, kept)), None
  scan_fn = nn.scan(body_capture, in_axes=(nn.broadcast,) * 3 + (0,), **scan_kw)
  return scan_fn(block, (x, jnp.zeros_like(x)), cond, cos, sin, jnp.arange(depth))[0]


class FourierTimeEmbed(nn.Module):
  """Gaussian-Fourier time features of fixed frequencies `freqs` -> Linear -> SiLU -> Linear."""
  dim: int
  num_freqs: int = 256
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, t):
    w = self.param(FREQS, nn.with_logical_partitioning(nn.initializers.normal(1.0), (None,)),
                   (self.num_freqs,), jnp.float32)
    # Fixed buffer: no gradient flows into it (the task also masks it out of the optimiser).
    arg = 2 * np.pi * t.astype(jnp.float32)[:, None] * jax.lax.stop_gradient(w)[None]
    emb = jnp.concatenate([jnp.sin(arg), jnp.cos(arg)], -1).astype(self.dtype)
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    h = linear(self.dim, 2 * self.num_freqs, (None, MLP), "mlp_0", "normal02", **kw)(emb)
    return linear(self.dim, self.dim, (MLP, EMBED), "mlp_2", "normal02", **kw)(jax.nn.silu(h))


class LabelEmbed(nn.Module):
  """(num_classes + 1)-row class table; the last row is the null class (guidance)."""
  num_classes: int
  dim: int
  dropout_prob: float = 0.1
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, y, train: bool):
    if train and self.dropout_prob > 0:
      drop = jax.random.uniform(self.make_rng("label_dropout"), y.shape) < self.dropout_prob
      y = jnp.where(drop, self.num_classes, y)
    table = self.param("embedding_table", nn.with_logical_partitioning(
        nn.initializers.normal(0.02), (None, EMBED)), (self.num_classes + 1, self.dim),
        self.param_dtype)
    return jnp.take(table, y, axis=0).astype(self.dtype)


class FinalLayer(nn.Module):
  """RMSNorm -> adaLN shift/scale from `cond` -> Linear to patch*patch*channels (zero init)."""
  dim: int
  cond_dim: int
  out_features: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, cond):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    mod = linear(2 * self.dim, self.cond_dim, (EMBED, MLP), "adaLN", "zeros", **kw)(
        jax.nn.silu(cond))
    shift, scale = jnp.split(mod, 2, axis=-1)
    h = modulate(RMSNorm(self.dim, param_dtype=self.param_dtype, name="norm")(x), shift, scale)
    return linear(self.out_features, self.dim, (EMBED, None), "linear", "zeros", **kw)(h)


def patchify(x, patch: int):
  """(B, pH, pW, C) -> (B, H*W, p*p*C), entry order (p, q, c) with c fastest."""
  return einops.rearrange(x, "b (h p) (w q) c -> b (h w) (p q c)", p=patch, q=patch)


def unpatchify(tokens, grid: int, patch: int):
  """Inverse of `patchify` for a square grid."""
  return einops.rearrange(tokens, "b (h w) (p q c) -> b (h p) (w q) c", h=grid, w=grid,
                          p=patch, q=patch)


# ------------------------------------------------------------------------------ the models
class _DiTBase(nn.Module):
  """Fields and embeddings shared by both DiTs; `__call__(x, t, y, train)` -> velocity (B, H, W, C)."""
  size: str = "XL"
  in_channels: int = 768
  input_size: int = 16             # latent grid side
  patch_size: int = 1
  num_classes: int = 1000
  class_dropout_prob: float = 0.1
  mlp_ratio: float = 4.0
  qk_norm: bool = False
  num_freqs: int = 256
  rope_theta: float = 10000.0
  scan_blocks: bool = False
  remat_policy: Optional[str] = None
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @property
  def body(self) -> DiTSize:
    """Width, depth and heads of the body."""
    if self.size not in SIZES:
      raise ValueError(f"DiT size {self.size!r}: expected one of {sorted(SIZES)}")
    return SIZES[self.size]

  @property
  def grid(self) -> int:
    """Tokens per side: input_size // patch_size."""
    if self.input_size % self.patch_size:
      raise ValueError(f"input_size {self.input_size} is not a multiple of patch {self.patch_size}")
    return self.input_size // self.patch_size

  def _kw(self) -> dict:
    """dtype / param_dtype keyword arguments."""
    return dict(dtype=self.dtype, param_dtype=self.param_dtype)

  def _t_y(self, t, y, train: bool):
    """(time embedding, label embedding), each (B, body width)."""
    dim = self.body.dim
    t_e = FourierTimeEmbed(dim, self.num_freqs, name="t_embedder", **self._kw())(t)
    y_e = LabelEmbed(self.num_classes, dim, self.class_dropout_prob, name="y_embedder",
                     **self._kw())(y, train)
    return t_e, y_e

  def _embed(self, x, dim: int, name: str, pos: bool):
    """Patchify, xavier Linear to `dim` [+ fixed sin-cos position embedding]."""
    p = self.patch_size
    tokens = patchify(x.astype(self.dtype), p)
    out = linear(dim, p * p * self.in_channels, (None, EMBED), name, "xavier", **self._kw())(tokens)
    if pos:
      out = out + jnp.asarray(sincos_2d(dim, self.grid, self.grid, cls_token=False), self.dtype)[None]
    return out

  def _blocks(self, x, cond, spec: DiTSize, cond_dim: int, name: str, init: str,
              capture: int = 0):
    """A stack of AdaLNBlocks of size `spec` with its RoPE tables ((out, hidden_k) if capture=k)."""
    rope = rope_tables(spec.dim // spec.heads, self.grid, self.rope_theta)
    if not 0 <= capture <= spec.depth:
      raise ValueError(f"hidden state of block {capture} asked, the stack has {spec.depth}")
    return run_blocks(x, cond, rope, spec.depth, name, self.scan_blocks, self.remat_policy,
                      capture=capture,
                      dim=spec.dim, num_heads=spec.heads, cond_dim=cond_dim,
                      mlp_ratio=self.mlp_ratio, qk_norm=self.qk_norm, init=init, **self._kw())

  def _output(self, h, cond, dim: int, cond_dim: int):
    """Final layer and unpatchify to a float32 (B, H, W, C) velocity."""
    out = FinalLayer(dim, cond_dim, self.patch_size**2 * self.in_channels, name="final_layer",
                     **self._kw())(h, cond)
    return unpatchify(out.astype(jnp.float32), self.grid, self.patch_size)


class LightningDiT(_DiTBase):
  """Plain DiT: cond = t_e + y_e per sample, sin-cos positions, xavier Linears.

  `return_hidden=k > 0`: returns (velocity, hidden tokens (B, N, width) after body block k) for
  REPA; the velocity is the same function as with k = 0.
  """

  @nn.compact
  def __call__(self, x, t, y, train: bool = False, return_hidden: int = 0):
    spec = self.body
    t_e, y_e = self._t_y(t, y, train)
    c = (t_e + y_e)[:, None, :]
    h = self._embed(x, spec.dim, "x_embedder", pos=True)
    h = self._blocks(h, c, spec, spec.dim, "blocks", "xavier", capture=return_hidden)
    if return_hidden:
      h, hidden = h
      return self._output(h, c, spec.dim, spec.dim), hidden
    return self._output(h, c, spec.dim, spec.dim)


class DiTDH(_DiTBase):
  """DiT with the wide DDT head: body on the embedded input, head on x_t conditioned per token.

  `return_hidden=k > 0`: returns (velocity, body tokens (B, N, width) after body block k) (REPA).
  """
  head_size: str = "DH"

  @property
  def head(self) -> DiTSize:
    """Width, depth and heads of the DDT head."""
    if self.head_size not in HEAD_SIZES:
      raise ValueError(f"DiT head size {self.head_size!r}: expected one of {sorted(HEAD_SIZES)}")
    return HEAD_SIZES[self.head_size]

  @nn.compact
  def __call__(self, x, t, y, train: bool = False, return_hidden: int = 0):
    spec = self.body
    t_e, y_e = self._t_y(t, y, train)
    c = jax.nn.silu(t_e + y_e)[:, None, :]   # the extra SiLU of the reference (adaLN adds its own)
    s = self._embed(x, spec.dim, "s_embedder", pos=True)
    s = self._blocks(s, c, spec, spec.dim, "blocks", "torch", capture=return_hidden)
    if return_hidden:  # REPA: the body's hidden state after block `return_hidden`
      s, hidden = s
      return self._head(x, s, t_e), hidden
    return self._head(x, s, t_e)

  def _head(self, x, s, t_e):
    """Time re-injection, projection to the head width, head blocks and the final layer."""
    spec, head = self.body, self.head
    s = jax.nn.silu(t_e[:, None, :] + s)      # time re-injected per token
    s = linear(head.dim, spec.dim, (EMBED, MLP), "s_projector", "torch", **self._kw())(s)
    h = self._embed(x, head.dim, "x_embedder", pos=False)  # the head re-embeds the noisy input
    h = self._blocks(h, s, head, head.dim, "head_blocks", "torch")
    return self._output(h, s, head.dim, head.dim)


class RepaProjector(nn.Module):
  """REPA's projector: Linear -> SiLU -> Linear -> SiLU -> Linear from a DiT hidden state to the
  frozen encoder's feature width (trained with the DiT, unused when sampling)."""
  hidden: int = 2048
  out_dim: int = 768
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, h):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    h = linear(self.hidden, h.shape[-1], (EMBED, MLP), "fc1", "torch", **kw)(h)
    h = linear(self.hidden, self.hidden, (MLP, MLP), "fc2", "torch", **kw)(jax.nn.silu(h))
    return linear(self.out_dim, self.hidden, (MLP, EMBED), "fc3", "torch", **kw)(jax.nn.silu(h))


MODELS = {"ddt": DiTDH, "lightning": LightningDiT}


def build(model_cfg, dtype: Dtype = jnp.float32) -> nn.Module:
  """The DiT described by `config.model` (`kind` picks DiTDH or LightningDiT)."""
  cfg = dict(model_cfg)
  kind = cfg.pop("kind", "ddt")
  if kind not in MODELS:
    raise ValueError(f"model.kind={kind!r}: expected one of {sorted(MODELS)}")
  if kind != "ddt":
    cfg.pop("head_size", None)
  return MODELS[kind](**cfg, dtype=dtype)


def abstract_params(model: nn.Module, batch: int = 1):
  """Boxed abstract params of `model` via jax.eval_shape (nothing is allocated)."""
  x = jax.ShapeDtypeStruct((batch, model.input_size, model.input_size, model.in_channels),
                           jnp.float32)
  t = jax.ShapeDtypeStruct((batch,), jnp.float32)
  y = jax.ShapeDtypeStruct((batch,), jnp.int32)
  return jax.eval_shape(model.init, jax.random.key(0), x, t, y)["params"]


def count_params(tree) -> int:
  """Number of scalars in a (possibly boxed, possibly abstract) param tree."""
  leaves = jax.tree.leaves(nn.unbox(tree))
  return int(sum(np.prod(l.shape) for l in leaves))


def is_frozen_path(path) -> bool:
  """True for param paths that are fixed buffers (the Fourier frequencies)."""
  last = path[-1]
  return getattr(last, "key", getattr(last, "name", None)) == FREQS
