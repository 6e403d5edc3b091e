"""Vector quantisation: nearest-code search, VQ losses, the Voronoi-style codebook reset, usage.

Shapes: continuous tokens z (B, T, D); per-token codebooks (T, K, D) (QG-VAE: token t has its own
K codes) or one shared codebook (K, D) (patch VQ-VAE). All functions are pure and jittable.

The reset (docs/qgvae.md#codebook-reset) is the original's sequential rule, vectorised: for each
codebook independently, while a code with zero accumulated statistic exists and a code with
statistic > 1e-6 exists, move the first dead code (lowest index) next to the busiest remaining
code (+ U(-1e-4, 1e-4) jitter) and mark both as used for this round. Each busy code is split at most
once per round, so the loop pairs the i-th dead code (by index) with the i-th busiest code (by
statistic, ties by index) for i < min(#dead, #busy): a sort and a gather, no Python loop.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array

# The original weights: codebook term 0.25, commitment 1.0. This is the REVERSE of the usual
# VQ-VAE convention (beta = 0.25 on the commitment term); QG-VAE keeps it, so do we.
CODEBOOK_WEIGHT = 0.25
COMMIT_WEIGHT = 1.0
RESET_EPS = 1e-6
RESET_JITTER = 1e-4


def squared_distances(z: Array, codebook: Array) -> Array:
  """||z - e||^2 for every token and code: (B, T, D) x (T, K, D) or (K, D) -> (B, T, K).

  Computed as |z|^2 - 2 z.e + |e|^2 (matmuls, no (B, T, K, D) intermediate) at HIGHEST precision so
  that TPUs do not pick codes from bfloat16 products.
  """
  hp = jax.lax.Precision.HIGHEST
  z = z.astype(jnp.float32)
  if codebook.ndim == 2:
    cross = jnp.einsum("btd,kd->btk", z, codebook, precision=hp)
    e2 = jnp.sum(jnp.square(codebook), -1)[None, None]
  else:
    cross = jnp.einsum("btd,tkd->btk", z, codebook, precision=hp)
    e2 = jnp.sum(jnp.square(codebook), -1)[None]
  return jnp.sum(jnp.square(z), -1, keepdims=True) - 2.0 * cross + e2


def lookup(codebook: Array, indices: Array) -> Array:
  """Code vectors (B, T, D) for indices (B, T) in per-token (T, K, D) or shared (K, D) codebooks."""
  if codebook.ndim == 2:
    return codebook[indices]
  return codebook[jnp.arange(codebook.shape[0])[None, :], indices]


def quantize(z: Array, codebook: Array) -> dict:
  """Nearest code per token with the straight-through estimator.

  Returns {'q_st': z + sg(q - z) (forward = q, gradient identity to z), 'q', 'indices' (B, T)
  int32, 'codebook_loss': mean((sg(z) - q)^2) (reaches the codebook only), 'commit_loss':
  mean((z - sg(q))^2) (reaches the encoder only)}.
  """
  z = z.astype(jnp.float32)
  indices = jnp.argmin(squared_distances(jax.lax.stop_gradient(z), codebook), axis=-1)
  indices = indices.astype(jnp.int32)
  q = lookup(codebook, indices)
  sg = jax.lax.stop_gradient
  return {"q_st": z + sg(q - z), "q": q, "indices": indices,
          "codebook_loss": jnp.mean(jnp.square(sg(z) - q)),
          "commit_loss": jnp.mean(jnp.square(z - sg(q)))}


def vq_loss(codebook_loss: Array, commit_loss: Array, codebook_weight: float = CODEBOOK_WEIGHT,
            commit_weight: float = COMMIT_WEIGHT) -> Array:
  """0.25 * codebook + 1.0 * commitment (QG-VAE's weights; see CODEBOOK_WEIGHT for the reversal)."""
  return codebook_weight * codebook_loss + commit_weight * commit_loss


# ------------------------------------------------------------------------------ reset
def accumulate(grad_mag: Array, codebook_grad: Array) -> Array:
  """m[t, k] += mean_D |dL/dE_t[k]|: how much quantisation error lands in each Voronoi cell."""
  return grad_mag + jnp.mean(jnp.abs(codebook_grad.astype(jnp.float32)), axis=-1)


def reset_plan(grad_mag: Array, eps: float = RESET_EPS) -> tuple:
  """(moved (T, K) bool, source (T, K) int32): which dead codes move, next to which busy code."""
  dead = grad_mag <= 0.0
  busy = grad_mag > eps
  n_pairs = jnp.minimum(dead.sum(-1), busy.sum(-1))                  # (T,)
  # Busiest first; a stable sort keeps the lowest index first among ties, as argmax does.
  by_load = jnp.argsort(-grad_mag, axis=-1, stable=True).astype(jnp.int32)
  dead_rank = jnp.cumsum(dead, axis=-1) - 1                          # i-th dead code, by index
  moved = dead & (dead_rank < n_pairs[:, None])
  k = grad_mag.shape[-1]
  source = jnp.take_along_axis(by_load, jnp.clip(dead_rank, 0, k - 1), axis=-1)
  return moved, source


def reset_codebook(codebook: Array, grad_mag: Array, rng: Array, eps: float = RESET_EPS,
                   jitter: float = RESET_JITTER) -> tuple:
  """One reset round on (T, K, D) codebooks: (new codebook, zeroed statistic, stats).

  stats = {'dead': mean over codebooks of #codes with zero statistic before the reset,
           'moved': mean over codebooks of #codes moved}.
  """
  moved, source = reset_plan(grad_mag, eps)
  src_codes = jnp.take_along_axis(codebook, source[..., None], axis=1)
  noise = hash_uniform(rng, codebook.shape, -jitter, jitter).astype(codebook.dtype)
  new = jnp.where(moved[..., None], src_codes + noise, codebook)
  stats = {"dead": jnp.mean(jnp.sum(grad_mag <= 0.0, -1).astype(jnp.float32)),
           "moved": jnp.mean(jnp.sum(moved, -1).astype(jnp.float32))}
  return new, jnp.zeros_like(grad_mag), stats


def _mix32(x: Array) -> Array:
  """A 32-bit integer finaliser (Wellons' 'lowbias32'): every input bit flips ~half the output."""
  x = x ^ (x >> 16)
  x = x * jnp.uint32(0x7FEB352D)
  x = x ^ (x >> 15)
  x = x * jnp.uint32(0x846CA68B)
  return x ^ (x >> 16)


def hash_bits(rng: Array, shape: tuple) -> Array:
  """uint32 bits of `shape` from a counter hash of (element index, the key's bits).

  The step's randomness (tail dropout, the reset's jitter) comes from here rather than from
  `jax.random`: each Threefry draw, split or fold_in puts a Threefry loop into the compiled step
  and XLA:CPU spends seconds compiling each one (docs/qgvae.md, compile time). Elementwise in the
  global index, so the values do not depend on sharding, and a resumed run repeats them.
  """
  seed = jax.random.key_data(rng).reshape(-1).astype(jnp.uint32)
  idx = jnp.zeros(shape, jnp.uint32)
  for axis in range(len(shape)):
    idx = idx * jnp.uint32(shape[axis]) + jax.lax.broadcasted_iota(jnp.uint32, shape, axis)
  return _mix32(_mix32(idx ^ seed[0]) ^ seed[-1])


def hash_uniform(rng: Array, shape: tuple, minval: float = 0.0, maxval: float = 1.0) -> Array:
  """U(minval, maxval) float32 of `shape` from `hash_bits` (24 random bits per value)."""
  unit = (hash_bits(rng, shape) >> 8).astype(jnp.float32) * (1.0 / (1 << 24))
  return minval + (maxval - minval) * unit


def hash_fold_in(rng: Array, data) -> Array:
  """A new key of the same kind from `rng` and an integer (the step), without Threefry."""
  words = jax.random.key_data(rng).astype(jnp.uint32)
  d = jnp.asarray(data).astype(jnp.uint32)
  salt = jnp.asarray([0x9E3779B9, 0x85EBCA6B], jnp.uint32)[: words.shape[-1]]
  mixed = _mix32(_mix32(words ^ d) + salt)
  return jax.random.wrap_key_data(mixed, impl=jax.random.key_impl(rng))


# ------------------------------------------------------------------------------ usage, ordering
def usage(indices: Array, codebook_size: int) -> dict:
  """Batch code usage: mean over tokens of the index perplexity and of the distinct codes used.

  For a shared codebook pass indices flattened to (B * T, 1) so all positions pool together.
  """
  onehot = jax.nn.one_hot(indices, codebook_size, dtype=jnp.float32)   # (B, T, K)
  counts = onehot.sum(0)                                               # (T, K)
  p = counts / jnp.maximum(counts.sum(-1, keepdims=True), 1.0)
  entropy = -jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0), -1)
  return {"perplexity": jnp.mean(jnp.exp(entropy)),
          "codes_used": jnp.mean(jnp.sum(counts > 0, -1).astype(jnp.float32))}


