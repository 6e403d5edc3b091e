"""`python -m uae_jax.generate {sample, stats, latents}`: samples of a trained DiT, latent statistics,
stored training latents.

    python -m uae_jax.generate sample --workdir=RUN --num=50000 --out=samples.npz \
        [--config=configs/dit.py] [--cfg-scale=1.5 --cfg-interval=0.1,1.0] [--sampler=euler]
        [--steps=50] [--label-sampling=equal] [--seed=42] [--batch=256] [--params=ema]
    python -m uae_jax.generate stats --config=configs/dit.py:tiny [--set tokenizer.workdir=UAE]
    python -m uae_jax.generate latents --config=configs/dit.py:tiny --out=DIR [--no-hflip]

`sample` uses the config the run recorded in its checkpoint (model, tokenizer, transport), so
`--config` is only needed for a workdir without one; `--set key=value` overrides any config key.
The output is what the ADM evaluation suite reads: `arr_0` uint8 (N, H, W, 3) and `arr_1` int
labels, plus `<out>_grid.png` (one row per class). Sampling runs in chunks of `--batch`, each
written to `<out>.parts/` as soon as it is done; a killed run started again with the same
arguments skips the finished chunks. Sample j's noise depends only on (seed, j), so the result
does not depend on the batch size, the device count or where a run was interrupted.
"""
import argparse
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from etils import epath

from uae_jax.errors import ConfigError, UserError
from uae_jax.generate import views


# ------------------------------------------------------------------------------ config
def _parse_value(old, text: str):
  """`text` converted to the type of the existing config value `old`."""
  if isinstance(old, bool):
    if text not in ("true", "True", "1", "false", "False", "0"):
      raise ConfigError(f"expected a boolean, got {text!r}")
    return text in ("true", "True", "1")
  if isinstance(old, (int, float)) and not isinstance(old, bool):
    try:
      return type(old)(float(text) if isinstance(old, float) else int(text))
    except ValueError:
      raise ConfigError(f"expected a {type(old).__name__}, got {text!r}") from None
  return text


def apply_overrides(config, sets) -> None:
  """Applies 'dotted.key=value' strings to a ConfigDict in place (unknown keys raise)."""
  for item in sets or ():
    key, sep, value = item.partition("=")
    if not sep:
      raise ConfigError(f"--set {item!r}: expected key=value")
    node, parts = config, key.split(".")
    for p in parts[:-1]:
      if p not in node:
        raise ConfigError(f"--set {key}: unknown config key")
      node = node[p]
    if parts[-1] not in node:
      raise ConfigError(f"--set {key}: unknown config key")
    try:
      node[parts[-1]] = _parse_value(node[parts[-1]], value)
    except ConfigError as e:
      raise ConfigError(f"--set {key}: {e}") from None


def recorded_config(workdir: str):
  """The config a training run saved with its newest checkpoint, or None."""
  from uae_jax.checkpoint import manager as ckpt_lib  # pylint: disable=g-import-not-at-top
  ckpt_dir = ckpt_lib.checkpoint_dir(workdir)
  if not epath.Path(ckpt_dir).is_dir():
    return None
  mgr = ckpt_lib.CheckpointManager(ckpt_dir, async_save=False)
  try:
    step = mgr.latest_step()
    if step is None:
      return None
    text = mgr.meta(step).get("config")
  finally:
    mgr.close()
  if not text:
    return None
  return ml_collections.ConfigDict(json.loads(text) if isinstance(text, str) else text)


def resolve_config(spec: str, workdir: str, sets=()):
  """Config for sampling: the run's recorded one (model/tokenizer/transport), else `spec`'s."""
  from uae_jax.generate import latents  # pylint: disable=g-import-not-at-top
  rec = recorded_config(workdir) if workdir else None
  if rec is None and not spec:
    raise ConfigError(f"{workdir}: no recorded config in a checkpoint; pass --config")
  config = latents.load_config_spec(spec) if spec else rec
  if rec is not None and spec:
    for key in ("model", "tokenizer", "transport", "latent"):
      if key in rec:
        config[key] = rec[key]
    logging.info("model, tokenizer and transport taken from the config recorded in %s", workdir)
  views.with_defaults(config)
  apply_overrides(config, sets)
  return config


