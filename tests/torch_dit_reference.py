"""A PyTorch DiT^DH ("DiT with a wide DDT head") written from the stage-2 specification.

Test-only (torch is in the test stack). It mirrors the module and parameter names of the
official `DiTwDDTHead` so that its `state_dict()` has the official checkpoint's keys:

  t_embedder.W, t_embedder.mlp.{0,2}.{weight,bias}     Gaussian-Fourier time embedding
  y_embedder.embedding_table.weight                    (num_classes + 1) rows, null id last
  s_embedder.proj.{weight,bias}, x_embedder.proj.*     Conv2d(C, D, p, stride p) patch embeds
  pos_embed                                            fixed MAE 2-D sin-cos table (1, N, D_body)
  enc_feat_rope.freqs_{cos,sin}, dec_feat_rope.*       fixed 2-D RoPE tables (N, head_dim)
  blocks.{i}.{norm1, attn.{qkv, q_norm, k_norm, proj}, norm2, mlp.{w12, w3},
              adaLN_modulation.1}                       body blocks first, then the head blocks
  s_projector.{weight,bias}
  final_layer.{norm_final, linear, adaLN_modulation.1}

Nothing here is imported from uae_jax: it is the independent side of the parity tests.
"""
import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def sincos_2d_table(dim: int, grid: int) -> np.ndarray:
  """MAE `get_2d_sincos_pos_embed` (no CLS row): first half of the channels encodes the column."""
  def one_axis(d, pos):
    omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
    out = pos.reshape(-1)[:, None] * omega[None]
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)
  w, h = np.meshgrid(np.arange(grid, dtype=np.float64), np.arange(grid, dtype=np.float64))
  return np.concatenate([one_axis(dim // 2, w), one_axis(dim // 2, h)], axis=1)


class RMSNorm(nn.Module):
  """RMSNorm with a learnable weight, eps 1e-6, computed in float32."""

  def __init__(self, dim, eps=1e-6):
    super().__init__()
    self.eps = eps
    self.weight = nn.Parameter(torch.ones(dim))

  def forward(self, x):
    """Normalised x times the weight."""
    x32 = x.float()
    y = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
    return y.type_as(x) * self.weight


def rotate_half(x):
  """Interleaved pairs: (x0, x1, x2, x3, ...) -> (-x1, x0, -x3, x2, ...)."""
  pairs = x.reshape(*x.shape[:-1], -1, 2)
  a, b = pairs.unbind(-1)
  return torch.stack((-b, a), dim=-1).flatten(-2)


class VisionRotaryEmbeddingFast(nn.Module):
  """EVA-style 2-D RoPE: `dim` = half the head dim; rows rotate the first half, columns the second."""

  def __init__(self, dim, pt_seq_len, theta=10000.0):
    super().__init__()
    freqs = 1.0 / theta ** (torch.arange(0, dim, 2)[: dim // 2].float() / dim)
    t = torch.arange(pt_seq_len).float()
    freqs = torch.einsum("i,f->if", t, freqs).repeat_interleave(2, dim=-1)     # (L, dim)
    n = pt_seq_len
    full = torch.cat([freqs[:, None, :].expand(n, n, dim), freqs[None, :, :].expand(n, n, dim)], -1)
    self.register_buffer("freqs_cos", full.cos().reshape(n * n, -1))
    self.register_buffer("freqs_sin", full.sin().reshape(n * n, -1))

  def forward(self, t):
    """Rotated q or k of shape (B, heads, N, head_dim)."""
    return t * self.freqs_cos + rotate_half(t) * self.freqs_sin


class NormAttention(nn.Module):
  """Self-attention: fused qkv with bias, optional q/k RMSNorm, RoPE, SDPA, proj."""

  def __init__(self, dim, num_heads, qk_norm=False):
    super().__init__()
    self.num_heads = num_heads
    self.head_dim = dim // num_heads
    self.qkv = nn.Linear(dim, 3 * dim, bias=True)
    self.q_norm = RMSNorm(self.head_dim) if qk_norm else nn.Identity()
    self.k_norm = RMSNorm(self.head_dim) if qk_norm else nn.Identity()
    self.proj = nn.Linear(dim, dim)

  def forward(self, x, rope):
    """Attention output (B, N, D)."""
    b, n, c = x.shape
    qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    q, k = self.q_norm(q), self.k_norm(k)
    q, k = rope(q), rope(k)
    out = F.scaled_dot_product_attention(q, k, v)
    return self.proj(out.transpose(1, 2).reshape(b, n, c))


class SwiGLUFFN(nn.Module):
  """w3(silu(x1) * x2) with (x1, x2) = w12(x).chunk(2)."""

  def __init__(self, dim, hidden):
    super().__init__()
    self.w12 = nn.Linear(dim, 2 * hidden)
    self.w3 = nn.Linear(hidden, dim)

  def forward(self, x):
    """SwiGLU MLP."""
    x1, x2 = self.w12(x).chunk(2, dim=-1)
    return self.w3(F.silu(x1) * x2)


def modulate(x, shift, scale):
  """adaLN modulation."""
  return x * (1 + scale) + shift


class LightningDDTBlock(nn.Module):
  """RMSNorm / RoPE attention / SwiGLU block with six adaLN vectors (per sample or per token)."""

  def __init__(self, dim, num_heads, mlp_ratio=4.0, qk_norm=False):
    super().__init__()
    self.norm1 = RMSNorm(dim)
    self.attn = NormAttention(dim, num_heads, qk_norm)
    self.norm2 = RMSNorm(dim)
    self.mlp = SwiGLUFFN(dim, int(2 / 3 * int(dim * mlp_ratio)))
    self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

  def forward(self, x, c, rope):
    """One block; c is (B, D) or (B, N, D)."""
    if c.dim() < x.dim():
      c = c.unsqueeze(1)
    sh1, sc1, g1, sh2, sc2, g2 = self.adaLN_modulation(c).chunk(6, dim=-1)
    x = x + g1 * self.attn(modulate(self.norm1(x), sh1, sc1), rope)
    return x + g2 * self.mlp(modulate(self.norm2(x), sh2, sc2))


class DDTFinalLayer(nn.Module):
  """RMSNorm -> shift/scale from the condition -> Linear."""

  def __init__(self, dim, out):
    super().__init__()
    self.norm_final = RMSNorm(dim)
    self.linear = nn.Linear(dim, out)
    self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

  def forward(self, x, c):
    """Output tokens."""
    shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)
    return self.linear(modulate(self.norm_final(x), shift, scale))


class GaussianFourierEmbedding(nn.Module):
  """[sin(2 pi t W), cos(2 pi t W)] of fixed W ~ N(0, 1) -> Linear -> SiLU -> Linear."""

  def __init__(self, dim, embedding_size=256):
    super().__init__()
    self.W = nn.Parameter(torch.randn(embedding_size), requires_grad=False)
    self.mlp = nn.Sequential(nn.Linear(2 * embedding_size, dim), nn.SiLU(), nn.Linear(dim, dim))

  def forward(self, t):
    """(B,) times -> (B, dim)."""
    arg = t[:, None].float() * self.W[None, :] * 2 * math.pi
    return self.mlp(torch.cat([torch.sin(arg), torch.cos(arg)], dim=-1))


class LabelEmbedder(nn.Module):
  """(num_classes + 1)-row table; label dropout to the null class in training."""

  def __init__(self, num_classes, dim, dropout_prob=0.1):
    super().__init__()
    self.num_classes, self.dropout_prob = num_classes, dropout_prob
    self.embedding_table = nn.Embedding(num_classes + 1, dim)

  def forward(self, y, train=False):
    """(B,) labels -> (B, dim)."""
    if train and self.dropout_prob > 0:
      y = torch.where(torch.rand(y.shape) < self.dropout_prob, self.num_classes, y)
    return self.embedding_table(y)


class PatchEmbed(nn.Module):
  """Conv2d(C, D, p, stride p) -> (B, N, D) tokens, row-major."""

  def __init__(self, patch, in_chans, dim):
    super().__init__()
    self.proj = nn.Conv2d(in_chans, dim, patch, stride=patch, bias=True)

  def forward(self, x):
    """(B, C, H, W) -> (B, N, D)."""
    return self.proj(x).flatten(2).transpose(1, 2)


class DiTwDDTHead(nn.Module):
  """The DiT^DH: body blocks on s, per-token conditioned head blocks on the re-embedded x_t."""

  def __init__(self, input_size=16, patch_size=1, in_channels=768, hidden_size=(1152, 2048),
               depth=(28, 2), num_heads=(16, 16), num_classes=1000, qk_norm=False,
               class_dropout_prob=0.1, mlp_ratio=4.0):
    super().__init__()
    body, head = hidden_size
    self.depth, self.patch, self.in_channels = depth, patch_size, in_channels
    grid = input_size // patch_size
    self.s_embedder = PatchEmbed(patch_size, in_channels, body)
    self.x_embedder = PatchEmbed(patch_size, in_channels, head)
    self.s_projector = nn.Linear(body, head)
    self.t_embedder = GaussianFourierEmbedding(body)
    self.y_embedder = LabelEmbedder(num_classes, body, class_dropout_prob)
    self.final_layer = DDTFinalLayer(head, patch_size * patch_size * in_channels)
    self.pos_embed = nn.Parameter(torch.from_numpy(sincos_2d_table(body, grid)).float()[None],
                                  requires_grad=False)
    self.enc_feat_rope = VisionRotaryEmbeddingFast(body // num_heads[0] // 2, grid)
    self.dec_feat_rope = VisionRotaryEmbeddingFast(head // num_heads[1] // 2, grid)
    self.blocks = nn.ModuleList(
        [LightningDDTBlock(body, num_heads[0], mlp_ratio, qk_norm) for _ in range(depth[0])]
        + [LightningDDTBlock(head, num_heads[1], mlp_ratio, qk_norm) for _ in range(depth[1])])

  def unpatchify(self, tokens):
    """(B, N, p*p*C) -> (B, C, H, W)."""
    b, n, _ = tokens.shape
    g, p, c = int(round(n ** 0.5)), self.patch, self.in_channels
    x = tokens.reshape(b, g, g, p, p, c)
    return torch.einsum("nhwpqc->nchpwq", x).reshape(b, c, g * p, g * p)

  def forward(self, x, t, y, train=False):
    """Velocity (B, C, H, W) of x_t (B, C, H, W) at times t (B,) for labels y (B,)."""
    t_e = self.t_embedder(t)
    c = F.silu(t_e + self.y_embedder(y, train))
    s = self.s_embedder(x) + self.pos_embed
    for i in range(self.depth[0]):
      s = self.blocks[i](s, c, self.enc_feat_rope)
    s = self.s_projector(F.silu(t_e[:, None] + s))
    h = self.x_embedder(x)
    for i in range(self.depth[0], sum(self.depth)):
      h = self.blocks[i](h, s, self.dec_feat_rope)
    return self.unpatchify(self.final_layer(h, s))


def randomize_(model: nn.Module, seed: int = 0, scale: float = 0.05) -> nn.Module:
  """Adds N(0, scale) noise to every trainable parameter, so zero-initialised layers matter."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for p in model.parameters():
      if p.requires_grad:
        p.add_(scale * torch.randn(p.shape, generator=gen))
  return model
