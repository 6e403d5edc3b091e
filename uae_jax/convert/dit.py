"""Official stage-2 DiT^DH checkpoints (PyTorch `DiTwDDTHead`) <-> our `models.dit.DiTDH` params.

Import. A stage-2 training checkpoint is a `torch.save` dict with `model` and `ema` state dicts
(plus optimiser state); it is read with `torch.load(weights_only=True)` only and the `ema` entry
is used by default (`which='model'` for the raw weights). A flat state dict (.pt, .safetensors,
e.g. our own export) is used as it is. Keys wrapped by DDP (`module.`) or `torch.compile`
(`_orig_mod.`) are accepted when every key carries the same wrapper. The key table, both ways:

  t_embedder.W                     t_embedder/freqs      the 256 fixed Fourier frequencies (bit-exact)
  t_embedder.mlp.{0,2}.*           t_embedder/mlp_{0,2}  Linear (W.T)
  y_embedder.embedding_table.weight  y_embedder/embedding_table   (num_classes + 1 rows)
  s_embedder.proj.*, x_embedder.proj.*   s_embedder, x_embedder   Conv2d (D, C, p, p) -> Dense
                                   kernel (p*p*C, D) in our patch order (row offset, column
                                   offset, channel)
  pos_embed                        -                     fixed sin-cos table: checked to 1e-5
  enc_feat_rope.freqs_{cos,sin}, dec_feat_rope.freqs_{cos,sin}
                                   -                     fixed RoPE tables: checked to 1e-5 when
                                                         present (written on export)
  blocks.{i} (i < body depth)      blocks_{i}            norm1, attn.{qkv, [q_norm, k_norm], proj},
  blocks.{body depth + j}          head_blocks_{j}       norm2, mlp.{w12, w3}, adaLN_modulation.1
                                                         -> norm1, attn/..., norm2, mlp/..., adaLN
  s_projector.*                    s_projector
  final_layer.{norm_final, linear, adaLN_modulation.1}   final_layer/{norm, linear, adaLN}
Every missing, unused or mis-shaped key is a `ConversionError` (a LoadError) listing all of them.

The architecture is read from the shapes: body and head width (patch embeds), depths (block
widths), latent channels and patch, grid (pos_embed), classes (label table), q/k norm (presence
of `q_norm`), and it must be one of the named sizes of `models.dit` (S/B/L/XL body, DH head);
the heads come from the named size and are checked against the RoPE tables' head dim.
Export writes the same layout as .safetensors (`python -m uae_jax.convert dit-export`).
"""
import os
from typing import Any, Dict, List, Mapping, Optional, Tuple

import numpy as np

from uae_jax.convert import flax_io
from uae_jax.convert import guard
from uae_jax.convert import tables
from uae_jax.convert import torch_io
from uae_jax.convert.tables import ConversionError, Row

MODEL_CLASS = "uae_jax.models.dit.DiTDH"
WRAPPERS = ("module.", "_orig_mod.")
EMBEDDERS = ("s_embedder", "x_embedder")
ROPE_KEYS = {"enc_feat_rope": "body", "dec_feat_rope": "head"}


# ------------------------------------------------------------------------------ key table
def block_rows(torch_index: int, flax_name: str, qk_norm: bool) -> List[Row]:
  """Rows of one official `blocks.{torch_index}` <-> our `flax_name` block."""
  t, f = f"blocks.{torch_index}.", (flax_name,)
  rows = [Row(f + ("norm1", "weight"), t + "norm1.weight", "identity"),
          Row(f + ("norm2", "weight"), t + "norm2.weight", "identity")]
  rows += tables.linear_rows(f + ("attn", "qkv"), t + "attn.qkv")
  rows += tables.linear_rows(f + ("attn", "proj"), t + "attn.proj")
  if qk_norm:
    rows += [Row(f + ("attn", "q_norm", "weight"), t + "attn.q_norm.weight", "identity"),
             Row(f + ("attn", "k_norm", "weight"), t + "attn.k_norm.weight", "identity")]
  rows += tables.linear_rows(f + ("mlp", "w12"), t + "mlp.w12")
  rows += tables.linear_rows(f + ("mlp", "w3"), t + "mlp.w3")
  rows += tables.linear_rows(f + ("adaLN",), t + "adaLN_modulation.1")
  return rows


