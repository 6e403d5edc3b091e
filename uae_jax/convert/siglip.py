"""SigLIP / SigLIP2 vision tower weights (HF transformers) <-> `uae_jax.models.siglip.Siglip`
params, and the official UAE-SigLIP2 checkpoint layout.

Accepted sources (prefix found from the `embeddings.patch_embedding.weight` key; no
`class_embedding`, which tells SigLIP from CLIP):
  HF `SiglipVisionModel` / `SiglipModel`   Conv2d patch embedding; position convention
                                           'torch_bicubic' (HF interpolate_pos_encoding)
  HF `Siglip2VisionModel` / `Siglip2Model` (NaFlex) Linear patch embedding over (p, p, C)-ordered
                                           patches; position convention 'antialiased_bilinear'
  official UAE-SigLIP2 (`encoder.model.*`, see `import_official_uae_siglip`)
The text tower and `logit_scale`/`logit_bias` of a full model are dropped by name, a verified
`embeddings.position_ids` buffer too (see convert/clip.py). Anything else unknown, missing or
mis-shaped is a `ConversionError` listing all of them.

Key table (ours <- HF, `i` = block):
  patch_embed/{kernel,bias}  embeddings.patch_embedding.{weight,bias}  (Conv2d OIHW; NaFlex's
                             Linear (D, p*p*C) is an exact reshape of the same tensor)
  pos_embed                  embeddings.position_embedding.weight (g*g, D)
  blocks_i/...               encoder.layers.i.{layer_norm1, self_attn.{q,k,v,out}_proj,
                             layer_norm2, mlp.fc1, mlp.fc2}  (as CLIP)
  norm/{scale,bias}          post_layernorm.{weight,bias}  (only with final_norm_affine=True; UAE
                             drops it and uses a parameter-free LayerNorm)
  head/probe                 head.probe
  head/query|key|value       head.attention.in_proj_{weight,bias} thirds (q, k, v order)
  head/proj                  head.attention.out_proj
  head/norm, head/mlp/fc1|fc2  head.layernorm, head.mlp.fc1|fc2      (only with head=True)
"""
from typing import Any, Dict, List, Mapping, Optional, Tuple

import numpy as np

from uae_jax.convert import clip as clip_convert
from uae_jax.convert import guard
from uae_jax.convert import tables
from uae_jax.convert import torch_io
from uae_jax.convert.tables import ConversionError, FlaxPath, Row, Table

MODEL_CLASS = "uae_jax.models.siglip.Siglip"
ANCHOR = clip_convert.ANCHOR
HUB_PREFIX = "vision_model."
OFFICIAL_PREFIX = "encoder.model."
LAYOUTS = ("siglip", "naflex")


def head_rows(prefix: str, fp: FlaxPath = ()) -> List[Row]:
  """The attention-pool head: torch MultiheadAttention's packed in_proj split into q, k, v."""
  h = prefix + "head."
  rows = [Row(fp + ("head", "probe"), h + "probe", "identity")]
  for k, name in enumerate(("query", "key", "value")):
    rows += [Row(fp + ("head", name, "kernel"), h + "attention.in_proj_weight", "linear", (k, 3)),
             Row(fp + ("head", name, "bias"), h + "attention.in_proj_bias", "identity", (k, 3))]
  rows += tables.linear_rows(fp + ("head", "proj"), h + "attention.out_proj")
  rows += tables.layernorm_rows(fp + ("head", "norm"), h + "layernorm")
  rows += tables.linear_rows(fp + ("head", "mlp", "fc1"), h + "mlp.fc1")
  rows += tables.linear_rows(fp + ("head", "mlp", "fc2"), h + "mlp.fc2")
  return rows


