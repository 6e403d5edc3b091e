"""PyTorch <-> Flax weight conversion by explicit key tables (see docs/conversion.md).

Python API:
  load_dinov2(path_or_dir, ...) -> (params, DinoV2 kwargs)
  export_dinov2(params, layout='hf4') -> PyTorch-named state dict (numpy)
  import_official_uae(path, which='ema') -> ({'encoder', 'decoder'[, 'modulator']}, arch)
  export_official_uae(params, path, key_style='hf4') -> writes .safetensors, returns the dict
  load_dino_disc(path_or_dir) -> (params, arch) of the DINO ViT-S/8 discriminator backbone
Architectures are inferred from the tensor shapes (a named size, or size='custom' with explicit
dims; heads as convert/arch.py says). To load weights into a configured model, use the loaders
that also lay out and shape-check them: `uae_jax.models.dinov2.load`,
`uae_jax.models.discriminator.load_backbone`, `uae_jax.convert.uae.load_official`.
Every failure is a `ConversionError` (a `uae_jax.errors.LoadError`) listing all offending keys.
torch is only imported to read .pth/.pt/.bin files (always with `weights_only=True`).
"""
from uae_jax.convert.tables import ConversionError
from uae_jax.convert.dinov2 import convert_dinov2, export_dinov2, load_dinov2
from uae_jax.convert.discriminator import convert_dino_disc, export_dino_disc, load_dino_disc
from uae_jax.convert.flax_io import load_params, save_params
from uae_jax.convert.uae import (export_official_uae, import_official_uae, uae_from_state_dict,
                                 uae_to_state_dict)

__all__ = [
    "ConversionError", "convert_dinov2", "export_dinov2", "load_dinov2", "convert_dino_disc",
    "export_dino_disc", "load_dino_disc", "load_params", "save_params", "export_official_uae",
    "import_official_uae", "uae_from_state_dict", "uae_to_state_dict",
]
