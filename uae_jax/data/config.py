"""The ``input`` section of the trainer configs."""
from __future__ import annotations

import ml_collections


def default_input_config() -> ml_collections.ConfigDict:
  """Default input config: the bundled photos at 256 px; trainer configs override what they need."""
  c = ml_collections.ConfigDict()
  # Where the records come from: 'photos' (bundled, no download), 'array_record' (our `prepare`
  # shards) or 'tfds' (a TFDS dataset prepared with file_format='array_record').
  c.source = 'photos'
  c.name = ''  # TFDS name for source='tfds', e.g. 'imagenet2012' or 'coco/2017'.
  c.split = 'train'
  c.eval_split = 'test'  # 'validation' for imagenet2012 and coco/2017.
  # photos: cache dir ('' = $UAE_JAX_CACHE/photos/v1); array_record: the `prepare --out` dir holding
  # '<split>.manifest.json'; tfds: the TFDS data_dir ('' = TFDS default).
  c.data_dir = ''
  # array_record only: explicit shard files or globs (list or comma-separated); overrides data_dir.
  c.paths = ''
  c.image_size = 256
  # Stored latents (`python -m uae_jax.generate latents --out=DIR`): when set, the TRAIN pipeline
  # reads {'latent', 'label'} from DIR's shards instead of images (eval still reads images).
  # DiT configs tie it to `latent.dir`.
  c.latent_dir = ''
  # Train transform: 'random' (shorter side to 1.5 x size, random crop: the official recipe) or
  # 'center' (the eval transform, ADM centre crop: whole images, e.g. small centred digits).
  c.train_crop = 'random'
  c.global_batch_size = 512  # Split evenly over JAX processes.
  c.eval_global_batch_size = 0  # 0 = global_batch_size.
  c.eval_max_examples = 0  # > 0 evaluates only the first N records of the eval split.
  c.shuffle_seed = 0
  # Grain multiprocess prefetch workers per host (0 = decode in this process with threads). On TPU
  # hosts use several (e.g. 16-32 on a v4/v5 host); see docs/data.md for measured numbers.
  c.num_workers = 0
  c.num_threads = 4  # Threads per process (or per worker) reading and decoding batches.
  c.prefetch_buffer_size = 4  # Batches prefetched per process (or per worker) by those threads.
  c.per_worker_buffer_size = 1  # Batches each multiprocess worker keeps ready.
  return c
