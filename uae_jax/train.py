"""The one trainer: mesh -> data -> abstract state -> shardings -> init/restore -> loop.

A stage is a config switch (`config.stage`, `config.recipe`) that compiles its own step in
`steps.py`; this file only does I/O, placement and bookkeeping.
"""
import functools
import json
import math
import os
import signal
import time
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from etils import epath

from uae_jax import sharding as sharding_lib
from uae_jax import steps as steps_lib
from uae_jax.checkpoint import manager as ckpt_lib
from uae_jax.data import pipeline
from uae_jax.evaluate import recon_eval
from uae_jax.metric_writers import MetricWriter, ProgressLine
from uae_jax.models import lpips as lpips_lib
from uae_jax.models import scan_utils


# Test hook (tests/test_train.py): SIGKILL this process right after the given step.
_KILL_AFTER_STEP = int(os.environ.get("UAE_JAX_SIGKILL_AFTER_STEP", "-1"))


class ConfigError(ValueError):
  """The config is inconsistent or names a file that does not exist."""


class NonFiniteLossError(FloatingPointError):
  """The loss became NaN or infinite; the last good checkpoint is left intact."""


def validate_config(config: ml_collections.ConfigDict, num_devices: Optional[int] = None) -> None:
  """Checks everything that can be checked before any compute; raises ConfigError naming the key."""
  if config.stage not in (1, 2, 3):
    raise ConfigError(f"stage={config.stage}: expected 1, 2 or 3")
  if config.recipe not in ("paper", "official"):
    raise ConfigError(f"recipe={config.recipe!r}: expected 'paper' or 'official'")
  steps_lib.compute_dtype(config)
  for key in ("dinov2", "official_uae", "from_stage"):
    path = config.init[key]
    if path and not epath.Path(path).exists():
      raise ConfigError(f"init.{key}={path!r} does not exist")
  if config.gan.disc_backbone_path and not epath.Path(config.gan.disc_backbone_path).exists():
    raise ConfigError(f"gan.disc_backbone_path={config.gan.disc_backbone_path!r} does not exist")
  allow_random = config.init.allow_random_encoder
  has_start = config.init.dinov2 or config.init.from_stage or config.init.official_uae
  if not has_start and not allow_random:
    raise ConfigError("no initialisation: set init.dinov2 (stage 1), init.from_stage (stages 2-3) "
                      "or init.official_uae, or init.allow_random_encoder=True for a toy run")
  if config.stage > 1 and not config.init.from_stage and not allow_random:
    raise ConfigError(f"stage {config.stage} starts from the previous stage: set init.from_stage")
  if config.gan.enabled and not config.gan.disc_backbone_path and not allow_random:
    raise ConfigError("gan.enabled needs gan.disc_backbone_path (DINO ViT-S/8 weights)")
  if config.gan.enabled and max(config.gan.d_start_frac, config.gan.g_start_frac) > 1:
    raise ConfigError("gan.d_start_frac and gan.g_start_frac are fractions of the stage (<= 1)")
  n_dev = num_devices or jax.device_count()
  if config.input.global_batch_size % n_dev:
    raise ConfigError(f"input.global_batch_size={config.input.global_batch_size} is not divisible "
                      f"by the {n_dev} devices")
  if steps_lib.total_steps(config) <= 0:
    raise ConfigError("train.total_steps (or num_epochs * num_train_examples) must be positive")
  grid = config.model.encoder.input_size // 14
  if config.input.image_size != config.model.decoder.patch_size * grid:
    raise ConfigError(f"input.image_size={config.input.image_size} must be model.decoder.patch_size "
                      f"({config.model.decoder.patch_size}) x the encoder grid ({grid}) so the "
                      "reconstruction has the input's size")


class _Preemption:
  """Turns SIGTERM into a flag checked between steps, so the loop can save before exiting."""

  def __init__(self):
    self.requested = False
    self._old = None

  def __enter__(self):
    try:
      self._old = signal.signal(signal.SIGTERM, self._handler)
    except ValueError:  # not the main thread (e.g. inside some test runners)
      self._old = None
    return self

  def _handler(self, signum, frame):
    logging.warning("SIGTERM received: saving a checkpoint before exiting")
    self.requested = True

  def __exit__(self, *exc):
    if self._old is not None:
      signal.signal(signal.SIGTERM, self._old)


