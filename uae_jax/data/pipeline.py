"""Grain input pipelines: deterministic, sharded per JAX process, checkpointable, skipping bad records.

Train (per process ``p`` of ``P``)::

  MapDataset.range(N).seed(seed).shuffle()   global permutation, a new one every epoch
    [:N - N % P][p::P]                        disjoint, equal-sized per-process shards
    .repeat(num_epochs)                       epochs continue through the slices (Grain keeps the
                                              epoch number in the index, so each epoch reshuffles)
    -> read + decode (bad records replaced)   `_ReadDecode`
    .random_map(train transform)              rng from Grain: fixed by (seed, position);
                                              `input.train_crop='center'`: the eval transform
    .batch(global_batch // P, drop_remainder=True)
    .to_iter_dataset(ReadOptions(threads, prefetch))
    .mp_prefetch(MultiprocessingOptions(num_workers))   skipped when num_workers == 0
    .map(_Finalize)                            in the main process: counts decode errors

Everything up to ``batch`` is a random-access ``MapDataset``, so an element (a whole batch) is a pure
function of (seed, process index, step). That is why the output does not depend on ``num_workers``
(Grain hands worker ``w`` the batches ``w, w + W, ...`` and interleaves them back in order) and why the
iterator state is a few integers that Orbax stores as its own checkpoint item.

Bad records. A record that fails to read or decode is logged (record index, file name, reason) and
replaced by the next record of the same process stream (position + 1, + 2, ...), so batches stay full
and the stream stays a pure function of the position. Each bad record read at its own position counts
once in `decode_error_count()` (process local; the count travels with the batch so it is right with
multiprocess workers too). Eval pipelines do not substitute: the slot gets ``mask`` False instead.
"""
from __future__ import annotations

import json
import math
import os
import threading
from typing import Any, Callable, Optional

from absl import flags
from absl import logging
import grain
import jax
import ml_collections
import numpy as np

from uae_jax.data import sources
from uae_jax.data import transforms

# A long run of consecutive bad records means the data (or a mount) is broken, not a few bad files.
MAX_CONSECUTIVE_BAD = 64
_ERROR_KEY = 'decode_errors'

_error_lock = threading.Lock()
_error_counts: dict[str, int] = {}


def decode_error_count(name: Optional[str] = None) -> int:
  """Bad records skipped so far in this process, for pipeline `name` ('train'/'eval') or in total."""
  with _error_lock:
    if name is None:
      return sum(_error_counts.values())
    return _error_counts.get(name, 0)


def reset_decode_error_count() -> None:
  """Resets the decode-error counters (for tests)."""
  with _error_lock:
    _error_counts.clear()


def _ensure_absl_flags_parsed() -> None:
  """Grain's mp_prefetch reads absl flags; mark them parsed outside absl.app (grain issue #1355)."""
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


def _load(source: Any, record_index: int) -> tuple[Optional[dict[str, Any]], str]:
  """Reads and decodes one record: ({'image': PIL, 'label', 'filename'}, '') or (None, reason)."""
  filename = '?'
  try:
    rec = sources.parse_record(source[record_index])
    filename = rec['filename'] or '?'
    rec['image'] = transforms.decode_image(rec['image'])
    return rec, ''
  except Exception as e:  # pylint: disable=broad-except
    return None, f'{filename}: {type(e).__name__}: {e}'


class _ReadDecode(grain.MapDataset):
  """Maps a stream of record indices to decoded records, skipping records that fail to decode."""

  def __init__(self, indices: grain.MapDataset, source: Any, *, substitute: bool):
    super().__init__(indices)
    self._source = source
    self._substitute = substitute

  def __len__(self) -> int:
    return len(self._parent)

  def __str__(self) -> str:
    return f'_ReadDecode(substitute={self._substitute})'

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.slice(index)
    record_index = self._parent[index]
    if record_index is None or record_index < 0:  # Eval padding.
      return {'image': None, 'label': -1, 'index': -1, _ERROR_KEY: 0}
    rec, reason = _load(self._source, record_index)
    errors = 0
    if rec is None:
      errors = 1
      logging.warning('Skipping bad record %d (%s)', record_index, reason)
      if self._substitute:
        rec, record_index = self._substitute_for(index)
    if rec is None:
      return {'image': None, 'label': -1, 'index': int(record_index), _ERROR_KEY: errors}
    return {'image': rec['image'], 'label': rec['label'], 'index': int(record_index),
            _ERROR_KEY: errors}

  def _substitute_for(self, index: int) -> tuple[dict[str, Any], int]:
    """The first good record after stream position `index` (each is counted at its own position)."""
    n = len(self._parent)
    for k in range(1, MAX_CONSECUTIVE_BAD + 1):
      record_index = self._parent[(index + k) % n]
      rec, _ = _load(self._source, record_index)
      if rec is not None:
        return rec, record_index
    raise RuntimeError(f'{MAX_CONSECUTIVE_BAD + 1} consecutive records failed to decode after '
                       f'stream position {index}; the dataset looks broken (see the warnings above)')


