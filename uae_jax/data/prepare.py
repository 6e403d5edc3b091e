"""Packs an image folder into ArrayRecord shards that keep the original encoded bytes.

Usage::

  python -m uae_jax.data.prepare --src /data/imagenet/train --out /data/imagenet_ar --split train

Input layout (torchvision ``ImageFolder``): ``SRC/<class>/**/<file>``; the label of a file is the index of
its top-level sub-folder in the sorted list of sub-folders. Files directly in ``SRC`` (for instance a flat
MS-COCO ``val2017`` folder) get label -1 (unlabelled). Records are written in ImageFolder order (sorted
classes, then sorted ``os.walk``), so an unshuffled eval pass visits images in the same order as PyTorch.

Output in ``OUT``:

* ``<split>-<i:05d>-of-<n:05d>.array_record``: shard ``i`` holds the files ``[i * shard_size, (i + 1) *
  shard_size)`` of the sorted listing, minus the ones that failed to decode. Written with
  ``group_size:1`` so that every record is cheap to read at random.
* ``<split>.manifest.json``: classes, counts, shards (name, record count, byte size, sha256), every
  skipped file with its reason, and ``complete``. It is rewritten after every finished shard, which makes
  it the progress file too: a restarted run skips the shards it lists and rewrites any other shard
  (half-written shards live under a ``.tmp`` name and are never listed).

Record format (``RECORD_FORMAT``): each record is a msgpack map ``{'image_bytes': bytes, 'label': int,
'filename': str}``; ``image_bytes`` are the file's bytes unchanged (no re-encoding), ``filename`` is the
path relative to ``SRC``. msgpack rather than pickle so reading a record never executes code.

Every file is fully decoded once with PIL before it is written; files that fail (corrupt, truncated,
not an image, unreadable) are reported with the reason, counted and left out, never dropped silently.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import multiprocessing
import os
import re
import sys
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence

from absl import logging
from array_record.python import array_record_module
import msgpack
import tqdm

from uae_jax.data import transforms
from uae_jax.errors import UserError

FORMAT_VERSION = 'uae_jax.array_record.v1'
RECORD_FORMAT = ("msgpack map {'image_bytes': bytes (original file, not re-encoded), "
                 "'label': int (-1 = unlabelled), 'filename': str (relative to the source folder)}")
UNLABELLED = -1
DEFAULT_SHARD_SIZE = 1024
# One record per group: random access reads exactly one record (Grain shuffles globally).
WRITER_OPTIONS = 'group_size:1'


def encode_record(image_bytes: bytes, label: int, filename: str) -> bytes:
  """Serialises one record (see RECORD_FORMAT)."""
  return msgpack.packb({'image_bytes': bytes(image_bytes), 'label': int(label),
                        'filename': str(filename)}, use_bin_type=True)


def decode_record(raw: bytes) -> dict[str, Any]:
  """Parses one record written by `encode_record` into a dict."""
  rec = msgpack.unpackb(raw, raw=False)
  if not isinstance(rec, dict) or 'image_bytes' not in rec:
    raise ValueError('not a uae_jax image record')
  return rec


@dataclasses.dataclass(frozen=True)
class Entry:
  """One file of the source folder: path relative to the folder, and its label."""
  relpath: str
  label: int


def shard_name(split: str, index: int, num_shards: int) -> str:
  """File name of shard `index` of `num_shards`."""
  return f'{split}-{index:05d}-of-{num_shards:05d}.array_record'


def manifest_path(out_dir: str, split: str) -> str:
  """Path of the manifest (and progress) JSON of a split."""
  return os.path.join(out_dir, f'{split}.manifest.json')


def list_image_folder(src: str) -> tuple[list[str], list[Entry], list[dict[str, str]]]:
  """Lists an ImageFolder tree: (sorted classes, entries in ImageFolder order, skipped entries)."""
  if not os.path.isdir(src):
    raise FileNotFoundError(f'--src {src!r} is not a directory')
  skipped = []
  classes, root_files = [], []
  for entry in sorted(os.scandir(src), key=lambda e: e.name):
    if entry.name.startswith('.'):
      # Hidden folders/files (.DS_Store, ._foo.jpg, .git) are not data, but are still reported.
      skipped.append({'file': entry.name, 'reason': 'hidden file or folder'})
    elif entry.is_dir():
      classes.append(entry.name)
    else:
      root_files.append(entry.name)
  entries = [Entry(name, UNLABELLED) for name in root_files]
  for label, cls in enumerate(classes):
    for root, dirs, fnames in sorted(os.walk(os.path.join(src, cls), followlinks=True)):
      dirs.sort()
      rel_root = os.path.relpath(root, src)
      for fname in sorted(fnames):
        rel = os.path.join(rel_root, fname)
        if fname.startswith('.'):
          skipped.append({'file': rel, 'reason': 'hidden file or folder'})
        else:
          entries.append(Entry(rel, label))
  return classes, entries, skipped


def _fingerprint(src: str, entries: Sequence[Entry], shard_size: int) -> str:
  """Hash of the listing and settings, so a resumed run can tell that nothing changed."""
  h = hashlib.sha256(f'{FORMAT_VERSION}\n{shard_size}\n'.encode())
  for e in entries:
    try:
      size = os.path.getsize(os.path.join(src, e.relpath))
    except OSError:
      size = -1
    h.update(f'{e.relpath}\t{e.label}\t{size}\n'.encode())
  return h.hexdigest()


def _sha256_file(path: str) -> str:
  """sha256 of a file's contents."""
  h = hashlib.sha256()
  with open(path, 'rb') as f:
    for block in iter(lambda: f.read(1 << 20), b''):
      h.update(block)
  return h.hexdigest()