def dit_table(depth: int, head_depth: int, qk_norm: bool, rope_buffers: bool = True) -> tables.Table:
  """The full DiT^DH table; `rope_buffers` adds the four fixed RoPE tables."""
  rows = [Row(("t_embedder", "freqs"), "t_embedder.W", "identity"),
          Row(("y_embedder", "embedding_table"), "y_embedder.embedding_table.weight", "identity"),
          Row(None, "pos_embed", "fixed:pos_embed")]
  rows += tables.linear_rows(("t_embedder", "mlp_0"), "t_embedder.mlp.0")
  rows += tables.linear_rows(("t_embedder", "mlp_2"), "t_embedder.mlp.2")
  for name in EMBEDDERS:  # kernels stay 4-D (p, p, C, D) here; `_embed_to_dense` flattens them
    rows += tables.conv_rows((name,), f"{name}.proj")
  if rope_buffers:
    for key in ROPE_KEYS:
      rows += [Row(None, f"{key}.freqs_cos", f"fixed:{key}_cos"),
               Row(None, f"{key}.freqs_sin", f"fixed:{key}_sin")]
  for i in range(depth):
    rows += block_rows(i, f"blocks_{i}", qk_norm)
  for j in range(head_depth):
    rows += block_rows(depth + j, f"head_blocks_{j}", qk_norm)
  rows += tables.linear_rows(("s_projector",), "s_projector")
  rows.append(Row(("final_layer", "norm", "weight"), "final_layer.norm_final.weight", "identity"))
  rows += tables.linear_rows(("final_layer", "linear"), "final_layer.linear")
  rows += tables.linear_rows(("final_layer", "adaLN"), "final_layer.adaLN_modulation.1")
  return tables.Table("official_dit_ddt", rows)


