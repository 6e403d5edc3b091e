"""Official UAE checkpoints (PyTorch) <-> our {'encoder', 'decoder'[, 'modulator']} params.

Import. The official training checkpoint is a `torch.save` dict `{step, epoch, model, ema,
optimizer, scheduler, disc, ...}`; it is read with `torch.load(weights_only=True)` only, and the
`ema` state dict is used by default (`which='model'` for the raw weights), as the official
`instantiate_from_config` does. A flat state dict (.pt or .safetensors, e.g. our own export) is
used as is. Keys:
  encoder.encoder.*  HF `Dinov2WithRegistersModel` (the official code's DINOv2 encoder), with either
                     transformers-4 names (`attention.attention.{query,key,value}`,
                     `attention.output.dense`) or transformers-5 in-memory names
                     (`attention.{q,k,v,o}_proj`); no final `layernorm` (UAE's final LayerNorm has
                     no affine parameters) -> our `DinoV2` with final_norm_affine=False and the
                     HF-with-registers interpolation convention ('antialiased_bicubic').
  decoder.*          `decoder_embed`, `decoder_pos_embed` (1, 1+g*g, D) - a fixed sin-cos table,
                     checked against ours (`decoder.sincos_2d`) to 1e-5 and not stored -,
                     `trainable_cls_token`, `decoder_layers.{i}.{layernorm_before,
                     attention.attention.{query,key,value}, attention.output.dense, layernorm_after,
                     intermediate.dense, output.dense}`, `decoder_norm`, `decoder_pred`
                     -> our `PixelDecoder`.
  uae_jax_modulator.{conv_in,conv_out}.{weight,bias}
                     our paper-recipe `SpectralModulator` (Conv2d OIHW); not in official files.
Any other key (or a missing one, or a shape mismatch) is a `ConversionError` listing all of them.

Export writes the same layout as a .safetensors file. Encoder names default to transformers-4
('hf4'): that is what the official code's `UAE.load_state_dict` expects (its checkpoints were
written with transformers 4, whose in-memory names equal the on-disk names), and what
`Dinov2WithRegistersModel.from_pretrained` maps on any transformers version. transformers 5.23
keeps `attention.{q,k,v,o}_proj` in memory, so a plain `load_state_dict` into a 5.x model needs
key_style='hf5'. `decoder.decoder_pos_embed` is written from our sin-cos table (grid 16 = 256 px by
default). The modulator, if present, goes under `uae_jax_modulator.` (the official model has
no such module: load the rest with strict=False or drop these keys).
"""
import os
from typing import Any, Dict, Mapping, Optional, Tuple

import numpy as np

from uae_jax.convert import arch as arch_lib
from uae_jax.convert import dinov2 as dinov2_convert
from uae_jax.convert import flax_io
from uae_jax.convert import guard
from uae_jax.convert import tables
from uae_jax.convert import torch_io
from uae_jax.convert.tables import ConversionError

MODEL_CLASS = "uae_jax.models.uae"
ENCODER_PREFIX = "encoder.encoder."
DECODER_PREFIX = "decoder."
MODULATOR_PREFIX = tables.MODULATOR_PREFIX
TRAINING_KEYS = ("model", "ema")


def select_state_dict(obj: Any, which: str, path: str) -> Dict[str, Any]:
  """The `which` ('ema' | 'model') state dict of a training checkpoint, or a flat state dict."""
  if which not in TRAINING_KEYS:
    raise ConversionError(f"which={which!r}: expected one of {TRAINING_KEYS}")
  if not isinstance(obj, Mapping):
    raise ConversionError(f"{path}: expected a dict, got {type(obj).__name__}")
  if any(k in obj for k in TRAINING_KEYS):
    if which not in obj:
      raise ConversionError(f"{path}: the checkpoint has no {which!r} entry (top-level keys: "
                            f"{sorted(map(str, obj))}); choose --which "
                            f"{' or '.join(k for k in TRAINING_KEYS if k in obj)}")
    obj = obj[which]
    if not isinstance(obj, Mapping):
      raise ConversionError(f"{path}[{which!r}]: expected a state dict, got {type(obj).__name__}")
  return dict(obj)


