"""Input pipeline throughput: images/s of the training pipeline, in-process vs multiprocess prefetch.

Runs the real training pipeline (ArrayRecord read, JPEG decode, bicubic resize to 1.5x, random crop,
float32 conversion, batching) on the bundled photos dataset and reports images/s for each
``num_workers`` setting, then the ratio to the first one::

  .venv/bin/python bench/input.py                      # 256 px, 200 batches of 16, workers 0 and 2
  .venv/bin/python -m bench.input --workers 0,1,2 --batches 50
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Optional, Sequence

from absl import logging


def measure(num_workers: int, *, image_size: int = 256, batch_size: int = 16, batches: int = 200,
            warmup: int = 10, num_threads: int = 4, data_dir: str = '') -> dict[str, float]:
  """Times `batches` training batches after `warmup` batches; returns images/s and timings."""
  from uae_jax.data import config as data_config  # pylint: disable=g-import-not-at-top
  from uae_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  cfg = data_config.default_input_config()
  cfg.data_dir = data_dir
  cfg.image_size = image_size
  cfg.global_batch_size = batch_size
  cfg.num_workers = num_workers
  cfg.num_threads = num_threads
  cfg.prefetch_buffer_size = max(num_threads, 4)
  it = pipeline.make_train_iterator(cfg, process_index=0, process_count=1)
  try:
    t0 = time.perf_counter()
    for _ in range(warmup):  # Includes worker start-up and the first reads.
      next(it)
    t1 = time.perf_counter()
    for _ in range(batches):
      batch = next(it)
    t2 = time.perf_counter()
  finally:
    it.close()
  assert batch['image'].shape == (batch_size, image_size, image_size, 3)
  return {'num_workers': num_workers, 'images_per_s': batches * batch_size / (t2 - t1),
          'seconds': t2 - t1, 'warmup_seconds': t1 - t0}


def run(workers: Sequence[int] = (0, 2), **kwargs) -> list[dict[str, float]]:
  """Measures every worker setting in turn; returns one result dict per setting."""
  from uae_jax.data import photos  # pylint: disable=g-import-not-at-top
  photos.build_photos_dataset(kwargs.get('data_dir') or None)  # Not part of the timing.
  return [measure(w, **kwargs) for w in workers]


def main(argv: Optional[Sequence[str]] = None) -> int:
  """Command-line entry point."""
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--workers', default='0,2', help='comma-separated num_workers settings')
  p.add_argument('--image-size', type=int, default=256)
  p.add_argument('--batch-size', type=int, default=16)
  p.add_argument('--batches', type=int, default=200)
  p.add_argument('--warmup', type=int, default=10)
  p.add_argument('--num-threads', type=int, default=4)
  p.add_argument('--data-dir', default='', help='photos dataset dir (default: the cache)')
  args = p.parse_args(argv)
  logging.set_verbosity(logging.ERROR)
  workers = [int(w) for w in args.workers.split(',')]
  print(f'input pipeline: bundled photos, {args.image_size} px, batch {args.batch_size}, '
        f'{args.batches} batches after {args.warmup} warm-up, num_threads {args.num_threads}, '
        f'{os.cpu_count()} CPUs')
  results = run(workers, image_size=args.image_size, batch_size=args.batch_size,
                batches=args.batches, warmup=args.warmup, num_threads=args.num_threads,
                data_dir=args.data_dir)
  base = results[0]['images_per_s']
  for r in results:
    print(f'num_workers={r["num_workers"]}: {r["images_per_s"]:8.1f} images/s '
          f'({r["seconds"]:.2f} s; warm-up {r["warmup_seconds"]:.2f} s) '
          f'ratio vs num_workers={results[0]["num_workers"]}: {r["images_per_s"] / base:.2f}x')
  print('RESULT ' + json.dumps({'benchmark': 'input', 'image_size': args.image_size,
                                'batch_size': args.batch_size, 'results': results}))
  return 0


if __name__ == '__main__':  # The guard matters: Grain starts its workers with 'spawn'.
  sys.exit(main())
