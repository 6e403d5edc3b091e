"""Conversion between the unrolled (`blocks_{i}`) and the scanned (stacked `blocks`) param layouts.

With `scan_blocks=True` (`DinoV2`, `PixelDecoder`, `DinoViTBackbone`) the transformer blocks run
as one `nn.scan`, and their parameters live under a single `blocks` entry whose leaves carry a
leading `depth` axis (logical axis `layers`, replicated by the default sharding rules):

  unrolled: {'blocks_0': {'attn': {'query': {'kernel': (D, D)}}}, 'blocks_1': {...}, ...}
  scanned:  {'blocks': {'attn': {'query': {'kernel': (depth, D, D)}}}}

Everything outside the models (the PyTorch conversion tables, `uae_jax.convert` output
directories, exports) uses the unrolled layout. Convert at the boundary:

  params = scan_utils.stack_blocks(converted_params)      # load into a scanned model
  flat = scan_utils.unstack_blocks(jax.device_get(params))  # before export / conversion

Both directions are exact copies (no arithmetic), so a round trip is bit-exact. The model
loaders (`dinov2.load`, `discriminator.load_backbone`, `convert.uae.load_official`) apply the
layout the config asks for; stage chaining (init.from_stage) between a scanned and an unrolled
run is refused by `uae_jax.checkpoint.layout.checkpoint_layout_error` (models never read Orbax).
"""
import re
from typing import Any, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np

BLOCKS = "blocks"
COMPONENTS = ("encoder", "decoder")  # UAE param subtrees whose layout follows the model config


def _stack(leaves):
  """Stacks same-shaped leaves along a new leading axis (numpy stays numpy)."""
  if all(isinstance(x, np.ndarray) for x in leaves):
    return np.stack(leaves)
  return jnp.stack(leaves)


def _block_indices(tree: Mapping, name: str) -> list:
  """Sorted i of the `{name}_{i}` keys of one dict; raises if they are not 0..n-1."""
  pat = re.compile(rf"^{re.escape(name)}_(\d+)$")
  idx = sorted(int(m.group(1)) for m in map(pat.match, tree) if m)
  if idx and idx != list(range(len(idx))):
    raise ValueError(f"{name}_i keys are not contiguous from 0: {idx}")
  return idx


def _map_dicts(fn, tree: Any) -> Any:
  """Applies `fn` bottom-up to every dict of any pytree (optax states hold params-shaped dicts)."""
  def visit(node):
    if isinstance(node, Mapping):
      return fn({k: _map_dicts(fn, v) for k, v in node.items()})
    return node
  return jax.tree.map(visit, tree, is_leaf=lambda n: isinstance(n, Mapping))


def stack_blocks(tree: Any, name: str = BLOCKS) -> Any:
  """Unrolled -> scanned: every dict's `{name}_0..{name}_{n-1}` become one stacked `{name}`.

  Works on params and on anything holding params-shaped dicts (EMA, optimiser state).
  """
  def stack(d):
    idx = _block_indices(d, name)
    if not idx:
      return d
    if name in d:
      raise ValueError(f"both {name!r} and {name}_i keys in one dict: mixed layouts")
    blocks = [d.pop(f"{name}_{i}") for i in idx]
    if len({jax.tree.structure(b) for b in blocks}) != 1:
      raise ValueError(f"{name}_i subtrees differ in structure; cannot stack them")
    d[name] = jax.tree.map(lambda *xs: _stack(list(xs)), *blocks)
    return d
  return _map_dicts(stack, tree)


def unstack_blocks(tree: Any, name: str = BLOCKS) -> Any:
  """Scanned -> unrolled: every dict entry `{name}` splits along axis 0 into `{name}_{i}`."""
  def unstack(d):
    v = d.get(name)
    if not isinstance(v, Mapping):
      return d
    depths = {np.shape(x)[0] if np.ndim(x) else None for x in jax.tree.leaves(v)}
    if len(depths) != 1 or None in depths:
      raise ValueError(f"{name!r} leaves do not share one leading (layers) axis: {depths}")
    (depth,) = depths
    out = {k: x for k, x in d.items() if k != name}
    for i in range(depth):
      out[f"{name}_{i}"] = jax.tree.map(lambda x, i=i: x[i], v)
    return out
  return _map_dicts(unstack, tree)


def is_stacked(tree: Any, name: str = BLOCKS) -> Optional[bool]:
  """True if the dict holds a stacked `{name}`, False if `{name}_0`, None if neither."""
  if not isinstance(tree, Mapping):
    return None
  if name in tree:
    return True
  if f"{name}_0" in tree:
    return False
  return None


def match_layout(params: Mapping, model_config: Mapping) -> dict:
  """UAE params {'encoder', 'decoder', ...} in the block layout `model_config` asks for.

  `model_config` is `config.model`: its `encoder.scan_blocks` / `decoder.scan_blocks` (default
  False) choose the layout per component; other subtrees pass through.
  """
  out = dict(params)
  for comp in COMPONENTS:
    if comp in out:
      out[comp] = to_layout(out[comp], bool(model_config[comp].get("scan_blocks", False)))
  return out


def to_layout(component_params: Mapping, scanned: bool) -> dict:
  """One model's params (e.g. the encoder) stacked if `scanned`, unrolled otherwise."""
  return stack_blocks(component_params) if scanned else unstack_blocks(component_params)
