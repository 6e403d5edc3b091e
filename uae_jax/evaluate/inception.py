"""Inception-v3, FID variant, in Flax Linen: pytorch-fid's `InceptionV3` with the TF-FID weights.

The network is pytorch-fid 0.3.0's `InceptionV3([3], resize_input=True, normalize_input=True,
use_fid_inception=True)`: torchvision's Inception3 trunk up to `Mixed_7c` with the FID patches
(`FIDInceptionA/C`: average pools that exclude the zero padding, as TensorFlow's do;
`FIDInceptionE_1`: the same; `FIDInceptionE_2`: a 3x3 *max* pool in the pool branch), then a global
average pool to the 2048-d "pool_3" features that FID uses. BatchNorm runs on its stored statistics
(eps 1e-3).

Input: NHWC uint8 images (0..255) or float images in [0, 1], any size. Two preprocessing
protocols (`FIDInception(preprocessing=...)`), stated exactly:
* 'pytorch-fid' (default; pytorch-fid 0.3.0): x in [0, 1] is resized to 299 x 299 with
  `F.interpolate(x, size=(299, 299), mode='bilinear', align_corners=False)` (no antialias; built
  here as fixed per-axis matrices that reproduce PyTorch's float32 source positions and weights),
  then mapped to [-1, 1] by `2x - 1`.
* 'tf1' (the TF graph `classify_image_graph_def.pb` that OpenAI's ADM evaluator runs, and
  torch-fidelity's `inception-v3-compat`, the official UAE rFID): pixel values x in [0, 255] are
  resized with TF1's legacy `ResizeBilinear` (align_corners=False, half_pixel_centers=False: source
  position = dst * in / out, no half-pixel offset), then mapped by `(x - 128) / 128`.
On 299 x 299 inputs both resizes are the identity; on 256 x 256 samples they differ.

Outputs used by the generation suite (`return_blocks=True`): 'pool' (B, 2048) = TF `pool_3`;
'spatial' (B, 17, 17, 7) = TF `mixed_6/conv` (the 1x1 branch of Mixed_6d = TF `mixed_6`, whose
output channels come first in the block's concat) sliced to its first 7 channels as ADM does for
sFID; and, with `with_logits=True`, 'logits' (B, 1008) = pool @ fc.weight^T *without* the bias,
as ADM (`softmax/logits/MatMul`) and torch-fidelity (`logits_unbiased`) compute it for the
Inception Score.

Weights: the TF-FID weights as ported by pytorch-fid, `pt_inception-2015-12-05-6726825d.pth`
(Inception3 key names, e.g. `Mixed_5b.branch5x5_1.conv.weight`,
`Mixed_5b.branch5x5_1.bn.running_var`, plus the unused 1008-way `fc`). A state dict of pytorch-fid's
wrapper (`blocks.0.0.conv.weight`, ...) is accepted too. Files are read with
`torch.load(weights_only=True)` or safetensors/npz (`uae_jax.convert.torch_io`) and mapped by the
explicit table `fid_inception_table(with_logits)`: every model variable needs exactly one key; any
unmapped, unused or mis-shaped key raises one `ConversionError` listing all of them. `fc.weight`
(1008 x 2048) becomes the logits head `params/fc/kernel` when present (the full Inception3 state
dict; pytorch-fid's wrapper layout has no classifier, so such weights give no IS). The only keys
read and dropped on purpose are `fc.bias` (unused by ADM and torch-fidelity) and each BatchNorm's
`num_batches_tracked` (listed by name in `ignored_torch_keys()`). The ADM evaluator, torch-fidelity
and pytorch-fid all use the same 2015-12-05 TF weights (the `.pth` files of pytorch-fid and
torch-fidelity carry the same sha256 prefix 6726825d), so one file serves every protocol.

Variables of `FIDInception`: {'params': {block: {conv: {conv: {kernel}, bn: {scale, bias}}}},
'batch_stats': {... bn: {mean, var}}}, with block/conv names equal to the PyTorch module names.
No Inception weights ship with any package, so rFID needs the weight file (`--inception PATH`);
tests use seeded random weights (tests/golden/make_inception_golden.py).
"""
from __future__ import annotations

