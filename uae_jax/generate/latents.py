"""The frozen tokenizer of latent generation: load a trained UAE, its latent statistics, (de)normalise.

A DiT config names its tokenizer with `tokenizer.config` (the UAE run's config file spec, e.g.
'configs/stage3.py' or 'configs/stage1.py:tiny') and `tokenizer.workdir` (that run's workdir:
its newest checkpoint's EMA params are used). The latent the DiT models is the UAE's
deterministic `tokenize` output (paper recipe: the fused clean bands; official recipe: the
zig-zag DCT low-pass), normalised per element:
  z_n = (z - mean) / sqrt(var + 1e-5),   mean, var of shape (H, W, C)
with mean and var computed once, exactly, over the training split (ADM centre crop, each image
and its horizontal mirror, float64 accumulation of per-batch centred moments across batches and
hosts) and stored as an .npz (`python -m uae_jax.generate stats --config=...`). Training computes
and stores them on first use if the file does not exist yet.

`encode_dataset` (`python -m uae_jax.generate latents`) stores the latents themselves (and the
same statistics, in the same pass) for training with `latent.source='stored'`.

    python -m uae_jax.generate stats --config=configs/dit.py:tiny [--set tokenizer.stats=F]
    python -m uae_jax.generate latents --config=configs/dit.py:tiny --out=DIR [--no-hflip]
"""
import importlib.util
import os
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from etils import epath

from uae_jax.errors import ConfigError, LoadError

STATS_EPS = 1e-5
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


# ------------------------------------------------------------------------------ the tokenizer
def load_config_spec(spec: str):
  """`get_config(arg)` of a config file spec 'path.py[:arg]' (relative to cwd or the repo)."""
  path, _, arg = spec.partition(":")
  candidates = [path, os.path.join(REPO_ROOT, path)]
  found = next((p for p in candidates if os.path.isfile(p)), None)
  if found is None:
    raise ConfigError(f"tokenizer.config={spec!r}: no such config file {path!r}")
  module_spec = importlib.util.spec_from_file_location(f"_tok_cfg_{abs(hash(found))}", found)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  try:
    return module.get_config(arg or None)
  except (KeyError, ValueError) as e:
    raise ConfigError(f"tokenizer.config={spec!r}: {e.args[0] if e.args else e}") from None


def tokenizer_config(config):
  """The UAE config of the DiT config's tokenizer."""
  return load_config_spec(config.tokenizer.config)


def build_tokenizer(uae_cfg) -> nn.Module:
  """The tokenizer module of a tokenizer run's config: a UAE or a KL-VAE (`config.task`)."""
  from uae_jax.evaluate import latent_spectrum  # pylint: disable=g-import-not-at-top
  return latent_spectrum.tokenizer_module(uae_cfg)


def latent_shape(uae_cfg) -> tuple:
  """(H, W, C) of the tokenizer's latent grid."""
  from uae_jax.evaluate import latent_spectrum  # pylint: disable=g-import-not-at-top
  return latent_spectrum.tokenizer_latent_shape(uae_cfg)


def abstract_tokenizer_params(uae_cfg):
  """Unboxed abstract params of the tokenizer (nothing is allocated)."""
  s = uae_cfg.input.image_size
  images = jax.ShapeDtypeStruct((1, s, s, 3), jnp.float32)
  key = jax.random.key(0)
  tree = jax.eval_shape(lambda k: build_tokenizer(uae_cfg).init(
      {"params": k, "noise": k}, jnp.zeros(images.shape), train=False), key)
  return nn.unbox(tree)["params"]


