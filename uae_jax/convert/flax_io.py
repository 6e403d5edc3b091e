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

from uae_jax.convert import guard
from uae_jax.convert.tables import ConversionError

FORMAT = "uae_jax.convert/1"
PARAMS_FILE = "params.msgpack"
ARCH_FILE = "arch.json"


def _atomic_write(path: str, data: bytes) -> None:
  """Writes `data` to a temporary name beside `path`, then renames it into place."""
  tmp = f"{path}.tmp-{os.getpid()}"
  try:
    with open(tmp, "wb") as f:
      f.write(data)
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def save_params(out_dir: str, params: Mapping, arch: Mapping[str, Any]) -> Tuple[str, str]:
  """Write `params.msgpack` + `arch.json` into `out_dir` (created if needed).

  `arch.json` is what makes a directory count as converted (`is_converted_dir`): an old one is
  removed first and the new one is renamed into place last, so an interrupted write never
  leaves a directory that looks complete.
  """
  from flax import serialization
  os.makedirs(out_dir, exist_ok=True)
  p, a = os.path.join(out_dir, PARAMS_FILE), os.path.join(out_dir, ARCH_FILE)
  if os.path.exists(a):
    os.remove(a)
  _atomic_write(p, serialization.msgpack_serialize(_to_numpy_tree(params)))
  text = json.dumps({"format": FORMAT, **arch}, indent=2, sort_keys=True) + "\n"
  _atomic_write(a, text.encode())
  return p, a


def is_converted_dir(path: str) -> bool:
  """True if `path` is a directory written by `save_params`."""
  return (os.path.isdir(path) and os.path.exists(os.path.join(path, PARAMS_FILE))
          and os.path.exists(os.path.join(path, ARCH_FILE)))


def _read_arch(path: str) -> Dict[str, Any]:
  """The checked arch.json of a converted directory."""
  f = os.path.join(path, ARCH_FILE)
  with guard.reading(f, "arch.json (not JSON)"):
    with open(f) as fh:
      arch = json.load(fh)
  if not isinstance(arch, dict):
    raise ConversionError(f"{f}: expected a JSON object, got {type(arch).__name__}")
  if arch.get("format") != FORMAT:
    raise ConversionError(f"{f}: unknown format {arch.get('format')!r}, expected {FORMAT!r}")
  if not isinstance(arch.get("model_class"), str):
    raise ConversionError(f"{f}: no 'model_class' string")
  if not isinstance(arch.get("kwargs", {}), dict):
    raise ConversionError(f"{f}: 'kwargs' is not a JSON object")
  return arch


def load_params(path: str) -> Tuple[Dict[str, Any], Dict[str, Any]]:
  """(params nested dict of numpy arrays, arch dict) from a directory written by `save_params`."""
  from flax import serialization
  if not is_converted_dir(path):
    raise ConversionError(f"{path}: not a converted-weights directory (needs {PARAMS_FILE} and "
                          f"{ARCH_FILE})")
  arch = _read_arch(path)
  f = os.path.join(path, PARAMS_FILE)
  with open(f, "rb") as fh:
    raw = fh.read()
  if not raw:
    raise ConversionError(f"{f}: empty file (an interrupted write?)")
  try:
    params = serialization.msgpack_restore(raw)
  except Exception as e:  # pylint: disable=broad-except  # msgpack raises many unrelated types
    raise ConversionError(f"{f}: truncated or corrupt ({guard.why(e)})") from None
  if not isinstance(params, Mapping) or not params:
    raise ConversionError(f"{f}: expected a nested dict of arrays, got "
                          f"{type(params).__name__ if params is not None else 'nothing'}")
  _check_leaves(f, params)
  return _to_numpy_tree(params), arch


def check_shapes(path: str, params: Mapping, expected: Mapping[tuple, tuple]) -> None:
  """Raises ConversionError unless the params tree has exactly the expected leaves and shapes."""
  from uae_jax.convert import tables
  have = {k: tuple(np.shape(v)) for k, v in tables.flatten(params).items()}
  problems = [("missing", "/".join(k)) for k in sorted(set(expected) - set(have))]
  problems += [("unexpected", "/".join(k)) for k in sorted(set(have) - set(expected))]
  problems += [("shape mismatch", f"{'/'.join(k)} {have[k]} != {tuple(expected[k])}")
               for k in sorted(set(have) & set(expected)) if have[k] != tuple(expected[k])]
  if problems:
    raise ConversionError(f"{path}: {PARAMS_FILE} does not match its {ARCH_FILE}", problems)


def _check_leaves(f: str, tree, prefix: str = "") -> None:
  """Raises ConversionError unless every leaf of the restored tree is a numeric array."""
  for k, v in tree.items():
    name = f"{prefix}{k}"
    if isinstance(v, Mapping):
      _check_leaves(f, v, name + "/")
    elif not (isinstance(v, (np.ndarray, np.generic)) and np.asarray(v).dtype.kind in "fiub"):
      raise ConversionError(f"{f}: leaf {name} is {type(v).__name__}, not a numeric array")


def _to_numpy_tree(tree):
  """Nested dict with str keys and numpy leaves."""
  if isinstance(tree, Mapping):
    return {str(k): _to_numpy_tree(v) for k, v in tree.items()}
  return np.asarray(tree)
