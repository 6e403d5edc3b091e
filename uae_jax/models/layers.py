"""Transformer building blocks shared by the DINOv2 encoder, the pixel decoder and the discriminator.

Parameter names mirror the PyTorch modules they are converted from (`query`, `key`, `value`,
`proj`, `fc1`, `fc2`, `norm1`, `ls1`, ...), so the conversion tables in `uae_jax.convert` stay
one line per tensor. Every parameter carries logical axis names; the trainer maps them to mesh
axes with the rules in the config.
"""
from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any

# Logical axis names used by every module in the package.
EMBED = "embed"   # model width; sharded over the FSDP axis by default.
MLP = "mlp"       # MLP hidden width.
HEADS = "heads"   # attention projections (num_heads * head_dim).
LAYERS = "layers" # leading axis of block parameters stacked for `nn.scan`; replicated by default.


def dense(features: int, axes: tuple, name: str, dtype: Dtype, param_dtype: Dtype,
          use_bias: bool = True, kernel_init: Callable = nn.initializers.lecun_normal(),
          bias_init: Callable = nn.initializers.zeros) -> nn.Dense:
  """A Dense layer whose kernel and bias carry logical axis names `axes` (in, out)."""
  return nn.Dense(
      features, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, name=name,
      kernel_init=nn.with_logical_partitioning(kernel_init, axes),
      bias_init=nn.with_logical_partitioning(bias_init, (axes[1],)))


def layer_norm(eps: float, name: str, dtype: Dtype, param_dtype: Dtype,
               affine: bool = True) -> nn.LayerNorm:
  """LayerNorm with named parameters; `affine=False` gives the parameter-free variant."""
  return nn.LayerNorm(
      epsilon=eps, use_scale=affine, use_bias=affine, dtype=dtype, param_dtype=param_dtype,
      name=name,
      scale_init=nn.with_logical_partitioning(nn.initializers.ones, (EMBED,)),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (EMBED,)))


# Attention implementations: 'einsum' is the explicit two-einsum formulation (float32 softmax);
# 'grouped' is the same arithmetic arranged for XLA:CPU (below); 'xla' / 'cudnn' go through
# `jax.nn.dot_product_attention`. None (default) is 'grouped' on CPU (measured fastest there) and
# otherwise `dot_product_attention(implementation=None)`, which lets JAX pick: XLA on TPU, cuDNN
# flash attention on a GPU when dtype and shapes allow. See docs/speed.md.
ATTENTION_IMPLEMENTATIONS = (None, "xla", "cudnn", "einsum", "grouped")
# 'grouped' attends HEADS_PER_GROUP heads at a time: the groups are independent programs that
# XLA:CPU's runtime runs side by side, where one batched dot over all heads ran its small
# (N x N x d) matmuls at 10-40 GFLOP/s (measured on 2 cores, docs/speed.md). Heads smaller than
# GROUP_MIN_WORK multiply-adds in q k^T (N * N * d; a 256-token, 64-dim head is 2**22) run as one
# group: attention is then a small part of the work (tiny test and demo models: 16-dim heads), and
# the groups would only make the program longer to compile.
HEADS_PER_GROUP = 2
GROUP_MIN_WORK = 2**22


def check_attention(implementation: Optional[str]) -> None:
  """Raises ValueError unless `implementation` is one of ATTENTION_IMPLEMENTATIONS."""
  if implementation not in ATTENTION_IMPLEMENTATIONS:
    raise ValueError(f"attention={implementation!r}: expected one of {ATTENTION_IMPLEMENTATIONS}")


def _einsum_attention(q, k, v):
  """softmax(q k^T / sqrt(d)) v on (B, N, heads, d) with a float32 softmax, as two einsums."""
  logits = jnp.einsum("bqhd,bkhd->bhqk", q * q.shape[-1]**-0.5, k)
  # Softmax in float32 even under bf16 compute, as PyTorch's eager attention does.
  probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(v.dtype)
  return jnp.einsum("bhqk,bkhd->bqhd", probs, v)


