"""One interface over the semantic encoders: `config.model.encoder.kind` selects the module.

Every encoder maps [0, 1] images (B, S, S, 3) to a channels-last latent grid (B, H, W, C). The UAE
model, the semantic teacher, the trainer, conversion and the analysis tools go through `build`,
`latent_dim`, `latent_grid` and `load` here, so adding an encoder is one registry entry, not
branches elsewhere.

Kinds (full-size defaults in `DEFAULTS`, CPU test sizes in `TINY`):
  dinov2   DINOv2 ViT-B/14 with 4 registers, 224 px, final LayerNorm without affine (models/dinov2.py)
  clip     OpenAI CLIP ViT-L/14, 224 px, raw last-block patch tokens (models/clip.py)
  siglip2  SigLIP2 ViT-B/16, 256 px, final LayerNorm without affine (models/siglip.py)
  mae      MAE ViT-B/16, 224 px (14 x 14 grid), final LayerNorm without affine (models/mae.py)
The official-code recipe settings that follow from the encoder (the DCT keep counts and the number
of zig-zag coefficients in the semantic loss) are in `OFFICIAL_RECIPE`.
"""
from typing import Any, Callable, Mapping, NamedTuple, Tuple

import flax.linen as nn
import jax.numpy as jnp

from uae_jax.errors import ConfigError
from uae_jax.models import clip
from uae_jax.models import dinov2
from uae_jax.models import mae
from uae_jax.models import siglip


class EncoderKind(NamedTuple):
  """How to build, size and load one kind of encoder."""
  module: Callable[..., nn.Module]          # the Flax module class
  latent_dim: Callable[[Mapping], int]      # channels C of the latent grid
  load: Callable[[str, Mapping], Any]       # (path, encoder_cfg) -> params in the config's layout
  # (path, input_size or None) -> (params, constructor kwargs) as stored in / implied by the file
  pretrained: Callable[[str, Any], Tuple[dict, dict]]
  default_patch: int                        # patch size when the config does not set one


def _dinov2_dim(cfg: Mapping) -> int:
  """DINOv2 width: the named size's, or the explicit `dim` of a custom size."""
  return cfg["dim"] if cfg.get("size") == "custom" else dinov2.SIZES[cfg["size"]].dim


def _dinov2_load(path: str, cfg: Mapping):
  """Converted or raw DINOv2 weights for `cfg` (see `dinov2.load`)."""
  return dinov2.load(path, cfg)


def _dinov2_pretrained(path: str, input_size):
  """DINOv2 (params, kwargs) as stored, final LayerNorm affine included (HF `last_hidden_state`)."""
  from uae_jax.convert import dinov2 as convert_dinov2
  return convert_dinov2.load_dinov2(path, input_size=input_size)


def _clip_pretrained(path: str, input_size):
  """CLIP (params, kwargs) as stored."""
  from uae_jax.convert import clip as convert_clip
  return convert_clip.load_clip(path, input_size=input_size)


def _siglip_pretrained(path: str, input_size):
  """SigLIP(2) (params, kwargs) as stored."""
  from uae_jax.convert import siglip as convert_siglip
  return convert_siglip.load_siglip(path, input_size=input_size)


def _mae_pretrained(path: str, input_size):
  """MAE (params, kwargs) as stored."""
  from uae_jax.convert import mae as convert_mae
  return convert_mae.load_mae(path, input_size=input_size)


def _size_dim(sizes: Mapping) -> Callable[[Mapping], int]:
  """latent_dim for encoders whose width is given by a named size."""
  def dim(cfg: Mapping) -> int:
    if cfg.get("size") not in sizes:
      raise ConfigError(f"model.encoder.size={cfg.get('size')!r}: expected one of {sorted(sizes)}")
    return sizes[cfg["size"]].dim
  return dim


KINDS = {
    "dinov2": EncoderKind(dinov2.DinoV2, _dinov2_dim, _dinov2_load, _dinov2_pretrained, 14),
    "clip": EncoderKind(clip.Clip, _size_dim(clip.SIZES), clip.load, _clip_pretrained, 14),
    "siglip2": EncoderKind(siglip.Siglip, _size_dim(siglip.SIZES), siglip.load,
                           _siglip_pretrained, 16),
    "mae": EncoderKind(mae.Mae, _size_dim(mae.SIZES), mae.load, _mae_pretrained, 16),
}