@guard.loader("UAE checkpoint")
def read_official(path: str, which: str = "ema", return_entry: bool = False):
  """The flat numpy state dict of an official checkpoint (a training dict's `which` entry, or a
  flat .pt / .safetensors state dict); with `return_entry`, also the entry used (or None)."""
  if not os.path.exists(path):
    raise ConversionError(f"{path}: no such file")
  if path.lower().endswith((".safetensors", ".npz")):
    obj = torch_io.read_checkpoint(path)
  else:
    obj = torch_io.load_torch(path)
  sd = torch_io.to_numpy(select_state_dict(obj, which, path))
  bad = sorted(k for k, v in sd.items() if not isinstance(v, np.ndarray))
  if bad:
    raise ConversionError(f"{path}: non-tensor entries in the state dict: {bad[:20]}")
  entry = which if isinstance(obj, Mapping) and which in obj else None
  return (sd, entry) if return_entry else sd


def _count(sd: Mapping[str, Any], fmt: str) -> int:
  """How many consecutive `fmt.format(i)` keys from 0 are in `sd`."""
  n = 0
  while fmt.format(n) in sd:
    n += 1
  return n


def _shape(sd, key, problems) -> Optional[Tuple[int, ...]]:
  """The shape of `sd[key]`, or None after recording it missing."""
  if key not in sd:
    problems.append(("missing PyTorch key", key))
    return None
  return tuple(np.shape(sd[key]))


def _decoder_arch(sd: Mapping[str, Any], prefix: str, num_heads: Optional[int] = None
                  ) -> Tuple[Dict[str, Any], int, int, int]:
  """(PixelDecoder kwargs, latent channels C, latent grid g, depth) from decoder shapes."""
  from uae_jax.models import decoder as decoder_lib
  problems = []
  emb = _shape(sd, prefix + "decoder_embed.weight", problems)
  pos = _shape(sd, prefix + "decoder_pos_embed", problems)
  pred = _shape(sd, prefix + "decoder_pred.weight", problems)
  depth = _count(sd, prefix + "decoder_layers.{}.layernorm_before.weight")
  mlp = _shape(sd, prefix + "decoder_layers.0.intermediate.dense.weight", problems)
  if problems:
    raise ConversionError("official UAE decoder", problems)
  dim, channels = emb
  grid = int(round((pos[1] - 1) ** 0.5))
  if len(pos) != 3 or grid * grid != pos[1] - 1:
    raise ConversionError(f"{prefix}decoder_pos_embed has shape {pos}: expected (1, 1 + g*g, D)")
  patch = int(round((pred[0] / 3) ** 0.5))
  if 3 * patch * patch != pred[0]:
    raise ConversionError(f"{prefix}decoder_pred.weight has {pred[0]} outputs: not 3 * p * p")
  size_kw, _ = arch_lib.resolve(decoder_lib.SIZES, {"dim": dim, "depth": depth,
                                                    "mlp_hidden": mlp[0]}, "PixelDecoder",
                                num_heads=num_heads, context="official UAE decoder")
  return {**size_kw, "patch_size": patch}, channels, grid, depth


def decoder_sincos(dim: int, grid: int) -> np.ndarray:
  """Our fixed decoder position table in the official (1, 1 + g*g, D) shape."""
  from uae_jax.models.decoder import sincos_2d
  return sincos_2d(dim, grid, grid)[None]


def _prefixed(shapes: Mapping[tuple, tuple], prefix: str) -> Dict[tuple, tuple]:
  """The same shapes with `prefix` prepended to every path."""
  return {(prefix,) + p: s for p, s in shapes.items()}


