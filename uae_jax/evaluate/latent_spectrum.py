"""Latent spectrum analysis of any trained tokenizer (a UAE stage or a KL-VAE run).

    python -m uae_jax.evaluate latent-spectrum --workdir=RUN [--delta 1.0] [--max-examples N]

The run's saved config (checkpoint 'meta') says what it is: `task = "uae"` (paper or official
recipe; the latent is the tokenizer's `tokenize` output, i.e. the fused clean bands or the
eval-mode low-pass) or `task = "kl_vae"` (SD-VAE / ESM-AE / DSM-AE / VQ; the posterior mean).

Per image, with the ANALYSIS settings of the Spectrum Matching code's `latent_analysis.py`
(no centring, DC kept, log1p, 16 radial bins; not the ESM loss settings), it computes:
  image    the 16-bin normalised band distribution of the image (delta = 0), the image blurred
           (7 x 7, sigma 1.2; skipped when the latent is 32 high, as the original) and bicubic-
           resized to the latent grid;
  target   the same flattened by (j + 1)^delta;
  latent   the latent's distribution;
  kl       KL(target || latent).
It reports mean +- std over images, the latent PCA picture (one 3-component PCA over latent
pixels, as RGB, min-max per image) and the DSM low-pass probe: for k in {0, 2, 4, 6, 8} the same
8 x 8 block-DCT mask on image and latent, the masked latent decoded, PSNR (always) and FID (when
FID Inception weights are available) between the decode and the masked image. Without Inception
weights the FID is not computed, exactly as `evaluate recon` leaves rFID out; the report says so.

Writes `latent_spectrum.json`, `latent_spectrum.png` (curves + PCA) and `latent_pca.png`, each
atomically (temporary file, then rename), into `--out` (default `<workdir>/latent_spectrum`).
"""
from __future__ import annotations

import json
import os
from typing import Iterable, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from uae_jax.errors import ConfigError
from uae_jax.losses import spectrum

LOWPASS_KS = (0, 2, 4, 6, 8)
TOKENIZER_TASKS = ("uae", "kl_vae")
FID_MISSING_NOTE = ("low-pass FID not computed: no FID Inception weights (pass --inception "
                    "pt_inception-2015-12-05-6726825d.pth; no package ships them); the low-pass "
                    "PSNR is reported instead")
# The measured 16-bin ImageNet RGB curve (delta = 0, analysis settings, f16 latent grid) that the
# Spectrum Matching authors plot in `latent_analysis.py: visualize_PSD`.
IMAGENET_RGB = (.4657, .1913, .0997, .0666, .0388, .0265, .0217, .0162, .0131, .0123, .0103,
                .0097, .0076, .0069, .0067, .0069)


# ------------------------------------------------------------------------------------------------
# Tokenizers of either kind.


def tokenizer_module(config) -> nn.Module:
  """The [0, 1] `tokenize` / `decode` module of a tokenizer run's config (UAE or KL-VAE)."""
  task = config.get("task", "uae")
  if task == "uae":
    from uae_jax.tasks import uae as uae_task
    return uae_task.build_model(config)
  if task == "kl_vae":
    from uae_jax.tasks import kl_vae as kl_task
    return kl_task.build_tokenizer(config)
  raise ConfigError(f"task {task!r} is not a tokenizer (expected one of {TOKENIZER_TASKS})")


def tokenizer_latent_shape(config) -> tuple:
  """(h, w, C) of a tokenizer config's latent grid (UAE or KL-VAE)."""
  task = config.get("task", "uae")
  if task == "kl_vae":
    from uae_jax.tasks import kl_vae as kl_task
    return tuple(kl_task.latent_grid(config))
  if task == "uae":
    from uae_jax.models import encoders
    enc = dict(config.model.encoder)
    g = encoders.latent_grid(enc)
    return (g, g, encoders.latent_dim(enc))
  raise ConfigError(f"task {task!r} is not a tokenizer (expected one of {TOKENIZER_TASKS})")


def abstract_tokenizer_params(config, mesh):
  """ShapeDtypeStructs (with shardings) of the params a tokenizer run checkpoints."""
  from uae_jax import sharding as sharding_lib
  from uae_jax import tasks as tasks_lib
  task = tasks_lib.get(config.get("task", "uae"))
  boxed = jax.eval_shape(lambda k: task.init_state(config, k)["params"], jax.random.key(0))
  shardings = sharding_lib.logical_shardings(boxed, mesh, config.sharding_rules)
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      nn.unbox(boxed), shardings)


