"""MAE ViT encoder weights (HF transformers `ViTMAEModel` / `ViTMAEForPreTraining`) <->
`uae_jax.models.mae.Mae` params.

Accepted sources (prefix found from the `embeddings.patch_embeddings.projection.weight` key):
  HF `ViTMAEModel` on disk / Hub         `embeddings.*`, `encoder.layer.{i}.*`, `layernorm.*`
  HF `ViTMAEForPreTraining` (facebook/vit-mae-*)
                                         the same under `vit.`; the pixel decoder (`decoder.*`)
                                         is dropped by name (listed in the result's `dropped_keys`)
  transformers-5 in-memory names         `layers.{i}.attention.{q,k,v,o}_proj`, `layers.{i}.mlp.*`
Any other key, a missing key or a shape mismatch is a `ConversionError` listing all of them.

Key table (ours <- HF, `i` = block; 'hf4' = on-disk / transformers-4 names, 'hf5' = in-memory):
  patch_embed/{kernel,bias}   embeddings.patch_embeddings.projection.{weight,bias} (Conv2d OIHW)
  cls_token                   embeddings.cls_token (1, 1, D)
  (constant, no param)        embeddings.position_embeddings (1, 1 + g*g, D): checked against our
                              fixed sin-cos table on import (max abs diff <= 1e-5), written from
                              it on export
  blocks_i/norm1, norm2       hf4 encoder.layer.i.layernorm_before, layernorm_after
                              hf5 layers.i.layernorm_before, layernorm_after
  blocks_i/attn/query|key|value|proj
                              hf4 encoder.layer.i.attention.attention.query|key|value,
                                  encoder.layer.i.attention.output.dense
                              hf5 layers.i.attention.q_proj|k_proj|v_proj|o_proj  (Linear W.T)
  blocks_i/mlp/fc1, fc2       hf4 encoder.layer.i.intermediate.dense, encoder.layer.i.output.dense
                              hf5 layers.i.mlp.fc1, layers.i.mlp.fc2
  norm/{scale,bias}           layernorm.{weight,bias}  (only with final_norm_affine=True; MAEwNorm
                              removes them and uses a parameter-free LayerNorm)
Heads are not in the weights: they come from the matching `Mae` size and are checked against a
`config.json` beside the weights when there is one.
"""
from typing import Any, Dict, List, Mapping, Optional, Tuple

import numpy as np

from uae_jax.convert import clip as clip_convert
from uae_jax.convert import guard
from uae_jax.convert import tables
from uae_jax.convert import torch_io
from uae_jax.convert.tables import ConversionError, FlaxPath, Row, Table

MODEL_CLASS = "uae_jax.models.mae.Mae"
ANCHOR = "embeddings.patch_embeddings.projection.weight"
PRETRAINING_PREFIX = "vit."
STYLES = ("hf4", "hf5")
POS_KEY = "embeddings.position_embeddings"
POS_CONSTANT = "mae_sincos"


def block_rows(i: int, prefix: str, style: str, fp: FlaxPath = ()) -> List[Row]:
  """One HF ViTMAE block <-> our `blocks_{i}` in the 'hf4' or 'hf5' naming."""
  f = fp + (f"blocks_{i}",)
  if style == "hf4":
    t = f"{prefix}encoder.layer.{i}."
    attn = (("query", "attention.attention.query"), ("key", "attention.attention.key"),
            ("value", "attention.attention.value"), ("proj", "attention.output.dense"))
    mlp = (("fc1", "intermediate.dense"), ("fc2", "output.dense"))
  elif style == "hf5":
    t = f"{prefix}layers.{i}."
    attn = (("query", "attention.q_proj"), ("key", "attention.k_proj"),
            ("value", "attention.v_proj"), ("proj", "attention.o_proj"))
    mlp = (("fc1", "mlp.fc1"), ("fc2", "mlp.fc2"))
  else:
    raise ConversionError(f"ViTMAE key style {style!r}: expected one of {STYLES}")
  rows = tables.layernorm_rows(f + ("norm1",), t + "layernorm_before")
  for ours, theirs in attn:
    rows += tables.linear_rows(f + ("attn", ours), t + theirs)
  rows += tables.layernorm_rows(f + ("norm2",), t + "layernorm_after")
  for ours, theirs in mlp:
    rows += tables.linear_rows(f + ("mlp", ours), t + theirs)
  return rows


