"""Random-access record sources: our ArrayRecord shards, TFDS ArrayRecord datasets, the bundled photos.

Every source is a Grain ``RandomAccessDataSource`` (``len`` + ``__getitem__``) whose records are turned
into ``{'image': bytes | uint8 array, 'label': int, 'filename': str}`` by `parse_record`:

* our shards (`prepare`) hold msgpack records with the original encoded bytes;
* TFDS datasets prepared with ``file_format='array_record'`` return feature dicts whose ``'image'`` TFDS
  has already decoded to uint8 (this needs pillow, not TensorFlow); datasets without a ``'label'``
  feature (e.g. ``coco/2017``) get label -1.
"""
from __future__ import annotations

import glob
import os
from typing import Any, Optional, Sequence, Union

import grain
import ml_collections
import numpy as np

from uae_jax.data import photos
from uae_jax.data import prepare

SOURCES = ('photos', 'array_record', 'tfds')
# TFDS feature names that carry the original file name, in order of preference.
_TFDS_FILENAME_KEYS = ('file_name', 'image/filename', 'filename')


def parse_record(record: Any) -> dict[str, Any]:
  """Normalises a raw record (our msgpack bytes or a TFDS feature dict) to image/label/filename."""
  if isinstance(record, (bytes, bytearray, memoryview)):
    rec = prepare.decode_record(bytes(record))
    return {'image': rec['image_bytes'], 'label': int(rec.get('label', prepare.UNLABELLED)),
            'filename': str(rec.get('filename', ''))}
  if isinstance(record, dict) and 'image' in record:
    filename = ''
    for key in _TFDS_FILENAME_KEYS:
      if key in record:
        filename = record[key]
        break
    if isinstance(filename, (bytes, np.bytes_)):
      filename = filename.decode('utf-8', 'replace')
    label = record.get('label', prepare.UNLABELLED)
    return {'image': record['image'], 'label': int(np.asarray(label)), 'filename': str(filename)}
  raise ValueError(f'unsupported record type {type(record).__name__}')


def _expand_paths(paths: Union[str, Sequence[str]]) -> list[str]:
  """Expands a comma-separated string or a list of files/globs into existing file paths."""
  if isinstance(paths, str):
    paths = [p for p in paths.split(',') if p.strip()]
  out = []
  for pattern in paths:
    pattern = os.path.expanduser(pattern.strip())
    matches = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
    if not matches or not all(os.path.exists(m) for m in matches):
      raise FileNotFoundError(f'input.paths: no ArrayRecord file matches {pattern!r}')
    out.extend(matches)
  return out


def array_record_source(paths: Union[str, Sequence[str]] = (), data_dir: str = '',
                        split: str = 'train') -> grain.sources.ArrayRecordDataSource:
  """Our ArrayRecord shards: explicit `paths` (files or globs), or `data_dir` + `split` via the manifest."""
  if paths:
    files = _expand_paths(paths)
  elif data_dir:
    data_dir = os.path.expanduser(data_dir)
    if not os.path.isdir(data_dir):
      raise FileNotFoundError(f'input.data_dir {data_dir!r} does not exist')
    files = prepare.shard_paths(data_dir, split)
    missing = [f for f in files if not os.path.exists(f)]
    if missing:
      raise FileNotFoundError(f'input.data_dir {data_dir!r}: manifest lists missing shards {missing[:3]}')
  else:
    raise ValueError("input.source='array_record' needs input.paths or input.data_dir")
  return grain.sources.ArrayRecordDataSource(files)


def tfds_source(name: str, split: str, data_dir: str = '') -> Any:
  """A TFDS dataset prepared as ArrayRecord, opened without TensorFlow via ``tfds.data_source``."""
  if not name:
    raise ValueError("input.source='tfds' needs input.name (e.g. 'imagenet2012' or 'coco/2017')")
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  try:
    # download=False: a missing dataset must fail here, not start a download/prepare on a TPU host.
    return tfds.data_source(name, split=split, data_dir=data_dir or None, download=False)
  except Exception as e:  # pylint: disable=broad-except
    try:
      # tfds.data_source has missed local datasets that the builder finds (tensorflow/datasets#5665).
      return tfds.builder(name, data_dir=data_dir or None).as_data_source(split=split)
    except Exception:  # pylint: disable=broad-except
      pass  # Report the first, more direct error.
    # First line only: TFDS's not-found message goes on to list every dataset it knows.
    reason = (str(e).strip().splitlines() or [''])[0]
    raise FileNotFoundError(
        f'input.name={name!r} split={split!r} data_dir={data_dir or "<TFDS default>"!r}: cannot open '
        f'the TFDS ArrayRecord dataset ({type(e).__name__}: {reason}). Prepare it with '
        "file_format='array_record'; see docs/data.md.") from e


def photos_source(split: str, data_dir: str = '') -> grain.sources.ArrayRecordDataSource:
  """The bundled photos dataset (built on first use) as an ArrayRecord source."""
  return grain.sources.ArrayRecordDataSource(photos.photos_split_paths(split, data_dir or None))


def make_source(input_config: ml_collections.ConfigDict, split: Optional[str] = None) -> Any:
  """Opens the source named by ``input_config.source`` for `split` (default ``input_config.split``)."""
  split = split or input_config.split
  source = input_config.source
  if source == 'photos':
    return photos_source(split, input_config.get('data_dir', ''))
  if source == 'array_record':
    return array_record_source(input_config.get('paths', ()), input_config.get('data_dir', ''), split)
  if source == 'tfds':
    return tfds_source(input_config.get('name', ''), split, input_config.get('data_dir', ''))
  raise ValueError(f'input.source={source!r} is not one of {SOURCES}')