# ------------------------------------------------------------------------------ models
def restore_dit(config, workdir: str, mesh, which: str = "ema"):
  """The DiT's `which` params ('ema' | 'params') from the newest checkpoint in `workdir`."""
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  from uae_jax import sharding as sharding_lib  # pylint: disable=g-import-not-at-top
  from uae_jax.checkpoint import manager as ckpt_lib  # pylint: disable=g-import-not-at-top
  from uae_jax.tasks import dit as dit_task  # pylint: disable=g-import-not-at-top
  if which not in ("ema", "params"):
    raise ConfigError(f"--params={which!r}: expected ema or params")
  boxed = jax.eval_shape(lambda k: dit_task.init_state(config, k), jax.random.key(0))[which]
  sh = sharding_lib.logical_shardings(boxed, mesh, config.sharding_rules)
  abstract = sharding_lib.abstract_with_shardings(nn.unbox(boxed), sh)
  out = ckpt_lib.restore_subtrees(workdir, {which: abstract})
  return out[which]


def _parts_meta(args, config, n_classes: int) -> dict:
  """What must match for chunks of an earlier run to be reused."""
  s = config.sample
  return {"num": args.num, "batch": args.batch, "seed": args.seed, "sampler": args.sampler,
          "steps": args.steps, "cfg_scale": args.cfg_scale, "cfg_interval": args.cfg_interval,
          "guidance": args.guidance, "label_sampling": args.label_sampling, "params": args.params,
          "num_classes": n_classes, "diffusion": [s.diffusion_form, s.diffusion_norm],
          "model": config.model.to_dict(), "workdir": os.path.abspath(args.workdir)}


def _open_parts(out: str, meta: dict) -> str:
  """The chunk directory of `out`; raises if it holds chunks of different settings."""
  parts = out + ".parts"
  os.makedirs(parts, exist_ok=True)
  meta_path = os.path.join(parts, "settings.json")
  if os.path.exists(meta_path):
    old = json.loads(open(meta_path).read())
    if old != json.loads(json.dumps(meta)):
      raise ConfigError(f"{parts} holds chunks of a run with other settings; delete it or "
                        "use another --out")
  elif jax.process_index() == 0:
    with open(meta_path, "w") as f:
      f.write(json.dumps(meta, indent=1))
  return parts


def _part_ok(path: str, n: int) -> bool:
  """True if a chunk file is complete and readable with `n` images."""
  try:
    with np.load(path, allow_pickle=False) as f:
      return f["images"].shape[0] == n and f["labels"].shape == (n,)
  except (OSError, KeyError, ValueError):
    return False


def _write_npz(path: str, **arrays) -> None:
  """Atomic .npz write (temporary file, then rename)."""
  tmp = path + ".tmp.npz"
  with open(tmp, "wb") as f:
    np.savez(f, **arrays)
  os.replace(tmp, path)


def class_grid(images: np.ndarray, labels: np.ndarray, per_class: int = 8,
               max_classes: int = 16) -> np.ndarray:
  """uint8 grid: one row per class (first classes present), the first `per_class` samples each."""
  from uae_jax.metric_writers import image_grid  # pylint: disable=g-import-not-at-top
  rows = []
  for c in np.unique(labels)[:max_classes]:
    sel = images[labels == c][:per_class]
    rows.append([im.astype(np.float32) / 255.0 for im in sel])
  return image_grid(rows)