def mae_table(*, depth: int, prefix: str = "", style: str = "hf4", final_norm: bool = True,
              flax_prefix: FlaxPath = ()) -> Table:
  """The explicit ViTMAE encoder table (see the module docstring)."""
  fp, e = flax_prefix, prefix + "embeddings."
  rows = tables.conv_rows(fp + ("patch_embed",), e + "patch_embeddings.projection")
  rows += [Row(fp + ("cls_token",), e + "cls_token", "identity"),
           Row(None, prefix + POS_KEY, "fixed:" + POS_CONSTANT)]
  for i in range(depth):
    rows += block_rows(i, prefix, style, fp)
  if final_norm:
    rows += tables.layernorm_rows(fp + ("norm",), prefix + "layernorm")
  return Table(f"vit_mae_{style}", rows)


def pos_constants(dim: int, grid: int) -> Dict[str, np.ndarray]:
  """The fixed position table as the (1, 1 + g*g, D) tensor HF stores."""
  from uae_jax.models.mae import pos_table
  return {POS_CONSTANT: pos_table(dim, grid)[None]}


def detect_style(sd: Mapping[str, Any], prefix: str) -> str:
  """'hf4' (encoder.layer.i.attention.attention.*) or 'hf5' (layers.i.attention.q_proj)."""
  hf4 = f"{prefix}encoder.layer.0.layernorm_before.weight" in sd
  hf5 = f"{prefix}layers.0.layernorm_before.weight" in sd
  if hf4 == hf5:
    raise ConversionError(f"ViTMAE state dict under {prefix!r}: expected block 0 as either "
                          f"`encoder.layer.0.*` (on disk) or `layers.0.*` (in memory), found "
                          f"{'both' if hf4 else 'neither'}")
  return "hf4" if hf4 else "hf5"


def count_blocks(sd: Mapping[str, Any], prefix: str, style: str) -> int:
  """Number of blocks under `prefix` in the given naming."""
  stem = f"{prefix}encoder.layer." if style == "hf4" else f"{prefix}layers."
  n = 0
  while f"{stem}{n}.layernorm_before.weight" in sd:
    n += 1
  return n


def drop_decoder(sd: Mapping[str, np.ndarray], prefix: str) -> Tuple[Dict[str, np.ndarray], List[str]]:
  """A ViTMAEForPreTraining state dict without its pixel decoder (`decoder.*` beside `vit.`)."""
  if not prefix.endswith(PRETRAINING_PREFIX):
    return dict(sd), []
  outer = prefix[:-len(PRETRAINING_PREFIX)] + "decoder."
  dropped = [k for k in sd if k.startswith(outer)]
  return {k: v for k, v in sd.items() if not k.startswith(outer)}, dropped


def infer_mae_arch(sd: Mapping[str, np.ndarray], prefix: str, style: str,
                   config: Optional[Mapping], input_size: Optional[int]) -> Dict[str, Any]:
  """`Mae` kwargs from tensor shapes (and a config.json when given)."""
  from uae_jax.models.mae import LN_EPS, SIZES
  e = prefix + "embeddings."
  fc1 = (f"{prefix}encoder.layer.0.intermediate.dense.weight" if style == "hf4"
         else f"{prefix}layers.0.mlp.fc1.weight")
  missing = [k for k in (e + "cls_token", prefix + POS_KEY, prefix + ANCHOR, fc1) if k not in sd]
  if missing:
    raise ConversionError("ViTMAE state dict", [("missing PyTorch key", k) for k in missing])
  w, pos = sd[prefix + ANCHOR], sd[prefix + POS_KEY]
  dim = int(sd[e + "cls_token"].shape[-1])
  if w.ndim != 4 or w.shape[:2] != (dim, 3) or w.shape[2] != w.shape[3]:
    raise ConversionError(f"{prefix}{ANCHOR} has shape {tuple(w.shape)}; expected ({dim}, 3, p, p)")
  if pos.ndim != 3 or pos.shape[0] != 1 or pos.shape[2] != dim:
    raise ConversionError(f"{prefix}{POS_KEY} has shape {tuple(pos.shape)}; expected "
                          f"(1, 1 + g*g, {dim})")
  vc = config or {}
  if vc.get("hidden_act", "gelu") != "gelu":
    raise ConversionError(f"config.json hidden_act={vc['hidden_act']!r}; Mae uses exact GELU")
  if vc.get("qkv_bias", True) is False:
    raise ConversionError("config.json qkv_bias=false; Mae's attention has q/k/v biases")
  size = clip_convert.match_size(SIZES, dim, count_blocks(sd, prefix, style),
                                 int(sd[fc1].shape[0]), vc.get("num_attention_heads"), "Mae")
  grid = clip_convert.square_grid(int(pos.shape[1]) - 1, prefix + POS_KEY)
  patch = int(w.shape[-1])
  return {"size": size, "patch_size": patch,
          "input_size": grid * patch if input_size is None else input_size,
          "pos_embed_grid": grid, "final_norm_affine": prefix + "layernorm.weight" in sd,
          "ln_eps": float(vc.get("layer_norm_eps", LN_EPS))}


