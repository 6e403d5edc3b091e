"""One interface over the semantic encoders: `config.model.encoder.kind` selects the module.

Every encoder maps [0, 1] images (B, S, S, 3) to a channels-last latent grid (B, H, W, C). The UAE
model, the semantic teacher, the trainer, conversion and the analysis tools go through `build`,
`latent_dim` and `load` here, so adding an encoder is one registry entry, not branches elsewhere.
"""
from typing import Any, Callable, Mapping, NamedTuple

import flax.linen as nn
import jax.numpy as jnp

from uae_jax.errors import ConfigError
from uae_jax.models import dinov2


class EncoderKind(NamedTuple):
  """How to build, size and load one kind of encoder."""
  module: Callable[..., nn.Module]          # the Flax module class
  latent_dim: Callable[[Mapping], int]      # channels C of the latent grid
  load: Callable[[str, Mapping], Any]       # (path, encoder_cfg) -> params in the config's layout


def _dinov2_dim(cfg: Mapping) -> int:
  """DINOv2 width: the named size's, or the explicit `dim` of a custom size."""
  return cfg["dim"] if cfg.get("size") == "custom" else dinov2.SIZES[cfg["size"]].dim


def _dinov2_load(path: str, cfg: Mapping):
  """Converted or raw DINOv2 weights for `cfg` (see `dinov2.load`)."""
  return dinov2.load(path, cfg)


KINDS = {
    "dinov2": EncoderKind(dinov2.DinoV2, _dinov2_dim, _dinov2_load),
}


def _kind(cfg: Mapping) -> EncoderKind:
  """The registry entry named by `cfg['kind']` (default dinov2)."""
  name = cfg.get("kind", "dinov2")
  if name not in KINDS:
    raise ConfigError(f"model.encoder.kind={name!r}: expected one of {sorted(KINDS)}")
  return KINDS[name]


def module_kwargs(cfg: Mapping) -> dict:
  """Constructor kwargs of the encoder module: the config without the registry key."""
  return {k: v for k, v in dict(cfg).items() if k != "kind"}


def build(cfg: Mapping, dtype: Any = jnp.float32, name: str = "encoder") -> nn.Module:
  """The encoder module described by `config.model.encoder`."""
  return _kind(cfg).module(**module_kwargs(cfg), dtype=dtype, name=name)


def latent_dim(cfg: Mapping) -> int:
  """Channels of the encoder's latent grid."""
  return _kind(cfg).latent_dim(cfg)


def load(path: str, cfg: Mapping):
  """Pretrained encoder params from `path`, converted, laid out and shape-checked for `cfg`."""
  return _kind(cfg).load(path, cfg)
