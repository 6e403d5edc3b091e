"""CLIP vision tower weights (HF transformers) <-> `uae_jax.models.clip.Clip` params, and the
official UAE-CLIP checkpoint layout.

Accepted sources (prefix found from the `embeddings.patch_embedding.weight` key):
  HF `CLIPVisionModel` on disk / Hub   `vision_model.embeddings.class_embedding`, ...
  HF `CLIPModel` (both towers)         the same `vision_model.*` keys; the text tower
                                       (`text_model.*`), `visual_projection.weight`,
                                       `text_projection.weight` and `logit_scale` are dropped by
                                       name (listed in the result's `dropped_keys`)
  transformers-5 in-memory             the same names without `vision_model.`
  official UAE-CLIP (`encoder.model.vision_model.*`, see `import_official_uae_clip`)
`embeddings.position_ids` (a buffer some older files carry) is checked to be 0..n-1 and dropped.
Any other key, a missing key or a shape mismatch is a `ConversionError` listing all of them.

Key table (ours <- HF, `i` = block):
  patch_embed/kernel        embeddings.patch_embedding.weight (Conv2d OIHW, no bias)
  cls_token                 embeddings.class_embedding (D,)
  pos_embed                 embeddings.position_embedding.weight (1 + g*g, D)
  pre_norm/{scale,bias}     pre_layrnorm.{weight,bias}   (sic, HF's spelling)
  blocks_i/norm1, norm2     encoder.layers.i.layer_norm1, layer_norm2
  blocks_i/attn/query|key|value|proj
                            encoder.layers.i.self_attn.q_proj|k_proj|v_proj|out_proj (Linear W.T)
  blocks_i/mlp/fc1, fc2     encoder.layers.i.mlp.fc1, fc2
  post_norm/{scale,bias}    post_layernorm.{weight,bias} (only with post_norm=True)
Heads are not in the weights: they come from the matching `Clip` size and are checked against a
`config.json` beside the weights when there is one.
"""
import importlib
import math
import os
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

import numpy as np

from uae_jax.convert import flax_io
from uae_jax.convert import guard
from uae_jax.convert import tables
from uae_jax.convert import torch_io
from uae_jax.convert.tables import ConversionError, FlaxPath, Row, Table

MODEL_CLASS = "uae_jax.models.clip.Clip"
ANCHOR = "embeddings.patch_embedding.weight"
HUB_PREFIX = "vision_model."
OFFICIAL_PREFIX = "encoder.model.vision_model."
# Keys of a full contrastive model that do not belong to the vision tower (dropped by name).
OTHER_TOWER_KEYS = ("visual_projection.weight", "text_projection.weight", "logit_scale",
                    "logit_bias")
OTHER_TOWER_PREFIXES = ("text_model.",)


# ----------------------------------------------------------------------------------------------
# Shared by the CLIP and SigLIP converters.

def find_prefix(sd: Mapping[str, Any], anchor: str = ANCHOR, what: str = "CLIP") -> str:
  """The key prefix in front of the single `anchor` key of a state dict."""
  hits = [k[:-len(anchor)] for k in sd if k.endswith(anchor)]
  if len(hits) != 1:
    raise ConversionError(f"cannot find the {what} vision tower: expected exactly one "
                          f"`...{anchor}` key, found {sorted(hits) or 'none'}; first keys: "
                          f"{sorted(sd)[:8]}")
  return hits[0]


def drop_extras(sd: Mapping[str, np.ndarray], prefix: str) -> Tuple[Dict[str, np.ndarray], List[str]]:
  """The state dict without the other tower's keys and a verified `position_ids` buffer."""
  out, dropped = {}, []
  outer = prefix[:-len(HUB_PREFIX)] if prefix.endswith(HUB_PREFIX) else prefix
  for k, v in sd.items():
    rel = k[len(outer):] if k.startswith(outer) else None
    if rel is not None and (rel in OTHER_TOWER_KEYS or rel.startswith(OTHER_TOWER_PREFIXES)):
      dropped.append(k)
      continue
    if k == prefix + "embeddings.position_ids":
      ids = np.asarray(v).reshape(-1)
      if not np.array_equal(ids, np.arange(ids.size)):
        raise ConversionError(f"{k} is not 0..{ids.size - 1}; refusing an unknown position order")
      dropped.append(k)
      continue
    out[k] = v
  return out, dropped


