"""DINOv2 weights (HF, timm, FAIR torch hub) <-> `uae_jax.models.dinov2.DinoV2` params.

Layout detection (by key names, after stripping a common prefix found from the patch-embedding key):
  hf4   HF on-disk / transformers-4 names: `embeddings.patch_embeddings.projection.weight`,
        `encoder.layer.{i}.attention.attention.{query,key,value}`, `attention.output.dense`
        (what `save_pretrained` writes and the Hub serves);
  hf5   HF transformers-5 in-memory names (`model.state_dict()`): `attention.{q,k,v,o}_proj`;
  timm  `blocks.{i}.attn.qkv`, `ls1.gamma`, `reg_token`, no `mask_token`;
  fair  FAIR torch hub: `blocks.{i}.attn.qkv`, `register_tokens`, `mask_token`.
Architecture from shapes: width = cls_token's last dim, depth = number of blocks, MLP width from
`fc1` (SwiGLU when the first MLP matrix is twice the second's input), registers, the position
grid (square), patch size. Any such shape converts: a named `DinoV2` size when one matches,
otherwise size='custom' with the explicit dims. Heads are not in the weights: an explicit
`num_heads`, else `config.json` beside the weights, else the matching named size, else dim // 64
(see convert/arch.py). `info['inferred']` (saved in arch.json's `source`) records all of it.

Position-embedding interpolation convention written into the architecture, per source:
  HF Dinov2Model (no registers)          'torch_bicubic'          (size=, no antialias)
  HF Dinov2WithRegistersModel            'antialiased_bicubic'
  FAIR hub without registers             'torch_bicubic_offset'   (scale_factor=(n+0.1)/M)
  FAIR hub *_reg                         'antialiased_bicubic'
  timm (both variants)                   'antialiased_bicubic'
The table keeps the checkpoint's grid (`pos_embed_grid`); `DinoV2` resizes it in the forward pass.

timm reg4 stores `pos_embed` without the CLS row and folds that row into `cls_token`: importing
gives our CLS position row = 0 and cls_token = timm's (the same function). Exporting to timm reg4
folds our CLS row into `cls_token` the same way. Only when the CLS position row is zero are
HF -> timm -> ours params bit-identical to HF -> ours; otherwise they differ by that fold (same
outputs). timm has no `mask_token`; importing timm fills ours with zeros (it is unused).
"""
import dataclasses
import math
import os
from typing import Any, Dict, Mapping, Optional, Tuple

import numpy as np

from uae_jax.convert import arch as arch_lib
from uae_jax.convert import flax_io
from uae_jax.convert import guard
from uae_jax.convert import tables
from uae_jax.convert import torch_io
from uae_jax.convert.tables import ConversionError

MODEL_CLASS = "uae_jax.models.dinov2.DinoV2"
VARIANTS = ("auto", "hf", "timm", "fair")


def pos_embed_convention(source: str, registers: int) -> str:
  """The interpolation convention of the reference implementation for a source family."""
  family = "hf" if source in ("hf", "hf4", "hf5") else source
  if family == "hf":
    return "antialiased_bicubic" if registers else "torch_bicubic"
  if family == "fair":
    return "antialiased_bicubic" if registers else "torch_bicubic_offset"
  if family == "timm":
    return "antialiased_bicubic"
  raise ValueError(f"unknown source {source!r}")


@dataclasses.dataclass(frozen=True)
class DinoV2Source:
  """What a state dict holds: layout, key prefix and the architecture inferred from shapes."""
  layout: str
  prefix: str
  dim: int
  depth: int
  mlp_hidden: int
  swiglu: bool
  registers: int
  grid: int
  patch_size: int
  final_norm: bool
  pos_cls_row: bool

  def table(self, final_norm: Optional[bool] = None) -> tables.Table:
    """The key table of this source (optionally overriding whether it has a final norm)."""
    return tables.dinov2_table(
        self.layout, depth=self.depth, dim=self.dim, registers=self.registers, swiglu=self.swiglu,
        final_norm=self.final_norm if final_norm is None else final_norm,
        pos_cls_row=self.pos_cls_row, prefix=self.prefix)


