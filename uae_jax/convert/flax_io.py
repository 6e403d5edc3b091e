"""Output format of converted weights: a directory with `params.msgpack` and `arch.json`.

`params.msgpack` is `flax.serialization.msgpack_serialize` of the plain nested dict of numpy
float32 arrays (the `params` collection only, no `{'params': ...}` wrapper). It is one file,
bit-exact, needs neither torch nor Orbax, and `flax.serialization.msgpack_restore` reads it back
(large arrays are chunked by flax, so multi-GB trees are fine). `arch.json` says what the tree is:

  {"format": "uae_jax.convert/1", "model_class": "uae_jax.models.dinov2.DinoV2",
   "kwargs": {...constructor kwargs...}, "source": {...file, layout, sha256, ...}}

For a whole UAE the kwargs are split per component ({"encoder": {...}, "decoder": {...}}).
The trainer turns these into sharded arrays itself (e.g. `jax.device_put(params, shardings)`).
"""
import json
import os
from typing import Any, Dict, Mapping, Tuple

import numpy as np

from uae_jax.convert.tables import ConversionError

FORMAT = "uae_jax.convert/1"
PARAMS_FILE = "params.msgpack"
ARCH_FILE = "arch.json"


def save_params(out_dir: str, params: Mapping, arch: Mapping[str, Any]) -> Tuple[str, str]:
  """Write `params.msgpack` + `arch.json` into `out_dir` (created if needed)."""
  from flax import serialization
  os.makedirs(out_dir, exist_ok=True)
  tree = _to_numpy_tree(params)
  p = os.path.join(out_dir, PARAMS_FILE)
  tmp = p + ".tmp"
  with open(tmp, "wb") as f:
    f.write(serialization.msgpack_serialize(tree))
  os.replace(tmp, p)
  a = os.path.join(out_dir, ARCH_FILE)
  with open(a, "w") as f:
    json.dump({"format": FORMAT, **arch}, f, indent=2, sort_keys=True)
    f.write("\n")
  return p, a


def is_converted_dir(path: str) -> bool:
  """True if `path` is a directory written by `save_params`."""
  return (os.path.isdir(path) and os.path.exists(os.path.join(path, PARAMS_FILE))
          and os.path.exists(os.path.join(path, ARCH_FILE)))


def load_params(path: str) -> Tuple[Dict[str, Any], Dict[str, Any]]:
  """(params nested dict of numpy arrays, arch dict) from a directory written by `save_params`."""
  from flax import serialization
  if not is_converted_dir(path):
    raise ConversionError(f"{path}: not a converted-weights directory (needs {PARAMS_FILE} and "
                          f"{ARCH_FILE})")
  with open(os.path.join(path, ARCH_FILE)) as f:
    arch = json.load(f)
  if arch.get("format") != FORMAT:
    raise ConversionError(f"{path}/{ARCH_FILE}: unknown format {arch.get('format')!r}, expected "
                          f"{FORMAT!r}")
  with open(os.path.join(path, PARAMS_FILE), "rb") as f:
    raw = f.read()
  try:
    params = serialization.msgpack_restore(raw)
  except Exception as e:  # msgpack raises several unrelated types on corrupt input
    raise ConversionError(f"{path}/{PARAMS_FILE}: truncated or corrupt ({type(e).__name__}: {e})") from None
  return _to_numpy_tree(params), arch


def _to_numpy_tree(tree):
  """Nested dict with str keys and numpy leaves."""
  if isinstance(tree, Mapping):
    return {str(k): _to_numpy_tree(v) for k, v in tree.items()}
  return np.asarray(tree)