def restore_tokenizer(workdir: str, step: Optional[int] = None, which: str = "ema") -> tuple:
  """(config, tokenizer module, params, step) of a UAE or KL-VAE training run."""
  from uae_jax.checkpoint import manager as ckpt_lib
  from uae_jax.evaluate import cli as eval_cli
  config, step = eval_cli.run_config_and_step(workdir, step)
  module = tokenizer_module(config)  # raises ConfigError for non-tokenizer runs
  mesh = eval_cli.make_mesh(config)
  target = {which: abstract_tokenizer_params(config, mesh)}
  out, used, _ = ckpt_lib.restore_subtrees(workdir, target, step, with_progress=True, move=False)
  return config, module, out[which], used


# ------------------------------------------------------------------------------------------------
# The analysis.


def _analysis_fns(tokenizer, delta: float, blur_skip_height: int):
  """(analyse, lowpass) jitted functions of one tokenizer."""

  @jax.jit
  def analyse(params, images):
    z = tokenizer.apply({"params": params}, images, method="tokenize").astype(jnp.float32)
    return z, spectrum.analysis_distributions(2.0 * images - 1.0, z, delta,
                                              blur_skip_height=blur_skip_height)

  @jax.jit
  def lowpass(params, images, z, k):
    # The probe of DSM: the same block mask on the [-1, 1] image and on the latent.
    x_bar = (spectrum.dsm_mask(2.0 * images - 1.0, k) + 1.0) / 2.0
    dec = tokenizer.apply({"params": params}, spectrum.dsm_mask(z, k), method="decode")
    dec, x_bar = jnp.clip(dec, 0.0, 1.0), jnp.clip(x_bar, 0.0, 1.0)
    se = jnp.mean(jnp.square(dec - x_bar), axis=(1, 2, 3))
    return 20.0 * jnp.log10(1.0 / jnp.sqrt(jnp.maximum(se, 1e-10))), dec, x_bar

  return analyse, lowpass


def _summary(dists: dict, delta: float, latent_shape) -> dict:
  """Mean +- std of the per-image distributions and KL."""
  d = {k: np.concatenate(v) for k, v in dists.items()}
  out = {"num_images": int(d["kl"].shape[0]), "delta": float(delta),
         "latent_shape": [int(s) for s in latent_shape],
         "kl_mean": float(d["kl"].mean()), "kl_std": float(d["kl"].std())}
  for key in ("image", "target", "latent"):
    out[key] = {"mean": d[key].mean(0).tolist(), "std": d[key].std(0).tolist()}
  return out


def analyse_tokenizer(tokenizer, params, batches: Iterable, delta: float = 1.0,
                      lowpass_ks: Sequence[int] = LOWPASS_KS,
                      blur_skip_height: int = spectrum.REFERENCE_BLUR_SKIP_HEIGHT,
                      fid=None, num_pca: int = 8) -> dict:
  """Band distributions, KL, PCA picture and low-pass probe of a tokenizer on [0, 1] batches.

  `batches` yields (B, S, S, 3) float images; `fid` is an optional `InceptionFID`. The low-pass
  probe needs a latent grid divisible by 8 (otherwise `lowpass` is empty, with a note).
  """
  from uae_jax.evaluate import fid as fid_lib
  analyse, lowpass = _analysis_fns(tokenizer, delta, blur_skip_height)
  dists, latents, shape = {}, [], None
  psnr = {int(k): [] for k in lowpass_ks}
  stats = {int(k): (fid_lib.FeatureStats(), fid_lib.FeatureStats()) for k in lowpass_ks}
  for images in batches:
    images = jnp.asarray(images, jnp.float32)
    z, d = analyse(params, images)
    shape = z.shape[1:]
    for key, v in jax.device_get(d).items():
      dists.setdefault(key, []).append(np.asarray(v, np.float64))
    if sum(len(x) for x in latents) < num_pca:
      latents.append(np.asarray(z))
    if z.shape[1] % spectrum.DSM_BLOCK or z.shape[2] % spectrum.DSM_BLOCK:
      continue
    for k in psnr:
      value, dec, x_bar = lowpass(params, images, z, jnp.int32(k))
      psnr[k].append(np.asarray(value, np.float64))
      if fid is not None:
        mask = jnp.ones(images.shape[:1], bool)
        stats[k][0].add_sums(jax.device_get(fid.batch_sums(dec, mask)))
        stats[k][1].add_sums(jax.device_get(fid.batch_sums(x_bar, mask)))
  if not dists:
    raise ConfigError("latent-spectrum: the data gave no images")
  out = _summary(dists, delta, shape)
  out["lowpass"] = {str(k): {"psnr": float(np.concatenate(v).mean())} for k, v in psnr.items() if v}
  if not out["lowpass"]:
    out["lowpass_note"] = (f"low-pass probe skipped: the latent grid {shape[0]}x{shape[1]} is not "
                           f"divisible by the DSM block {spectrum.DSM_BLOCK}")
  if fid is not None:
    for k, (fake, real) in stats.items():
      if psnr[k]:
        out["lowpass"][str(k)]["fid"] = fid.distance(fake, real.mean_cov())
  elif out["lowpass"]:
    out["lowpass_note"] = FID_MISSING_NOTE
  out["pca_rgb"] = spectrum.pca_rgb(np.concatenate(latents)[:num_pca])
  return out


