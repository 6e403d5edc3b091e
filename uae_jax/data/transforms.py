"""Image decoding and the train / eval pixel transforms (PIL based, numpy out).

Both transforms reproduce the official UAE PyTorch pipeline on PIL images:

* train: torchvision ``Resize(int(1.5 * size), BICUBIC)`` on the shorter side (PIL resampling, so it is
  antialiased), then ``RandomCrop(size)``, no flip, ``ToTensor()`` (uint8 / 255);
* eval: guided-diffusion (ADM) ``center_crop_arr(img, size)``, then uint8 / 255.

Outputs are float32 HWC arrays in [0, 1]. Randomness comes only from the ``np.random.Generator`` that the
caller passes in (Grain's ``random_map`` hands one per element), so crops are reproducible.
"""
from __future__ import annotations

import io
from typing import Union

import numpy as np
from PIL import Image

ImageLike = Union[bytes, bytearray, memoryview, np.ndarray, Image.Image]

# Decompression-bomb guard: ImageNet's largest image is ~10k x 10k; refuse anything absurdly larger
# rather than letting one record take the host's memory.
Image.MAX_IMAGE_PIXELS = 200_000_000


def decode_image(data: ImageLike) -> Image.Image:
  """Decodes encoded bytes or a uint8 array into a fully loaded RGB PIL image."""
  if isinstance(data, Image.Image):
    img = data
  elif isinstance(data, np.ndarray):
    # TFDS `Image` features arrive already decoded as uint8 (H, W, C); C may be 1 for grey images.
    arr = data
    if arr.dtype != np.uint8:
      raise ValueError(f'expected a uint8 image array, got {arr.dtype}')
    if arr.ndim == 3 and arr.shape[-1] == 1:
      arr = arr[..., 0]
    img = Image.fromarray(arr)
  else:
    img = Image.open(io.BytesIO(bytes(data)))
    # Force the full decode here so truncated files fail now, inside the caller's error handling.
    img.load()
  # Same as torchvision's default ImageFolder loader: grey, palette, CMYK and RGBA all become RGB.
  if img.mode != 'RGB':
    img = img.convert('RGB')
  return img


def to_float(arr: np.ndarray) -> np.ndarray:
  """Converts a uint8 HWC array to float32 in [0, 1] exactly like torchvision ``ToTensor``."""
  return arr.astype(np.float32) / np.float32(255.0)


def resize_shorter_side(img: Image.Image, short: int,
                        resample: int = Image.BICUBIC) -> Image.Image:
  """Resizes so the shorter side equals `short`, with torchvision ``Resize(int)`` rounding."""
  w, h = img.size
  # torchvision `_compute_resized_output_size`: the long side is truncated with int(), not rounded.
  if w <= h:
    new_w, new_h = short, int(short * h / w)
  else:
    new_w, new_h = int(short * w / h), short
  if (new_w, new_h) == (w, h):
    return img
  return img.resize((new_w, new_h), resample=resample)


def train_resize_size(size: int) -> int:
  """The shorter-side size of the train resize: ``int(1.5 * size)`` as in the official code."""
  # The official script uses int(1.5 * image_size); for even sizes (256 -> 384) this equals round().
  return int(1.5 * size)


def random_crop(arr: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
  """Crops a random `size` x `size` window (torchvision ``RandomCrop`` offsets) from an HWC array."""
  h, w = arr.shape[:2]
  if h < size or w < size:
    raise ValueError(f'image {h}x{w} is smaller than the crop {size}')
  top = int(rng.integers(0, h - size + 1))
  left = int(rng.integers(0, w - size + 1))
  return arr[top:top + size, left:left + size]


def train_transform_uint8(img: Image.Image, size: int, rng: np.random.Generator) -> np.ndarray:
  """Train transform before the float conversion: uint8 (size, size, 3)."""
  img = resize_shorter_side(img, train_resize_size(size), Image.BICUBIC)
  return random_crop(np.asarray(img), size, rng)


def train_transform(img: Image.Image, size: int, rng: np.random.Generator) -> np.ndarray:
  """Train transform: shorter side to int(1.5 * size) (bicubic), random crop, float32 in [0, 1]."""
  return to_float(train_transform_uint8(img, size, rng))


def center_crop_arr(img: Image.Image, size: int) -> np.ndarray:
  """ADM centre crop (guided-diffusion ``center_crop_arr``): uint8 (size, size, 3)."""
  # Halve with a box filter while the image is at least twice the target, as ADM does by hand
  # (it predates PIL's `reducing_gap`), then one bicubic resize so the shorter side is `size`.
  while min(*img.size) >= 2 * size:
    img = img.resize(tuple(x // 2 for x in img.size), resample=Image.BOX)
  scale = size / min(*img.size)
  img = img.resize(tuple(round(x * scale) for x in img.size), resample=Image.BICUBIC)
  arr = np.asarray(img)
  top = (arr.shape[0] - size) // 2
  left = (arr.shape[1] - size) // 2
  return arr[top:top + size, left:left + size]


def eval_transform(img: Image.Image, size: int) -> np.ndarray:
  """Eval transform: ADM centre crop to `size`, float32 in [0, 1]."""
  return to_float(center_crop_arr(img, size))
