"""Reconstruction evaluation over a held-out split: PSNR, SSIM, LPIPS and (optionally) rFID.

`ReconstructionEvaluator(config, batch_sharding, lpips_params, fid=None)` is built once and called
with params as often as needed (the trainer calls it for raw and EMA params every N steps):

    evaluator = recon_eval.ReconstructionEvaluator(config, batch_sharding, lpips_params)
    metrics = evaluator(state["ema"])     # {'psnr', 'ssim', 'lpips'[, 'rfid']}: Python floats

Conventions (see `uae_jax/evaluate/metrics.py`): reconstructions are clipped to [0, 1] and quantised
to uint8 levels (`uint8_mode` 'round' by default, 'truncate' = the official code), references are
snapped to their uint8 level; PSNR per image then averaged; SSIM = dm-pix Gaussian 11x11, sigma 1.5,
mean over the valid region (= scikit-image gaussian mode); LPIPS = VGG16 LPIPS v0.1, always in
float32 at HIGHEST precision (`eval_metrics`), whatever `compute_dtype` training uses. rFID compares
the FID-Inception statistics of the quantised reconstructions with those of the references (image
set vs image set, as the official torch-fidelity call): read from an `.npz` if the `InceptionFID`
has a reference, otherwise accumulated from the same eval images on the first call and cached.

Multi-host: every process reads its own shard of the split (`pipeline.make_eval_iterator`), the
batch becomes one global array (`pipeline.to_global_array`), per-image values are gathered to every
process (`multihost_utils.process_allgather`) and Inception feature sums are reduced inside their
jitted call (replicated outputs), so every process returns the same numbers. Padding images (`mask`
False) are left out of every sum.

The optional `config.eval` section (not required) may set `uint8_mode`, `inception_path`,
`fid_stats` and `fid_method`; with `inception_path` and `fid_stats` both set the evaluator builds
its own `InceptionFID` and reports 'rfid'.
"""
from __future__ import annotations

import copy
import dataclasses
import functools
import time
from typing import Any, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P

from uae_jax.tasks import uae as uae_task
from uae_jax.data import pipeline
from uae_jax.evaluate import fid as fid_lib
from uae_jax.evaluate import metrics as metrics_lib
from uae_jax.models import bands as bands_lib
from uae_jax.metric_writers import image_grid

METRICS = ("psnr", "ssim", "lpips")


def eval_metrics(lpips_params: Any, recon, images, uint8_mode: str = "round") -> dict:
  """Per-image PSNR / SSIM / LPIPS in float32 at HIGHEST precision, whatever the training dtype.

  Training may run LPIPS in bfloat16 (a loss only needs its gradient direction); a reported
  metric must not depend on that, nor on the TPU's default one-pass bf16 float32 convolutions.
  The precision is fixed while tracing, so it holds inside any jit that calls this.
  """
  with jax.default_matmul_precision("highest"):
    return metrics_lib.reconstruction_metrics(lpips_params, recon, images, uint8_mode,
                                              lpips_dtype=jnp.float32)


@dataclasses.dataclass
class EvalResult:
  """Dataset means plus what a report needs (per-image values, optional uint8 reconstructions)."""
  metrics: dict                       # {'psnr', 'ssim', 'lpips'[, 'rfid']} Python floats
  num_images: int
  per_image: dict                     # {'index', 'psnr', 'ssim', 'lpips'} numpy, valid images only
  recon_uint8: Optional[np.ndarray]   # (N, S, S, 3) in `per_image['index']` order, if kept
  seconds: float


def _eval_section(config) -> dict:
  """The optional `config.eval` section as a plain dict."""
  section = config.get("eval", None) if hasattr(config, "get") else None
  if section is None:
    return {}
  return section.to_dict() if hasattr(section, "to_dict") else dict(section)