def siglip_table(*, depth: int, prefix: str = HUB_PREFIX, final_norm: bool = True,
                 head: bool = True, flax_prefix: FlaxPath = ()) -> Table:
  """The explicit SigLIP vision-tower table (Conv2d patch layout; see the module docstring)."""
  fp, e = flax_prefix, prefix + "embeddings."
  rows = tables.conv_rows(fp + ("patch_embed",), e + "patch_embedding")
  rows.append(Row(fp + ("pos_embed",), e + "position_embedding.weight", "identity"))
  for i in range(depth):
    rows += clip_convert.vit_block_rows(i, prefix, fp)
  if final_norm:
    rows += tables.layernorm_rows(fp + ("norm",), prefix + "post_layernorm")
  if head:
    rows += head_rows(prefix, fp)
  return Table("siglip_vision", rows)


def naflex_to_conv(w: np.ndarray, key: str) -> np.ndarray:
  """NaFlex Linear weight (D, p*p*C), inputs ordered (p, p, C) -> Conv2d weight (D, C, p, p)."""
  d, n = w.shape
  p = int(round((n / 3) ** 0.5))
  if 3 * p * p != n:
    raise ConversionError(f"{key} has {n} inputs: not 3 * p * p")
  return np.ascontiguousarray(w.reshape(d, p, p, 3).transpose(0, 3, 1, 2))


def conv_to_naflex(w: np.ndarray) -> np.ndarray:
  """Inverse of `naflex_to_conv` (exact copy)."""
  return np.ascontiguousarray(w.transpose(0, 2, 3, 1).reshape(w.shape[0], -1))


def infer_siglip_arch(sd: Mapping[str, np.ndarray], prefix: str, config: Optional[Mapping],
                      input_size: Optional[int], layout: str) -> Dict[str, Any]:
  """`Siglip` kwargs from tensor shapes (and a config.json when given); conv patch layout."""
  from uae_jax.models.siglip import SIZES
  e = prefix + "embeddings."
  need = [e + "position_embedding.weight", e + "patch_embedding.weight",
          prefix + "encoder.layers.0.mlp.fc1.weight"]
  missing = [k for k in need if k not in sd]
  if missing:
    raise ConversionError("SigLIP vision state dict", [("missing PyTorch key", k) for k in missing])
  w = sd[e + "patch_embedding.weight"]
  pos = sd[e + "position_embedding.weight"]
  dim = int(pos.shape[-1])
  if w.ndim != 4 or w.shape[:2] != (dim, 3) or w.shape[2] != w.shape[3]:
    raise ConversionError(f"{e}patch_embedding.weight has shape {tuple(w.shape)}; expected "
                          f"({dim}, 3, p, p)")
  vc = clip_convert.vision_config(config)
  depth = clip_convert.count_blocks(sd, prefix)
  mlp = int(sd[prefix + "encoder.layers.0.mlp.fc1.weight"].shape[0])
  size = clip_convert.match_size(SIZES, dim, depth, mlp, vc.get("num_attention_heads"), "Siglip")
  if vc.get("hidden_act", "gelu_pytorch_tanh") != "gelu_pytorch_tanh":
    raise ConversionError(f"config.json hidden_act={vc['hidden_act']!r}; Siglip uses tanh GELU")
  grid = clip_convert.square_grid(int(pos.shape[0]), e + "position_embedding.weight")
  patch = int(w.shape[-1])
  return {"size": size, "patch_size": patch,
          "input_size": grid * patch if input_size is None else input_size,
          "pos_embed_grid": grid,
          "pos_embed_convention": "antialiased_bilinear" if layout == "naflex" else "torch_bicubic",
          "final_norm_affine": prefix + "post_layernorm.weight" in sd,
          "head": prefix + "head.probe" in sd,
          "ln_eps": float(vc.get("layer_norm_eps", 1e-6))}


def _normalise(sd: Mapping[str, np.ndarray], prefix: str) -> Tuple[dict, str, List[str]]:
  """Drop extras; NaFlex patch Linear -> Conv2d layout. Returns (state dict, layout, dropped)."""
  if prefix + "embeddings.class_embedding" in sd:
    raise ConversionError(f"{prefix}embeddings.class_embedding present: a CLIP vision tower, not "
                          "SigLIP (use `convert clip`)")
  sd, dropped = clip_convert.drop_extras(sd, prefix)
  key = prefix + ANCHOR
  layout = "naflex" if np.ndim(sd[key]) == 2 else "siglip"
  if layout == "naflex":
    sd[key] = naflex_to_conv(np.asarray(sd[key]), key)
  return sd, layout, dropped