# Full-size encoder configs (config.model.encoder) of the official UAE encoders.
DEFAULTS = {
    "dinov2": dict(kind="dinov2", size="B", num_registers=4, input_size=224, pos_embed_grid=37,
                   pos_embed_convention="antialiased_bicubic", final_norm_affine=False),
    "clip": dict(kind="clip", size="L", patch_size=14, input_size=224, pos_embed_grid=16,
                 pos_embed_convention="torch_bicubic", post_norm=False),
    "siglip2": dict(kind="siglip2", size="B", patch_size=16, input_size=256, pos_embed_grid=16,
                    pos_embed_convention="torch_bicubic", final_norm_affine=False, head=False),
    # Standard MAE values (facebook/vit-mae-base: 224 px, ImageNet statistics); the UAE code's
    # MAEwNorm states none. Its 14 x 14 grid makes the tokenizer image 14 x 16 = 224 px.
    "mae": dict(kind="mae", size="B", patch_size=16, input_size=224, pos_embed_grid=14,
                final_norm_affine=False),
}
# CPU test sizes: an 8 x 8 latent grid from 64 px images (decoder patch 8).
TINY = {
    "dinov2": dict(size="tiny", input_size=112, pos_embed_grid=8),
    "clip": dict(size="tiny", input_size=112, pos_embed_grid=8),
    "siglip2": dict(size="tiny", input_size=128, pos_embed_grid=8),
    "mae": dict(size="tiny", input_size=128, pos_embed_grid=8),
}
# Official-code recipe settings tied to the encoder (its stage-2 configs): eval keep count, random
# keep range of the DCT low-pass, and the zig-zag coefficients of the semantic loss.
OFFICIAL_RECIPE = {
    "dinov2": dict(dct_count=36, dct_count_min=32, dct_count_max=256, semantic_first_k=64),
    "clip": dict(dct_count=36, dct_count_min=36, dct_count_max=256, semantic_first_k=64),
    "siglip2": dict(dct_count=128, dct_count_min=128, dct_count_max=256, semantic_first_k=128),
    # No official MAE config exists: DINOv2's counts, the range capped at the 14 x 14 = 196 grid.
    "mae": dict(dct_count=36, dct_count_min=32, dct_count_max=196, semantic_first_k=64),
}


def kind_name(cfg: Mapping) -> str:
  """The encoder kind named by `cfg['kind']` (default dinov2), validated."""
  name = cfg.get("kind", "dinov2")
  if name not in KINDS:
    raise ConfigError(f"model.encoder.kind={name!r}: expected one of {sorted(KINDS)}")
  return name


def _kind(cfg: Mapping) -> EncoderKind:
  """The registry entry named by `cfg['kind']` (default dinov2)."""
  return KINDS[kind_name(cfg)]


def module_kwargs(cfg: Mapping) -> dict:
  """Constructor kwargs of the encoder module: the config without the registry key."""
  return {k: v for k, v in dict(cfg).items() if k != "kind"}


def build(cfg: Mapping, dtype: Any = jnp.float32, name: str = "encoder") -> nn.Module:
  """The encoder module described by `config.model.encoder`."""
  return _kind(cfg).module(**module_kwargs(cfg), dtype=dtype, name=name)


def latent_dim(cfg: Mapping) -> int:
  """Channels of the encoder's latent grid."""
  return _kind(cfg).latent_dim(cfg)


def patch_size(cfg: Mapping) -> int:
  """The encoder's patch size (the config's, else the kind's default)."""
  return int(cfg.get("patch_size") or _kind(cfg).default_patch)


def latent_grid(cfg: Mapping) -> int:
  """Side of the square latent grid: input_size // patch_size."""
  if not cfg.get("input_size"):
    raise ConfigError("model.encoder.input_size must be set to know the latent grid")
  return int(cfg["input_size"]) // patch_size(cfg)


def load(path: str, cfg: Mapping):
  """Pretrained encoder params from `path`, converted, laid out and shape-checked for `cfg`."""
  return _kind(cfg).load(path, cfg)


def pretrained(kind: str, path: str, input_size: Any = None) -> Tuple[nn.Module, dict]:
  """(module, params) of an encoder exactly as stored in `path` (analysis tools, no config)."""
  entry = _kind({"kind": kind})
  params, kwargs = entry.pretrained(path, input_size)
  return entry.module(**kwargs), params


def official_recipe(cfg: Mapping) -> dict:
  """The encoder-dependent official-recipe settings (DCT keep counts, semantic_first_k)."""
  return dict(OFFICIAL_RECIPE[kind_name(cfg)])


def normalisation(cfg: Mapping) -> Tuple[tuple, tuple]:
  """(mean, std) the encoder normalises pixels with; the pixel decoder must de-normalise with them."""
  # parent=None: a detached instance, so calling this inside another module's setup adds no child.
  module = _kind(cfg).module(**module_kwargs(cfg), parent=None)
  return tuple(module.mean), tuple(module.std)