_HF_ANCHOR = "embeddings.patch_embeddings.projection.weight"
_TIMM_ANCHOR = "patch_embed.proj.weight"


def detect_layout(sd: Mapping[str, np.ndarray], variant: str = "auto") -> Tuple[str, str]:
  """(layout in tables.DINOV2_LAYOUTS, key prefix) of a DINOv2 state dict."""
  if variant not in VARIANTS:
    raise ConversionError(f"variant {variant!r}: expected one of {VARIANTS}")
  hf = [k[:-len(_HF_ANCHOR)] for k in sd if k.endswith(_HF_ANCHOR)]
  tm = [k[:-len(_TIMM_ANCHOR)] for k in sd if k.endswith(_TIMM_ANCHOR)]
  if len(hf) + len(tm) != 1:
    raise ConversionError(
        "cannot detect the DINOv2 layout: expected exactly one patch-embedding weight "
        f"(`...{_HF_ANCHOR}` for HF or `...{_TIMM_ANCHOR}` for timm/FAIR), found "
        f"{sorted(hf + tm) or 'none'}; first keys: {sorted(sd)[:8]}")
  if hf:
    prefix = hf[0]
    if variant not in ("auto", "hf"):
      raise ConversionError(f"--variant {variant} requested, but the file has HF key names "
                            f"({prefix}{_HF_ANCHOR})")
    hf4 = any(k.startswith(prefix + "encoder.layer.") and ".attention.attention." in k for k in sd)
    hf5 = any(k.startswith(prefix + "encoder.layer.") and ".attention.q_proj." in k for k in sd)
    if hf4 == hf5:
      raise ConversionError("cannot tell HF on-disk (`attention.attention.query`) from "
                            "transformers-5 in-memory (`attention.q_proj`) names: "
                            + ("both present" if hf4 else "neither present"))
    return ("hf4" if hf4 else "hf5"), prefix
  prefix = tm[0]
  if variant == "hf":
    raise ConversionError(f"--variant hf requested, but the file has timm/FAIR key names "
                          f"({prefix}{_TIMM_ANCHOR})")
  if variant in ("timm", "fair"):
    return variant, prefix
  if prefix + "reg_token" in sd:
    return "timm", prefix
  if prefix + "register_tokens" in sd or prefix + "mask_token" in sd:
    return "fair", prefix
  return "timm", prefix


def _isqrt_exact(n: int) -> Optional[int]:
  """The integer square root of n if n is a perfect square, else None."""
  r = math.isqrt(n)
  return r if r * r == n else None