import functools
import hashlib
import os
from typing import Any, Mapping, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from uae_jax.convert import guard
from uae_jax.convert import tables
from uae_jax.convert import torch_io
from uae_jax.convert.tables import ConversionError, Row, Table

FID_INPUT_SIZE = 299
FEATURE_DIM = 2048
NUM_LOGITS = 1008          # the TF graph's classifier: 1000 ImageNet classes + 8 unused
SPATIAL_CHANNELS = 7       # ADM keeps mixed_6/conv[..., :7] for sFID
SPATIAL_DIM = 17 * 17 * SPATIAL_CHANNELS  # 2023
PREPROCESSING = ("pytorch-fid", "tf1")
BN_EPS = 1e-3
WEIGHTS_FILENAME = "pt_inception-2015-12-05-6726825d.pth"
_HIGHEST = jax.lax.Precision.HIGHEST

# ------------------------------------------------------------------------------------------------
# Architecture description, shared by the module and the key table (torch module names).
# Each conv: (name, out_channels, kernel (kh, kw), stride, padding (ph, pw)).

_STEM = (
    ("Conv2d_1a_3x3", 32, (3, 3), 2, (0, 0)),
    ("Conv2d_2a_3x3", 32, (3, 3), 1, (0, 0)),
    ("Conv2d_2b_3x3", 64, (3, 3), 1, (1, 1)),
    # maxpool1 (3, stride 2)
    ("Conv2d_3b_1x1", 80, (1, 1), 1, (0, 0)),
    ("Conv2d_4a_3x3", 192, (3, 3), 1, (0, 0)),
    # maxpool2 (3, stride 2)
)


def _block_a(pool_features: int):
  """InceptionA convs (torchvision names)."""
  return (("branch1x1", 64, (1, 1), 1, (0, 0)),
          ("branch5x5_1", 48, (1, 1), 1, (0, 0)),
          ("branch5x5_2", 64, (5, 5), 1, (2, 2)),
          ("branch3x3dbl_1", 64, (1, 1), 1, (0, 0)),
          ("branch3x3dbl_2", 96, (3, 3), 1, (1, 1)),
          ("branch3x3dbl_3", 96, (3, 3), 1, (1, 1)),
          ("branch_pool", pool_features, (1, 1), 1, (0, 0)))


def _block_b():
  """InceptionB convs."""
  return (("branch3x3", 384, (3, 3), 2, (0, 0)),
          ("branch3x3dbl_1", 64, (1, 1), 1, (0, 0)),
          ("branch3x3dbl_2", 96, (3, 3), 1, (1, 1)),
          ("branch3x3dbl_3", 96, (3, 3), 2, (0, 0)))


def _block_c(c7: int):
  """InceptionC convs."""
  return (("branch1x1", 192, (1, 1), 1, (0, 0)),
          ("branch7x7_1", c7, (1, 1), 1, (0, 0)),
          ("branch7x7_2", c7, (1, 7), 1, (0, 3)),
          ("branch7x7_3", 192, (7, 1), 1, (3, 0)),
          ("branch7x7dbl_1", c7, (1, 1), 1, (0, 0)),
          ("branch7x7dbl_2", c7, (7, 1), 1, (3, 0)),
          ("branch7x7dbl_3", c7, (1, 7), 1, (0, 3)),
          ("branch7x7dbl_4", c7, (7, 1), 1, (3, 0)),
          ("branch7x7dbl_5", 192, (1, 7), 1, (0, 3)),
          ("branch_pool", 192, (1, 1), 1, (0, 0)))


def _block_d():
  """InceptionD convs."""
  return (("branch3x3_1", 192, (1, 1), 1, (0, 0)),
          ("branch3x3_2", 320, (3, 3), 2, (0, 0)),
          ("branch7x7x3_1", 192, (1, 1), 1, (0, 0)),
          ("branch7x7x3_2", 192, (1, 7), 1, (0, 3)),
          ("branch7x7x3_3", 192, (7, 1), 1, (3, 0)),
          ("branch7x7x3_4", 192, (3, 3), 2, (0, 0)))