class ReconstructionEvaluator:
  """Evaluates UAE params on `config.input.eval_split`; `__call__(params) -> dict` of floats."""

  def __init__(self, config: ml_collections.ConfigDict, batch_sharding: NamedSharding,
               lpips_params: Any, fid: Optional[fid_lib.InceptionFID] = None, *,
               uint8_mode: Optional[str] = None, max_batches: Optional[int] = None,
               input_config: Optional[ml_collections.ConfigDict] = None):
    section = _eval_section(config)
    self.config = config
    self.batch_sharding = batch_sharding
    self.replicated = NamedSharding(batch_sharding.mesh, P())
    self.input_config = copy.deepcopy(input_config if input_config is not None else config.input)
    self.uint8_mode = uint8_mode or section.get("uint8_mode", "round")
    if self.uint8_mode not in metrics_lib.UINT8_MODES:
      raise ValueError(f"uint8_mode={self.uint8_mode!r}: expected one of {metrics_lib.UINT8_MODES}")
    self.max_batches = int(config.get("eval_batches", 0) if max_batches is None else max_batches)
    self.lpips_params = jax.device_put(lpips_params, self.replicated)
    if fid is None and section.get("inception_path") and section.get("fid_stats"):
      fid = fid_lib.InceptionFID.from_files(section["inception_path"], section["fid_stats"],
                                            self.replicated, section.get("fid_method", "sqrtm"),
                                            section.get("fid_preprocessing", "pytorch-fid"))
    self.fid = fid
    self._reference_cache = None  # inline reference statistics (the eval images do not change)
    self._band_decode = jax.jit(make_band_decode(config), out_shardings=self.replicated)
    model = uae_task.build_model(config)
    mode = self.uint8_mode
    # The metrics ignore config.compute_dtype: they are measurements, not part of training.
    self.metrics_fn = jax.jit(functools.partial(eval_metrics, uint8_mode=mode))

    def step(params, lpips_params, images):
      recon = model.apply({"params": params}, images, method="reconstruct")
      return {"per_image": eval_metrics(lpips_params, recon, images, mode),
              "recon_uint8": metrics_lib.to_uint8(recon, mode)}

    self._step = jax.jit(step)
    # References snapped to their uint8 level, as `reconstruction_metrics` does.
    self._ref_uint8 = jax.jit(lambda x: metrics_lib.to_uint8(x, "round"))

  # ----------------------------------------------------------------------------------------------
  def _batches(self):
    """Global eval batches {'image', 'mask', 'index'} of at most `max_batches` batches."""
    it = pipeline.make_eval_iterator(self.input_config)
    try:
      for i, batch in enumerate(it):
        if self.max_batches and i >= self.max_batches:
          break
        local = {"image": np.asarray(batch["image"], np.float32),
                 "mask": np.asarray(batch["mask"], np.bool_),
                 "index": np.asarray(batch["index"], np.int32)}
        yield pipeline.to_global_array(local, self.batch_sharding)
    finally:
      if hasattr(it, "close"):
        it.close()  # stop multiprocess workers now, not at garbage collection

  def run(self, params, keep_images: bool = False) -> EvalResult:
    """One pass over the eval split: means, per-image values and (if asked) the uint8 recons.

    `keep_images` gathers every reconstruction to every process (N x S x S x 3 bytes of host
    memory): meant for small sets and single-host runs.
    """
    t0 = time.time()
    with_fid = self.fid is not None
    with_ref = with_fid and self.fid.reference is None and self._reference_cache is None
    per = {k: [] for k in ("index",) + METRICS}
    recons = []
    fake, real = fid_lib.FeatureStats(), fid_lib.FeatureStats()
    for g in self._batches():
      out = self._step(params, self.lpips_params, g["image"])
      wanted = {"per_image": out["per_image"], "mask": g["mask"], "index": g["index"]}
      if keep_images:
        wanted["recon_uint8"] = out["recon_uint8"]
      host = multihost_utils.process_allgather(wanted, tiled=True)
      valid = np.asarray(host["mask"], bool)
      per["index"].append(np.asarray(host["index"])[valid])
      for k in METRICS:
        per[k].append(np.asarray(host["per_image"][k], np.float64)[valid])
      if keep_images:
        recons.append(np.asarray(host["recon_uint8"])[valid])
      # Inception runs as its own jitted call (the one `fid-stats` uses), so switching rFID on
      # does not recompile the UAE step. It sees the reconstructions as saved: uint8 levels.
      if with_fid:
        fake.add_sums(jax.device_get(self.fid.batch_sums(out["recon_uint8"], g["mask"])))
      if with_ref:
        real.add_sums(jax.device_get(self.fid.batch_sums(self._ref_uint8(g["image"]), g["mask"])))
    per = {k: np.concatenate(v) if v else np.zeros((0,)) for k, v in per.items()}
    n = int(per["index"].size)
    metrics = {k: float(np.mean(per[k])) if n else float("nan") for k in METRICS}
    if with_fid:
      if with_ref:
        self._reference_cache = real.mean_cov()
      reference = self.fid.reference if self.fid.reference is not None else self._reference_cache
      metrics["rfid"] = self.fid.distance(fake, reference)
    recon = np.concatenate(recons) if keep_images and recons else None
    return EvalResult(metrics, n, per, recon, time.time() - t0)

  def __call__(self, params) -> dict:
    """Dataset means {'psnr', 'ssim', 'lpips'[, 'rfid']} of `params` on the eval split."""
    return self.run(params).metrics

  def band_grid(self, params, num_images: int = 4) -> np.ndarray:
    """uint8 grid: per row original | reconstruction | decodes of b0, b0+b1, ... (first batch)."""
    g = next(iter(self._batches()))
    host = multihost_utils.process_allgather({"x": g["image"], "mask": g["mask"]}, tiled=True)
    idx = np.flatnonzero(np.asarray(host["mask"]))[:num_images]
    # Only the shown images are decoded, always `num_images` of them (one compiled shape).
    x = np.asarray(host["x"], np.float32)[np.resize(idx, num_images)]
    recon, cum = self._band_decode(params, jax.make_array_from_process_local_data(
        self.replicated, x))
    recon, cum = np.asarray(recon), np.asarray(cum)
    rows = [[x[i], recon[i]] + [cum[k, i] for k in range(cum.shape[0])] for i in range(len(idx))]
    return image_grid(rows)