def infer_source(sd: Mapping[str, np.ndarray], layout: str, prefix: str) -> DinoV2Source:
  """Architecture from tensor shapes (see module docstring)."""
  hf = layout in ("hf4", "hf5")
  e = prefix + ("embeddings." if hf else "")
  k_patch = e + ("patch_embeddings.projection.weight" if hf else "patch_embed.proj.weight")
  k_cls = e + "cls_token"
  k_pos = e + ("position_embeddings" if hf else "pos_embed")
  k_reg = e + ("register_tokens" if layout in ("hf4", "hf5", "fair") else "reg_token")
  block = (lambda i: f"{prefix}encoder.layer.{i}.") if hf else (lambda i: f"{prefix}blocks.{i}.")
  missing = [k for k in (k_patch, k_cls, k_pos, block(0) + "norm1.weight") if k not in sd]
  if missing:
    raise ConversionError(f"DINOv2 {layout} state dict", [("missing PyTorch key", k) for k in missing])
  w = sd[k_patch]
  dim = int(sd[k_cls].shape[-1])
  if w.ndim != 4 or w.shape[1] != 3 or w.shape[2] != w.shape[3] or w.shape[0] != dim:
    raise ConversionError(f"{k_patch} has shape {tuple(w.shape)}; expected ({dim}, 3, p, p)")
  depth = 0
  while block(depth) + "norm1.weight" in sd:
    depth += 1
  b0 = block(0)
  if hf and layout == "hf4" and b0 + "mlp.weights_in.weight" in sd:
    swiglu, mlp = True, sd[b0 + "mlp.weights_in.weight"].shape[0] // 2
  elif hf and b0 + "mlp.gate_proj.weight" in sd:
    swiglu, mlp = True, sd[b0 + "mlp.gate_proj.weight"].shape[0]
  elif layout == "fair" and b0 + "mlp.w12.weight" in sd:
    swiglu, mlp = True, sd[b0 + "mlp.w12.weight"].shape[0] // 2
  elif b0 + "mlp.fc1.weight" in sd and b0 + "mlp.fc2.weight" in sd:
    fc1, fc2 = sd[b0 + "mlp.fc1.weight"], sd[b0 + "mlp.fc2.weight"]
    swiglu = layout == "timm" and fc1.shape[0] == 2 * fc2.shape[1]  # timm SwiGLUPacked (ViT-g)
    mlp = fc2.shape[1]
  else:
    raise ConversionError(f"DINOv2 {layout} state dict: cannot find the first block's MLP weights "
                          f"under {b0}mlp.*")
  registers = int(sd[k_reg].shape[1]) if k_reg in sd else 0
  n = int(sd[k_pos].shape[1])
  if _isqrt_exact(n - 1):
    grid, pos_cls_row = _isqrt_exact(n - 1), True
  elif layout == "timm" and _isqrt_exact(n):
    grid, pos_cls_row = _isqrt_exact(n), False  # timm reg4: no CLS row
  else:
    raise ConversionError(f"{k_pos} has {n} positions: not 1 + a square grid")
  final = (prefix + "layernorm.weight") if hf else (prefix + "norm.weight")
  return DinoV2Source(layout, prefix, dim, depth, int(mlp), bool(swiglu), registers, grid,
                      int(w.shape[-1]), final in sd, pos_cls_row)


def shape_dims(src: DinoV2Source) -> Dict[str, Any]:
  """The DinoV2 module fields the weights determine (everything but the heads)."""
  return {"dim": src.dim, "depth": src.depth, "mlp_hidden": src.mlp_hidden, "swiglu": src.swiglu}


def resolve_arch(src: DinoV2Source, *, size: Optional[str] = None, num_heads: Optional[int] = None,
                 config_heads: Optional[int] = None, context: str = ""
                 ) -> Tuple[Dict[str, Any], Dict[str, Any]]:
  """(DinoV2 size kwargs, inferred-architecture record) of a state dict; see convert/arch.py."""
  from uae_jax.models.dinov2 import SIZES
  return arch_lib.resolve(SIZES, shape_dims(src), "DINOv2", requested=size, num_heads=num_heads,
                          config_heads=config_heads, context=context)


def model_param_shapes(model_cls, kwargs: Mapping[str, Any], input_shape) -> Dict[tuple, tuple]:
  """Flax path -> shape of the params `model_cls(**kwargs).init` creates (abstractly)."""
  import flax.linen as nn
  import jax
  import jax.numpy as jnp
  model = model_cls(**kwargs)
  v = jax.eval_shape(model.init, jax.random.key(0), jax.ShapeDtypeStruct(input_shape, jnp.float32))
  return {p: tuple(x.shape) for p, x in tables.flatten(nn.unbox(v)["params"]).items()}


def dinov2_param_shapes(arch: Mapping[str, Any]) -> Dict[tuple, tuple]:
  """Flax path -> shape of the params `DinoV2(**arch)` creates."""
  from uae_jax.models.dinov2 import DinoV2
  s = arch.get("input_size") or arch["pos_embed_grid"] * arch.get("patch_size", 14)
  return model_param_shapes(DinoV2, arch, (1, s, s, 3))


def _hf_config(config: Optional[Mapping]) -> Optional[Mapping]:
  """The config.json of an HF DINOv2 model, or None for anything else."""
  if not config or config.get("model_type") not in ("dinov2", "dinov2_with_registers"):
    return None
  return config