def convert_mae(sd: Mapping[str, np.ndarray], *, input_size: Optional[int] = None,
                config: Optional[Mapping] = None, drop_final_norm: bool = False,
                context: str = "") -> Tuple[dict, Dict[str, Any], Dict[str, Any]]:
  """HF ViTMAE state dict -> (params, Mae kwargs, info). input_size None: the native size."""
  from uae_jax.models.mae import Mae
  prefix = clip_convert.find_prefix(sd, ANCHOR, "ViTMAE")
  sd, dropped = drop_decoder(sd, prefix)
  style = detect_style(sd, prefix)
  arch = infer_mae_arch(sd, prefix, style, config, input_size)
  if drop_final_norm and arch["final_norm_affine"]:
    for k in ("weight", "bias"):
      dropped.append(prefix + f"layernorm.{k}")
      sd.pop(prefix + f"layernorm.{k}", None)
    arch["final_norm_affine"] = False
  table = mae_table(depth=count_blocks(sd, prefix, style), prefix=prefix, style=style,
                    final_norm=arch["final_norm_affine"])
  dim = int(sd[prefix + "embeddings.cls_token"].shape[-1])
  params = tables.to_flax(table, sd, expected=clip_convert.model_shapes(Mae, arch),
                          constants=pos_constants(dim, arch["pos_embed_grid"]),
                          context=context or f"converting a ViTMAE encoder ({style} names)")
  return params, arch, {"prefix": prefix, "style": style, "dropped_keys": dropped}


def export_mae(params: Mapping, *, pos_embed_grid: int, prefix: str = "", style: str = "hf4"
               ) -> Dict[str, np.ndarray]:
  """Our (unrolled) Mae params -> an HF ViTMAEModel state dict ('hf4' on-disk names by default;
  prefix='vit.' gives ViTMAEForPreTraining's encoder keys, style='hf5' the in-memory names for
  `load_state_dict`). The fixed position table is written for `pos_embed_grid`."""
  from uae_jax.convert.dinov2 import _count_blocks
  if style not in STYLES:
    raise ConversionError(f"style {style!r}: expected one of {STYLES}")
  table = mae_table(depth=_count_blocks(params), prefix=prefix, style=style,
                    final_norm="norm" in params)
  dim = int(np.shape(params["cls_token"])[-1])
  return tables.to_torch(table, params, constants=pos_constants(dim, pos_embed_grid),
                         context=f"exporting Mae params to the HF {style} layout")


@guard.loader("MAE weights")
def load_mae(path: str, *, input_size: Optional[int] = None) -> Tuple[dict, Dict[str, Any]]:
  """(params, Mae kwargs) from a converted directory or an HF file / model directory."""
  params, kwargs, sd, config = clip_convert.read_any(path, MODEL_CLASS)
  if params is None:
    params, kwargs, _ = convert_mae(sd, input_size=input_size, config=config,
                                    context=f"converting {path}")
  elif input_size is not None:
    kwargs["input_size"] = input_size
  return params, kwargs


@guard.loader("MAE weights")
def load_for_config(path: str, cfg: Mapping) -> dict:
  """Params for the encoder config `cfg` (kind 'mae'); see `convert.clip.fit_to_config`."""
  from uae_jax.models.mae import Mae
  params, kwargs = load_mae(path)
  return clip_convert.fit_to_config(params, kwargs, cfg, Mae, path,
                                    {"final_norm_affine": ("norm",)})


@guard.loader("MAE weights")
def convert_mae_file(src: str, out_dir: str, *, input_size: Optional[int] = None,
                     drop_final_norm: bool = False) -> Tuple[dict, Dict[str, Any]]:
  """Convert `src` and write `out_dir/{params.msgpack, arch.json}`."""
  sd, config = torch_io.read_state_dict(src)
  params, arch, info = convert_mae(sd, input_size=input_size, config=config,
                                   drop_final_norm=drop_final_norm, context=f"converting {src}")
  clip_convert.write_converted(out_dir, params, MODEL_CLASS, arch, src, info)
  return params, arch
