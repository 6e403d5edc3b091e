"""Architecture of a converted transformer from its tensor shapes: size name or explicit dims.

Width, depth, MLP width and SwiGLU are read from the weights. The number of attention heads is
not in the weights (q/k/v are D x D whatever the split), so it is taken, in this order, from:

  1. an explicit `num_heads` (`--num-heads` on the command line),
  2. an HF `config.json` beside the weights (`num_attention_heads`),
  3. a named size with exactly these shapes (e.g. DINOv2-B: 12 heads, decoder XL: 16),
  4. dim // 64 when the width is a multiple of 64 (every released DINOv2 uses 64-wide heads),
otherwise the conversion stops and asks for `num_heads`. An explicit value that disagrees with
config.json is refused.

The result is the module's constructor kwargs: `{'size': name}` when a named size has exactly
these dims (and heads), else `{'size': 'custom', 'dim', 'depth', 'num_heads', 'mlp_hidden'[,
'swiglu']}`, which `DinoV2` / `PixelDecoder` accept as they are.
"""
from typing import Any, Dict, Mapping, Optional, Tuple

from uae_jax.convert.tables import ConversionError

CUSTOM = "custom"
HEAD_WIDTH = 64
# Spec attribute (DinoV2Size / DecoderSize) behind each module field.
_SPEC_ATTR = {"num_heads": "heads"}


def _spec_matches(spec: Any, dims: Mapping[str, Any]) -> bool:
  """True if the named size's spec has every value of `dims` (module field names)."""
  return all(getattr(spec, _SPEC_ATTR.get(k, k), False) == v for k, v in dims.items())


def describe(dims: Mapping[str, Any]) -> str:
  """'dim 64, depth 2, MLP 256' (+ heads / SwiGLU when present) for messages."""
  parts = [f"dim {dims['dim']}", f"depth {dims['depth']}", f"MLP {dims['mlp_hidden']}"]
  if dims.get("num_heads") is not None:
    parts.append(f"{dims['num_heads']} heads")
  if dims.get("swiglu"):
    parts.append("SwiGLU")
  return ", ".join(parts)


def infer_heads(sizes: Mapping[str, Any], dims: Mapping[str, Any], *,
                num_heads: Optional[int] = None, config_heads: Optional[int] = None,
                context: str = "") -> Tuple[int, str]:
  """(number of heads, where it came from) for a model of `dims` (see the module docstring)."""
  if num_heads is not None and config_heads is not None and int(num_heads) != int(config_heads):
    raise ConversionError(f"{context}: num_heads={num_heads} was given but config.json says "
                          f"num_attention_heads={config_heads}")
  if num_heads is not None:
    heads, source = int(num_heads), "explicit num_heads"
  elif config_heads is not None:
    heads, source = int(config_heads), "config.json"
  else:
    named = [n for n, s in sizes.items() if _spec_matches(s, dims)]
    if named:
      return int(sizes[named[0]].heads), f"named size {named[0]!r}"
    if dims["dim"] % HEAD_WIDTH:
      raise ConversionError(
          f"{context}: cannot tell the number of attention heads of a {describe(dims)} model "
          f"(no config.json, no named size, width not a multiple of {HEAD_WIDTH}); pass "
          "num_heads (--num-heads)")
    heads, source = dims["dim"] // HEAD_WIDTH, f"dim // {HEAD_WIDTH}"
  if heads < 1 or dims["dim"] % heads:
    raise ConversionError(f"{context}: width {dims['dim']} is not divisible by {heads} heads "
                          f"({source})")
  return heads, source


def size_kwargs(sizes: Mapping[str, Any], dims: Mapping[str, Any]) -> Dict[str, Any]:
  """{'size': name} if a named size has exactly `dims` (incl. heads), else the custom kwargs."""
  for name, spec in sizes.items():
    if _spec_matches(spec, dims):
      return {"size": name}
  return {"size": CUSTOM, **dims}


def check_requested_size(sizes: Mapping[str, Any], requested: Optional[str],
                         dims: Mapping[str, Any], what: str, context: str = "") -> None:
  """Refuses a file whose shapes are not the requested named size (None / 'custom': no check)."""
  if requested in (None, CUSTOM):
    return
  if requested not in sizes:
    raise ConversionError(f"{what} size {requested!r}: expected one of {sorted(sizes)} or "
                          f"{CUSTOM!r}")
  shape_dims = {k: v for k, v in dims.items() if k != "num_heads"}
  if not _spec_matches(sizes[requested], shape_dims):
    named = [n for n, s in sizes.items() if _spec_matches(s, shape_dims)]
    holds = f"{what} size {named[0]!r}" if named else f"a custom {what}"
    s = sizes[requested]
    want = {"dim": s.dim, "depth": s.depth, "mlp_hidden": s.mlp_hidden,
            "swiglu": getattr(s, "swiglu", False)}
    raise ConversionError(
        f"architecture mismatch{' in ' + context if context else ''}: the file holds {holds} "
        f"({describe(shape_dims)}), but size {requested!r} ({describe(want)}) was requested")


def resolve(sizes: Mapping[str, Any], shape_dims: Mapping[str, Any], what: str, *,
            requested: Optional[str] = None, num_heads: Optional[int] = None,
            config_heads: Optional[int] = None, context: str = ""
            ) -> Tuple[Dict[str, Any], Dict[str, Any]]:
  """(module size kwargs, record of the inferred architecture incl. where the heads came from)."""
  check_requested_size(sizes, requested, shape_dims, what, context)
  heads, source = infer_heads(sizes, shape_dims, num_heads=num_heads, config_heads=config_heads,
                              context=context or what)
  dims = dict(shape_dims, num_heads=heads)
  return size_kwargs(sizes, dims), dict(dims, heads_from=source)
