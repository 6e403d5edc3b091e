"""Spectral modulator: fuses the K frequency bands into one latent with a zero-init residual."""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any


class SpectralModulator(nn.Module):
  """Conv3x3(K*C->C) -> SiLU -> zero-init Conv3x3(C->C) on the concatenated bands, plus their sum.

  Attributes:
    features: latent channels C.
    num_bands: number of bands K.
    dtype: compute dtype of the convolutions.
    param_dtype: dtype of the parameters.
  """

  features: int
  num_bands: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, bands: jax.Array) -> jax.Array:
    """Maps bands (K, B, H, W, C) to the fused latent q = Delta + sum_k b_k, (B, H, W, C)."""
    num_bands, batch, height, width, channels = bands.shape
    if num_bands != self.num_bands or channels != self.features:
      raise ValueError(f"bands {bands.shape} do not match num_bands={self.num_bands}, "
                       f"features={self.features}")
    # Channel index k*C + c: band 0's channels first, the same as concatenating the bands.
    x = jnp.transpose(bands, (1, 2, 3, 0, 4)).reshape(batch, height, width,
                                                      num_bands * channels)
    x = nn.Conv(
        self.features, (3, 3), padding="SAME", dtype=self.dtype, param_dtype=self.param_dtype,
        kernel_init=nn.with_logical_partitioning(
            nn.initializers.lecun_normal(), (None, None, "embed", "mlp")),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("mlp",)),
        name="conv_in")(x)
    x = nn.silu(x)
    # Zero-initialised so that at init q == sum_k b_k == z and training starts from the encoder's
    # own latent.
    delta = nn.Conv(
        self.features, (3, 3), padding="SAME", dtype=self.dtype, param_dtype=self.param_dtype,
        kernel_init=nn.with_logical_partitioning(
            nn.initializers.zeros_init(), (None, None, "mlp", "embed")),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("embed",)),
        name="conv_out")(x)
    # The band sum stays in the bands' dtype (f32) so q reproduces z exactly at init even with a
    # bf16 compute dtype.
    return jnp.sum(bands, axis=0) + delta.astype(bands.dtype)