def _block_e():
  """InceptionE convs (both FID variants)."""
  return (("branch1x1", 320, (1, 1), 1, (0, 0)),
          ("branch3x3_1", 384, (1, 1), 1, (0, 0)),
          ("branch3x3_2a", 384, (1, 3), 1, (0, 1)),
          ("branch3x3_2b", 384, (3, 1), 1, (1, 0)),
          ("branch3x3dbl_1", 448, (1, 1), 1, (0, 0)),
          ("branch3x3dbl_2", 384, (3, 3), 1, (1, 1)),
          ("branch3x3dbl_3a", 384, (1, 3), 1, (0, 1)),
          ("branch3x3dbl_3b", 384, (3, 1), 1, (1, 0)),
          ("branch_pool", 192, (1, 1), 1, (0, 0)))


# (module name, block kind, convs) in forward order; kinds A, B, C, D, E1 (avg pool), E2 (max pool).
MIXED = (
    ("Mixed_5b", "A", _block_a(32)),
    ("Mixed_5c", "A", _block_a(64)),
    ("Mixed_5d", "A", _block_a(64)),
    ("Mixed_6a", "B", _block_b()),
    ("Mixed_6b", "C", _block_c(128)),
    ("Mixed_6c", "C", _block_c(160)),
    ("Mixed_6d", "C", _block_c(160)),
    ("Mixed_6e", "C", _block_c(192)),
    ("Mixed_7a", "D", _block_d()),
    ("Mixed_7b", "E1", _block_e()),
    ("Mixed_7c", "E2", _block_e()),
)

# pytorch-fid's wrapper nests the same modules as blocks.<i>.<j>; its maxpools have no parameters.
_WRAPPER_PREFIXES = {
    "blocks.0.0.": "Conv2d_1a_3x3.", "blocks.0.1.": "Conv2d_2a_3x3.",
    "blocks.0.2.": "Conv2d_2b_3x3.",
    "blocks.1.0.": "Conv2d_3b_1x1.", "blocks.1.1.": "Conv2d_4a_3x3.",
    **{f"blocks.2.{j}.": f"{name}." for j, (name, _, _) in enumerate(MIXED[:8])},
    **{f"blocks.3.{j}.": f"{name}." for j, (name, _, _) in enumerate(MIXED[8:])},
}


# ------------------------------------------------------------------------------------------------
# Resize: PyTorch's bilinear (align_corners=False, no antialias) as fixed matrices.


@functools.lru_cache(maxsize=32)
def torch_bilinear_matrix(in_size: int, out_size: int) -> np.ndarray:
  """(out, in) matrix of `F.interpolate(mode='bilinear', align_corners=False)` along one axis."""
  # PyTorch computes the scale, source positions and weights in float32 (its opmath type for
  # float inputs), clamps negative positions to 0 and repeats the last pixel at the far edge.
  f32 = np.float32
  scale = f32(in_size) / f32(out_size)
  src = scale * (np.arange(out_size, dtype=f32) + f32(0.5)) - f32(0.5)
  src = np.maximum(src, f32(0.0))
  i0 = np.minimum(src.astype(np.int64), in_size - 1)
  i1 = np.minimum(i0 + 1, in_size - 1)
  lam1 = np.clip(src - i0.astype(f32), f32(0.0), f32(1.0))
  lam0 = f32(1.0) - lam1
  m = np.zeros((out_size, in_size), np.float64)
  rows = np.arange(out_size)
  np.add.at(m, (rows, i0), lam0)
  np.add.at(m, (rows, i1), lam1)
  return m


@functools.lru_cache(maxsize=32)
def tf1_bilinear_matrix(in_size: int, out_size: int) -> np.ndarray:
  """(out, in) matrix of TF1 `ResizeBilinear` (align_corners=False, legacy, no half-pixel)."""
  # TensorFlow's compute_interpolation_weights with the legacy scaler, in float32:
  # in = out_index * (in_size / out_size); lower = floor(in); upper = min(ceil(in), in_size - 1).
  f32 = np.float32
  scale = f32(in_size) / f32(out_size)
  src = np.arange(out_size, dtype=f32) * scale
  floor = np.floor(src)
  lower = np.maximum(floor.astype(np.int64), 0)
  upper = np.minimum(np.ceil(src).astype(np.int64), in_size - 1)
  lerp = (src - floor).astype(f32)
  m = np.zeros((out_size, in_size), np.float64)
  rows = np.arange(out_size)
  np.add.at(m, (rows, lower), f32(1.0) - lerp)
  np.add.at(m, (rows, upper), lerp)
  return m