def _check_hf_config(config: Optional[Mapping], src: DinoV2Source, heads: int) -> Dict[str, Any]:
  """Cross-check an HF config.json; returns extra DinoV2 kwargs it implies (ln_eps)."""
  if _hf_config(config) is None:
    return {}
  problems = []
  want = {"hidden_size": src.dim, "num_hidden_layers": src.depth,
          "num_attention_heads": heads, "patch_size": src.patch_size}
  if src.registers or config.get("model_type") == "dinov2_with_registers":
    want["num_register_tokens"] = src.registers
  for k, v in want.items():
    if k in config and config[k] != v:
      problems.append(("config.json disagrees", f"{k}={config[k]}, expected {v}"))
  if config.get("hidden_act", "gelu") != "gelu":
    problems.append(("config.json disagrees", f"hidden_act={config['hidden_act']!r}; DinoV2 uses "
                     "exact GELU"))
  if config.get("use_swiglu_ffn", src.swiglu) != src.swiglu:
    problems.append(("config.json disagrees", f"use_swiglu_ffn={config['use_swiglu_ffn']}"))
  if problems:
    raise ConversionError("HF config.json vs weights", problems)
  return {"ln_eps": float(config["layer_norm_eps"])} if "layer_norm_eps" in config else {}


def convert_dinov2(sd: Mapping[str, np.ndarray], *, variant: str = "auto",
                   input_size: Optional[int] = 224, size: Optional[str] = None,
                   drop_final_norm: bool = False, config: Optional[Mapping] = None,
                   num_heads: Optional[int] = None, context: str = ""
                   ) -> Tuple[dict, Dict[str, Any], Dict[str, Any]]:
  """PyTorch DINOv2 state dict -> (params, DinoV2 kwargs, info).

  The architecture comes from the shapes (and the heads as convert/arch.py says); a shape that
  is no named size gives size='custom' with explicit dims. size: expected `DinoV2` size; a file
  of another architecture is refused. num_heads: the number of attention heads, when neither
  config.json nor the width tells it. drop_final_norm: consume and discard the final
  LayerNorm's weight/bias (UAE uses a parameter-free final LayerNorm); otherwise they become our
  `norm` and `final_norm_affine=True`.
  """
  layout, prefix = detect_layout(sd, variant)
  src = infer_source(sd, layout, prefix)
  hf_config = _hf_config(config) if layout in ("hf4", "hf5") else None
  size_kw, inferred = resolve_arch(
      src, size=size, num_heads=num_heads,
      config_heads=hf_config.get("num_attention_heads") if hf_config else None, context=context)
  extra = _check_hf_config(hf_config, src, inferred["num_heads"])
  arch = {**size_kw, "patch_size": src.patch_size, "num_registers": src.registers,
          "input_size": input_size, "pos_embed_grid": src.grid,
          "pos_embed_convention": pos_embed_convention(layout, src.registers),
          "final_norm_affine": bool(src.final_norm and not drop_final_norm), "ln_eps": 1e-6}
  arch.update(extra)
  sd = dict(sd)
  dropped = []
  if src.final_norm and drop_final_norm:
    names = ("layernorm" if layout in ("hf4", "hf5") else "norm")
    for k in (f"{prefix}{names}.weight", f"{prefix}{names}.bias"):
      if k in sd:
        del sd[k]
        dropped.append(k)
  table = src.table(final_norm=arch["final_norm_affine"])
  expected = dinov2_param_shapes(arch)
  params = tables.to_flax(table, sd, expected=expected,
                          context=context or f"converting DINOv2 ({layout} layout)")
  info = {"layout": layout, "prefix": prefix, "dropped_keys": dropped, "inferred": inferred,
          "source_dtypes": sorted({str(v.dtype) for v in sd.values()})}
  return params, arch, info


def _count_blocks(params: Mapping) -> int:
  """Number of `blocks_{i}` entries of an unrolled params dict."""
  n = 0
  while f"blocks_{n}" in params:
    n += 1
  return n