def vit_block_rows(i: int, prefix: str, flax_prefix: FlaxPath = ()) -> List[Row]:
  """One HF CLIP/SigLIP `encoder.layers.{i}` block <-> our `blocks_{i}`."""
  t = f"{prefix}encoder.layers.{i}."
  f = flax_prefix + (f"blocks_{i}",)
  rows = tables.layernorm_rows(f + ("norm1",), t + "layer_norm1")
  for ours, theirs in (("query", "q_proj"), ("key", "k_proj"), ("value", "v_proj"),
                       ("proj", "out_proj")):
    rows += tables.linear_rows(f + ("attn", ours), t + f"self_attn.{theirs}")
  rows += tables.layernorm_rows(f + ("norm2",), t + "layer_norm2")
  rows += tables.linear_rows(f + ("mlp", "fc1"), t + "mlp.fc1")
  rows += tables.linear_rows(f + ("mlp", "fc2"), t + "mlp.fc2")
  return rows


def count_blocks(sd: Mapping[str, Any], prefix: str) -> int:
  """Number of `encoder.layers.{i}` blocks under `prefix`."""
  n = 0
  while f"{prefix}encoder.layers.{n}.layer_norm1.weight" in sd:
    n += 1
  return n


def square_grid(n: int, key: str) -> int:
  """g with g * g == n, or a ConversionError naming `key`."""
  g = math.isqrt(n)
  if g * g != n:
    raise ConversionError(f"{key} has {n} patch positions: not a square grid")
  return g


def match_size(sizes: Mapping, dim: int, depth: int, mlp: int, heads: Optional[int],
               what: str) -> str:
  """The size name with these numbers (heads checked when known), or a ConversionError."""
  for name, s in sizes.items():
    if (s.dim, s.depth, s.mlp_hidden) == (dim, depth, mlp):
      if heads is not None and heads != s.heads:
        raise ConversionError(f"{what} size {name!r} has {s.heads} heads, but config.json says "
                              f"num_attention_heads={heads}")
      return name
  known = ", ".join(f"{n}: dim {s.dim} depth {s.depth} mlp {s.mlp_hidden}" for n, s in sizes.items())
  raise ConversionError(f"no {what} size has dim {dim}, depth {depth}, MLP {mlp}; known: {known}")


def vision_config(config: Optional[Mapping]) -> Mapping:
  """The vision part of an HF config.json (full models nest it under `vision_config`)."""
  if not config:
    return {}
  return config.get("vision_config") or config


def model_shapes(model_cls, kwargs: Mapping[str, Any]) -> Dict[tuple, tuple]:
  """Flax path -> shape of the params `model_cls(**kwargs)` creates, at its native input size."""
  from uae_jax.convert.dinov2 import model_param_shapes
  s = kwargs.get("input_size") or kwargs["pos_embed_grid"] * kwargs["patch_size"]
  return model_param_shapes(model_cls, kwargs, (1, s, s, 3))


@guard.loader("weights")
def read_any(path: str, model_class: str) -> Tuple[Optional[dict], Optional[dict], Any, Any]:
  """(params, kwargs, None, None) for a converted dir, else (None, None, state dict, config)."""
  if flax_io.is_converted_dir(path):
    params, arch = flax_io.load_params(path)
    if arch.get("model_class") != model_class:
      raise ConversionError(f"{path}: holds {arch.get('model_class')!r}, not {model_class}")
    module, _, name = model_class.rpartition(".")
    flax_io.check_shapes(path, params,
                         model_shapes(getattr(importlib.import_module(module), name),
                                      arch["kwargs"]))
    return params, dict(arch["kwargs"]), None, None
  sd, config = torch_io.read_state_dict(path)
  return None, None, sd, config