def convert_siglip(sd: Mapping[str, np.ndarray], *, input_size: Optional[int] = None,
                   config: Optional[Mapping] = None, drop_final_norm: bool = False,
                   drop_head: bool = False, context: str = ""
                   ) -> Tuple[dict, Dict[str, Any], Dict[str, Any]]:
  """HF SigLIP(2) vision state dict -> (params, Siglip kwargs, info)."""
  from uae_jax.models.siglip import Siglip
  prefix = clip_convert.find_prefix(sd, ANCHOR, "SigLIP")
  sd, layout, dropped = _normalise(sd, prefix)
  arch = infer_siglip_arch(sd, prefix, config, input_size, layout)
  for flag, drop, names in (("final_norm_affine", drop_final_norm, ("post_layernorm.",)),
                            ("head", drop_head, ("head.",))):
    if drop and arch[flag]:
      gone = [k for k in sd if k.startswith(tuple(prefix + n for n in names))]
      dropped += gone
      for k in gone:
        del sd[k]
      arch[flag] = False
  table = siglip_table(depth=clip_convert.count_blocks(sd, prefix), prefix=prefix,
                       final_norm=arch["final_norm_affine"], head=arch["head"])
  params = tables.to_flax(table, sd, expected=clip_convert.model_shapes(Siglip, arch),
                          context=context or f"converting a SigLIP vision tower ({layout})")
  return params, arch, {"prefix": prefix, "layout": layout, "dropped_keys": dropped}


def export_siglip(params: Mapping, *, prefix: str = HUB_PREFIX, layout: str = "siglip"
                  ) -> Dict[str, np.ndarray]:
  """Our (unrolled) Siglip params -> an HF state dict: 'siglip' (SiglipVisionModel, Conv2d patch)
  or 'naflex' (Siglip2VisionModel, Linear patch). prefix='' gives transformers-5 in-memory names."""
  from uae_jax.convert.dinov2 import _count_blocks
  if layout not in LAYOUTS:
    raise ConversionError(f"layout {layout!r}: expected one of {LAYOUTS}")
  table = siglip_table(depth=_count_blocks(params), prefix=prefix, final_norm="norm" in params,
                       head="head" in params)
  sd = tables.to_torch(table, params, context=f"exporting Siglip params to the HF {layout} layout")
  if layout == "naflex":
    key = prefix + ANCHOR
    sd[key] = conv_to_naflex(sd[key])
  return sd


@guard.loader("SigLIP weights")
def load_siglip(path: str, *, input_size: Optional[int] = None) -> Tuple[dict, Dict[str, Any]]:
  """(params, Siglip kwargs) from a converted directory or an HF file / model directory."""
  params, kwargs, sd, config = clip_convert.read_any(path, MODEL_CLASS)
  if params is None:
    params, kwargs, _ = convert_siglip(sd, input_size=input_size, config=config,
                                       context=f"converting {path}")
  elif input_size is not None:
    kwargs["input_size"] = input_size
  return params, kwargs


@guard.loader("SigLIP weights")
def load_for_config(path: str, cfg: Mapping) -> dict:
  """Params for the encoder config `cfg` (kind 'siglip2'); see `convert.clip.fit_to_config`."""
  from uae_jax.models.siglip import Siglip
  params, kwargs = load_siglip(path)
  want = cfg.get("pos_embed_convention")
  if want and want != kwargs["pos_embed_convention"]:
    from uae_jax.errors import ConfigError
    raise ConfigError(f"{path} was trained with pos_embed_convention="
                      f"{kwargs['pos_embed_convention']!r}, model.encoder says {want!r}")
  return clip_convert.fit_to_config(params, kwargs, cfg, Siglip, path,
                                    {"final_norm_affine": ("norm",), "head": ("head",)})


