"""Frozen DINO v1 ViT-S/8 discriminator backbone (FAIR DINO / timm names) <-> Flax params.

Source keys (`dino_vit_small_patch8_224.pth`, a flat state dict): `cls_token` (1,1,384),
`pos_embed` (1,785,384), `patch_embed.proj.{weight (384,3,8,8), bias}`,
`blocks.{i}.{norm1, attn.qkv (1152,384), attn.proj, norm2, mlp.fc1, mlp.fc2}.{weight,bias}`,
`norm.{weight,bias}`; no LayerScale. Target tree (uae_jax.models.discriminator backbone):
`patch_embed{kernel (8,8,3,384), bias}`, `cls_token`, `pos_embed`, `blocks_{i}{norm1{scale,bias},
attn{query,key,value,proj}{kernel,bias}, norm2, mlp{fc1,fc2}}`, `norm{scale,bias}`.
The fused qkv is split into thirds (q, k, v). The official code zeroes the key third of every
`attn.qkv.bias` before loading; that bias cannot change the output (it adds a per-query constant to
all attention logits, which softmax removes), so it is kept as stored unless zero_key_bias=True.
The final `norm` is converted (the official features never apply it; the file has it).
"""
import os
from typing import Any, Dict, Mapping, Optional, Tuple

import numpy as np

from uae_jax.convert import flax_io
from uae_jax.convert import guard
from uae_jax.convert import tables
from uae_jax.convert import torch_io
from uae_jax.convert.tables import ConversionError

MODEL_CLASS = "uae_jax.models.discriminator.DinoViTBackbone"
# Architecture kwargs are DinoViTBackbone's constructor fields: DinoViTBackbone(**arch).
DINO_S8 = {"dim": 384, "depth": 12, "num_heads": 6, "mlp_hidden": 1536, "patch_size": 8,
           "image_size": 224}