def fit_to_config(params: Mapping, kwargs: Mapping, cfg: Mapping, model_cls, path: str,
                  optional: Mapping[str, Tuple[str, ...]]) -> dict:
  """Converted params adapted to an encoder config: checked architecture, optional groups dropped
  when the config does not want them, block layout, and the tree_check shape check.

  optional: config flag -> top-level param names it controls (e.g. {'post_norm': ('post_norm',)}).
  """
  from uae_jax.errors import ConfigError
  from uae_jax.models import scan_utils
  from uae_jax.models import tree_check
  cfg = {k: v for k, v in dict(cfg).items() if k != "kind"}
  for key in ("size", "patch_size", "pos_embed_grid"):
    if key in cfg and key in kwargs and cfg[key] != kwargs[key]:
      raise ConfigError(f"{path} has {key}={kwargs[key]!r} but model.encoder.{key}={cfg[key]!r}")
  params = dict(params)
  for flag, names in optional.items():
    want = bool(cfg.get(flag, False))
    have = all(n in params for n in names)
    if want and not have:
      raise ConfigError(f"model.encoder.{flag}=True but {path} has no {'/'.join(names)} params")
    if not want:
      for n in names:
        params.pop(n, None)
  import jax
  import jax.numpy as jnp
  model = model_cls(**cfg)
  s = cfg.get("input_size") or model.pos_embed_grid * model.patch_size
  target = jax.eval_shape(model.init, jax.random.key(0), jax.ShapeDtypeStruct((1, s, s, 3),
                                                                              jnp.float32))
  params = scan_utils.to_layout(params, bool(cfg.get("scan_blocks", False)))
  tree_check.check_same_shapes(params, target["params"], f"encoder weights {path}")
  return params


# ----------------------------------------------------------------------------------------------
# CLIP.

def clip_table(*, depth: int, prefix: str = HUB_PREFIX, post_norm: bool = True,
               flax_prefix: FlaxPath = ()) -> Table:
  """The explicit CLIP vision-tower table (see the module docstring)."""
  fp, e = flax_prefix, prefix + "embeddings."
  rows = [Row(fp + ("patch_embed", "kernel"), e + "patch_embedding.weight", "conv"),
          Row(fp + ("cls_token",), e + "class_embedding", "identity"),
          Row(fp + ("pos_embed",), e + "position_embedding.weight", "identity")]
  rows += tables.layernorm_rows(fp + ("pre_norm",), prefix + "pre_layrnorm")
  for i in range(depth):
    rows += vit_block_rows(i, prefix, fp)
  if post_norm:
    rows += tables.layernorm_rows(fp + ("post_norm",), prefix + "post_layernorm")
  return Table("clip_vision", rows)


def infer_clip_arch(sd: Mapping[str, np.ndarray], prefix: str, config: Optional[Mapping],
                    input_size: Optional[int]) -> Dict[str, Any]:
  """`Clip` kwargs from tensor shapes (and a config.json when given)."""
  from uae_jax.models.clip import SIZES
  e = prefix + "embeddings."
  need = [e + "class_embedding", e + "position_embedding.weight", e + "patch_embedding.weight",
          prefix + "encoder.layers.0.mlp.fc1.weight"]
  missing = [k for k in need if k not in sd]
  if missing:
    raise ConversionError("CLIP vision state dict", [("missing PyTorch key", k) for k in missing])
  w = sd[e + "patch_embedding.weight"]
  dim = int(sd[e + "class_embedding"].shape[-1])
  if w.ndim != 4 or w.shape[:2] != (dim, 3) or w.shape[2] != w.shape[3]:
    raise ConversionError(f"{e}patch_embedding.weight has shape {tuple(w.shape)}; expected "
                          f"({dim}, 3, p, p)")
  vc = vision_config(config)
  depth = count_blocks(sd, prefix)
  mlp = int(sd[prefix + "encoder.layers.0.mlp.fc1.weight"].shape[0])
  size = match_size(SIZES, dim, depth, mlp, vc.get("num_attention_heads"), "Clip")
  if vc.get("hidden_act", "quick_gelu") != "quick_gelu":
    raise ConversionError(f"config.json hidden_act={vc['hidden_act']!r}; Clip uses quick_gelu")
  grid = square_grid(int(sd[e + "position_embedding.weight"].shape[0]) - 1,
                     e + "position_embedding.weight")
  patch = int(w.shape[-1])
  return {"size": size, "patch_size": patch,
          "input_size": grid * patch if input_size is None else input_size,
          "pos_embed_grid": grid, "pos_embed_convention": "torch_bicubic",
          "post_norm": prefix + "post_layernorm.weight" in sd,
          "ln_eps": float(vc.get("layer_norm_eps", 1e-5))}


