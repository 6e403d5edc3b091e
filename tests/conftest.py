"""Test set-up: 8 fake CPU devices, parsed absl flags, shared fixtures."""
import os

# Must happen before anything imports jax.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# Many tests compile the same tiny programs from fresh closures; XLA's persistent cache keyed by
# the HLO turns those repeats into cache hits. A fresh directory per run keeps CI honest, and the
# environment variable reaches the tests' subprocesses (resume, multi-host) too.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  import atexit
  import shutil
  import tempfile
  os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="uae_jax_test_xla_cache_")
  # Only the process that made it (pytest itself, not its xdist workers) removes it at exit.
  atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")

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


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist reads the marks (it runs the hook too)
def pytest_collection_modifyitems(config, items):
  """Tests sharing a module fixture run on one xdist worker; `heavy` tests are handed out first.

  A module fixture is often a trained tiny run or a compiled network; under `--dist loadgroup`
  the group keeps it from being built once per worker.
  """
  del config
  for item in items:
    defs = getattr(item, "_fixtureinfo", None)
    defs = defs.name2fixturedefs if defs is not None else {}
    if any(d[-1].scope == "module" for d in defs.values()):
      item.add_marker(pytest.mark.xdist_group(item.module.__name__))
  # xdist hands out groups first (largest first), then single tests in collection order; a long
  # single test collected last would run alone at the end while the other worker idles.
  items.sort(key=lambda item: item.get_closest_marker("heavy") is None)