def _load_and_check(path: str) -> tuple[Optional[bytes], Optional[str]]:
  """Reads a file and fully decodes it: (bytes, None) if it is a usable image, else (None, reason)."""
  try:
    with open(path, 'rb') as f:
      data = f.read()
    # The same decode the training pipeline uses, so whatever passes here also decodes there.
    img = transforms.decode_image(data)
    if img.width < 1 or img.height < 1:
      return None, 'empty image'
    return data, None
  except Exception as e:  # pylint: disable=broad-except
    # PIL names the in-memory buffer with its address; drop it so reruns report identical reasons.
    return None, re.sub(r' ?<_io\.BytesIO object at 0x[0-9a-fA-F]+>', '', f'{type(e).__name__}: {e}')


def _checked(paths: Sequence[str], num_workers: int) -> Iterator[tuple[Optional[bytes], Optional[str]]]:
  """Yields `_load_and_check` results in order, in a process pool when num_workers > 0."""
  if num_workers <= 0 or not paths:
    yield from map(_load_and_check, paths)
    return
  # spawn, not fork: the caller may have JAX/Grain threads running.
  with multiprocessing.get_context('spawn').Pool(num_workers) as pool:
    yield from pool.imap(_load_and_check, paths, chunksize=8)


def _write_json(path: str, obj: Any) -> None:
  """Writes JSON atomically (temp file + rename) so a crash never leaves a torn manifest."""
  tmp = path + '.tmp'
  with open(tmp, 'w') as f:
    json.dump(obj, f, indent=1, sort_keys=True)
    f.write('\n')
  os.replace(tmp, path)


def _load_progress(path: str, fingerprint: str, overwrite: bool) -> dict[int, dict[str, Any]]:
  """Returns the shards an earlier run of the same job finished (index -> shard entry)."""
  if overwrite or not os.path.exists(path):
    return {}
  try:
    with open(path) as f:
      old = json.load(f)
  except ValueError as e:
    raise ValueError(f'{path}: not a readable manifest ({e}); pass --overwrite to rebuild the '
                     'split') from None
  if not isinstance(old, dict) or old.get('fingerprint') != fingerprint:
    raise ValueError(
        f'{path} was written for a different source listing or shard size; pass --overwrite to '
        'rebuild the split from scratch')
  done = {}
  out_dir = os.path.dirname(path)
  for shard in old.get('shards', []):
    fpath = os.path.join(out_dir, shard['file'])
    # A listed shard whose file vanished or changed size is rewritten rather than trusted.
    if os.path.exists(fpath) and os.path.getsize(fpath) == shard['bytes']:
      done[shard['index']] = shard
  return done