def _place(tree, shardings):
  """Host arrays -> global arrays with the given shardings."""
  return jax.tree.map(lambda x, s: jax.device_put(np.asarray(x), s), tree, shardings)


def _copy(tree):
  """Distinct buffers for trees that appear twice in the donated state (params and EMA)."""
  return jax.tree.map(jnp.copy, tree)


def _abstract(state_abs, shardings):
  """ShapeDtypeStructs carrying concrete shardings (what Orbax needs to restore in place)."""
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      state_abs, shardings)


def _load_encoder_weights(config, target_abs):
  """Converted DINOv2 params for the encoder, checked against the configured architecture."""
  from uae_jax.convert import dinov2 as convert_dinov2
  params, arch = convert_dinov2.load_dinov2(
      config.init.dinov2, drop_final_norm=not config.model.encoder.final_norm_affine)
  want = dict(config.model.encoder)
  for key in ("size", "num_registers", "pos_embed_grid"):
    if key in arch and arch[key] != want[key]:
      raise ConfigError(f"init.dinov2 has {key}={arch[key]!r} but model.encoder.{key}={want[key]!r}")
  if arch.get("pos_embed_convention", want["pos_embed_convention"]) != want["pos_embed_convention"]:
    logging.warning("init.dinov2 was converted with pos_embed_convention=%s but the config says %s",
                    arch["pos_embed_convention"], want["pos_embed_convention"])
  # Converted weights are unrolled (blocks_{i}); a scanned encoder wants them stacked.
  params = scan_utils.to_layout(params, bool(want.get("scan_blocks", False)))
  _check_same_shapes(params, target_abs, "init.dinov2")
  return params


def _check_same_shapes(tree, target, what):
  """Raises ConfigError listing every missing/extra key or shape mismatch between two trees."""
  flat_a = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_leaves_with_path(tree)}
  flat_b = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_leaves_with_path(target)}
  problems = [f"missing {k}" for k in sorted(set(flat_b) - set(flat_a))]
  problems += [f"unexpected {k}" for k in sorted(set(flat_a) - set(flat_b))]
  problems += [f"{k}: {np.shape(flat_a[k])} != {flat_b[k].shape}" for k in sorted(set(flat_a) & set(flat_b))
               if tuple(np.shape(flat_a[k])) != tuple(flat_b[k].shape)]
  if problems:
    raise ConfigError(f"{what} does not match the model: " + "; ".join(problems))