def convert_clip(sd: Mapping[str, np.ndarray], *, input_size: Optional[int] = None,
                 config: Optional[Mapping] = None, drop_post_norm: bool = False,
                 context: str = "") -> Tuple[dict, Dict[str, Any], Dict[str, Any]]:
  """HF CLIP vision state dict -> (params, Clip kwargs, info). input_size None: the native size."""
  from uae_jax.models.clip import Clip
  prefix = find_prefix(sd, ANCHOR, "CLIP")
  if prefix + "embeddings.class_embedding" not in sd:
    raise ConversionError(f"{prefix}embeddings.* has no class_embedding: not a CLIP vision tower "
                          "(a SigLIP checkpoint? use `convert siglip2`)")
  sd, dropped = drop_extras(sd, prefix)
  arch = infer_clip_arch(sd, prefix, config, input_size)
  if drop_post_norm and arch["post_norm"]:
    for k in ("weight", "bias"):
      dropped.append(prefix + f"post_layernorm.{k}")
      sd.pop(prefix + f"post_layernorm.{k}", None)
    arch["post_norm"] = False
  table = clip_table(depth=count_blocks(sd, prefix), prefix=prefix, post_norm=arch["post_norm"])
  params = tables.to_flax(table, sd, expected=model_shapes(Clip, arch),
                          context=context or "converting a CLIP vision tower")
  return params, arch, {"prefix": prefix, "dropped_keys": dropped}


def export_clip(params: Mapping, *, prefix: str = HUB_PREFIX) -> Dict[str, np.ndarray]:
  """Our (unrolled) Clip params -> an HF CLIPVisionModel state dict (Hub names by default;
  prefix='' gives transformers-5 in-memory names for `load_state_dict`)."""
  from uae_jax.convert.dinov2 import _count_blocks
  table = clip_table(depth=_count_blocks(params), prefix=prefix, post_norm="post_norm" in params)
  return tables.to_torch(table, params, context="exporting Clip params to the HF layout")


@guard.loader("CLIP weights")
def load_clip(path: str, *, input_size: Optional[int] = None) -> Tuple[dict, Dict[str, Any]]:
  """(params, Clip kwargs) from a converted directory or an HF file / model directory."""
  params, kwargs, sd, config = read_any(path, MODEL_CLASS)
  if params is None:
    params, kwargs, _ = convert_clip(sd, input_size=input_size, config=config,
                                     context=f"converting {path}")
  elif input_size is not None:
    kwargs["input_size"] = input_size
  return params, kwargs


@guard.loader("CLIP weights")
def load_for_config(path: str, cfg: Mapping) -> dict:
  """Params for the encoder config `cfg` (kind 'clip'); see `fit_to_config`."""
  from uae_jax.models.clip import Clip
  params, kwargs = load_clip(path)
  return fit_to_config(params, kwargs, cfg, Clip, path, {"post_norm": ("post_norm",)})


@guard.loader("CLIP weights")
def convert_clip_file(src: str, out_dir: str, *, input_size: Optional[int] = None,
                      drop_post_norm: bool = False) -> Tuple[dict, Dict[str, Any]]:
  """Convert `src` and write `out_dir/{params.msgpack, arch.json}`."""
  sd, config = torch_io.read_state_dict(src)
  params, arch, info = convert_clip(sd, input_size=input_size, config=config,
                                    drop_post_norm=drop_post_norm, context=f"converting {src}")
  write_converted(out_dir, params, MODEL_CLASS, arch, src, info)
  return params, arch


def write_converted(out_dir: str, params, model_class: str, arch, src: str, info) -> None:
  """params.msgpack + arch.json with the source file (and its sha256) recorded."""
  source = {"file": os.path.abspath(src), **info}
  if os.path.isfile(src):
    source["sha256"] = torch_io.sha256(src)
  flax_io.save_params(out_dir, params, {"model_class": model_class, "kwargs": arch,
                                        "source": source})