def uae_from_state_dict(sd: Mapping[str, np.ndarray], *, encoder_input_size: int = 224,
                        encoder_num_heads: Optional[int] = None,
                        decoder_num_heads: Optional[int] = None,
                        context: str = "") -> Tuple[dict, Dict[str, Any]]:
  """Official-layout UAE state dict -> (params {'encoder','decoder'[,'modulator']}, arch).

  Encoder and decoder sizes are inferred from the shapes (convert/arch.py; the *_num_heads
  arguments give the heads of non-standard widths).
  """
  from uae_jax.models.decoder import PixelDecoder
  context = context or "converting an official UAE state dict"
  enc_sd = {k: v for k, v in sd.items() if k.startswith(ENCODER_PREFIX)}
  if not enc_sd:
    raise ConversionError(f"{context}: no `{ENCODER_PREFIX}*` keys (first keys: {sorted(sd)[:8]})")
  layout, prefix = dinov2_convert.detect_layout(enc_sd, "hf")
  if prefix != ENCODER_PREFIX:
    raise ConversionError(f"{context}: encoder keys under {prefix!r}, expected {ENCODER_PREFIX!r}")
  src = dinov2_convert.infer_source(enc_sd, layout, prefix)
  enc_size, _ = dinov2_convert.resolve_arch(src, num_heads=encoder_num_heads,
                                            context=f"{context} (encoder)")
  enc_arch = {**enc_size, "patch_size": src.patch_size, "num_registers": src.registers,
              "input_size": encoder_input_size, "pos_embed_grid": src.grid,
              "pos_embed_convention": dinov2_convert.pos_embed_convention(layout, src.registers),
              "final_norm_affine": False, "ln_eps": 1e-6}
  dec_arch, channels, grid, depth = _decoder_arch(sd, DECODER_PREFIX, decoder_num_heads)
  if channels != src.dim:
    raise ConversionError(f"{context}: decoder_embed takes {channels} channels, the encoder gives "
                          f"{src.dim}")
  table = src.table(final_norm=False)
  table = tables.Table(table.name, [r._replace(flax=("encoder",) + r.flax) for r in table.rows])
  table = table + tables.official_decoder_table(depth=depth, prefix=DECODER_PREFIX,
                                                flax_prefix=("decoder",))
  expected = _prefixed(dinov2_convert.dinov2_param_shapes(enc_arch), "encoder")
  expected.update(_prefixed(dinov2_convert.model_param_shapes(
      PixelDecoder, dec_arch, (1, grid, grid, channels)), "decoder"))
  arch = {"model_class": MODEL_CLASS, "recipe": "official", "encoder": enc_arch,
          "decoder": dec_arch, "latent_grid": grid, "encoder_layout": layout}
  mod_w = MODULATOR_PREFIX + "conv_in.weight"
  if mod_w in sd:
    from uae_jax.models.modulator import SpectralModulator
    kc = int(np.shape(sd[mod_w])[1])
    if kc % channels:
      raise ConversionError(f"{context}: {mod_w} takes {kc} channels, not a multiple of C={channels}")
    mod_arch = {"features": channels, "num_bands": kc // channels}
    table = table + tables.modulator_table(flax_prefix=("modulator",))
    expected.update(_prefixed(dinov2_convert.model_param_shapes(
        SpectralModulator, mod_arch, (mod_arch["num_bands"], 1, grid, grid, channels)),
        "modulator"))
    arch.update(recipe="paper", modulator=mod_arch)
  d_dim = expected[("decoder", "cls_token")][-1]
  params = tables.to_flax(table, sd, expected=expected,
                          constants={"decoder_sincos": decoder_sincos(d_dim, grid)},
                          context=context)
  return params, arch


@guard.loader("UAE checkpoint")
def import_official_uae(path: str, which: str = "ema", *, encoder_input_size: int = 224,
                        encoder_num_heads: Optional[int] = None,
                        decoder_num_heads: Optional[int] = None) -> Tuple[dict, Dict[str, Any]]:
  """(params {'encoder','decoder'[,'modulator']}, arch) from an official UAE checkpoint.

  `path`: a training checkpoint (.pt, `torch.load(weights_only=True)`), a flat .pt state dict,
  or a .safetensors file (e.g. written by `export_official_uae`). Params are unrolled
  (`blocks_{i}`); `load_official` gives them in a config's layout, shape-checked.
  """
  sd, entry = read_official(path, which, return_entry=True)
  params, arch = uae_from_state_dict(
      sd, encoder_input_size=encoder_input_size, encoder_num_heads=encoder_num_heads,
      decoder_num_heads=decoder_num_heads,
      context=f"converting {path}" + (f" [{entry}]" if entry else ""))
  arch["source"] = {"file": os.path.abspath(path), "which": entry}
  return params, arch


def uae_to_state_dict(params: Mapping, *, key_style: str = "hf4",
                      decoder_grid: int = 16) -> Dict[str, np.ndarray]:
  """Our UAE params -> official-layout state dict (numpy). See the module docstring."""
  if set(params) == {"params"}:
    params = params["params"]
  problems = [("unmapped model parameter", f"{k} (top-level collection)") for k in params
              if k not in ("encoder", "decoder", "modulator")]
  problems += [("missing model parameter", k) for k in ("encoder", "decoder") if k not in params]
  if problems:
    raise ConversionError("exporting UAE params to the official layout", problems)
  if key_style not in ("hf4", "hf5"):
    raise ConversionError(f"key_style={key_style!r}: expected 'hf4' or 'hf5'")
  enc, dec = params["encoder"], params["decoder"]
  if "norm" in enc:
    raise ConversionError("exporting UAE params: the encoder has an affine final norm "
                          "(encoder/norm); the official layout has no encoder.encoder.layernorm")
  dim = int(np.shape(enc["cls_token"])[-1])
  registers = int(np.shape(enc["register_tokens"])[1]) if "register_tokens" in enc else 0
  depth = dinov2_convert._count_blocks(enc)
  swiglu = depth > 0 and "w12" in enc["blocks_0"]["mlp"]
  table = tables.dinov2_table(key_style, depth=depth, dim=dim, registers=registers, swiglu=swiglu,
                              final_norm=False, prefix=ENCODER_PREFIX, flax_prefix=("encoder",))
  table = table + tables.official_decoder_table(depth=dinov2_convert._count_blocks(dec),
                                                prefix=DECODER_PREFIX, flax_prefix=("decoder",))
  if "modulator" in params:
    table = table + tables.modulator_table(flax_prefix=("modulator",))
  d_dim = int(np.shape(dec["cls_token"])[-1])
  return tables.to_torch(table, params,
                         constants={"decoder_sincos": decoder_sincos(d_dim, decoder_grid)},
                         context="exporting UAE params to the official layout")


def export_official_uae(params: Mapping, path: Optional[str], *, key_style: str = "hf4",
                        decoder_grid: int = 16, metadata: Optional[Mapping[str, str]] = None
                        ) -> Dict[str, np.ndarray]:
  """Write our UAE params as an official-layout .safetensors file (and return the dict)."""
  sd = uae_to_state_dict(params, key_style=key_style, decoder_grid=decoder_grid)
  if path is not None:
    meta = {"format": "uae_official_state_dict", "encoder_key_style": key_style,
            "exported_by": "uae_jax.convert", "modulator_prefix": MODULATOR_PREFIX,
            **(metadata or {})}
    torch_io.write_safetensors(sd, path, meta)
  return sd


@guard.loader("UAE checkpoint")
def import_official_uae_to_dir(src: str, out_dir: str, which: str = "ema", *,
                               encoder_input_size: int = 224, encoder_num_heads=None,
                               decoder_num_heads=None) -> Tuple[dict, Dict[str, Any]]:
  """Import `src` and write `out_dir/{params.msgpack, arch.json}`; returns (params, arch)."""
  params, arch = import_official_uae(src, which, encoder_input_size=encoder_input_size,
                                     encoder_num_heads=encoder_num_heads,
                                     decoder_num_heads=decoder_num_heads)
  if os.path.isfile(src):
    arch["source"]["sha256"] = torch_io.sha256(src)
  flax_io.save_params(out_dir, params, arch)
  return params, arch


def _custom_heads(component_cfg: Mapping) -> Optional[int]:
  """The configured heads of a size='custom' component (None for named sizes)."""
  if component_cfg.get("size") == arch_lib.CUSTOM:
    return component_cfg.get("num_heads")
  return None


def _check_decoder_arch(found: Mapping, dec_cfg: Mapping, what: str) -> None:
  """Raises LoadError if the imported decoder is another architecture than `dec_cfg` asks for."""
  from uae_jax.errors import LoadError
  from uae_jax.models.decoder import PixelDecoder
  from uae_jax.models.dinov2 import spec_text
  have, want = PixelDecoder(**found), PixelDecoder(**dec_cfg)
  if have.spec != want.spec or have.patch_size != want.patch_size:
    raise LoadError(f"{what}: the decoder is size {have.size!r} ({spec_text(have.spec)}, patch "
                    f"{have.patch_size}) but model.decoder asks for size {want.size!r} "
                    f"({spec_text(want.spec)}, patch {want.patch_size})")


def model_abstract_params(model_cfg: Mapping) -> Dict[str, Any]:
  """Abstract params {'encoder', 'decoder'[, 'modulator']} of the UAE `config.model` describes."""
  import jax
  import jax.numpy as jnp
  from uae_jax.models import encoders
  from uae_jax.models.decoder import PixelDecoder
  from uae_jax.models.modulator import SpectralModulator
  enc_cfg = dict(model_cfg["encoder"])
  size = enc_cfg.get("input_size") or enc_cfg["pos_embed_grid"] * enc_cfg.get("patch_size", 14)
  images = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
  key = jax.random.key(0)
  z, enc = jax.eval_shape(encoders.build(enc_cfg, name=None).init_with_output, key, images)
  out = {"encoder": enc["params"]}
  out["decoder"] = jax.eval_shape(PixelDecoder(**model_cfg["decoder"]).init, key, z)["params"]
  if model_cfg.get("use_modulator", False):
    k = int(model_cfg["num_bands"])
    bands = jax.ShapeDtypeStruct((k,) + z.shape, jnp.float32)
    out["modulator"] = jax.eval_shape(SpectralModulator(features=z.shape[-1], num_bands=k).init,
                                      key, bands)["params"]
  return out


@guard.loader("UAE checkpoint")
def load_official(path: str, model_cfg: Mapping, *, which: str = "ema") -> dict:
  """Params of an official PyTorch UAE checkpoint for the UAE `model_cfg` (config.model) builds.

  Converts (sizes inferred from the shapes; the heads of size='custom' components from the
  config), refuses another encoder/decoder architecture than the config's, puts every component
  in the config's block layout (scan_utils.match_layout) and shape-checks the whole tree against
  the model's abstract params. Raises LoadError (ConversionError is one) naming `path`.
  """
  from uae_jax.errors import LoadError
  from uae_jax.models import dinov2, scan_utils, tree_check
  enc_cfg, dec_cfg = dict(model_cfg["encoder"]), dict(model_cfg["decoder"])
  kind = enc_cfg.pop("kind", "dinov2")
  if kind == "dinov2":
    params, arch = import_official_uae(
        path, which, encoder_input_size=enc_cfg.get("input_size", 224),
        encoder_num_heads=_custom_heads(enc_cfg), decoder_num_heads=_custom_heads(dec_cfg))
    dinov2.check_arch(arch["encoder"], enc_cfg, path)
    _check_decoder_arch(arch["decoder"], dec_cfg, path)
  else:  # UAE-CLIP / UAE-SigLIP2: the encoder's own key table; the shape check below decides
    from uae_jax.convert import clip as clip_convert
    size = {"encoder_input_size": enc_cfg["input_size"]} if enc_cfg.get("input_size") else {}
    params, arch = clip_convert.official_importer(kind)(path, which, **size)
  params = scan_utils.match_layout(params, model_cfg)
  tree_check.check_same_shapes(params, model_abstract_params(model_cfg),
                               f"official UAE checkpoint {path}")
  return params


@guard.loader("converted UAE directory")
def export_official_uae_from_dir(src_dir: str, out_path: str, *, key_style: str = "hf4",
                                 decoder_grid: Optional[int] = None) -> Dict[str, np.ndarray]:
  """Export a converted UAE directory as an official-layout .safetensors."""
  params, arch = flax_io.load_params(src_dir)
  if arch.get("model_class") != MODEL_CLASS:
    raise ConversionError(f"{src_dir}: holds {arch.get('model_class')!r}, not a UAE ({MODEL_CLASS})")
  grid = decoder_grid or int(arch.get("latent_grid", 16))
  return export_official_uae(params, out_path, key_style=key_style, decoder_grid=grid)