def load_tokenizer_params(config, uae_cfg) -> dict:
  """Host EMA params of the tokenizer run in `tokenizer.workdir` (random if `allow_random`)."""
  from uae_jax.checkpoint import manager as ckpt_lib  # pylint: disable=g-import-not-at-top
  tok = config.tokenizer
  if not tok.workdir:
    if not tok.allow_random:
      raise ConfigError("tokenizer.workdir is empty: point it at a trained UAE run (or set "
                        "tokenizer.allow_random=True for a toy run)")
    logging.warning("=" * 78 + "\nTOKENIZER IS RANDOMLY INITIALISED (tokenizer.workdir unset). "
                    "Toy runs only.\n" + "=" * 78)
    from uae_jax.train import init_compiler_options  # pylint: disable=g-import-not-at-top
    s, model = uae_cfg.input.image_size, build_tokenizer(uae_cfg)
    init = lambda: nn.unbox(model.init({"params": jax.random.key(1), "noise": jax.random.key(1)},
                                       jnp.zeros((1, s, s, 3)), train=False))["params"]
    # Jitted: eagerly, Flax's init compiles one small program per op (~25 s for the tiny UAE).
    # One trace gives both the output shapes (for the compile options) and the program.
    traced = jax.jit(init).trace()
    return jax.device_get(traced.lower().compile(init_compiler_options(traced.out_info))())
  sh = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh),
                          abstract_tokenizer_params(uae_cfg))
  logging.info("tokenizer: EMA params from %s", tok.workdir)
  out = ckpt_lib.restore_subtrees(tok.workdir, {"ema": abstract})
  return jax.device_get(out["ema"])


# ------------------------------------------------------------------------------ statistics
def stats_path(config, tag: str = "") -> str:
  """Where the latent statistics live: `tokenizer.stats`, else next to the tokenizer run.

  '' for a random toy tokenizer without `tokenizer.stats`: its statistics are never stored.
  `tag` names a latent other than the plain `tokenize` output (e.g. '_band0', see views.py).
  """
  tok = config.tokenizer
  if tok.stats or not tok.workdir:
    return tok.stats
  return os.path.join(tok.workdir,
                      f"latent_stats_{config.input.source}_{config.input.split}{tag}.npz")


def normalise(z, stats):
  """(z - mean) / std with the stored per-element statistics."""
  return (z - stats["mean"]) / stats["std"]


def denormalise(z, stats):
  """Inverse of `normalise`."""
  return z * stats["std"] + stats["mean"]


def combine_moments(acc: Optional[dict], n, mean, m2) -> dict:
  """Chan et al.'s parallel update of (count, mean, M2) in float64."""
  n, mean, m2 = float(n), np.asarray(mean, np.float64), np.asarray(m2, np.float64)
  if acc is None or acc["n"] == 0:
    return {"n": n, "mean": mean, "m2": m2}
  if n == 0:
    return acc
  tot = acc["n"] + n
  delta = mean - acc["mean"]
  return {"n": tot, "mean": acc["mean"] + delta * (n / tot),
          "m2": acc["m2"] + m2 + delta**2 * (acc["n"] * n / tot)}


def _batch_moments_fn(model, hflip: bool, method="tokenize"):
  """jit(params, images, mask) -> (count, mean, M2) of the batch's latents (and mirrors)."""
  def fn(params, images, mask):
    z = model.apply({"params": params}, images, method=method).astype(jnp.float32)
    m = mask.astype(jnp.float32)
    if hflip:
      z_f = model.apply({"params": params}, images[:, :, ::-1], method=method)
      z, m = jnp.concatenate([z, z_f.astype(jnp.float32)]), jnp.concatenate([m, m])
    mb = m[:, None, None, None]
    n = jnp.sum(m)
    mean = jnp.sum(z * mb, 0) / jnp.maximum(n, 1.0)
    return n, mean, jnp.sum(jnp.square(z - mean) * mb, 0)
  return fn


def compute_stats(config, uae_cfg, tok_params, hflip: bool = True, max_batches: int = 0,
                  method="tokenize") -> dict:
  """Exact per-element mean / var of the normalisation latents over `input.split`."""
  from uae_jax import sharding as sharding_lib  # pylint: disable=g-import-not-at-top
  from uae_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  mesh = sharding_lib.make_mesh({"data": -1, "fsdp": 1})
  batch_sh, rep = sharding_lib.batch_sharding(mesh), sharding_lib.replicated(mesh)
  fn = jax.jit(_batch_moments_fn(build_tokenizer(uae_cfg), hflip, method), out_shardings=rep)
  params = jax.device_put(tok_params, rep)
  cfg = config.input.copy_and_resolve_references()
  cfg.eval_max_examples = 0
  it = pipeline.make_eval_iterator(cfg, split=config.input.split)
  acc = None
  for i, batch in enumerate(it):
    if max_batches and i >= max_batches:
      break
    g = pipeline.to_global_array({k: batch[k] for k in ("image", "mask")}, batch_sh)
    n, mean, m2 = jax.device_get(fn(params, g["image"], g["mask"]))
    acc = combine_moments(acc, n, mean, m2)  # every host sees the same replicated moments
  if acc is None or acc["n"] < 2:
    raise ConfigError(f"input.split={config.input.split!r} gave fewer than 2 latents for statistics")
  var = acc["m2"] / acc["n"]
  return {"mean": acc["mean"].astype(np.float32), "var": var.astype(np.float32),
          "count": np.int64(acc["n"])}