_RESIZE_MATRICES = {"pytorch-fid": torch_bilinear_matrix, "tf1": tf1_bilinear_matrix}


def _resize_separable(images: jax.Array, size: int, matrix_fn) -> jax.Array:
  """(B,H,W,C) -> (B,size,size,C) with per-axis resampling matrices (identity at equal size)."""
  _, h, w, _ = images.shape
  images = jnp.asarray(images, jnp.float32)
  if (h, w) == (size, size):
    return images  # both PyTorch's interpolate and TF's ResizeBilinear are the identity here.
  my = jnp.asarray(matrix_fn(h, size), jnp.float32)
  mx = jnp.asarray(matrix_fn(w, size), jnp.float32)
  x = jnp.einsum("oh,bhwc->bowc", my, images, precision=_HIGHEST)
  return jnp.einsum("pw,bowc->bopc", mx, x, precision=_HIGHEST)


def resize_bilinear_torch(images: jax.Array, size: int = FID_INPUT_SIZE) -> jax.Array:
  """(B,H,W,C) -> (B,size,size,C) exactly as PyTorch's bilinear resize with align_corners=False."""
  return _resize_separable(images, size, torch_bilinear_matrix)


def resize_bilinear_tf1(images: jax.Array, size: int = FID_INPUT_SIZE) -> jax.Array:
  """(B,H,W,C) -> (B,size,size,C) as TF1's legacy `ResizeBilinear` (the ADM/TF FID graph)."""
  return _resize_separable(images, size, tf1_bilinear_matrix)


def check_preprocessing(name: str) -> str:
  """Returns `name` if it is a known preprocessing protocol, else raises ValueError."""
  if name not in PREPROCESSING:
    raise ValueError(f"unknown Inception preprocessing {name!r}; expected one of {PREPROCESSING}")
  return name


def preprocess(images: jax.Array, preprocessing: str = "pytorch-fid",
               resize: bool = True) -> jax.Array:
  """uint8 (0..255) or float [0,1] NHWC -> the network input in [-1, 1] at 299 x 299.

  'pytorch-fid': x/255 -> PyTorch bilinear -> 2x - 1. 'tf1': x in 0..255 -> TF1 legacy bilinear
  -> (x - 128) / 128 (the ADM/TF graph and torch-fidelity).
  """
  check_preprocessing(preprocessing)
  x = jnp.asarray(images)
  is_uint8 = x.dtype == jnp.uint8
  x = x.astype(jnp.float32)
  if preprocessing == "tf1":
    x = x if is_uint8 else x * 255.0
    if resize:
      x = _resize_separable(x, FID_INPUT_SIZE, tf1_bilinear_matrix)
    return (x - 128.0) / 128.0
  x = x / 255.0 if is_uint8 else x
  if resize:
    x = _resize_separable(x, FID_INPUT_SIZE, torch_bilinear_matrix)
  return 2.0 * x - 1.0


# ------------------------------------------------------------------------------------------------
# The network.


class BasicConv2d(nn.Module):
  """torchvision BasicConv2d: bias-free conv, BatchNorm (eps 1e-3, stored statistics), ReLU."""
  features: int
  kernel_size: tuple
  stride: int = 1
  padding: tuple = (0, 0)
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    """NHWC in, NHWC out."""
    ph, pw = self.padding
    x = nn.Conv(self.features, self.kernel_size, strides=(self.stride, self.stride),
                padding=((ph, ph), (pw, pw)), use_bias=False, dtype=self.dtype,
                param_dtype=jnp.float32, precision=_HIGHEST, name="conv")(x)
    x = nn.BatchNorm(use_running_average=True, epsilon=BN_EPS, dtype=jnp.float32,
                     name="bn")(x.astype(jnp.float32))
    return nn.relu(x)


def _avg_pool_tf(x):
  """3x3 stride-1 average pool that ignores the zero padding (TF semantics; FID patch)."""
  return nn.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)), count_include_pad=False)