def _train_element(size: int, crop: str = 'random'
                   ) -> Callable[[dict[str, Any], np.random.Generator], dict[str, Any]]:
  """The per-element train transform for `random_map` (`crop`: 'random' or 'center')."""
  if crop not in ('random', 'center'):
    raise ValueError(f"input.train_crop={crop!r}: expected 'random' or 'center'")

  def fn(elem: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
    """Crops one decoded record (random or ADM centre crop) to float32 (size, size, 3)."""
    image = (transforms.train_transform(elem['image'], size, rng) if crop == 'random'
             else transforms.eval_transform(elem['image'], size))
    return {'image': image,
            'label': np.int32(elem['label']), 'index': np.int32(elem['index']),
            _ERROR_KEY: np.int32(elem[_ERROR_KEY])}

  return fn


def _eval_element(size: int) -> Callable[[dict[str, Any]], dict[str, Any]]:
  """The per-element eval transform for `map`; missing images become zeros with mask False."""

  def fn(elem: dict[str, Any]) -> dict[str, Any]:
    """ADM centre-crops one decoded record to float32 (size, size, 3)."""
    ok = elem['image'] is not None
    image = (transforms.eval_transform(elem['image'], size) if ok
             else np.zeros((size, size, 3), np.float32))
    return {'image': image, 'label': np.int32(elem['label']), 'mask': np.bool_(ok),
            'index': np.int32(elem['index']), _ERROR_KEY: np.int32(elem[_ERROR_KEY])}

  return fn


class _Finalize(grain.transforms.Map):
  """Runs in the main process: adds the batch's decode errors to the counter, drops internal keys."""

  def __init__(self, name: str, keep_index: bool):
    self._name = name
    self._keep_index = keep_index

  def map(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Counts and strips the per-element error field."""
    batch = dict(batch)
    errors = int(np.sum(batch.pop(_ERROR_KEY)))
    if errors:
      with _error_lock:
        _error_counts[self._name] = _error_counts.get(self._name, 0) + errors
    if not self._keep_index:
      batch.pop('index', None)
    return batch


def _process_info(process_index: Optional[int], process_count: Optional[int]) -> tuple[int, int]:
  """(index, count) of this JAX process, unless given (tests simulate several processes)."""
  count = jax.process_count() if process_count is None else int(process_count)
  index = jax.process_index() if process_index is None else int(process_index)
  if not 0 <= index < count:
    raise ValueError(f'process_index {index} is not in [0, {count})')
  return index, count


def _per_process_batch(global_batch: int, process_count: int, field: str) -> int:
  """Global batch / process count, which must divide evenly."""
  if global_batch <= 0 or global_batch % process_count:
    raise ValueError(f'{field}={global_batch} must be a positive multiple of the process count '
                     f'({process_count})')
  return global_batch // process_count


def _to_iter(ds: grain.MapDataset, cfg: ml_collections.ConfigDict, name: str,
             keep_index: bool) -> grain.IterDataset:
  """Thread prefetch, optional multiprocess prefetch, then the main-process finalize step."""
  it = ds.to_iter_dataset(grain.ReadOptions(num_threads=int(cfg.get('num_threads', 4)),
                                            prefetch_buffer_size=int(cfg.get('prefetch_buffer_size', 4))))
  num_workers = int(cfg.get('num_workers', 0))
  if num_workers < 0:
    raise ValueError(f'input.num_workers must be >= 0, got {num_workers}')
  if num_workers:
    _ensure_absl_flags_parsed()
    it = it.mp_prefetch(grain.MultiprocessingOptions(
        num_workers=num_workers, per_worker_buffer_size=int(cfg.get('per_worker_buffer_size', 1))))
  return it.map(_Finalize(name, keep_index))


def _shuffled_shard(cfg, n: int, pi: int, pc: int, num_epochs, what: str) -> grain.MapDataset:
  """Record indices of process `pi`: seeded shuffle, equal shards, repeated for `num_epochs`."""
  usable = n - n % pc  # Equal shard sizes keep every process on the same epoch at the same step.
  if usable == 0:
    raise ValueError(f'{what}, fewer than {pc} processes')
  ds = grain.MapDataset.range(n).seed(int(cfg.shuffle_seed)).shuffle()
  return ds[:usable][pi::pc].repeat(num_epochs)


def make_train_dataset(input_config: ml_collections.ConfigDict, *, source: Any = None,
                       process_index: Optional[int] = None, process_count: Optional[int] = None,
                       num_epochs: Optional[int] = None, keep_index: bool = False) -> grain.IterDataset:
  """The training `IterDataset` of this process: batches {'image', 'label'} (+ 'index' if asked).

  With `input.latent_dir` set it streams stored latents instead: {'latent', 'label'} batches.
  """
  cfg = input_config
  pi, pc = _process_info(process_index, process_count)
  batch = _per_process_batch(int(cfg.global_batch_size), pc, 'input.global_batch_size')
  if cfg.get('latent_dir', ''):  # stored latents (`python -m uae_jax.generate latents`)
    return _latent_train_dataset(cfg, pi, pc, batch, num_epochs, source)
  src = sources.make_source(cfg, cfg.split) if source is None else source
  ds = _shuffled_shard(cfg, len(src), pi, pc, num_epochs,
                       f'input.split={cfg.split!r} has {len(src)} records')
  ds = _ReadDecode(ds, src, substitute=True)
  ds = ds.random_map(_train_element(int(cfg.image_size), str(cfg.get('train_crop', 'random'))))
  ds = ds.batch(batch, drop_remainder=True)
  return _to_iter(ds, cfg, 'train', keep_index)


# ------------------------------------------------------------------------------ stored latents
LATENT_MANIFEST = 'manifest.json'


_LATENT_MAGIC = b'UAELAT1\n'
_LATENT_HEADER = len(_LATENT_MAGIC) + 4 * 5  # magic, int32 label, V, H, W, C


def latent_record(latents: np.ndarray, label: int) -> bytes:
  """One stored-latent record: magic, int32 (label, V, H, W, C), float32 (V, H, W, C) data.

  A flat little-endian layout (no zip, no pickle): parsing is one `np.frombuffer`.
  """
  z = np.ascontiguousarray(latents, '<f4')
  if z.ndim != 4:
    raise ValueError(f'latents of shape {z.shape}: expected (views, H, W, C)')
  return _LATENT_MAGIC + np.asarray((label,) + z.shape, '<i4').tobytes() + z.tobytes()


def parse_latent_record(data: bytes, where: str = '?') -> tuple[np.ndarray, np.int32]:
  """(latent (V, H, W, C) float32, label) of one record; LoadError naming `where` if garbage."""
  from uae_jax.errors import LoadError  # pylint: disable=g-import-not-at-top
  data = bytes(data)
  if len(data) < _LATENT_HEADER or not data.startswith(_LATENT_MAGIC):
    raise LoadError(f'{where}: not a stored-latent record ({len(data)} bytes, bad header)')
  label, *shape = np.frombuffer(data, '<i4', 5, len(_LATENT_MAGIC)).tolist()
  if min(shape) < 1 or len(data) != _LATENT_HEADER + 4 * int(np.prod(shape)):
    raise LoadError(f'{where}: not a stored-latent record (shape {tuple(shape)} does not fit '
                    f'its {len(data)} bytes)')
  z = np.frombuffer(data, '<f4', offset=_LATENT_HEADER).reshape(shape).astype(np.float32)
  return z, np.int32(label)


def open_latent_dir(latent_dir: str) -> tuple[dict[str, Any], Any]:
  """(manifest, ArrayRecord source) of a stored-latent directory; LoadError if unusable."""
  from uae_jax.errors import LoadError  # pylint: disable=g-import-not-at-top
  path = os.path.join(latent_dir, LATENT_MANIFEST)
  try:
    with open(path) as f:
      manifest = json.load(f)
    files = [os.path.join(latent_dir, n) for n in manifest['shards']]
    count, shape = int(manifest['count']), tuple(manifest['shape'])
  except (OSError, ValueError, KeyError, TypeError) as e:
    raise LoadError(f'{path}: not a stored-latent manifest ({type(e).__name__}: {e})') from None
  try:
    src = grain.sources.ArrayRecordDataSource(files)
    n = len(src)
  except Exception as e:  # pylint: disable=broad-except
    raise LoadError(f'{latent_dir}: unreadable latent shards ({type(e).__name__}: '
                    f'{str(e).splitlines()[0] if str(e) else ""})') from None
  if n != count or len(shape) != 3:
    raise LoadError(f'{path}: manifest says {count} latents of shape {shape}, shards hold {n}')
  return manifest, src


def _latent_element(source: Any) -> Callable[[int, np.random.Generator], dict[str, Any]]:
  """Record index -> {'latent' (H, W, C), 'label'}: one of the stored views at random."""

  def fn(index: int, rng: np.random.Generator) -> dict[str, Any]:
    """Reads one record and picks a view (image or mirror), the stored random flip."""
    z, label = parse_latent_record(source[int(index)], f'latent record {int(index)}')
    view = int(rng.integers(z.shape[0])) if z.shape[0] > 1 else 0
    return {'latent': z[view], 'label': label, 'index': np.int32(index), _ERROR_KEY: np.int32(0)}

  return fn


def _latent_train_dataset(cfg, pi: int, pc: int, batch: int, num_epochs, source=None):
  """The train stream of stored latents: the image pipeline's shuffle/shard/repeat/batch."""
  src = open_latent_dir(str(cfg.latent_dir))[1] if source is None else source
  ds = _shuffled_shard(cfg, len(src), pi, pc, num_epochs,
                       f'input.latent_dir={cfg.latent_dir!r} has {len(src)} latents')
  ds = ds.random_map(_latent_element(src))
  ds = ds.batch(batch, drop_remainder=True)
  return _to_iter(ds, cfg, 'train', keep_index=False)


def make_train_iterator(input_config: ml_collections.ConfigDict, *, source: Any = None,
                        process_index: Optional[int] = None, process_count: Optional[int] = None,
                        num_epochs: Optional[int] = None,
                        keep_index: bool = False) -> grain.DatasetIterator:
  """Iterator over this process's training batches; has get_state/set_state for checkpoints."""
  return iter(make_train_dataset(input_config, source=source, process_index=process_index,
                                 process_count=process_count, num_epochs=num_epochs,
                                 keep_index=keep_index))


def make_eval_dataset(input_config: ml_collections.ConfigDict, *, split: Optional[str] = None,
                      source: Any = None, process_index: Optional[int] = None,
                      process_count: Optional[int] = None) -> grain.IterDataset:
  """One ordered pass over an eval split: {'image', 'label', 'mask', 'index'} batches.

  The split is padded to a multiple of the global eval batch so that every process yields the same
  number of full batches; padding (and undecodable records) has ``mask`` False and ``index`` -1
  (``index`` is the record's position in the split, for putting per-image results back in order).
  """
  cfg = input_config
  split = split or cfg.get('eval_split', '') or cfg.split
  pi, pc = _process_info(process_index, process_count)
  global_batch = int(cfg.get('eval_global_batch_size', 0)) or int(cfg.global_batch_size)
  batch = _per_process_batch(global_batch, pc, 'input.eval_global_batch_size')
  src = sources.make_source(cfg, split) if source is None else source
  n = len(src)
  limit = int(cfg.get('eval_max_examples', 0))
  if limit > 0:
    n = min(n, limit)
  padded = math.ceil(n / global_batch) * global_batch
  ds = grain.MapDataset.range(padded).map(lambda i: i if i < n else -1)[pi::pc]
  ds = _ReadDecode(ds, src, substitute=False)
  ds = ds.map(_eval_element(int(cfg.image_size)))
  ds = ds.batch(batch, drop_remainder=True)
  return _to_iter(ds, cfg, 'eval', keep_index=True)


def make_eval_iterator(input_config: ml_collections.ConfigDict, *, split: Optional[str] = None,
                       source: Any = None, process_index: Optional[int] = None,
                       process_count: Optional[int] = None) -> grain.DatasetIterator:
  """Iterator over one ordered, padded pass of an eval split (see `make_eval_dataset`)."""
  return iter(make_eval_dataset(input_config, split=split, source=source,
                                process_index=process_index, process_count=process_count))


def to_global_array(batch: dict[str, np.ndarray], sharding: Any) -> dict[str, jax.Array]:
  """Assembles per-process host batches into global `jax.Array`s with the batch sharding.

  `sharding` is one `jax.sharding.NamedSharding` for every leaf (e.g. ``P('data')`` or
  ``P(('data', 'fsdp'))`` over the leading batch axis) or a pytree of shardings matching `batch`.
  """
  if isinstance(sharding, jax.sharding.Sharding):
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), batch)
  return jax.tree.map(lambda s, x: jax.make_array_from_process_local_data(s, x), sharding, batch)