def _grouped_attention(q, k, v, groups: int):
  """The same attention arranged for XLA:CPU: `groups` independent head groups, each normalised
  after `@ v` (the (N, d) output divided by the row sums, one pass over the (N, N) weights less),
  with v laid out (B, heads, N, d) for that dot, which XLA:CPU runs about twice as fast as the
  one contracting v in its (B, N, heads, d) layout (docs/speed.md)."""
  outs = []
  for qg, kg, vg in zip(*(jnp.split(t, groups, axis=2) for t in (q, k, v))):
    logits = jnp.einsum("bqhd,bkhd->bhqk", qg * qg.shape[-1]**-0.5, kg).astype(jnp.float32)
    # The shift cancels in the ratio, so it needs no gradient (as in jax.nn.softmax).
    weights = jnp.exp(logits - jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True)))
    out = jnp.einsum("bhqk,bhkd->bhqd", weights.astype(vg.dtype), jnp.transpose(vg, (0, 2, 1, 3)))
    out = out.astype(jnp.float32) / jnp.sum(weights, axis=-1, keepdims=True)
    outs.append(jnp.transpose(out.astype(vg.dtype), (0, 2, 1, 3)))
  return jnp.concatenate(outs, axis=2)


def multi_head_attention(q, k, v, num_heads: int, implementation: Optional[str] = None):
  """softmax(q k^T / sqrt(d)) v per head on (B, N, heads*d) projections -> (B, N, heads*d).

  The heads are split by a reshape to (B, N, heads, d), the layout `dot_product_attention`
  takes, so no (B, heads, N, d) transposes are materialised around the attention (the CPU
  default, 'grouped', transposes v on purpose: see `_grouped_attention`).
  """
  check_attention(implementation)
  b, n, width = q.shape
  head_dim = width // num_heads
  split = lambda t: t.reshape(t.shape[0], t.shape[1], num_heads, head_dim)
  q, k, v = split(q), split(k), split(v)
  if implementation is None and jax.default_backend() == "cpu":
    implementation = "grouped"
  if implementation == "einsum":
    out = _einsum_attention(q, k, v)
  elif implementation == "grouped":
    grouped = num_heads % HEADS_PER_GROUP == 0 and n * n * head_dim >= GROUP_MIN_WORK
    out = _grouped_attention(q, k, v, num_heads // HEADS_PER_GROUP if grouped else 1)
  else:
    # Logits and softmax in float32 under bf16 compute too (jax's XLA path does that itself).
    out = jax.nn.dot_product_attention(q, k, v, scale=head_dim**-0.5,
                                       implementation=implementation)
  return out.reshape(b, n, width)


class Attention(nn.Module):
  """Multi-head self-attention with separate q/k/v projections and scale head_dim**-0.5."""
  dim: int
  num_heads: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  out_name: str = "proj"
  implementation: Optional[str] = None  # see ATTENTION_IMPLEMENTATIONS

  @nn.compact
  def __call__(self, x):
    mk = lambda n, axes: dense(self.dim, axes, n, self.dtype, self.param_dtype)
    q, k, v = (mk(n, (EMBED, HEADS))(x) for n in ("query", "key", "value"))
    out = multi_head_attention(q, k, v, self.num_heads, self.implementation)
    return mk(self.out_name, (HEADS, EMBED))(out)


ACTIVATIONS = ("gelu", "gelu_tanh", "quick_gelu")


def gelu_exact(x):
  """Exact GELU as PyTorch computes it, x * (1 + erf(x / sqrt 2)) / 2.

  `jax.nn.gelu(approximate=False)` evaluates the same function through erfc, which XLA:CPU runs
  2.7x slower than erf (1.44 vs 0.54 ms forward at the B decoder's (4, 257, 3072); docs/speed.md).
  Both are within 6e-7 of a float64 reference.
  """
  return 0.5 * x * (1 + jax.lax.erf(x * 0.5**0.5))


def activation_fn(name: Optional[str], gelu_approximate: bool = False) -> Callable:
  """The MLP nonlinearity: exact GELU, tanh GELU (SigLIP, DINO v1) or quick GELU (OpenAI CLIP).

  `name=None` keeps the older switch: exact GELU, or the tanh form if `gelu_approximate`.
  """
  if name is None:
    return activation_fn("gelu_tanh" if gelu_approximate else "gelu")
  if name == "gelu":
    return gelu_exact
  if name == "gelu_tanh":
    return lambda h: jax.nn.gelu(h, approximate=True)
  if name == "quick_gelu":
    # OpenAI CLIP's x * sigmoid(1.702 x) (HF `quick_gelu`).
    return lambda h: h * jax.nn.sigmoid(1.702 * h)
  raise ValueError(f"activation={name!r}: expected one of {ACTIVATIONS} or None")


class Mlp(nn.Module):
  """Two-layer MLP with GELU (exact by default; DINO v1 discriminator uses the tanh form)."""
  dim: int
  hidden: int
  gelu_approximate: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  activation: Optional[str] = None  # overrides gelu_approximate, see `activation_fn`

  @nn.compact
  def __call__(self, x):
    h = dense(self.hidden, (EMBED, MLP), "fc1", self.dtype, self.param_dtype)(x)
    h = activation_fn(self.activation, self.gelu_approximate)(h)
    return dense(self.dim, (MLP, EMBED), "fc2", self.dtype, self.param_dtype)(h)


class SwiGluMlp(nn.Module):
  """SwiGLU feed-forward of DINOv2-g: fused `w12` (D -> 2H), silu(x1) * x2, then `w3` (H -> D)."""
  dim: int
  hidden: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    h = dense(2 * self.hidden, (EMBED, MLP), "w12", self.dtype, self.param_dtype)(x)
    x1, x2 = jnp.split(h, 2, axis=-1)
    return dense(self.dim, (MLP, EMBED), "w3", self.dtype, self.param_dtype)(jax.nn.silu(x1) * x2)


class LayerScale(nn.Module):
  """Per-channel learnable residual scale (`gamma`), DINOv2's LayerScale."""
  dim: int
  init_value: float = 1.0
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    gamma = self.param("gamma", nn.with_logical_partitioning(
        nn.initializers.constant(self.init_value), (EMBED,)), (self.dim,), self.param_dtype)
    return x * gamma.astype(x.dtype)


class TransformerBlock(nn.Module):
  """Pre-norm ViT block: x += [ls1](attn(norm1(x))); x += [ls2](mlp(norm2(x)))."""
  dim: int
  num_heads: int
  mlp_hidden: int
  ln_eps: float = 1e-6
  layerscale: Optional[float] = None  # init value; None disables LayerScale.
  swiglu: bool = False
  gelu_approximate: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  activation: Optional[str] = None  # MLP nonlinearity name (see `activation_fn`); None: GELU
  attention: Optional[str] = None   # attention implementation (see ATTENTION_IMPLEMENTATIONS)

  @nn.compact
  def __call__(self, x):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    h = layer_norm(self.ln_eps, "norm1", **kw)(x)
    h = Attention(self.dim, self.num_heads, name="attn", implementation=self.attention, **kw)(h)
    if self.layerscale is not None:
      h = LayerScale(self.dim, self.layerscale, self.param_dtype, name="ls1")(h)
    x = x + h
    h = layer_norm(self.ln_eps, "norm2", **kw)(x)
    if self.swiglu:
      h = SwiGluMlp(self.dim, self.mlp_hidden, name="mlp", **kw)(h)
    else:
      h = Mlp(self.dim, self.mlp_hidden, self.gelu_approximate, activation=self.activation,
              name="mlp", **kw)(h)
    if self.layerscale is not None:
      h = LayerScale(self.dim, self.layerscale, self.param_dtype, name="ls2")(h)
    return x + h


def block_class(remat_policy: Optional[str], prevent_cse: bool = True):
  """TransformerBlock, optionally wrapped in `nn.remat` with a named checkpoint policy."""
  if not remat_policy or remat_policy == "none":
    return TransformerBlock
  policies = {
      "full": None,  # save nothing, recompute the whole block.
      "dots": jax.checkpoint_policies.checkpoint_dots,
      "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
  }
  if remat_policy not in policies:
    raise ValueError(f"remat_policy={remat_policy!r}: expected one of {sorted(policies)} or 'none'")
  return nn.remat(TransformerBlock, policy=policies[remat_policy], prevent_cse=prevent_cse)


def scanned_blocks(x, depth: int, remat_policy: Optional[str], collect: bool = False,
                   name: str = "blocks", **block_kwargs):
  """Runs `depth` identical TransformerBlocks as one `nn.scan`; returns (x, per-block outputs).

  Call from inside a compact method. The parameters are stacked under `name` with a leading
  `depth` axis (logical name LAYERS) instead of `blocks_{i}`; `uae_jax.models.scan_utils`
  converts between the two layouts. XLA then compiles one block body instead of `depth` copies.
  `collect=True` also returns the list of every block's output (stacked by the scan).
  """
  # prevent_cse is only needed outside scan; inside it, it just blocks optimisations.
  block = block_class(remat_policy, prevent_cse=False)

  def body(module, carry, _):
    y = module(carry)
    return y, (y if collect else None)

  scan = nn.scan(body, variable_axes={"params": 0}, split_rngs={"params": True}, length=depth,
                 metadata_params={nn.PARTITION_NAME: LAYERS})
  x, ys = scan(block(name=name, **block_kwargs), x, None)
  return x, ([ys[i] for i in range(depth)] if collect else [])