def make_band_decode(config):
  """`band_decode(params, images) -> (recon, cumulative (K, B, H, W, 3))` for image grids.

  Paper recipe: decode the fused latent of b_0, b_0+b_1, ... (higher bands zeroed); official
  recipe: decode zig-zag DCT low-passes keeping 1/K, 2/K, ... of the coefficients. The last,
  full latent gives the reconstruction (`reconstruct` = decode(fuse(all bands)), resp.
  decode(encode) officially). All latents go through one vmapped decoder: a program with K + 1
  decoders compiled about five times longer than the evaluation step.
  """
  model, k = uae_task.build_model(config), int(config.model.num_bands)

  def band_decode(params, images):
    v = {"params": params}
    z = model.apply(v, images, method="encode")
    if config.recipe == "paper":
      b = model.apply(v, z, method="split")
      keep = np.tril(np.ones((k, k), np.float32))  # row i keeps bands 0..i; the last keeps all
      latents = jax.vmap(lambda m: model.apply(v, b * m[:, None, None, None, None],
                                               method="fuse"))(jnp.asarray(keep))
    else:
      n = z.shape[1] * z.shape[2]
      latents = jnp.stack([bands_lib.dct_lowpass(z, max(1, n * (i + 1) // k)) for i in range(k)]
                          + [z])
    out = jax.vmap(lambda q: model.apply(v, q, method="decode"))(latents)
    return out[-1], out[:k]

  return band_decode