# ----------------------------------------------------------------------------------------------
# Official UAE checkpoints with a CLIP or SigLIP2 encoder (DINOv2 ones: convert/uae.py).

def official_encoder_kind(sd: Mapping[str, Any]) -> str:
  """'dinov2' | 'clip' | 'siglip2' from the encoder key prefix of an official UAE state dict."""
  if any(k.startswith("encoder.encoder.") for k in sd):
    return "dinov2"
  if OFFICIAL_PREFIX + "embeddings.class_embedding" in sd:
    return "clip"
  if "encoder.model." + ANCHOR in sd:
    return "siglip2"
  raise ConversionError(f"official UAE state dict: no known encoder prefix (encoder.encoder. = "
                        f"DINOv2, {OFFICIAL_PREFIX} = CLIP, encoder.model. = SigLIP2); first keys: "
                        f"{sorted(sd)[:8]}")


def _prefixed_rows(table: Table, top: str) -> Table:
  return Table(table.name, [r._replace(flax=(top,) + r.flax) for r in table.rows],
               {(top,) + p: s for p, s in table.zero_defaults.items()})


def official_uae_from_state_dict(sd: Mapping[str, np.ndarray], enc_table: Table,
                                 enc_shapes: Mapping, enc_arch: Mapping, *, context: str
                                 ) -> Tuple[dict, Dict[str, Any]]:
  """Encoder table (Flax paths relative to the encoder) + the official decoder -> UAE params."""
  from uae_jax.convert import uae as uae_convert
  from uae_jax.convert.dinov2 import model_param_shapes
  from uae_jax.models.decoder import PixelDecoder
  dec_arch, channels, grid, depth = uae_convert._decoder_arch(sd, uae_convert.DECODER_PREFIX)
  dim = enc_shapes[("pos_embed",)][-1]
  if channels != dim:
    raise ConversionError(f"{context}: decoder_embed takes {channels} channels, the encoder "
                          f"gives {dim}")
  table = _prefixed_rows(enc_table, "encoder") + tables.official_decoder_table(
      depth=depth, prefix=uae_convert.DECODER_PREFIX, flax_prefix=("decoder",))
  expected = {("encoder",) + p: s for p, s in enc_shapes.items()}
  expected.update({("decoder",) + p: s for p, s in model_param_shapes(
      PixelDecoder, dec_arch, (1, grid, grid, channels)).items()})
  d_dim = expected[("decoder", "cls_token")][-1]
  params = tables.to_flax(table, sd, expected=expected,
                          constants={"decoder_sincos": uae_convert.decoder_sincos(d_dim, grid)},
                          context=context)
  arch = {"model_class": uae_convert.MODEL_CLASS, "recipe": "official", "encoder": dict(enc_arch),
          "decoder": dec_arch, "latent_grid": grid}
  return params, arch


def official_uae_to_state_dict(params: Mapping, enc_table: Table, *, decoder_grid: int
                               ) -> Dict[str, np.ndarray]:
  """UAE params {'encoder', 'decoder'} -> official state dict with the given encoder table."""
  from uae_jax.convert import uae as uae_convert
  from uae_jax.convert.dinov2 import _count_blocks
  if set(params) == {"params"}:
    params = params["params"]
  extra = sorted(set(params) - {"encoder", "decoder"})
  if extra or not {"encoder", "decoder"} <= set(params):
    raise ConversionError("exporting UAE params to the official layout: expected exactly "
                          f"'encoder' and 'decoder', got {sorted(params)} (the official model "
                          "has no modulator)")
  dec = params["decoder"]
  table = _prefixed_rows(enc_table, "encoder") + tables.official_decoder_table(
      depth=_count_blocks(dec), prefix=uae_convert.DECODER_PREFIX, flax_prefix=("decoder",))
  d_dim = int(np.shape(dec["cls_token"])[-1])
  return tables.to_torch(table, params, constants={
      "decoder_sincos": uae_convert.decoder_sincos(d_dim, decoder_grid)},
      context="exporting UAE params to the official layout")