def _max_pool_3s2(x):
  """3x3 stride-2 max pool without padding (torch MaxPool2d(3, 2))."""
  return nn.max_pool(x, (3, 3), strides=(2, 2), padding="VALID")


class MixedBlock(nn.Module):
  """One FID Inception block (kind A, B, C, D, E1 or E2); branch order as in PyTorch's concat."""
  kind: str
  convs: tuple
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    """NHWC in, NHWC out (channels concatenated in PyTorch's order)."""
    c = {name: BasicConv2d(f, k, s, p, self.dtype, name=name) for name, f, k, s, p in self.convs}
    if self.kind == "A":
      b1 = c["branch1x1"](x)
      b5 = c["branch5x5_2"](c["branch5x5_1"](x))
      b3 = c["branch3x3dbl_3"](c["branch3x3dbl_2"](c["branch3x3dbl_1"](x)))
      bp = c["branch_pool"](_avg_pool_tf(x))
      return jnp.concatenate([b1, b5, b3, bp], axis=-1)
    if self.kind == "B":
      b3 = c["branch3x3"](x)
      bd = c["branch3x3dbl_3"](c["branch3x3dbl_2"](c["branch3x3dbl_1"](x)))
      return jnp.concatenate([b3, bd, _max_pool_3s2(x)], axis=-1)
    if self.kind == "C":
      b1 = c["branch1x1"](x)
      b7 = c["branch7x7_3"](c["branch7x7_2"](c["branch7x7_1"](x)))
      bd = x
      for i in range(1, 6):
        bd = c[f"branch7x7dbl_{i}"](bd)
      bp = c["branch_pool"](_avg_pool_tf(x))
      return jnp.concatenate([b1, b7, bd, bp], axis=-1)
    if self.kind == "D":
      b3 = c["branch3x3_2"](c["branch3x3_1"](x))
      b7 = x
      for i in range(1, 5):
        b7 = c[f"branch7x7x3_{i}"](b7)
      return jnp.concatenate([b3, b7, _max_pool_3s2(x)], axis=-1)
    if self.kind in ("E1", "E2"):
      b1 = c["branch1x1"](x)
      t = c["branch3x3_1"](x)
      b3 = jnp.concatenate([c["branch3x3_2a"](t), c["branch3x3_2b"](t)], axis=-1)
      t = c["branch3x3dbl_2"](c["branch3x3dbl_1"](x))
      bd = jnp.concatenate([c["branch3x3dbl_3a"](t), c["branch3x3dbl_3b"](t)], axis=-1)
      if self.kind == "E1":
        pooled = _avg_pool_tf(x)
      else:
        # FIDInceptionE_2 uses max pooling here (the TF graph does); padding counts as -inf.
        pooled = nn.max_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)))
      bp = c["branch_pool"](pooled)
      return jnp.concatenate([b1, b3, bd, bp], axis=-1)
    raise ValueError(f"unknown block kind {self.kind!r}")


