"""Safe reading and writing of PyTorch-side weight files.

Reading:
  .safetensors      `safetensors.numpy` (bfloat16 / float8 tensors, which numpy cannot name, are
                    read from the documented file layout with `ml_dtypes`); no code execution possible.
  .npz              `np.load(allow_pickle=False)`.
  .pth / .pt / .bin / .ckpt
                    only `torch.load(path, map_location='cpu', weights_only=True)`. A file that
                    needs anything beyond tensors and plain containers (pickled classes, functions,
                    `os.system` payloads, numpy objects) is refused with a `ConversionError` naming
                    the file; it is never unpickled with `weights_only=False`.
  HF directory      `model.safetensors`, a sharded `model.safetensors.index.json`, or
                    `pytorch_model.bin` (the same rules), plus `config.json` if present.
Truncated or corrupt files give a `ConversionError` saying so. torch is imported only for
torch-format files, so safetensors/npz conversion works without torch.

Writing: `write_safetensors` (safetensors.numpy, contiguous float arrays, string metadata).
"""
import json
import os
import struct
import sys
from typing import Any, Dict, Mapping, Optional, Tuple

import numpy as np

from uae_jax.convert import guard
from uae_jax.convert.tables import ConversionError
from uae_jax.errors import UserError

TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt", ".tar")
SAFETENSORS_SUFFIXES = (".safetensors",)

# safetensors dtype names -> numpy dtypes (the ones numpy lacks come from ml_dtypes).
_ST_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "I64": np.int64, "I32": np.int32,
    "I16": np.int16, "I8": np.int8, "U8": np.uint8, "U16": np.uint16, "U32": np.uint32,
    "U64": np.uint64, "BOOL": np.bool_,
}


def _ml_dtype(name: str):
  """The ml_dtypes type of a safetensors dtype numpy cannot name (or None)."""
  import ml_dtypes
  return {"BF16": ml_dtypes.bfloat16, "F8_E4M3": ml_dtypes.float8_e4m3fn,
          "F8_E5M2": ml_dtypes.float8_e5m2}.get(name)


def _file_kind(path: str) -> str:
  """'safetensors', 'npz' or 'torch', from the suffix or the first bytes."""
  low = path.lower()
  if low.endswith(SAFETENSORS_SUFFIXES):
    return "safetensors"
  if low.endswith(".npz"):
    return "npz"
  if low.endswith(TORCH_SUFFIXES):
    return "torch"
  with open(path, "rb") as f:
    head = f.read(9)
  if head[:2] == b"PK":
    return "torch"  # zip: torch.save's format (npz is zip too, but has its own suffix)
  if len(head) >= 9 and head[8:9] == b"{":
    return "safetensors"
  if head[:1] == b"\x80":
    return "torch"  # legacy pickle-based torch.save
  raise ConversionError(f"{path}: unknown weight file format (expected .safetensors, .npz, "
                        f".pth/.pt/.bin)")


def _safetensors_header(path: str) -> Tuple[dict, int]:
  """(header dict, data offset) of a safetensors file, checked against its size."""
  size = os.path.getsize(path)
  with open(path, "rb") as f:
    raw = f.read(8)
    if len(raw) < 8:
      raise ConversionError(f"{path}: truncated or corrupt safetensors file ({size} bytes, no header)")
    (n,) = struct.unpack("<Q", raw)
    if n > size - 8:
      raise ConversionError(f"{path}: truncated or corrupt safetensors file (header of {n} bytes "
                            f"announced, file has {size})")
    try:
      header = json.loads(f.read(n))
    except (ValueError, RecursionError) as e:
      raise ConversionError(f"{path}: corrupt safetensors header ({e})") from None
  _check_header(path, header)
  end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
  if 8 + n + end > size:
    raise ConversionError(f"{path}: truncated safetensors file: tensors need {8 + n + end} bytes, "
                          f"the file has {size}")
  return header, 8 + n


def _check_header(path: str, header: Any) -> None:
  """Raises ConversionError unless every entry has a dtype, an int shape and valid data_offsets."""
  if not isinstance(header, dict):
    raise ConversionError(f"{path}: corrupt safetensors header (a JSON {type(header).__name__}, "
                          "not an object)")
  for name, info in header.items():
    if name == "__metadata__":
      if info is not None and not isinstance(info, dict):
        raise ConversionError(f"{path}: corrupt safetensors header (__metadata__ is not an object)")
      continue
    if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= set(info):
      got = sorted(info) if isinstance(info, dict) else type(info).__name__
      raise ConversionError(f"{path}: corrupt safetensors header: tensor {name!r} needs dtype, "
                            f"shape and data_offsets, has {got}")
    offs, shape = info["data_offsets"], info["shape"]
    if (not isinstance(offs, list) or len(offs) != 2 or not all(isinstance(o, int) for o in offs)
        or not 0 <= offs[0] <= offs[1]):
      raise ConversionError(f"{path}: corrupt safetensors header: tensor {name!r} has "
                            f"data_offsets {offs!r}")
    if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
      raise ConversionError(f"{path}: corrupt safetensors header: tensor {name!r} has shape "
                            f"{shape!r}")