def constants(arch: Mapping[str, Any]) -> Dict[str, np.ndarray]:
  """Our fixed tables in the official shapes: pos_embed (1, N, D) and the RoPE cos/sin (N, hd)."""
  from uae_jax.models import dit as dit_lib
  from uae_jax.models.decoder import sincos_2d
  body, head = dit_lib.SIZES[arch["size"]], dit_lib.HEAD_SIZES[arch["head_size"]]
  grid = arch["input_size"] // arch["patch_size"]
  out = {"pos_embed": sincos_2d(body.dim, grid, grid, cls_token=False)[None]}
  for key, spec in (("enc_feat_rope", body), ("dec_feat_rope", head)):
    out[f"{key}_cos"], out[f"{key}_sin"] = dit_lib.rope_tables(spec.dim // spec.heads, grid)
  return out


# ------------------------------------------------------------------------------ layouts
def _embed_to_dense(params: dict) -> dict:
  """Conv-layout patch-embed kernels (p, p, C, D) -> our Dense kernels (p*p*C, D)."""
  out = dict(params)
  for name in EMBEDDERS:
    k = out[name]["kernel"]
    out[name] = dict(out[name], kernel=k.reshape(-1, k.shape[-1]))
  return out


def _embed_to_conv(params: Mapping, patch: int) -> dict:
  """Inverse of `_embed_to_dense` for patch size `patch`."""
  out = dict(params)
  for name in EMBEDDERS:
    k = np.asarray(out[name]["kernel"])
    if k.ndim != 2 or k.shape[0] % (patch * patch):
      raise ConversionError(f"exporting DiT params: {name}/kernel has shape {k.shape}, not "
                            f"(p*p*C, D) for patch {patch}")
    out[name] = dict(out[name], kernel=k.reshape(patch, patch, -1, k.shape[-1]))
  return out


def unrolled(params: Mapping) -> dict:
  """Params with both block stacks in the unrolled `blocks_{i}` / `head_blocks_{j}` layout."""
  from uae_jax.models import scan_utils
  if set(params) == {"params"}:
    params = params["params"]
  return scan_utils.unstack_blocks(scan_utils.unstack_blocks(dict(params)), "head_blocks")


def in_layout(params: Mapping, scanned: bool) -> dict:
  """Unrolled params stacked (scan_blocks=True) or left unrolled."""
  from uae_jax.models import scan_utils
  if not scanned:
    return dict(params)
  return scan_utils.stack_blocks(scan_utils.stack_blocks(dict(params)), "head_blocks")


def _expected_shapes(arch: Mapping[str, Any]) -> Dict[tuple, tuple]:
  """Flax path -> shape of the unrolled model `arch` describes, patch-embed kernels 4-D."""
  from uae_jax.models import dit as dit_lib
  from uae_jax.models import tree_check
  flat = tree_check.flat_shapes(dit_lib.abstract_params(dit_lib.build(dict(arch))))
  out = {tuple(k.split("/")): v for k, v in flat.items()}
  p, c = arch["patch_size"], arch["in_channels"]
  for name in EMBEDDERS:
    out[(name, "kernel")] = (p, p, c, out[(name, "kernel")][-1])
  return out


# ------------------------------------------------------------------------------ architecture
def _count(sd: Mapping[str, Any], fmt: str) -> int:
  """How many consecutive `fmt.format(i)` keys from 0 are in `sd`."""
  n = 0
  while fmt.format(n) in sd:
    n += 1
  return n


def _named(sizes: Mapping[str, Any], dim: int, depth: int, what: str, context: str) -> str:
  """The name of the size with this width and depth, or a ConversionError listing the sizes."""
  for name, spec in sizes.items():
    if (spec.dim, spec.depth) == (dim, depth):
      return name
  known = ", ".join(f"{n} ({s.dim}/{s.depth})" for n, s in sizes.items())
  raise ConversionError(f"{context}: the {what} is {dim} wide and {depth} deep, which is no named "
                        f"DiT size (width/depth: {known})")


def _check_rope_heads(sd, arch, context: str) -> None:
  """The RoPE tables' head dim (when present) must be the named sizes' width / heads."""
  from uae_jax.models import dit as dit_lib
  specs = {"body": dit_lib.SIZES[arch["size"]], "head": dit_lib.HEAD_SIZES[arch["head_size"]]}
  for key, part in ROPE_KEYS.items():
    cos = sd.get(f"{key}.freqs_cos")
    if cos is None:
      continue
    spec = specs[part]
    if np.shape(cos)[-1] != spec.dim // spec.heads:
      raise ConversionError(f"{context}: {key}.freqs_cos has head dim {np.shape(cos)[-1]}, but the "
                            f"{part} size has {spec.heads} heads of {spec.dim // spec.heads}")


def infer_arch(sd: Mapping[str, Any], context: str) -> Dict[str, Any]:
  """`models.dit.build` kwargs of an official DiT^DH state dict, from its shapes."""
  from uae_jax.models import dit as dit_lib
  needed = ("s_embedder.proj.weight", "x_embedder.proj.weight", "t_embedder.W", "pos_embed",
            "y_embedder.embedding_table.weight", "blocks.0.norm1.weight")
  missing = [k for k in needed if k not in sd]
  if missing:
    raise ConversionError(context, [("missing PyTorch key", k) for k in missing])
  s_w, x_w = np.shape(sd["s_embedder.proj.weight"]), np.shape(sd["x_embedder.proj.weight"])
  if len(s_w) != 4 or len(x_w) != 4 or s_w[1:] != x_w[1:] or s_w[2] != s_w[3]:
    raise ConversionError(f"{context}: patch embeds of shapes {s_w} and {x_w}: expected Conv2d "
                          "weights (D, C, p, p) with the same C and p")
  body_dim, channels, patch = int(s_w[0]), int(s_w[1]), int(s_w[2])
  head_dim = int(x_w[0])
  if body_dim == head_dim:
    raise ConversionError(f"{context}: body and head are both {body_dim} wide (no s_projector); "
                          "only the DiT^DH with a wider head is supported")
  n_blocks = _count(sd, "blocks.{}.norm1.weight")
  depth = 0
  while depth < n_blocks and np.shape(sd[f"blocks.{depth}.norm1.weight"]) == (body_dim,):
    depth += 1
  n_pos = np.shape(sd["pos_embed"])[1] if np.ndim(sd["pos_embed"]) == 3 else -1
  grid = int(round(max(n_pos, 0) ** 0.5))
  if grid * grid != n_pos:
    raise ConversionError(f"{context}: pos_embed has shape {np.shape(sd['pos_embed'])}: expected "
                          "(1, g*g, D)")
  arch = {"kind": "ddt", "size": _named(dit_lib.SIZES, body_dim, depth, "body", context),
          "head_size": _named(dit_lib.HEAD_SIZES, head_dim, n_blocks - depth, "head", context),
          "in_channels": channels, "input_size": grid * patch, "patch_size": patch,
          "num_classes": int(np.shape(sd["y_embedder.embedding_table.weight"])[0]) - 1,
          "qk_norm": "blocks.0.attn.q_norm.weight" in sd,
          "num_freqs": int(np.shape(sd["t_embedder.W"])[0])}
  _check_rope_heads(sd, arch, context)
  return arch


# ------------------------------------------------------------------------------ import / export
def _unwrap(sd: Mapping[str, Any]) -> Dict[str, Any]:
  """Strips a DDP / torch.compile prefix that every key carries (repeatedly)."""
  sd = dict(sd)
  changed = True
  while changed and sd:
    changed = False
    for w in WRAPPERS:
      if all(isinstance(k, str) and k.startswith(w) for k in sd):
        sd = {k[len(w):]: v for k, v in sd.items()}
        changed = True
  return sd


def _flat_rope(sd: Dict[str, Any]) -> Dict[str, Any]:
  """RoPE tables stored as (g, g, hd) become (g*g, hd), the layout the table checks."""
  for key in ROPE_KEYS:
    for part in ("cos", "sin"):
      k = f"{key}.freqs_{part}"
      if k in sd and np.ndim(sd[k]) == 3:
        sd[k] = np.reshape(sd[k], (-1, np.shape(sd[k])[-1]))
  return sd


def dit_from_state_dict(sd: Mapping[str, np.ndarray], context: str = "") -> Tuple[dict, dict]:
  """Official DiT^DH state dict -> (unrolled Flax params, `models.dit.build` kwargs)."""
  context = context or "converting an official DiT^DH state dict"
  sd = _flat_rope(_unwrap(sd))
  arch = infer_arch(sd, context)
  from uae_jax.models import dit as dit_lib
  rope = any(f"{k}.freqs_cos" in sd for k in ROPE_KEYS)
  table = dit_table(dit_lib.SIZES[arch["size"]].depth, dit_lib.HEAD_SIZES[arch["head_size"]].depth,
                    arch["qk_norm"], rope)
  params = tables.to_flax(table, sd, expected=_expected_shapes(arch), constants=constants(arch),
                          context=context)
  return _embed_to_dense(params), arch


def select_state_dict(obj: Any, which: str, path: str) -> Dict[str, Any]:
  """The `which` ('ema' | 'model') state dict of a training checkpoint, tensors only."""
  from uae_jax.convert import uae as uae_convert  # the same training-checkpoint layout
  sd = uae_convert.select_state_dict(obj, which, path)
  bad = sorted(str(k) for k, v in sd.items() if not isinstance(v, np.ndarray))
  if bad:
    raise ConversionError(f"{path}: non-tensor entries in the state dict: {bad[:20]}")
  return sd


@guard.loader("DiT checkpoint")
def import_official_dit(path: str, which: str = "ema") -> Tuple[dict, dict]:
  """(unrolled params, arch) of an official DiT^DH checkpoint (.pt / .pth / .safetensors)."""
  if not os.path.isfile(path):
    raise ConversionError(f"{path}: no such file")
  obj = torch_io.read_checkpoint(path)
  sd = select_state_dict(obj, which, path)
  entry = which if isinstance(obj, Mapping) and which in obj else None
  params, arch = dit_from_state_dict(
      sd, context=f"converting {path}" + (f" [{entry}]" if entry else ""))
  return params, {"kwargs": arch, "source": {"file": os.path.abspath(path), "which": entry}}


def dit_to_state_dict(params: Mapping, arch: Mapping[str, Any],
                      rope_buffers: bool = True) -> Dict[str, np.ndarray]:
  """Our DiT^DH params (scanned or unrolled) -> official-layout state dict (numpy float32)."""
  from uae_jax.models import dit as dit_lib
  if arch.get("kind", "ddt") != "ddt":
    raise ConversionError(f"exporting DiT params: kind={arch.get('kind')!r}; only the DiT^DH "
                          "('ddt') has an official layout")
  flat = unrolled(params)
  depth, head_depth = dit_lib.SIZES[arch["size"]].depth, dit_lib.HEAD_SIZES[arch["head_size"]].depth
  qk_norm = bool(arch.get("qk_norm", False))
  table = dit_table(depth, head_depth, qk_norm, rope_buffers)
  conv = _embed_to_conv(flat, arch.get("patch_size", 1))
  sd = tables.to_torch(table, conv, constants=constants(dict(_defaults(), **arch)),
                       context="exporting DiT params to the official layout")
  return {k: np.asarray(v, np.float32) for k, v in sd.items()}


def _defaults() -> Dict[str, Any]:
  """The DiT^DH constructor defaults that matter for the fixed tables."""
  return {"input_size": 16, "patch_size": 1, "head_size": "DH", "size": "XL"}


def export_official_dit(params: Mapping, arch: Mapping[str, Any], path: Optional[str],
                        rope_buffers: bool = True) -> Dict[str, np.ndarray]:
  """Write our DiT^DH params as an official-layout .safetensors file (and return the dict)."""
  sd = dit_to_state_dict(params, arch, rope_buffers)
  if path is not None:
    torch_io.write_safetensors(sd, path, {"format": "official_dit_ddt_state_dict",
                                          "exported_by": "uae_jax.convert"})
  return sd


@guard.loader("DiT checkpoint")
def import_official_dit_to_dir(src: str, out_dir: str, which: str = "ema") -> Tuple[dict, dict]:
  """Import `src` and write `out_dir/{params.msgpack, arch.json}`; returns (params, arch)."""
  params, info = import_official_dit(src, which)
  info["source"]["sha256"] = torch_io.sha256(src)
  arch = {"model_class": MODEL_CLASS, **info}
  flax_io.save_params(out_dir, params, arch)
  return params, arch


@guard.loader("converted DiT directory")
def export_official_dit_from_dir(src_dir: str, out_path: str,
                                 rope_buffers: bool = True) -> Dict[str, np.ndarray]:
  """Export a converted DiT directory (params.msgpack + arch.json) as official .safetensors."""
  params, arch = flax_io.load_params(src_dir)
  if arch.get("model_class") != MODEL_CLASS:
    raise ConversionError(f"{src_dir}: holds {arch.get('model_class')!r}, not a DiT^DH "
                          f"({MODEL_CLASS})")
  return export_official_dit(params, arch.get("kwargs", {}), out_path, rope_buffers)


# ------------------------------------------------------------------------------ into a config
_ARCH_KEYS = ("kind", "size", "head_size", "in_channels", "input_size", "patch_size",
              "num_classes", "qk_norm", "num_freqs")


def _check_against_config(arch: Mapping[str, Any], model_cfg: Mapping[str, Any], path: str) -> None:
  """LoadError naming every architecture field where the file and `config.model` disagree."""
  from uae_jax.errors import LoadError
  diffs = [f"{k}: file {arch[k]!r}, config {model_cfg.get(k)!r}" for k in _ARCH_KEYS
           if k in model_cfg and arch[k] != model_cfg[k]]
  if diffs:
    raise LoadError(f"{path}: the DiT in the file does not match config.model ({'; '.join(diffs)})")


@guard.loader("DiT checkpoint")
def load(path: str, model_cfg: Mapping[str, Any], which: str = "ema") -> dict:
  """Params of an official DiT^DH checkpoint (or a converted directory) for `config.model`.

  Refuses another architecture than the config's, puts the blocks in the config's layout
  (`scan_blocks`) and shape-checks the whole tree against the model's abstract params.
  """
  from uae_jax.models import dit as dit_lib
  from uae_jax.models import tree_check
  model_cfg = dict(model_cfg)
  if flax_io.is_converted_dir(path):
    params, info = flax_io.load_params(path)
    if info.get("model_class") != MODEL_CLASS:
      raise ConversionError(f"{path}: holds {info.get('model_class')!r}, not a DiT^DH")
    arch = info.get("kwargs", {})
  else:
    params, info = import_official_dit(path, which)
    arch = info["kwargs"]
  if model_cfg.get("kind", "ddt") != "ddt":
    raise ConversionError(f"{path}: a DiT^DH checkpoint cannot initialise model.kind="
                          f"{model_cfg.get('kind')!r}")
  _check_against_config(arch, model_cfg, path)
  params = in_layout(unrolled(params), bool(model_cfg.get("scan_blocks", False)))
  target = dit_lib.abstract_params(dit_lib.build(model_cfg))
  tree_check.check_same_shapes(params, target, f"DiT checkpoint {path}")
  return params