def _manifest(run: dict[str, Any], done: dict[int, dict], complete: bool) -> dict[str, Any]:
  """The manifest of a prepare run for the shards finished so far."""
  classes = run['classes']
  shards = [done[i] for i in sorted(done)]
  skipped = run['listing_skipped'] + [s for shard in shards for s in shard['skipped']]
  counts = [0] * len(classes)
  for shard in shards:
    for label, n in enumerate(shard['counts']):
      counts[label] += n
  return {
      'format': FORMAT_VERSION, 'record_format': RECORD_FORMAT, 'split': run['split'],
      'src': run['src'], 'shard_size': run['shard_size'], 'num_shards': run['num_shards'],
      'fingerprint': run['fingerprint'], 'complete': complete, 'classes': classes,
      'num_classes': len(classes), 'num_records': sum(s['num_records'] for s in shards),
      'counts_per_class': dict(zip(classes, counts)),
      'num_unlabelled': sum(s['num_unlabelled'] for s in shards),
      'num_skipped': len(skipped), 'skipped': skipped, 'shards': shards,
  }


def _write_shard(out: str, name: str, shard_entries, results, num_classes: int, bar,
                 progress: bool) -> dict[str, Any]:
  """Writes one shard to a temporary file, renames it into place; returns its manifest entry."""
  final = os.path.join(out, name)
  tmp = final + '.tmp'
  for stale in (tmp, final):
    if os.path.exists(stale):
      os.remove(stale)
  writer = array_record_module.ArrayRecordWriter(tmp, WRITER_OPTIONS)
  counts, unlabelled, skipped, n = [0] * num_classes, 0, [], 0
  for entry in shard_entries:
    data, reason = next(results)
    bar.update(1)
    if data is None:
      skipped.append({'file': entry.relpath, 'reason': reason})
      if progress:
        bar.write(f'skipping {entry.relpath}: {reason}', file=sys.stderr)
      logging.warning('prepare: skipping %s (%s)', entry.relpath, reason)
      continue
    writer.write(encode_record(data, entry.label, entry.relpath))
    n += 1
    if entry.label == UNLABELLED:
      unlabelled += 1
    else:
      counts[entry.label] += 1
  writer.close()
  os.replace(tmp, final)
  return {'file': name, 'num_records': n, 'bytes': os.path.getsize(final),
          'sha256': _sha256_file(final), 'counts': counts, 'num_unlabelled': unlabelled,
          'skipped': skipped}