class FIDInception(nn.Module):
  """FID Inception-v3 (TF-FID weights): NHWC images -> (B, 2048) pool features.

  Images are uint8 (0..255) or float in [0, 1]. `preprocessing` is 'pytorch-fid' or 'tf1' (see
  the module docstring); `resize_input` / `normalize_input` as in pytorch-fid (both on by default;
  with `normalize_input=False` the input must already be in the network's [-1, 1] range).
  `with_logits` adds the 1008-way classifier `fc` (no bias). With `return_blocks=True` it returns a
  dict with the pytorch-fid output blocks ('block0' (B,73,73,64) ... 'pool' (B,2048)), every
  Mixed_* output, 'spatial' (B,17,17,7) (ADM's sFID tap) and 'logits' (B,1008) if `with_logits`.
  """
  resize_input: bool = True
  normalize_input: bool = True
  dtype: Any = jnp.float32
  preprocessing: str = "pytorch-fid"
  with_logits: bool = False

  @nn.compact
  def __call__(self, images, return_blocks: bool = False):
    """Pool features (B, 2048), or all intermediate outputs when `return_blocks`."""
    if self.normalize_input:
      x = preprocess(images, self.preprocessing, resize=self.resize_input)
    else:
      x = jnp.asarray(images, jnp.float32)
      x = _resize_separable(x, FID_INPUT_SIZE, _RESIZE_MATRICES[self.preprocessing]) \
          if self.resize_input else x
    out = {}
    for i, (name, f, k, s, p) in enumerate(_STEM):
      x = BasicConv2d(f, k, s, p, self.dtype, name=name)(x)
      if name in ("Conv2d_2b_3x3", "Conv2d_4a_3x3"):
        x = _max_pool_3s2(x)
        out["block0" if name == "Conv2d_2b_3x3" else "block1"] = x
    for name, kind, convs in MIXED:
      x = MixedBlock(kind, convs, self.dtype, name=name)(x)
      out[name] = x
    out["block2"] = out["Mixed_6e"]
    # TF mixed_6/conv = Mixed_6d.branch1x1, the first 192 channels of the Mixed_6d concat.
    out["spatial"] = out["Mixed_6d"][..., :SPATIAL_CHANNELS]
    pool = jnp.mean(x.astype(jnp.float32), axis=(1, 2))  # AdaptiveAvgPool2d(1) + flatten
    out["pool"] = pool
    if self.with_logits:
      # ADM and torch-fidelity take only the MatMul of softmax/logits: no bias.
      out["logits"] = nn.Dense(NUM_LOGITS, use_bias=False, dtype=jnp.float32,
                               param_dtype=jnp.float32, precision=_HIGHEST, name="fc")(pool)
    return out if return_blocks else pool


# ------------------------------------------------------------------------------------------------
# Weights: explicit key table.


def _basic_rows(flax_block: tuple, torch_prefix: str) -> list:
  """Rows of one BasicConv2d: conv weight, BN affine (params) and running stats (batch_stats)."""
  return [
      Row(("params",) + flax_block + ("conv", "kernel"), f"{torch_prefix}.conv.weight", "conv"),
      Row(("params",) + flax_block + ("bn", "scale"), f"{torch_prefix}.bn.weight", "identity"),
      Row(("params",) + flax_block + ("bn", "bias"), f"{torch_prefix}.bn.bias", "identity"),
      Row(("batch_stats",) + flax_block + ("bn", "mean"), f"{torch_prefix}.bn.running_mean",
          "identity"),
      Row(("batch_stats",) + flax_block + ("bn", "var"), f"{torch_prefix}.bn.running_var",
          "identity"),
  ]


def _all_convs() -> list:
  """Torch module prefixes of every BasicConv2d, in forward order."""
  names = [name for name, *_ in _STEM]
  for block, _, convs in MIXED:
    names += [f"{block}.{c[0]}" for c in convs]
  return names


def fid_inception_table(with_logits: bool = False) -> Table:
  """The explicit PyTorch (Inception3 names) <-> Flax table of the FID Inception (+ `fc`)."""
  rows = []
  for prefix in _all_convs():
    rows += _basic_rows(tuple(prefix.split(".")), prefix)
  if with_logits:
    rows.append(Row(("params", "fc", "kernel"), "fc.weight", "linear"))
  return Table("fid_inception", rows)


def ignored_torch_keys(with_logits: bool = True) -> tuple:
  """Keys read and dropped on purpose: the classifier bias (and weight unless `with_logits`),
  and the BatchNorm batch counters."""
  fc = ("fc.bias",) if with_logits else ("fc.weight", "fc.bias")
  return fc + tuple(f"{p}.bn.num_batches_tracked" for p in _all_convs())


@functools.lru_cache(maxsize=2)
def variable_shapes(with_logits: bool = False) -> dict:
  """Flat {flax path: shape} of every variable of `FIDInception` (params and batch_stats)."""
  abstract = jax.eval_shape(lambda: FIDInception(with_logits=with_logits).init(
      jax.random.key(0), jnp.zeros((1, FID_INPUT_SIZE, FID_INPUT_SIZE, 3))))
  return {k: tuple(v.shape) for k, v in tables.flatten(dict(abstract)).items()}