# ------------------------------------------------------------------------------ sample
def _build_generate(args, config, mesh):
  """(jitted generate(idx, labels) -> uint8 images, labels of all samples, num classes)."""
  from uae_jax import sharding as sharding_lib  # pylint: disable=g-import-not-at-top
  from uae_jax.generate import latents, sampling  # pylint: disable=g-import-not-at-top
  from uae_jax.tasks import dit as dit_task  # pylint: disable=g-import-not-at-top
  lo, hi = args.cfg_interval
  spec = sampling.sampler_spec(config, method=args.sampler, num_points=args.steps,
                               mode=args.guidance, scale=args.cfg_scale, t_min=lo, t_max=hi)
  params = restore_dit(config, args.workdir, mesh, args.params)
  guide_model = guide_params = None
  if spec.guidance.mode == "autoguidance" and spec.guidance.active:
    if not (args.guide_workdir or config.sample.guide_workdir):
      raise ConfigError("--guidance=autoguidance needs --guide-workdir (the guide model's run)")
    g_dir = args.guide_workdir or config.sample.guide_workdir
    g_cfg = resolve_config(args.guide_config or config.sample.guide_config, g_dir)
    guide_model = dit_task.build_model(g_cfg)
    guide_params = restore_dit(g_cfg, g_dir, mesh, args.params)
  uae_cfg, tokenizer = dit_task.build_tokenizer(config)
  tok = latents.load_tokenizer_params(config, uae_cfg)
  stats = dit_task.latent_stats(config, uae_cfg, tok)
  rep = sharding_lib.replicated(mesh)
  tok = jax.device_put(tok, rep)
  stats = jax.device_put({"mean": stats["mean"], "std": stats["std"]}, rep)
  gen = sampling.make_generate(dit_task.build_model(config), tokenizer,
                               config.transport.prediction, spec, config.model.num_classes,
                               guide_model, decode=views.decode_method(config))
  m = config.model
  shape = (m.input_size, m.input_size, m.in_channels)
  key = jax.random.key(args.seed)

  def run(idx, labels, chunk):
    # Per-sample noise from (seed, sample index): independent of batching and devices.
    noise = jax.vmap(lambda j: jax.random.normal(jax.random.fold_in(key, j), shape))(idx)
    rng = jax.random.fold_in(jax.random.key(args.seed + 1), chunk)
    return gen(params, guide_params, tok, stats, noise, labels, rng)

  batch_sh = sharding_lib.batch_sharding(mesh)
  fn = jax.jit(run, in_shardings=(batch_sh, batch_sh, None), out_shardings=rep)
  labels = sampling.labels_for(args.num, m.num_classes, args.label_sampling, args.seed)
  return fn, labels, spec