def export_dinov2(params: Mapping, *, layout: str = "hf4", prefix: str = "",
                  pos_cls_row: Optional[bool] = None) -> Dict[str, np.ndarray]:
  """Our DinoV2 params -> a PyTorch state dict in `layout` ('hf4' = HF on-disk names, the default;
  'hf5' = transformers-5 in-memory names; 'timm'; 'fair'). For timm with registers the CLS
  position row is folded into `cls_token` (timm's reg4 convention) unless pos_cls_row=True."""
  if layout not in tables.DINOV2_LAYOUTS:
    raise ConversionError(f"layout {layout!r}: expected one of {tables.DINOV2_LAYOUTS}")
  params = {k: v for k, v in params.items()}
  dim = int(np.shape(params["cls_token"])[-1])
  registers = int(np.shape(params["register_tokens"])[1]) if "register_tokens" in params else 0
  depth = _count_blocks(params)
  swiglu = depth > 0 and "w12" in params["blocks_0"]["mlp"]
  if pos_cls_row is None:
    pos_cls_row = not (layout == "timm" and registers)
  if not pos_cls_row:
    pos = np.asarray(params["pos_embed"])
    params["cls_token"] = np.asarray(params["cls_token"]) + pos[:, :1]
    params["pos_embed"] = np.concatenate([np.zeros_like(pos[:, :1]), pos[:, 1:]], axis=1)
  table = tables.dinov2_table(layout, depth=depth, dim=dim, registers=registers, swiglu=swiglu,
                              final_norm="norm" in params, pos_cls_row=pos_cls_row, prefix=prefix)
  return tables.to_torch(table, params, context=f"exporting DINOv2 to the {layout} layout")


@guard.loader("DINOv2 weights")
def load_dinov2(path_or_dir: str, *, variant: str = "auto", input_size: Optional[int] = None,
                size: Optional[str] = None, drop_final_norm: bool = False,
                num_heads: Optional[int] = None) -> Tuple[dict, Dict[str, Any]]:
  """(params, DinoV2 kwargs) from a converted directory (params.msgpack + arch.json), a PyTorch /
  safetensors file, or an HF model directory. `DinoV2(**kwargs).apply({'params': params}, x)`.

  input_size: the encoder's input resolution (not a property of the weights); default 224 for
  PyTorch files, the stored value for converted directories.
  """
  if flax_io.is_converted_dir(path_or_dir):
    params, arch = flax_io.load_params(path_or_dir)
    if arch.get("model_class") != MODEL_CLASS:
      raise ConversionError(f"{path_or_dir}: holds {arch.get('model_class')!r}, not {MODEL_CLASS}")
    kwargs = dict(arch["kwargs"])
    flax_io.check_shapes(path_or_dir, params, dinov2_param_shapes(kwargs))
    if size not in (None, arch_lib.CUSTOM) and kwargs["size"] != size:
      raise ConversionError(f"architecture mismatch: {path_or_dir} holds DINOv2 size "
                            f"{kwargs['size']!r}, but size {size!r} was requested")
    if drop_final_norm and "norm" in params:
      params = {k: v for k, v in params.items() if k != "norm"}
      kwargs["final_norm_affine"] = False
    if input_size is not None:
      kwargs["input_size"] = input_size
    return params, kwargs
  sd, config = torch_io.read_state_dict(path_or_dir)
  params, arch, _ = convert_dinov2(
      sd, variant=variant, input_size=224 if input_size is None else input_size, size=size,
      drop_final_norm=drop_final_norm, config=config, num_heads=num_heads,
      context=f"converting {path_or_dir}")
  return params, arch


@guard.loader("DINOv2 weights")
def convert_dinov2_file(src: str, out_dir: str, *, variant: str = "auto", input_size: int = 224,
                        size: Optional[str] = None, drop_final_norm: bool = False,
                        num_heads: Optional[int] = None) -> Tuple[dict, Dict[str, Any]]:
  """Convert `src` and write `out_dir/{params.msgpack, arch.json}`; returns (params, kwargs)."""
  sd, config = torch_io.read_state_dict(src)
  params, arch, info = convert_dinov2(sd, variant=variant, input_size=input_size, size=size,
                                      drop_final_norm=drop_final_norm, config=config,
                                      num_heads=num_heads, context=f"converting {src}")
  source = {"file": os.path.abspath(src), **info}
  if os.path.isfile(src):
    source["sha256"] = torch_io.sha256(src)
  flax_io.save_params(out_dir, params, {"model_class": MODEL_CLASS, "kwargs": arch,
                                        "source": source})
  return params, arch