@guard.loader("safetensors file")
def read_safetensors(path: str) -> Dict[str, np.ndarray]:
  """All tensors of a .safetensors file as numpy arrays (bf16/fp8 as ml_dtypes arrays)."""
  header, data_start = _safetensors_header(path)
  tensors = {k: v for k, v in header.items() if k != "__metadata__"}
  if all(v["dtype"] in _ST_DTYPES for v in tensors.values()):
    from safetensors import SafetensorError
    from safetensors.numpy import load_file
    try:
      return dict(load_file(path))
    except (SafetensorError, ValueError, OSError) as e:
      raise ConversionError(f"{path}: truncated or corrupt safetensors file ({e})") from None
  out = {}
  with open(path, "rb") as f:
    for name, info in tensors.items():
      dt = _ST_DTYPES.get(info["dtype"]) or _ml_dtype(info["dtype"])
      if dt is None:
        raise ConversionError(f"{path}: tensor {name} has unsupported dtype {info['dtype']}")
      start, stop = info["data_offsets"]
      f.seek(data_start + start)
      buf = f.read(stop - start)
      out[name] = np.frombuffer(buf, dtype=dt).reshape(info["shape"]).copy()
  return out


@guard.loader("safetensors file")
def safetensors_metadata(path: str) -> Dict[str, str]:
  """The string metadata of a safetensors file."""
  header, _ = _safetensors_header(path)
  return dict(header.get("__metadata__") or {})


def _is_wellformed_pickle(path: str) -> bool:
  """True if the file's (or, for torch's zip format, its data.pkl's) first pickle parses fully.

  Parsing walks the opcodes only (`pickletools.genops`), nothing is executed. It tells a real
  pickle that the weights-only unpickler refuses from random or damaged bytes.
  """
  import pickletools
  import zipfile
  try:
    if zipfile.is_zipfile(path):
      with zipfile.ZipFile(path) as z:
        names = [n for n in z.namelist() if n.endswith("data.pkl")]
        data = z.read(names[0]) if names else b""
    else:
      with open(path, "rb") as f:
        data = f.read(1 << 26)
    for op, _, _ in pickletools.genops(data):
      if op.name == "STOP":
        return True
  except Exception:  # pylint: disable=broad-except  # any parse failure: not a pickle
    return False
  return False


def load_torch(path: str) -> Any:
  """`torch.load(path, map_location='cpu', weights_only=True)`, with clear refusals and errors."""
  try:
    import torch
  except ImportError:
    raise ConversionError(f"{path}: reading a PyTorch pickle file needs torch (not installed); "
                          "convert it to .safetensors first") from None
  import pickle
  import warnings
  size = os.path.getsize(path)
  if size == 0:
    raise ConversionError(f"{path}: empty file (truncated or corrupt)")
  try:
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")
      return torch.load(path, map_location="cpu", weights_only=True)
  except pickle.UnpicklingError as e:
    msg = str(e)
    reason = ""
    for line in msg.splitlines():
      if "GLOBAL" in line or "Unsupported" in line or "WeightsUnpickler error" in line:
        reason = line.strip()
        if "GLOBAL" in line:
          break
    if "truncated" in msg.lower() or "EOF" in msg or not (
        "GLOBAL" in reason or _is_wellformed_pickle(path)):
      # Random bytes also fail the weights-only unpickler ('Unsupported operand'): not a refusal.
      raise ConversionError(f"{path}: truncated or corrupt PyTorch file ({reason or msg[:200]})") from None
    raise ConversionError(
        f"refusing to load {path}: it contains pickled Python objects that "
        f"torch.load(weights_only=True) will not execute ({reason or 'unsupported pickle content'}). "
        "Only tensors and plain containers are accepted; this loader never unpickles arbitrary "
        "code. Re-save the tensors (e.g. as .safetensors) in an environment you trust.") from None
  except UserError:
    raise
  except Exception as e:  # pylint: disable=broad-except  # random bytes raise IndexError, KeyError...
    raise ConversionError(f"{path}: truncated or corrupt PyTorch file ({guard.why(e)})") from None