@guard.loader("SigLIP weights")
def convert_siglip_file(src: str, out_dir: str, *, input_size: Optional[int] = None,
                        drop_final_norm: bool = False, drop_head: bool = False
                        ) -> Tuple[dict, Dict[str, Any]]:
  """Convert `src` and write `out_dir/{params.msgpack, arch.json}`."""
  sd, config = torch_io.read_state_dict(src)
  params, arch, info = convert_siglip(sd, input_size=input_size, config=config,
                                      drop_final_norm=drop_final_norm, drop_head=drop_head,
                                      context=f"converting {src}")
  clip_convert.write_converted(out_dir, params, MODEL_CLASS, arch, src, info)
  return params, arch


# ----------------------------------------------------------------------------------------------
# Official UAE-SigLIP2: `encoder.model.{embeddings, encoder.layers, head}` (no post_layernorm).

def uae_siglip_from_state_dict(sd: Mapping[str, np.ndarray], *, encoder_input_size: int = 256,
                               context: str = "") -> Tuple[dict, Dict[str, Any]]:
  """Official UAE-SigLIP2 state dict -> UAE params (the head is kept: frozen, not in the latent)."""
  from uae_jax.models.siglip import Siglip
  context = context or "converting an official UAE-SigLIP2 state dict"
  enc_sd = {k: v for k, v in sd.items() if k.startswith(OFFICIAL_PREFIX)}
  if not enc_sd:
    raise ConversionError(f"{context}: no `{OFFICIAL_PREFIX}*` keys")
  enc_sd, layout, _ = _normalise(enc_sd, OFFICIAL_PREFIX)
  arch = infer_siglip_arch(enc_sd, OFFICIAL_PREFIX, None, encoder_input_size, layout)
  if arch["final_norm_affine"]:
    raise ConversionError(f"{context}: {OFFICIAL_PREFIX}post_layernorm.* present; the official "
                          "UAE-SigLIP2 encoder has no post_layernorm affine")
  sd = {**{k: v for k, v in sd.items() if not k.startswith(OFFICIAL_PREFIX)}, **enc_sd}
  enc_table = siglip_table(depth=clip_convert.count_blocks(enc_sd, OFFICIAL_PREFIX),
                           prefix=OFFICIAL_PREFIX, final_norm=False, head=arch["head"])
  return clip_convert.official_uae_from_state_dict(
      sd, enc_table, clip_convert.model_shapes(Siglip, arch), {"kind": "siglip2", **arch},
      context=context)


def uae_siglip_to_state_dict(params: Mapping, *, decoder_grid: int = 16) -> Dict[str, np.ndarray]:
  """Our UAE-SigLIP2 params (unrolled) -> the official state dict layout."""
  from uae_jax.convert.dinov2 import _count_blocks
  p = params.get("params", params)
  enc = p.get("encoder", {})
  if "norm" in enc:
    raise ConversionError("exporting UAE-SigLIP2: the encoder has an affine final norm; the "
                          "official layout has no post_layernorm")
  enc_table = siglip_table(depth=_count_blocks(enc), prefix=OFFICIAL_PREFIX, final_norm=False,
                           head="head" in enc)
  return clip_convert.official_uae_to_state_dict(p, enc_table, decoder_grid=decoder_grid)


@guard.loader("UAE-SigLIP2 checkpoint")
def import_official_uae_siglip(path: str, which: str = "ema", *, encoder_input_size: int = 256
                               ) -> Tuple[dict, Dict[str, Any]]:
  """(UAE params, arch) from an official UAE-SigLIP2 checkpoint."""
  return clip_convert.read_official_with(uae_siglip_from_state_dict, path, which,
                                         encoder_input_size)


def export_official_uae_siglip(params: Mapping, path: Optional[str], *, decoder_grid: int = 16
                               ) -> Dict[str, np.ndarray]:
  """Write our UAE-SigLIP2 params as an official-layout .safetensors file (and return the dict)."""
  return clip_convert.write_official(uae_siglip_to_state_dict(params, decoder_grid=decoder_grid),
                                     path, "siglip2")
