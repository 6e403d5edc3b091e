"""The bundled default dataset: real photographs shipped inside scikit-image and scikit-learn.

No download is needed, so the demo, the benchmarks and the tests all run on real images. The dataset is
built once (under ``$UAE_JAX_CACHE/photos/v1``, default ``~/.cache/uae_jax/photos/v1``, or a directory
you pass) by writing an ImageFolder tree and running the same `prepare.prepare_split` as real datasets.

Contents (10 classes; the label is the photo's name, classes sorted alphabetically):

=====================  ==============================  =========  ============================
class                  file                            size (WxH)  source
=====================  ==============================  =========  ============================
astronaut              skimage/data/astronaut.png      512x512    scikit-image
chelsea                skimage/data/chelsea.png        451x300    scikit-image
china                  sklearn/datasets/images/china   640x427    scikit-learn
coffee                 skimage/data/coffee.png         600x400    scikit-image
flower                 sklearn/datasets/images/flower  640x427    scikit-learn
hubble_deep_field      skimage/data/hubble_deep_field  1000x872   scikit-image
immunohistochemistry   skimage/data/ihc.png            512x512    scikit-image
motorcycle             skimage/data/motorcycle_left    741x500    scikit-image (stereo, left)
retina                 skimage/data/retina.jpg         1411x1411  scikit-image
rocket                 skimage/data/rocket.jpg         640x427    scikit-image
=====================  ==============================  =========  ============================

* ``test`` split, 10 records: each original file, byte for byte (PNG or JPEG as shipped). It is not a
  held-out set: the train split is cut from the same photos. It exercises the eval transform on
  real-size images of several aspect ratios.
* ``train`` split, 80 records: ``CROPS_PER_PHOTO`` = 8 random square crops per photo, side uniform in
  60-100 % of the shorter side, position uniform, resized to ``CROP_SIZE`` = 320 px (PIL bicubic) and
  saved as JPEG quality 95. The crops come from ``np.random.default_rng(CROP_SEED)`` in the order of the
  table, so every machine builds the same files.
"""
from __future__ import annotations

import contextlib
import fcntl
import io
import os
import shutil
from typing import Iterator, Optional

from absl import logging
import numpy as np
from PIL import Image

from uae_jax.data import prepare
from uae_jax.data import transforms

VERSION = 'v1'  # Bump when the recipe below changes so stale caches are rebuilt elsewhere.
CROPS_PER_PHOTO = 8
CROP_SIZE = 320
CROP_SCALE = (0.6, 1.0)
CROP_SEED = 20240
JPEG_QUALITY = 95
SHARD_SIZE = 32  # Small shards so the bundled dataset exercises multi-shard reading.
SPLITS = ('train', 'test')

# class name -> (package, file inside the package's data folder)
PHOTOS = {
    'astronaut': ('skimage', 'astronaut.png'),
    'chelsea': ('skimage', 'chelsea.png'),
    'china': ('sklearn', 'china.jpg'),
    'coffee': ('skimage', 'coffee.png'),
    'flower': ('sklearn', 'flower.jpg'),
    'hubble_deep_field': ('skimage', 'hubble_deep_field.jpg'),
    'immunohistochemistry': ('skimage', 'ihc.png'),
    'motorcycle': ('skimage', 'motorcycle_left.png'),
    'retina': ('skimage', 'retina.jpg'),
    'rocket': ('skimage', 'rocket.jpg'),
}


def default_dir() -> str:
  """Where the bundled dataset is cached unless a directory is given."""
  cache = os.environ.get('UAE_JAX_CACHE') or os.path.join(os.path.expanduser('~'), '.cache', 'uae_jax')
  return os.path.join(cache, 'photos', VERSION)


def original_path(name: str) -> str:
  """Path of the shipped file of photo `name` inside its Python package."""
  package, fname = PHOTOS[name]
  if package == 'skimage':
    import skimage.data  # pylint: disable=g-import-not-at-top
    folder = skimage.data.data_dir
  else:
    import sklearn.datasets  # pylint: disable=g-import-not-at-top
    folder = os.path.join(os.path.dirname(sklearn.datasets.__file__), 'images')
  path = os.path.join(folder, fname)
  if not os.path.exists(path):
    raise FileNotFoundError(f'{package} does not ship {fname} at {path}; is {package} installed?')
  return path


def _write_image_folder(folder: str) -> None:
  """Writes the train crops and the test originals as ``folder/{train,test}/<class>/<file>``."""
  rng = np.random.default_rng(CROP_SEED)
  for name in PHOTOS:
    src = original_path(name)
    test_dir = os.path.join(folder, 'test', name)
    os.makedirs(test_dir)
    shutil.copyfile(src, os.path.join(test_dir, name + os.path.splitext(src)[1]))
    with open(src, 'rb') as f:
      img = transforms.decode_image(f.read())
    train_dir = os.path.join(folder, 'train', name)
    os.makedirs(train_dir)
    w, h = img.size
    for k in range(CROPS_PER_PHOTO):
      side = int(round(rng.uniform(*CROP_SCALE) * min(w, h)))
      left = int(rng.integers(0, w - side + 1))
      top = int(rng.integers(0, h - side + 1))
      crop = img.crop((left, top, left + side, top + side)).resize((CROP_SIZE, CROP_SIZE), Image.BICUBIC)
      buf = io.BytesIO()
      crop.save(buf, format='JPEG', quality=JPEG_QUALITY)
      with open(os.path.join(train_dir, f'{name}_{k:02d}.jpg'), 'wb') as f:
        f.write(buf.getvalue())


@contextlib.contextmanager
def _locked(root: str) -> Iterator[None]:
  """Holds an exclusive lock on `root` so concurrent processes build the dataset only once."""
  os.makedirs(root, exist_ok=True)
  with open(os.path.join(root, '.lock'), 'w') as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


def _is_built(root: str) -> bool:
  """True if both splits of the dataset in `root` finished preparing."""
  for split in SPLITS:
    try:
      prepare.load_manifest(root, split)
    except (FileNotFoundError, ValueError):
      return False
  return True


def build_photos_dataset(root: Optional[str] = None, force: bool = False) -> str:
  """Builds the bundled photos dataset once (ArrayRecord via `prepare`) and returns its directory."""
  root = os.path.abspath(root or default_dir())
  if not force and _is_built(root):
    return root
  with _locked(root):
    if not force and _is_built(root):  # Another process finished while we waited for the lock.
      return root
    logging.info('Building the bundled photos dataset in %s', root)
    folder = os.path.join(root, 'images')
    if os.path.exists(folder):
      shutil.rmtree(folder)  # A half-written folder from an interrupted build.
    _write_image_folder(folder)
    for split in SPLITS:
      manifest = prepare.prepare_split(os.path.join(folder, split), root, split=split,
                                       shard_size=SHARD_SIZE, overwrite=True, progress=False)
      if manifest['num_skipped']:
        raise RuntimeError(f'bundled photos: unexpected skipped files {manifest["skipped"]}')
  return root


def photos_split_paths(split: str, root: Optional[str] = None) -> list[str]:
  """ArrayRecord shard paths of a split of the bundled photos dataset, building it if needed."""
  if split not in SPLITS:
    raise ValueError(f'input.split={split!r}: the bundled photos dataset has splits {SPLITS}')
  return prepare.shard_paths(build_photos_dataset(root), split)