def imagenet_rgb_difference(images: np.ndarray, grid: int = 16,
                            blur_skip_height: int = spectrum.REFERENCE_BLUR_SKIP_HEIGHT) -> dict:
  """Image-side band distribution (analysis settings, delta 0) of [0, 1] images on a grid x grid
  latent grid vs the authors' measured ImageNet RGB curve: {'ours', 'imagenet', 'diff'}.

  The ImageNet curve was measured for the f16d16 model at 256 px, i.e. a 16 x 16 grid.
  """
  x = 2.0 * jnp.asarray(images, jnp.float32) - 1.0
  z = jnp.zeros((x.shape[0], grid, grid, 1), jnp.float32)
  # Jitted: eagerly every op of the analysis compiles its own program.
  analyse = jax.jit(lambda x, z: spectrum.analysis_distributions(
      x, z, 0.0, blur_skip_height=blur_skip_height)["image"])
  p = np.asarray(analyse(x, z), np.float64)
  ours = p.mean(0)
  ref = np.asarray(IMAGENET_RGB)
  return {"ours": ours.tolist(), "ours_std": p.std(0).tolist(), "imagenet": ref.tolist(),
          "diff": (ours - ref).tolist(), "num_images": int(p.shape[0]), "grid": grid}


# ------------------------------------------------------------------------------------------------
# Reports.


def text_report(rep: dict) -> str:
  """The printed table: distributions, KL, low-pass probe."""
  lines = [f"{rep['num_images']} images, latent {rep['latent_shape']}, delta {rep['delta']}: "
           f"KL(target || latent) = {rep['kl_mean']:.4f} +- {rep['kl_std']:.4f}",
           "bin      " + " ".join(f"{j:>6d}" for j in range(spectrum.NUM_BINS))]
  for key in ("image", "target", "latent"):
    lines.append(f"{key:<8} " + " ".join(f"{v:6.4f}" for v in rep[key]["mean"]))
  for k, v in rep.get("lowpass", {}).items():
    lines.append(f"low-pass k={k}: " + ", ".join(f"{n} {x:.3f}" for n, x in v.items()))
  if rep.get("lowpass_note"):
    lines.append(rep["lowpass_note"])
  return "\n".join(lines)


def plot(rep: dict, path: str, title: str = "") -> None:
  """Band distributions (log scale, mean +- std) beside the latent PCA pictures, as PNG."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  pca = rep["pca_rgb"][:4]
  fig, axes = plt.subplots(1, 1 + len(pca), figsize=(5 + 1.6 * len(pca), 4), squeeze=False,
                           gridspec_kw={"width_ratios": [3] + [1] * len(pca)})
  ax, bins = axes[0][0], np.arange(spectrum.NUM_BINS)
  for key, style in (("image", "k-"), ("target", "k--"), ("latent", "r-")):
    m, s = np.asarray(rep[key]["mean"]), np.asarray(rep[key]["std"])
    ax.semilogy(bins, m, style, label=f"target delta={rep['delta']}" if key == "target" else key)
    ax.fill_between(bins, np.maximum(m - s, 1e-4), m + s, alpha=0.15, color=style[0])
  ax.set_xlabel("radial DCT bin (16 bins)")
  ax.set_ylabel("normalised band distribution")
  ax.set_title(f"{title} KL(target||latent) = {rep['kl_mean']:.4f}".strip(), fontsize=9)
  ax.legend(fontsize=8)
  for a, img in zip(axes[0][1:], pca):
    a.imshow(img, interpolation="nearest")
    a.axis("off")
  fig.tight_layout()
  with _atomic(path) as tmp, open(tmp, "wb") as f:
    fig.savefig(f, dpi=100, format="png")
  plt.close(fig)


def _atomic(path: str):
  """The evaluate CLI's temporary-name-then-rename context manager."""
  from uae_jax.evaluate import cli as eval_cli
  return eval_cli._atomic_path(path)  # pylint: disable=protected-access