def save_stats(path: str, stats: dict, info: dict) -> None:
  """Writes the statistics (and string metadata) as an .npz; only process 0 writes."""
  if jax.process_index() != 0:
    return
  epath.Path(path).parent.mkdir(parents=True, exist_ok=True)
  tmp = path + ".tmp.npz"
  with open(tmp, "wb") as f:
    np.savez(f, mean=stats["mean"], var=stats["var"], count=stats["count"],
             **{f"info_{k}": np.asarray(str(v)) for k, v in info.items()})
  os.replace(tmp, path)


def load_stats(path: str, shape: tuple) -> dict:
  """{'mean', 'var', 'std'} float32 (H, W, C) from a stats .npz; LoadError if unusable."""
  try:
    with np.load(path, allow_pickle=False) as f:
      mean, var = np.asarray(f["mean"], np.float32), np.asarray(f["var"], np.float32)
  except (OSError, KeyError, ValueError) as e:
    raise LoadError(f"{path}: not a latent statistics file ({type(e).__name__}: {e})") from None
  if mean.shape != tuple(shape) or var.shape != tuple(shape):
    raise LoadError(f"{path}: statistics of shape {mean.shape} but the tokenizer's latent is "
                    f"{tuple(shape)}")
  if not (np.all(np.isfinite(mean)) and np.all(np.isfinite(var)) and np.all(var >= 0)):
    raise LoadError(f"{path}: statistics hold non-finite or negative values")
  return _with_std({"mean": mean, "var": var})


def _with_std(stats: dict) -> dict:
  """{'mean', 'var', 'std' = sqrt(var + 1e-5)} as float32 arrays."""
  mean, var = np.asarray(stats["mean"], np.float32), np.asarray(stats["var"], np.float32)
  return {"mean": mean, "var": var, "std": np.sqrt(var + STATS_EPS).astype(np.float32)}


def ensure_stats(config, uae_cfg, tok_params, recompute: bool = False, method="tokenize",
                 tag: str = "") -> dict:
  """Loads the statistics file, computing and storing it first if it is missing.

  `method` (a tokenizer method name or function) and `tag` select another latent than the plain
  `tokenize` output (uae_jax/generate/views.py).
  """
  path = stats_path(config, tag)
  if not path:
    return _with_std(compute_stats(config, uae_cfg, tok_params, hflip=config.train.hflip,
                                   method=method))
  if recompute or not epath.Path(path).exists():
    logging.info("latent statistics: one pass over %s/%s -> %s", config.input.source,
                 config.input.split, path)
    stats = compute_stats(config, uae_cfg, tok_params, hflip=config.train.hflip, method=method)
    save_stats(path, stats, {"latent": tag or "tokenize", "tokenizer_config": config.tokenizer.config,
                             "tokenizer_workdir": config.tokenizer.workdir,
                             "source": config.input.source, "split": config.input.split,
                             "hflip": config.train.hflip})
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      multihost_utils.sync_global_devices("latent_stats_written")
  return load_stats(path, latent_shape(uae_cfg))


# ------------------------------------------------------------------------------ stored latents
STORED_STATS = "stats.npz"


def _encode_fn(model, hflip: bool, method="tokenize"):
  """jit(params, images, mask) -> (latents (B, V, H, W, C), count, mean, M2) of one batch."""
  moments = _batch_moments_fn(model, hflip, method)

  def fn(params, images, mask):
    z = model.apply({"params": params}, images, method=method).astype(jnp.float32)
    views = [z]
    if hflip:
      views.append(model.apply({"params": params}, images[:, :, ::-1],
                               method=method).astype(jnp.float32))
    return (jnp.stack(views, 1),) + moments(params, images, mask)
  return fn


def _local_rows(x) -> np.ndarray:
  """This process's rows of a batch-sharded global array, in process-local order."""
  if jax.process_count() == 1:
    return np.asarray(jax.device_get(x))
  seen = {}
  for s in x.addressable_shards:
    seen.setdefault(s.index[0].start or 0, np.asarray(s.data))
  return np.concatenate([seen[k] for k in sorted(seen)])