def torch_state_dict_shapes(with_logits: bool = False) -> dict:
  """{torch key: shape} the table expects (ignored keys excluded), in table order."""
  shapes = variable_shapes(with_logits)
  out = {}
  for row in fid_inception_table(with_logits).rows:
    s = shapes[row.flax]
    if row.transform == "conv":
      s = (s[3], s[2], s[0], s[1])
    elif row.transform == "linear":
      s = (s[1], s[0])
    out[row.torch] = s
  return out


def _rename_wrapper_keys(sd: Mapping[str, np.ndarray]) -> dict:
  """pytorch-fid wrapper names (blocks.i.j.*) -> Inception3 names; others unchanged."""
  out = {}
  for k, v in sd.items():
    for old, new in _WRAPPER_PREFIXES.items():
      if k.startswith(old):
        k = new + k[len(old):]
        break
    out[k] = v
  return out


def convert_state_dict(sd: Mapping[str, np.ndarray], context: str = "FID Inception",
                       with_logits: Optional[bool] = None) -> dict:
  """PyTorch FID-Inception state dict (numpy) -> Flax variables {'params', 'batch_stats'}.

  `with_logits`: None = map `fc.weight` to the logits head iff the state dict has it; True =
  require it; False = drop it.
  """
  sd = _rename_wrapper_keys(sd)
  if with_logits is None:
    with_logits = "fc.weight" in sd
  ignored = set(ignored_torch_keys(with_logits))
  kept = {k: v for k, v in sd.items() if k not in ignored}
  return tables.to_flax(fid_inception_table(with_logits), kept,
                        expected=variable_shapes(with_logits), context=context)


def has_logits(variables: Mapping) -> bool:
  """True if the variables carry the 1008-way classifier (`params/fc/kernel`)."""
  return "fc" in variables.get("params", {})


def export_state_dict(variables: Mapping) -> dict:
  """Flax variables -> Inception3-named PyTorch state dict (numpy), through the same table."""
  return tables.to_torch(fid_inception_table(has_logits(variables)), variables,
                         context="exporting FID Inception")


def weights_fingerprint(variables: Mapping) -> str:
  """Short sha256 of the variables' values (names, shapes and bytes), to key feature caches."""
  h = hashlib.sha256()
  for path, leaf in sorted(tables.flatten(dict(variables)).items()):
    arr = np.ascontiguousarray(np.asarray(leaf, np.float32))
    h.update("/".join(path).encode() + str(arr.shape).encode())
    h.update(arr.tobytes())
  return h.hexdigest()[:16]


def default_weights_path() -> Optional[str]:
  """$UAE_JAX_INCEPTION, else pytorch-fid's torch-hub cache file, if either exists."""
  env = os.environ.get("UAE_JAX_INCEPTION", "")
  hub = os.path.join(os.path.expanduser(os.environ.get("TORCH_HOME", "~/.cache/torch")), "hub",
                     "checkpoints", WEIGHTS_FILENAME)
  for path in (env, hub):
    if path and os.path.exists(path):
      return path
  return None


@guard.loader("Inception weights")
def load_inception(path: str, with_logits: Optional[bool] = None) -> dict:
  """Reads FID Inception weights (.pth via weights_only torch.load, .safetensors, .npz)."""
  if not os.path.exists(path):
    raise ConversionError(f"{path}: no such Inception weights file")
  sd = torch_io.read_checkpoint(path)
  if not isinstance(sd, Mapping) or not all(isinstance(v, np.ndarray) for v in sd.values()):
    raise ConversionError(f"{path}: expected a flat state dict of tensors")
  return convert_state_dict(sd, context=f"converting {path}", with_logits=with_logits)


def make_feature_fn(variables: Mapping, dtype: Any = jnp.float32,
                    preprocessing: str = "pytorch-fid"):
  """`features(images) -> (B, 2048)` closed over (device-placed) Inception variables."""
  model = FIDInception(dtype=dtype, preprocessing=check_preprocessing(preprocessing),
                       with_logits=has_logits(variables))

  def features(v, images):
    """Pool features of `images` under variables `v`."""
    return model.apply(v, images)

  return functools.partial(features, variables)


def describe_blocks() -> Sequence[str]:
  """Names of the intermediate outputs returned with `return_blocks=True`."""
  return ("block0", "block1") + tuple(n for n, _, _ in MIXED) + ("block2", "spatial", "pool")