def tail_dropout_mask(rng: Array, batch: int, tokens: int, prob: float = 1.0 / 3.0) -> Array:
  """(B, T) float mask: per sample, with probability `prob`, tokens r.. are zeroed, r ~ U{1..T-1}.

  Both draws come from `hash_bits` (split + uniform + randint would put five Threefry loops into
  the compiled step); r = 1 + bits mod (T - 1) is uniform up to a bias below T / 2^32.
  """
  bits = hash_bits(rng, (2, batch))
  on = (bits[0] >> 8).astype(jnp.float32) * (1.0 / (1 << 24)) < prob
  r = 1 + (bits[1] % jnp.uint32(max(tokens - 1, 1))).astype(jnp.int32)
  keep = jnp.arange(tokens)[None, :] < r[:, None]
  return jnp.where(on[:, None], keep, True).astype(jnp.float32)


def qggan_adaptive_weight(grad_rec: Array, grad_gan: Array, scale: float = 0.75,
                          eps: float = 1e-6) -> Array:
  """QGGAN's lambda = 0.75 ||g_rec|| / ||g_gan + eps|| (eps added to the tensor), no gradient.

  Unlike VQGAN's weight there is no cap and eps sits inside the norm, as in the original.
  """
  num = jnp.sqrt(jnp.sum(jnp.square(grad_rec.astype(jnp.float32))))
  den = jnp.sqrt(jnp.sum(jnp.square(grad_gan.astype(jnp.float32) + eps)))
  return jax.lax.stop_gradient(scale * num / den)


def avg_pool(x: Array, factor: int) -> Array:
  """factor x factor mean pooling of NHWC images (a Gaussian-pyramid level by box filtering)."""
  if factor == 1:
    return x
  b, h, w, c = x.shape
  return x.reshape(b, h // factor, factor, w // factor, factor, c).mean(axis=(2, 4))