class Trainer:
  """Holds the compiled functions and state of one stage; `run()` trains it to the end."""

  def __init__(self, config: ml_collections.ConfigDict, workdir: str, devices=None):
    validate_config(config, len(devices) if devices is not None else None)
    self.config = config
    self.workdir = workdir
    self.is_main = jax.process_index() == 0
    self.total = steps_lib.total_steps(config)
    self.mesh = sharding_lib.make_mesh(config.mesh, devices)
    self.batch_sh = sharding_lib.batch_sharding(self.mesh)
    self.repl = sharding_lib.replicated(self.mesh)
    size = config.input.image_size
    images = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)

    # Abstract state first: the full state never exists unsharded on one host.
    init_fn = functools.partial(steps_lib.init_state, config)
    boxed = jax.eval_shape(init_fn, jax.random.key(0), images)
    self.state_sh = sharding_lib.logical_shardings(boxed, self.mesh, config.sharding_rules)
    self.state_abs = _abstract(nn.unbox(boxed), self.state_sh)
    zeros = jnp.zeros(images.shape, images.dtype)
    self._init = jax.jit(lambda k: nn.unbox(init_fn(k, zeros)), out_shardings=self.state_sh)

    # Frozen, non-donated inputs: LPIPS VGG16 and the discriminator backbone.
    self.lpips_params = jax.device_put(lpips_lib.load_lpips_params("vgg16"), self.repl)
    self.disc_backbone = None
    if config.gan.enabled:
      self.disc_backbone = self._load_disc_backbone(images)

    batch_shardings = {"image": self.batch_sh, "label": self.batch_sh}
    self.train_step = jax.jit(
        steps_lib.make_train_step(config),
        in_shardings=(self.state_sh, batch_shardings, None, None),
        out_shardings=(self.state_sh, None), donate_argnums=(0,))
    # Runs on every process (it gathers per-image results); rFID too when config.eval names
    # the converted FID Inception weights and reference statistics.
    self.evaluator = recon_eval.ReconstructionEvaluator(config, self.batch_sh, self.lpips_params)
    self.ckpt = ckpt_lib.CheckpointManager(str(epath.Path(workdir) / "checkpoints"),
                                           keep=config.ckpt.keep, async_save=config.ckpt.async_save)
    self.writer = MetricWriter(workdir, enabled=self.is_main)

  def _load_disc_backbone(self, images):
    """DINO ViT-S/8 weights from gan.disc_backbone_path, or random (announced) for toy runs."""
    abs_bb = jax.eval_shape(functools.partial(steps_lib.init_disc_backbone, self.config),
                            jax.random.key(0), images)
    sh = sharding_lib.logical_shardings(abs_bb, self.mesh, self.config.sharding_rules)
    if self.config.gan.disc_backbone_path:
      from uae_jax.convert import discriminator as convert_disc
      params, _ = convert_disc.load_dino_disc(self.config.gan.disc_backbone_path)
      _check_same_shapes(params, nn.unbox(abs_bb), "gan.disc_backbone_path")
      return _place(params, sh)
    logging.warning("=" * 78 + "\nDISCRIMINATOR BACKBONE IS RANDOM (gan.disc_backbone_path unset). "
                    "Fine for toy runs only.\n" + "=" * 78)
    init = jax.jit(lambda k: nn.unbox(steps_lib.init_disc_backbone(self.config, k,
                                                                   jnp.zeros(images.shape))),
                   out_shardings=sh)
    return init(jax.random.key(self.config.seed + 7))

  # ------------------------------------------------------------------ initialisation / restore
  def initial_state(self, data_iter) -> tuple:
    """(state, start_step): resume from this workdir, else initialise per `config.init`."""
    latest = self.ckpt.latest_step()
    if latest is not None:
      logging.info("resuming from %s step %d", self.ckpt.directory, latest)
      state = self.ckpt.restore(latest, self.state_abs, data_iter)
      return state, latest
    c = self.config
    state = self._init(jax.random.key(c.seed))
    p_sh, p_abs = self.state_sh["params"], self.state_abs["params"]
    if c.init.from_stage:
      logging.info("init: EMA params and teacher from the previous stage at %s", c.init.from_stage)
      layout_error = scan_utils.checkpoint_layout_error(c.init.from_stage, p_abs)
      if layout_error:
        raise ConfigError(layout_error)
      prev = ckpt_lib.restore_subtrees(c.init.from_stage, {"ema": p_abs,
                                                           "teacher": self.state_abs["teacher"]})
      state.update(params=prev["ema"], ema=_copy(prev["ema"]), teacher=prev["teacher"])
    elif c.init.official_uae:
      from uae_jax.convert import uae as convert_uae
      logging.info("init: official UAE checkpoint %s", c.init.official_uae)
      params, _ = convert_uae.import_official_uae(c.init.official_uae)
      params = scan_utils.match_layout(params, c.model)
      _check_same_shapes(params, p_abs, "init.official_uae")
      params = _place(params, p_sh)
      teacher = params["encoder"]
      if c.init.dinov2:
        teacher = _place(_load_encoder_weights(c, p_abs["encoder"]), p_sh["encoder"])
      state.update(params=params, ema=_copy(params), teacher=_copy(teacher))
    elif c.init.dinov2:
      logging.info("init: encoder from converted DINOv2 %s", c.init.dinov2)
      enc = _place(_load_encoder_weights(c, p_abs["encoder"]), p_sh["encoder"])
      state["params"] = dict(state["params"], encoder=enc)
      state["ema"] = dict(state["ema"], encoder=_copy(enc))
      state["teacher"] = _copy(enc)
    else:
      logging.warning("=" * 78 + "\nENCODER IS RANDOMLY INITIALISED (no init.dinov2 / from_stage). "
                      "The semantic band has no pretrained meaning; toy runs only.\n" + "=" * 78)
    return state, 0

  # ------------------------------------------------------------------ evaluation and images
  def evaluate(self, params) -> dict:
    """Mean PSNR / SSIM / LPIPS (and rFID when configured) on the held-out split."""
    return self.evaluator(params)

  def write_image_grid(self, step: int, params, name: str):
    """Original | reconstruction | cumulative band decodes, for a few held-out images."""
    self.writer.write_images(step, {name: self.evaluator.band_grid(params)})

  # ------------------------------------------------------------------ the loop
  def run(self) -> dict:
    """Trains to `total_steps`, checkpointing, logging and evaluating; returns a summary."""
    c = self.config
    data_iter = pipeline.make_train_iterator(c.input)
    state, start = self.initial_state(data_iter)
    summary = {"stage": c.stage, "recipe": c.recipe, "start_step": start, "total_steps": self.total}
    start_file = epath.Path(self.workdir) / "eval_start.json"
    if start == 0:
      summary["eval_start"] = self._eval_and_log(0, state)
      if c.image_every_steps:
        self.write_image_grid(0, state["ema"], "recon_ema")
      if self.is_main:
        start_file.write_text(json.dumps(summary["eval_start"]))
    elif start_file.exists():  # resumed: keep the start-of-stage numbers of the first run
      summary["eval_start"] = json.loads(start_file.read_text())
    progress = ProgressLine(self.total, c.input.global_batch_size, start)
    meta = {"stage": c.stage, "recipe": c.recipe, "config": c.to_json_best_effort()}
    step = start
    with _Preemption() as preempt:
      while step < self.total:
        batch = next(data_iter)
        batch = pipeline.to_global_array({"image": batch["image"], "label": batch["label"]},
                                         self.batch_sh)
        t0 = time.time()
        state, metrics = self.train_step(state, batch, self.lpips_params, self.disc_backbone)
        step += 1
        if step == start + 1:
          jax.block_until_ready(metrics["loss"])
          summary["first_step_seconds"] = time.time() - t0
        last = step == self.total
        must_save = last or preempt.requested or step % c.ckpt.every_steps == 0
        if step % c.log_every_steps == 0 or last or must_save:
          scalars = {k: float(v) for k, v in jax.device_get(metrics).items()}
          bad = [k for k, v in scalars.items() if not math.isfinite(v)]
          if bad:
            self.ckpt.wait()
            raise NonFiniteLossError(
                f"non-finite {bad} at step {step} (loss={scalars.get('loss')}); stopping. The last "
                f"good checkpoint (step {self.ckpt.latest_step()}) in {self.ckpt.directory} is intact.")
          if step % c.log_every_steps == 0 or last:
            progress.update(step, scalars)
            scalars["images_per_sec"] = progress.images_per_sec or 0.0
            self.writer.write_scalars(step, scalars)
        if must_save:
          self.ckpt.save(step, state, data_iter, dict(meta, step=step))
        if step == _KILL_AFTER_STEP:  # resume tests: die hard, as a preempted VM would
          self.ckpt.wait()
          os.kill(os.getpid(), signal.SIGKILL)
        if c.image_every_steps and (step % c.image_every_steps == 0 or last):
          self.write_image_grid(step, state["ema"], "recon_ema")
        if c.eval_every_steps and (step % c.eval_every_steps == 0 or last):
          summary["eval_end"] = self._eval_and_log(step, state)
        if preempt.requested and not last:
          self.ckpt.wait()
          logging.warning("stopped by SIGTERM at step %d after saving", step)
          summary["preempted_at"] = step
          break
    self.ckpt.wait()
    self.writer.flush()
    summary["final_step"] = step
    summary["images_per_sec"] = progress.images_per_sec
    if self.is_main:
      (epath.Path(self.workdir) / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary

  def _eval_and_log(self, step: int, state) -> dict:
    """Evaluates raw and EMA params and logs them as eval/... and eval_ema/... scalars."""
    out = {}
    for tag, params in (("eval", state["params"]), ("eval_ema", state["ema"])):
      m = self.evaluate(params)
      out.update({f"{tag}/{k}": v for k, v in m.items()})
    self.writer.write_scalars(step, out)
    logging.info("step %d eval: %s", step, " ".join(f"{k}={v:.4f}" for k, v in out.items()))
    return out

  def close(self):
    """Flushes writers and waits for checkpoints."""
    self.ckpt.close()
    self.writer.close()


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Runs one stage in `workdir` (resuming if it holds checkpoints); returns its summary."""
  trainer = Trainer(config, workdir)
  try:
    return trainer.run()
  finally:
    trainer.close()