def sample(args) -> dict:
  """Generates `args.num` samples chunk by chunk into `args.out` (resumable); returns a summary."""
  from uae_jax import sharding as sharding_lib  # pylint: disable=g-import-not-at-top
  config = resolve_config(args.config, args.workdir, args.set)
  if args.batch % jax.device_count():
    raise ConfigError(f"--batch={args.batch} is not divisible by the {jax.device_count()} devices")
  mesh = sharding_lib.make_mesh(config.mesh)
  fn, labels, spec = _build_generate(args, config, mesh)
  parts = _open_parts(args.out, _parts_meta(args, config, config.model.num_classes))
  n_chunks = -(-args.num // args.batch)
  paths = [os.path.join(parts, f"part_{i:06d}.npz") for i in range(n_chunks)]
  sizes = [min(args.batch, args.num - i * args.batch) for i in range(n_chunks)]
  done = np.asarray([_part_ok(p, n) for p, n in zip(paths, sizes)])
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    done = multihost_utils.broadcast_one_to_all(done)
  todo = [i for i in range(n_chunks) if not done[i]]
  if args.max_chunks > 0 and len(todo) > args.max_chunks:
    todo, stop_early = todo[:args.max_chunks], True
  else:
    stop_early = False
  print(f"{n_chunks - len(todo)} of {n_chunks} chunks already done; {len(todo)} to go", flush=True)
  t0, made = time.time(), 0
  for k, i in enumerate(todo):
    start, n = i * args.batch, sizes[i]
    idx = np.arange(start, start + args.batch, dtype=np.int32)  # the last chunk is padded
    lab = np.resize(labels[start:start + n], args.batch).astype(np.int32)
    images = np.asarray(jax.device_get(fn(idx, lab, i)))[:n]
    if jax.process_index() == 0:
      _write_npz(paths[i], images=images, labels=labels[start:start + n])
    made += n
    rate = made / (time.time() - t0)
    left = sum(sizes[j] for j in todo[k + 1:])
    print(f"chunk {i + 1}/{n_chunks} | {made} new samples | {rate:.2f} img/s | "
          f"ETA {left / max(rate, 1e-9):.0f} s", flush=True)
  summary = {"num": args.num, "chunks": n_chunks, "resumed_chunks": n_chunks - len(todo),
             "new_samples": made, "seconds": time.time() - t0,
             "images_per_sec": made / max(time.time() - t0, 1e-9), "nfe": _nfe(spec),
             "out": args.out}
  if stop_early:
    print(f"stopped after {args.max_chunks} chunks (--max-chunks); run again to continue",
          flush=True)
  elif jax.process_index() == 0:
    _finish(args.out, paths, parts)
  return summary


def _nfe(spec) -> int:
  """Network evaluations per sample (x2 where guidance runs a second pass)."""
  n = (spec.num_points - 1) * {"euler": 1, "heun": 2, "rk4": 4, "euler_maruyama": 1}[spec.method]
  return n * (2 if spec.guidance.active else 1)


def _finish(out: str, paths, parts: str) -> None:
  """Concatenates the chunks into the ADM .npz and the class grid PNG; removes the chunks."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  images, labels = [], []
  for p in paths:
    with np.load(p, allow_pickle=False) as f:
      images.append(f["images"])
      labels.append(f["labels"])
  images, labels = np.concatenate(images), np.concatenate(labels).astype(np.int64)
  epath.Path(out).parent.mkdir(parents=True, exist_ok=True)
  _write_npz(out, arr_0=images, arr_1=labels)
  Image.fromarray(class_grid(images, labels)).save(os.path.splitext(out)[0] + "_grid.png")
  for p in paths:
    os.remove(p)
  os.remove(os.path.join(parts, "settings.json"))
  os.rmdir(parts)
  print(f"wrote {out}: arr_0 {images.shape} uint8, arr_1 {labels.shape} labels", flush=True)


# ------------------------------------------------------------------------------ stats
def stats(args) -> dict:
  """Computes (or recomputes) the latent statistics file of a DiT config."""
  from uae_jax.generate import latents  # pylint: disable=g-import-not-at-top
  config = resolve_config(args.config, args.workdir, args.set)
  uae_cfg = latents.tokenizer_config(config)
  tok = latents.load_tokenizer_params(config, uae_cfg)
  from uae_jax.tasks import dit as dit_task  # pylint: disable=g-import-not-at-top
  s = dit_task.latent_stats(config, uae_cfg, tok, recompute=args.recompute)
  path = latents.stats_path(config, views.stats_tag(config, uae_cfg))
  print(f"latent statistics {path or '(not stored: random tokenizer)'}: shape {s['mean'].shape}, "
        f"mean |mean| {np.abs(s['mean']).mean():.4f}, mean std {s['std'].mean():.4f}", flush=True)
  return {"path": path}


def encode_latents(args) -> dict:
  """Stores a DiT config's training latents (+ mirrors) and their statistics in `--out`."""
  from uae_jax.generate import latents  # pylint: disable=g-import-not-at-top
  config = resolve_config(args.config, args.workdir, args.set)
  uae_cfg = latents.tokenizer_config(config)
  views.validate(config, uae_cfg)
  if config.latent.progressive.enabled:
    raise ConfigError("latent.progressive: the schedule's latent changes during training; "
                      "store the plain latent (or encode on the fly)")
  tok = latents.load_tokenizer_params(config, uae_cfg)
  t0 = time.time()
  s = latents.encode_dataset(config, uae_cfg, tok, args.out, hflip=args.hflip,
                             method=views.stats_method(config, uae_cfg),
                             tag=views.stats_tag(config, uae_cfg), max_batches=args.max_batches)
  print(f"wrote {args.out}: {int(s['count'])} latents{' (images + mirrors)' if args.hflip else ''}"
        f" of shape {s['mean'].shape} in {time.time() - t0:.1f} s; train with "
        f"--config.latent.source=stored --config.latent.dir={args.out}", flush=True)
  return {"out": args.out, "count": int(s["count"])}


# ------------------------------------------------------------------------------ main
def _interval(text: str) -> tuple:
  """'0.1,1.0' -> (0.1, 1.0)."""
  try:
    lo, hi = (float(v) for v in text.split(","))
  except ValueError:
    raise argparse.ArgumentTypeError(f"expected two numbers 'lo,hi', got {text!r}") from None
  return lo, hi


def parser() -> argparse.ArgumentParser:
  """The command-line parser of `python -m uae_jax.generate`."""
  p = argparse.ArgumentParser(prog="python -m uae_jax.generate", description=__doc__.split("\n")[0])
  sub = p.add_subparsers(dest="cmd", required=True)
  s = sub.add_parser("sample", help="ADM-format .npz of class-conditional samples")
  s.add_argument("--workdir", required=True, help="the DiT training run")
  s.add_argument("--config", default="", help="config spec (only if the run recorded none)")
  s.add_argument("--out", required=True, help="output .npz (arr_0 uint8 NHWC, arr_1 labels)")
  s.add_argument("--num", "--num-samples", type=int, default=50_000, dest="num")
  s.add_argument("--batch", type=int, default=256, help="global batch per chunk")
  s.add_argument("--sampler", default=None, help="euler | heun | rk4 | euler_maruyama")
  s.add_argument("--steps", type=int, default=None, help="grid points (steps + 1)")
  s.add_argument("--guidance", default=None, help="none | cfg | autoguidance")
  s.add_argument("--cfg-scale", type=float, default=None)
  s.add_argument("--cfg-interval", type=_interval, default=(None, None),
                 help="transport-time interval 'lo,hi' where guidance acts")
  s.add_argument("--label-sampling", default="equal", help="equal | random")
  s.add_argument("--seed", type=int, default=42)
  s.add_argument("--params", default="ema", help="ema | params")
  s.add_argument("--max-chunks", type=int, default=0,
                 help="stop after this many new chunks (0: all); run again to continue")
  s.add_argument("--guide-workdir", default="", help="autoguidance: the guide model's run")
  s.add_argument("--guide-config", default="", help="autoguidance: its config spec if unrecorded")
  t = sub.add_parser("stats", help="latent mean/std of the tokenizer over the training split")
  t.add_argument("--config", required=True)
  t.add_argument("--workdir", default="", help="unused; accepted for symmetry")
  t.add_argument("--recompute", action="store_true")
  e = sub.add_parser("latents", help="store the training latents (+ mirrors) and their statistics")
  e.add_argument("--config", required=True, help="the DiT config (tokenizer, input split, latent)")
  e.add_argument("--workdir", default="", help="unused; accepted for symmetry")
  e.add_argument("--out", required=True, help="output directory (shards, stats.npz, manifest)")
  e.add_argument("--hflip", action=argparse.BooleanOptionalAction, default=True,
                 help="also store each mirrored image's latent (default on)")
  e.add_argument("--max-batches", type=int, default=0, help="stop after N batches (tests)")
  for q in (s, t, e):
    q.add_argument("--set", action="append", default=[], help="config override key=value")
  return p


def main(argv) -> None:
  """Entry point: one-line errors and exit status 2 for anything a user can fix."""
  args = parser().parse_args(argv)
  from uae_jax.metric_writers import quiet_library_logs  # pylint: disable=g-import-not-at-top
  quiet_library_logs()
  logging.set_verbosity(logging.WARNING)  # Orbax logs every restore at INFO
  try:
    if args.cmd == "sample":
      print(json.dumps(sample(args)), flush=True)
    elif args.cmd == "latents":
      encode_latents(args)
    else:
      stats(args)
  except UserError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