def write_outputs(rep: dict, out_dir: str, title: str = "") -> dict:
  """Writes latent_spectrum.{png,json} and latent_pca.png atomically; returns their paths."""
  from PIL import Image
  from uae_jax.evaluate import cli as eval_cli
  from uae_jax.metric_writers import image_grid
  os.makedirs(out_dir, exist_ok=True)
  paths = {k: os.path.join(out_dir, f) for k, f in (
      ("png", "latent_spectrum.png"), ("pca", "latent_pca.png"), ("json", "latent_spectrum.json"))}
  plot(rep, paths["png"], title)
  pca = [np.repeat(np.repeat(p, max(1, 64 // p.shape[0]), 0), max(1, 64 // p.shape[1]), 1)
         for p in rep["pca_rgb"]]
  grid = image_grid([pca])
  write = eval_cli._write_atomic  # pylint: disable=protected-access
  write(paths["pca"], lambda f: Image.fromarray(grid).save(f, format="PNG"))
  # The JSON last: readers look for it, and it appears only when the pictures exist.
  write(paths["json"], json.dumps(dict(rep, pca_rgb=None), indent=1))
  return paths


# ------------------------------------------------------------------------------------------------
# Command line (`python -m uae_jax.evaluate latent-spectrum`).


def add_args(p) -> None:
  """The arguments of the `latent-spectrum` subcommand."""
  from uae_jax.evaluate import cli as eval_cli
  p.add_argument("--workdir", required=True, help="a UAE stage or KL-VAE training run")
  p.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
  p.add_argument("--raw", action="store_true", help="raw params instead of the EMA")
  p.add_argument("--data", default="", help="photos[:DIR] | array_record:DIR | tfds:NAME "
                 "(default: the run's input)")
  p.add_argument("--data-dir", default="")
  p.add_argument("--split", default="", help="default: the run's eval split")
  p.add_argument("--batch-size", type=int, default=0, help="default: the run's eval batch")
  p.add_argument("--max-examples", type=int, default=-1, help="first N images (-1: config)")
  p.add_argument("--delta", type=float, default=1.0, help="target flattening (j + 1)^delta")
  p.add_argument("--lowpass-k", default=",".join(map(str, LOWPASS_KS)),
                 help="DSM low-pass probe k values (removed anti-diagonals of 8 x 8 blocks)")
  p.add_argument("--blur-skip-height", type=int, default=spectrum.REFERENCE_BLUR_SKIP_HEIGHT,
                 help="skip the image blur at this latent height, as the original (0: always blur)")
  p.add_argument("--inception", default="", help=eval_cli.INCEPTION_HELP)
  p.add_argument("--out", default="", help="output dir (default: <workdir>/latent_spectrum)")


def _batches(input_cfg):
  """Valid [0, 1] images of the eval split, batch by batch (this process reads everything)."""
  from uae_jax.data import pipeline
  it = pipeline.make_eval_iterator(input_cfg, process_index=0, process_count=1)
  try:
    for b in it:
      valid = np.asarray(b["mask"], bool)
      if valid.any():
        yield np.asarray(b["image"], np.float32)[valid]
  finally:
    if hasattr(it, "close"):
      it.close()


def run(args) -> dict:
  """`latent-spectrum`: restores the run, analyses its eval split, prints and writes the report."""
  from uae_jax.evaluate import cli as eval_cli
  config, tok, params, step = restore_tokenizer(args.workdir, args.step,
                                                "params" if args.raw else "ema")
  input_cfg = eval_cli.apply_data_arg(config.input, args.data, args.data_dir, args.split, 0,
                                      args.batch_size, args.max_examples)
  fid = None
  inception = eval_cli._inception_path(args.inception)  # pylint: disable=protected-access
  if inception:
    from uae_jax.evaluate import fid as fid_lib
    fid = fid_lib.InceptionFID.from_files(inception)
  ks = tuple(int(k) for k in args.lowpass_k.split(",") if k.strip())
  rep = analyse_tokenizer(tok, params, _batches(input_cfg), args.delta, ks,
                          args.blur_skip_height, fid)
  task = config.get("task", "uae")
  kind = (f"{task}:{config.get('variant', '')}" if task == "kl_vae"
          else f"uae stage {config.get('stage', '')}")
  rep.update(source={"workdir": os.path.abspath(args.workdir), "step": int(step), "kind": kind,
                     "params": "params" if args.raw else "ema"},
             data={"source": input_cfg.source, "split": input_cfg.eval_split,
                   "image_size": int(input_cfg.image_size)},
             settings={**spectrum.ANALYSIS, "n_bins": spectrum.NUM_BINS,
                       "blur_skip_height": args.blur_skip_height},
             inception=os.path.abspath(inception) if inception else None)
  out_dir = args.out or os.path.join(args.workdir, "latent_spectrum")
  if jax.process_index() == 0:
    rep["files"] = write_outputs(rep, out_dir, kind)
    print(text_report(rep))
  return rep
