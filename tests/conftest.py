"""Test set-up: 8 fake CPU devices, parsed absl flags, shared fixtures."""
import os

# Must happen before anything imports jax.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from absl import flags  # noqa: E402

# Grain's mp_prefetch reads absl flags; under pytest nobody parses them (grain #1355).
if not flags.FLAGS.is_parsed():
  flags.FLAGS.mark_as_parsed()

import numpy as np  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture(scope="session")
def photos():
  """Real colour photographs shipped in scikit-image / scikit-learn, uint8 HWC."""
  import skimage.data
  from sklearn.datasets import load_sample_images
  out = {name: getattr(skimage.data, name)() for name in ("astronaut", "chelsea", "coffee", "rocket")}
  china, flower = load_sample_images().images
  out["china"], out["flower"] = china, flower
  return out


@pytest.fixture(scope="session")
def photo_batch(photos):
  """Four real photos centre-cropped and resized to 256x256, float32 in [0, 1], (4, 256, 256, 3)."""
  from PIL import Image
  imgs = []
  for name in ("astronaut", "chelsea", "coffee", "rocket"):
    im = Image.fromarray(photos[name])
    s = min(im.size)
    left, top = (im.size[0] - s) // 2, (im.size[1] - s) // 2
    im = im.crop((left, top, left + s, top + s)).resize((256, 256), Image.BICUBIC)
    imgs.append(np.asarray(im, np.float32) / 255.0)
  return np.stack(imgs)