def uae_clip_from_state_dict(sd: Mapping[str, np.ndarray], *, encoder_input_size: int = 224,
                             context: str = "") -> Tuple[dict, Dict[str, Any]]:
  """Official UAE-CLIP state dict (`encoder.model.vision_model.*`, `decoder.*`) -> UAE params."""
  from uae_jax.models.clip import Clip
  context = context or "converting an official UAE-CLIP state dict"
  enc_sd = {k: v for k, v in sd.items() if k.startswith(OFFICIAL_PREFIX)}
  if not enc_sd:
    raise ConversionError(f"{context}: no `{OFFICIAL_PREFIX}*` keys")
  arch = infer_clip_arch(enc_sd, OFFICIAL_PREFIX, None, encoder_input_size)
  if arch["post_norm"]:
    raise ConversionError(f"{context}: {OFFICIAL_PREFIX}post_layernorm.* present; the official "
                          "UAE-CLIP encoder has no post_layernorm affine")
  enc_table = clip_table(depth=count_blocks(enc_sd, OFFICIAL_PREFIX), prefix=OFFICIAL_PREFIX,
                         post_norm=False)
  params, uae_arch = official_uae_from_state_dict(sd, enc_table, model_shapes(Clip, arch),
                                                  {"kind": "clip", **arch}, context=context)
  return params, uae_arch


def uae_clip_to_state_dict(params: Mapping, *, decoder_grid: int = 16) -> Dict[str, np.ndarray]:
  """Our UAE-CLIP params (unrolled) -> the official state dict layout."""
  from uae_jax.convert.dinov2 import _count_blocks
  p = params.get("params", params)
  if "post_norm" in p.get("encoder", {}):
    raise ConversionError("exporting UAE-CLIP: the encoder holds post_norm params; the official "
                          "layout has no post_layernorm (build the encoder with post_norm=False)")
  enc_table = clip_table(depth=_count_blocks(p["encoder"]), prefix=OFFICIAL_PREFIX,
                         post_norm=False)
  return official_uae_to_state_dict(p, enc_table, decoder_grid=decoder_grid)


def read_official_with(from_state_dict: Callable, path: str, which: str,
                       encoder_input_size: int) -> Tuple[dict, Dict[str, Any]]:
  """(UAE params, arch) of an official UAE checkpoint whose encoder `from_state_dict` converts."""
  from uae_jax.convert import uae as uae_convert
  sd = uae_convert.read_official(path, which)
  params, arch = from_state_dict(sd, encoder_input_size=encoder_input_size,
                                 context=f"converting {path}")
  arch["source"] = {"file": os.path.abspath(path), "which": which}
  return params, arch


def write_official(sd: Dict[str, np.ndarray], path: Optional[str], encoder: str
                   ) -> Dict[str, np.ndarray]:
  """Writes an official-layout state dict as .safetensors (when `path`); returns it."""
  if path is not None:
    torch_io.write_safetensors(sd, path, {"format": "uae_official_state_dict",
                                          "encoder": encoder, "exported_by": "uae_jax.convert"})
  return sd


@guard.loader("UAE-CLIP checkpoint")
def import_official_uae_clip(path: str, which: str = "ema", *, encoder_input_size: int = 224
                             ) -> Tuple[dict, Dict[str, Any]]:
  """(UAE params, arch) from an official UAE-CLIP checkpoint (.pt training dict or flat file)."""
  return read_official_with(uae_clip_from_state_dict, path, which, encoder_input_size)


def export_official_uae_clip(params: Mapping, path: Optional[str], *, decoder_grid: int = 16
                             ) -> Dict[str, np.ndarray]:
  """Write our UAE-CLIP params as an official-layout .safetensors file (and return the dict)."""
  return write_official(uae_clip_to_state_dict(params, decoder_grid=decoder_grid), path, "clip")


def official_importer(kind: str) -> Callable:
  """`import_official_*` for an encoder kind detected by `official_encoder_kind`."""
  if kind == "clip":
    return import_official_uae_clip
  if kind == "siglip2":
    from uae_jax.convert import siglip
    return siglip.import_official_uae_siglip
  raise ConversionError(f"no official importer here for encoder kind {kind!r} (DINOv2 UAE "
                        "checkpoints: uae_jax.convert.uae.import_official_uae)")