def infer_arch(sd: Mapping[str, np.ndarray], prefix: str = "") -> Dict[str, int]:
  """DinoViTBackbone kwargs from the shapes of a DINO ViT state dict (heads = dim // 64)."""
  problems = [("missing PyTorch key", prefix + k) for k in
              ("cls_token", "pos_embed", "patch_embed.proj.weight", "blocks.0.mlp.fc1.weight")
              if prefix + k not in sd]
  if problems:
    raise ConversionError("DINO ViT discriminator backbone state dict", problems)
  w = np.shape(sd[prefix + "patch_embed.proj.weight"])
  dim = int(np.shape(sd[prefix + "cls_token"])[-1])
  depth = 0
  while f"{prefix}blocks.{depth}.norm1.weight" in sd:
    depth += 1
  n = int(np.shape(sd[prefix + "pos_embed"])[1]) - 1
  grid = int(round(n ** 0.5))
  if grid * grid != n:
    raise ConversionError(f"{prefix}pos_embed has {n + 1} positions: not 1 + a square grid")
  return {"dim": dim, "depth": depth, "num_heads": max(dim // 64, 1),
          "mlp_hidden": int(np.shape(sd[prefix + "blocks.0.mlp.fc1.weight"])[0]),
          "patch_size": int(w[-1]), "image_size": grid * int(w[-1])}


def disc_param_shapes(arch: Mapping[str, int]) -> Dict[tuple, tuple]:
  """The Flax tree of the discriminator backbone, written out from its architecture."""
  d, h, p = arch["dim"], arch["mlp_hidden"], arch["patch_size"]
  out = {("patch_embed", "kernel"): (p, p, 3, d), ("patch_embed", "bias"): (d,),
         ("cls_token",): (1, 1, d), ("pos_embed",): (1, 1 + (arch["image_size"] // p) ** 2, d),
         ("norm", "scale"): (d,), ("norm", "bias"): (d,)}
  for i in range(arch["depth"]):
    b = f"blocks_{i}"
    for n in ("norm1", "norm2"):
      out[(b, n, "scale")] = (d,)
      out[(b, n, "bias")] = (d,)
    for n in ("query", "key", "value", "proj"):
      out[(b, "attn", n, "kernel")] = (d, d)
      out[(b, "attn", n, "bias")] = (d,)
    out[(b, "mlp", "fc1", "kernel")] = (d, h)
    out[(b, "mlp", "fc1", "bias")] = (h,)
    out[(b, "mlp", "fc2", "kernel")] = (h, d)
    out[(b, "mlp", "fc2", "bias")] = (d,)
  return out


def _check_expected(arch: Mapping[str, Any], expect: Mapping[str, Any], context: str) -> None:
  """Refuses an architecture other than `expect` (heads are not in the weights: not compared)."""
  diff = {k: (arch.get(k), v) for k, v in expect.items() if k != "num_heads" and arch.get(k) != v}
  if diff:
    want = "a DINO ViT-S/8" if dict(expect) == DINO_S8 else f"the expected backbone {dict(expect)}"
    raise ConversionError(
        f"architecture mismatch{' in ' + context if context else ''}: the file is not {want} ("
        + ", ".join(f"{k} {got}, expected {w}" for k, (got, w) in diff.items()) + ")")


def convert_dino_disc(sd: Mapping[str, np.ndarray], *, expect: Optional[Mapping[str, int]] = DINO_S8,
                      zero_key_bias: bool = False, context: str = ""
                      ) -> Tuple[dict, Dict[str, int]]:
  """DINO ViT state dict -> (params, DinoViTBackbone kwargs). `expect` (default ViT-S/8) refuses
  other architectures; pass None to accept any (e.g. tiny random test models; heads = dim / 64)."""
  arch = infer_arch(sd)
  if expect is not None:
    _check_expected(arch, expect, context)
    arch["num_heads"] = expect["num_heads"]
  table = tables.dino_disc_table(depth=arch["depth"])
  params = tables.to_flax(table, sd, expected=disc_param_shapes(arch),
                          context=context or "converting the DINO ViT discriminator backbone")
  if zero_key_bias:
    for i in range(arch["depth"]):
      b = params[f"blocks_{i}"]["attn"]["key"]
      b["bias"] = np.zeros_like(b["bias"])
  return params, arch


def export_dino_disc(params: Mapping) -> Dict[str, np.ndarray]:
  """Backbone params -> the timm / FAIR DINO state dict (numpy)."""
  depth = 0
  while f"blocks_{depth}" in params:
    depth += 1
  return tables.to_torch(tables.dino_disc_table(depth=depth), params,
                         context="exporting the DINO ViT discriminator backbone")


@guard.loader("DINO discriminator weights")
def load_dino_disc(path_or_dir: str, *, expect: Optional[Mapping[str, int]] = DINO_S8,
                   zero_key_bias: bool = False) -> Tuple[dict, Dict[str, Any]]:
  """(params, arch) from a converted directory or a PyTorch / safetensors file."""
  if flax_io.is_converted_dir(path_or_dir):
    params, arch = flax_io.load_params(path_or_dir)
    if arch.get("model_class") != MODEL_CLASS:
      raise ConversionError(f"{path_or_dir}: holds {arch.get('model_class')!r}, not {MODEL_CLASS}")
    flax_io.check_shapes(path_or_dir, params, disc_param_shapes(arch["kwargs"]))
    if expect is not None:
      _check_expected(arch["kwargs"], expect, f"loading {path_or_dir}")
      if arch["kwargs"].get("num_heads") != expect["num_heads"]:
        raise ConversionError(f"architecture mismatch in loading {path_or_dir}: converted with "
                              f"{arch['kwargs'].get('num_heads')} heads, expected "
                              f"{expect['num_heads']}")
    return params, arch["kwargs"]
  sd, _ = torch_io.read_state_dict(path_or_dir)
  return convert_dino_disc(sd, expect=expect, zero_key_bias=zero_key_bias,
                           context=f"converting {path_or_dir}")


@guard.loader("DINO discriminator weights")
def convert_dino_disc_file(src: str, out_dir: str, *, expect=DINO_S8, zero_key_bias: bool = False):
  """Convert `src` and write `out_dir/{params.msgpack, arch.json}`; returns (params, arch)."""
  sd, _ = torch_io.read_state_dict(src)
  params, arch = convert_dino_disc(sd, expect=expect, zero_key_bias=zero_key_bias,
                                   context=f"converting {src}")
  source = {"file": os.path.abspath(src), "zero_key_bias": zero_key_bias}
  if os.path.isfile(src):
    source["sha256"] = torch_io.sha256(src)
  flax_io.save_params(out_dir, params, {"model_class": MODEL_CLASS, "kwargs": arch,
                                        "source": source})
  return params, arch