def _shard_writer(out: str):
  """(ArrayRecord writer of this process's shard at a temporary path, tmp path, final name)."""
  from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top
  name = f"latents-{jax.process_index():05d}-of-{jax.process_count():05d}.array_record"
  tmp = os.path.join(out, name + ".tmp")
  return array_record_module.ArrayRecordWriter(tmp, "group_size:1"), tmp, name


def encode_dataset(config, uae_cfg, tok_params, out: str, hflip: bool = True, method="tokenize",
                   tag: str = "", max_batches: int = 0) -> dict:
  """Stores the latents of `input.split` (centre crop, eval mode) and their exact statistics.

  One pass: each process writes its rows as {latent (V, H, W, C) float32, label} records
  (V = 2 with `hflip`: the image and its mirror), the moments are combined in float64 exactly
  as in `compute_stats`. `out/manifest.json` is written last, so a directory with a manifest is
  complete. Returns the statistics.
  """
  from uae_jax import sharding as sharding_lib  # pylint: disable=g-import-not-at-top
  from uae_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  mesh = sharding_lib.make_mesh({"data": -1, "fsdp": 1})
  batch_sh, rep = sharding_lib.batch_sharding(mesh), sharding_lib.replicated(mesh)
  fn = jax.jit(_encode_fn(build_tokenizer(uae_cfg), hflip, method),
               out_shardings=(batch_sh, rep, rep, rep))
  params = jax.device_put(tok_params, rep)
  cfg = config.input.copy_and_resolve_references()
  cfg.eval_max_examples = 0
  epath.Path(out).mkdir(parents=True, exist_ok=True)
  writer, tmp, name = _shard_writer(out)
  acc, written = None, 0
  for i, batch in enumerate(pipeline.make_eval_iterator(cfg, split=config.input.split)):
    if max_batches and i >= max_batches:
      break
    g = pipeline.to_global_array({k: batch[k] for k in ("image", "mask")}, batch_sh)
    z, n, mean, m2 = fn(params, g["image"], g["mask"])
    acc = combine_moments(acc, *jax.device_get((n, mean, m2)))
    for row, label, ok in zip(_local_rows(z), batch["label"], batch["mask"]):
      if ok:  # padding and undecodable records are not stored (nor counted in the moments)
        writer.write(pipeline.latent_record(row, int(label)))
        written += 1
  writer.close()
  os.replace(tmp, os.path.join(out, name))
  if acc is None or acc["n"] < 2:
    raise ConfigError(f"input.split={config.input.split!r} gave fewer than 2 latents")
  stats = {"mean": acc["mean"].astype(np.float32), "var": (acc["m2"] / acc["n"]).astype(np.float32),
           "count": np.int64(acc["n"])}
  _finish_latent_dir(config, out, stats, written, hflip, latent_shape(uae_cfg), tag)
  return stats


def _finish_latent_dir(config, out: str, stats: dict, written: int, hflip: bool, shape,
                       tag: str = "") -> None:
  """Writes the statistics and (last, atomically) the manifest; process 0 after all shards."""
  import json  # pylint: disable=g-import-not-at-top
  from uae_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  total = written
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    total = int(np.sum(multihost_utils.process_allgather(np.int64(written))))
    multihost_utils.sync_global_devices("latent_shards_written")
  if jax.process_index() != 0:
    return
  info = {"latent": tag or "tokenize", "tokenizer_config": config.tokenizer.config,
          "tokenizer_workdir": config.tokenizer.workdir,
          "source": config.input.source, "split": config.input.split, "hflip": hflip}
  save_stats(os.path.join(out, STORED_STATS), stats, info)
  shards = [f"latents-{p:05d}-of-{jax.process_count():05d}.array_record"
            for p in range(jax.process_count())]
  manifest = dict(info, count=total, views=2 if hflip else 1, shape=list(shape), shards=shards,
                  stats=STORED_STATS)
  tmp = os.path.join(out, pipeline.LATENT_MANIFEST + ".tmp")
  with open(tmp, "w") as f:
    json.dump(manifest, f, indent=1)
  os.replace(tmp, os.path.join(out, pipeline.LATENT_MANIFEST))