def prepare_split(src: str, out: str, split: str = 'train', shard_size: int = DEFAULT_SHARD_SIZE,
                  num_workers: int = 0, overwrite: bool = False, progress: bool = True,
                  on_shard_done: Optional[Callable[[int], None]] = None) -> dict[str, Any]:
  """Writes `src` (an image folder) as ArrayRecord shards of `split` in `out`; returns the manifest."""
  if shard_size < 1:
    raise ValueError(f'--shard-size must be >= 1, got {shard_size}')
  src = os.path.abspath(src)
  classes, entries, listing_skipped = list_image_folder(src)
  if not entries:
    raise ValueError(f'--src {src!r} contains no files (expected SRC/<class>/<image> or SRC/<image>)')
  os.makedirs(out, exist_ok=True)
  num_shards = -(-len(entries) // shard_size)
  fingerprint = _fingerprint(src, entries, shard_size)
  run = dict(split=split, src=src, shard_size=shard_size, num_shards=num_shards,
             fingerprint=fingerprint, classes=classes, listing_skipped=listing_skipped)
  mpath = manifest_path(out, split)
  done = _load_progress(mpath, fingerprint, overwrite)
  for s in listing_skipped:
    logging.warning('prepare: skipping %s (%s)', s['file'], s['reason'])
  pending = [i for i in range(num_shards) if i not in done]
  pending_entries = [e for i in pending for e in entries[i * shard_size:(i + 1) * shard_size]]
  bar = tqdm.tqdm(total=len(entries), initial=len(entries) - len(pending_entries), unit='img',
                  desc=f'prepare {split}', disable=not progress, file=sys.stderr)
  results = _checked([os.path.join(src, e.relpath) for e in pending_entries], num_workers)
  try:
    for i in pending:
      shard = _write_shard(out, shard_name(split, i, num_shards),
                           entries[i * shard_size:(i + 1) * shard_size], results, len(classes),
                           bar, progress)
      done[i] = {'index': i, **shard}
      # Recording the shard only after its file is final is what makes restarts safe.
      _write_json(mpath, _manifest(run, done, complete=False))
      if on_shard_done is not None:
        on_shard_done(i)
  finally:
    bar.close()
    if hasattr(results, 'close'):
      results.close()
  result = _manifest(run, done, complete=True)
  _write_json(mpath, result)
  return result


def load_manifest(out: str, split: str) -> dict[str, Any]:
  """Reads a finished split's manifest; raises if it is missing or incomplete."""
  path = manifest_path(out, split)
  if not os.path.exists(path):
    raise FileNotFoundError(f'no manifest {path!r}: prepare split {split!r} into {out!r} first '
                            '(python -m uae_jax.data.prepare --src FOLDER --out DIR --split SPLIT)')
  with open(path) as f:
    manifest = json.load(f)
  if not manifest.get('complete'):
    raise ValueError(f'{path} is from an unfinished prepare run; rerun prepare to resume it')
  return manifest


def shard_paths(out: str, split: str) -> list[str]:
  """Absolute paths of a finished split's shards, in record order."""
  return [os.path.join(out, s['file']) for s in load_manifest(out, split)['shards']]


def _parse_args(argv: Iterable[str]) -> argparse.Namespace:
  """Command-line flags of `python -m uae_jax.data.prepare`."""
  # argparse rather than absl flags: this module is also imported as a library (photos.py), and
  # absl would define the flags twice when it is also run as __main__.
  p = argparse.ArgumentParser(prog='python -m uae_jax.data.prepare', description=__doc__.split('\n')[0])
  p.add_argument('--src', required=True, help='image folder: SRC/<class>/<image> (or flat SRC/<image>)')
  p.add_argument('--out', required=True, help='output directory for shards and manifest')
  p.add_argument('--split', default='train', help='split name used in the file names (default train)')
  p.add_argument('--shard-size', type=int, default=DEFAULT_SHARD_SIZE,
                 help=f'files per shard (default {DEFAULT_SHARD_SIZE})')
  p.add_argument('--num-workers', type=int, default=min(8, os.cpu_count() or 1),
                 help='processes that decode-check files (0 = in this process)')
  p.add_argument('--overwrite', action='store_true', help='ignore earlier progress and rebuild')
  p.add_argument('--no-progress', action='store_true', help='no progress bar')
  return p.parse_args(list(argv))


def main(argv: Optional[Sequence[str]] = None) -> int:
  """Command-line entry point; returns the exit code (2 and one `error:` line on bad input)."""
  args = _parse_args(sys.argv[1:] if argv is None else argv)
  logging.set_verbosity(logging.ERROR)  # Skips are printed below; keep the console readable.
  try:
    m = prepare_split(args.src, args.out, split=args.split, shard_size=args.shard_size,
                      num_workers=args.num_workers, overwrite=args.overwrite,
                      progress=not args.no_progress)
  except (UserError, ValueError, OSError) as e:  # a missing/empty --src, a foreign manifest, ...
    text = ' '.join(str(e).split()) or type(e).__name__
    print(f'error: {text}', file=sys.stderr)
    return 2
  print(f'{m["split"]}: {m["num_records"]} records in {m["num_shards"]} shards, '
        f'{m["num_classes"]} classes, {m["num_unlabelled"]} unlabelled -> {args.out}')
  print(f'skipped {m["num_skipped"]} files' + (':' if m['skipped'] else ''))
  for s in m['skipped']:
    print(f'  {s["file"]}: {s["reason"]}')
  print(f'manifest: {manifest_path(args.out, args.split)}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