def to_numpy(obj: Any) -> Any:
  """Recursively turn torch tensors into numpy arrays (bfloat16 -> float32, exact)."""
  # Torch tensors exist only if something imported torch; never import it here.
  torch = sys.modules.get("torch")
  if torch is not None and isinstance(obj, torch.Tensor):
    t = obj.detach().cpu()
    if t.dtype in (torch.bfloat16,) or "float8" in str(t.dtype):
      t = t.float()
    return t.numpy()
  if isinstance(obj, Mapping):
    return {k: to_numpy(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return type(obj)(to_numpy(v) for v in obj)
  return obj


def _require_flat(path: str, obj: Any) -> Dict[str, np.ndarray]:
  """The object as a flat {str: ndarray} state dict, or a ConversionError."""
  if not isinstance(obj, Mapping) or not all(isinstance(k, str) for k in obj):
    raise ConversionError(f"{path}: expected a flat state dict of tensors, got {type(obj).__name__}")
  bad = [k for k, v in obj.items() if not isinstance(v, np.ndarray)]
  if bad:
    raise ConversionError(f"{path}: expected a flat state dict of tensors; these entries are not "
                          f"tensors: {bad[:20]}" + (" (top-level keys of a training checkpoint? "
                          "use the UAE importer)" if set(bad) & {"model", "ema", "state_dict"} else ""))
  return dict(obj)


@guard.loader("weight file")
def read_checkpoint(path: str) -> Any:
  """Read any supported weight file; torch objects are converted to numpy recursively."""
  if not os.path.exists(path):
    raise ConversionError(f"{path}: no such file or directory")
  kind = _file_kind(path)
  if kind == "safetensors":
    return read_safetensors(path)
  if kind == "npz":
    try:
      with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}
    except guard.DATA_ERRORS as e:
      raise ConversionError(f"{path}: truncated or corrupt .npz file ({guard.why(e)})") from None
  return to_numpy(load_torch(path))


def _read_json_file(path: str, what: str) -> Any:
  """A JSON file's content, or ConversionError naming it."""
  with guard.reading(path, what):
    with open(path) as f:
      return json.load(f)


def _read_hf_dir(path: str) -> Tuple[Dict[str, np.ndarray], Optional[dict]]:
  """A flat state dict and the config.json of a Hugging Face model directory."""
  cfg = os.path.join(path, "config.json")
  config = _read_json_file(cfg, "config.json") if os.path.exists(cfg) else None
  if config is not None and not isinstance(config, dict):
    raise ConversionError(f"{cfg}: expected a JSON object, got {type(config).__name__}")
  index = os.path.join(path, "model.safetensors.index.json")
  if os.path.exists(os.path.join(path, "model.safetensors")):
    return read_safetensors(os.path.join(path, "model.safetensors")), config
  if os.path.exists(index):
    weight_map = _read_json_file(index, "safetensors index")
    weight_map = weight_map.get("weight_map") if isinstance(weight_map, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
      raise ConversionError(f"{index}: malformed safetensors index (no 'weight_map' of file names)")
    sd = {}
    for s in sorted(set(weight_map.values())):
      sd.update(read_safetensors(os.path.join(path, s)))
    return sd, config
  if os.path.exists(os.path.join(path, "pytorch_model.bin")):
    return _require_flat(path, to_numpy(load_torch(os.path.join(path, "pytorch_model.bin")))), config
  raise ConversionError(f"{path}: directory without model.safetensors, a safetensors index or "
                        "pytorch_model.bin")


def read_state_dict(path: str) -> Tuple[Dict[str, np.ndarray], Optional[dict]]:
  """A flat state dict from a file or an HF model directory, plus its `config.json` (or None)."""
  if not os.path.exists(path):
    raise ConversionError(f"{path}: no such file or directory")
  if os.path.isdir(path):
    return _read_hf_dir(path)
  config = None
  cfg = os.path.join(os.path.dirname(os.path.abspath(path)), "config.json")
  if os.path.exists(cfg) and path.lower().endswith(SAFETENSORS_SUFFIXES + (".bin",)):
    try:
      config = _read_json_file(cfg, "config.json")
    except ConversionError:
      config = None  # a stray config.json beside a single file is only a hint
    config = config if isinstance(config, dict) else None
  return _require_flat(path, read_checkpoint(path)), config


def write_safetensors(state_dict: Mapping[str, np.ndarray], path: str,
                      metadata: Optional[Mapping[str, str]] = None) -> None:
  """Write a numpy state dict (contiguous) with string metadata; atomically (temp + rename)."""
  from safetensors.numpy import save_file
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = f"{path}.tmp-{os.getpid()}"
  try:
    save_file({k: np.ascontiguousarray(v) for k, v in state_dict.items()}, tmp,
              metadata={k: str(v) for k, v in (metadata or {}).items()})
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def sha256(path: str, chunk: int = 1 << 22) -> str:
  """Hex SHA-256 of a file, read in chunks."""
  import hashlib
  h = hashlib.sha256()
  with open(path, "rb") as f:
    while True:
      b = f.read(chunk)
      if not b:
        break
      h.update(b)
  return h.hexdigest()
