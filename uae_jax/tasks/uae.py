"""The UAE tokenizer task: both recipes, all stages. Pure functions; I/O only through `load`s.

The train state is a plain dict pytree:
  step      int32 scalar
  rng       uint32[2] key data (checkpointable)
  params    UAE params {'encoder', 'decoder'[, 'modulator']}
  ema       EMA of params (frozen subtrees are copied, not averaged)
  opt       generator optax state
  teacher   frozen copy of the initial pretrained encoder params (semantic loss target)
  disc      {'params': heads, 'spectral': u/v} and disc_opt, only when the stage has a GAN
The step's frozen inputs are {'lpips': VGG16 LPIPS[, 'disc_backbone': DINO ViT-S/8]}: they never
change, are not donated and are not checkpointed per step.

A stage is a config: which subtrees train (`train.encoder_trainable`), the loss weights, the
noise scale (`model.noise_tau`) and whether the GAN is on (`gan.enabled`) are all written out in
`configs/stage*.py`; nothing here branches on a stage number.
"""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from absl import logging
from etils import epath

from uae_jax import tasks
from uae_jax.checkpoint import layout as ckpt_layout
from uae_jax.checkpoint import manager as ckpt_lib
from uae_jax.errors import ConfigError
from uae_jax.losses import diffaug
from uae_jax.losses import gan
from uae_jax.losses import reconstruction
from uae_jax.losses import semantic
from uae_jax.models import discriminator as disc_lib
from uae_jax.models import encoders
from uae_jax.models import lpips as lpips_lib
from uae_jax.models import scan_utils
from uae_jax.models import uae as uae_lib
from uae_jax.tasks import common
from uae_jax.tasks.common import compute_dtype, total_steps  # noqa: F401  (part of the task's API)

# Path of the decoder's last layer: the VQGAN adaptive weight compares gradients there.
LAST_LAYER = ("decoder", "pred", "kernel")

DISC_SIZES = {
    "S8": {},  # DINO v1 ViT-S/8 defaults of the module
    "tiny": dict(dim=32, depth=4, num_heads=2, mlp_hidden=64, image_size=32, key_depths=(0, 1, 2, 3)),
}


# ------------------------------------------------------------------------------ models
def build_model(config) -> nn.Module:
  """The UAE module of `config.recipe` described by `config.model`."""
  m, loss = config.model, config.loss
  common_kw = dict(encoder=dict(m.encoder), decoder=dict(m.decoder), noise_tau=m.noise_tau,
                   dtype=compute_dtype(config))
  if config.recipe == "paper":
    return uae_lib.PaperUAE(
        **common_kw, num_bands=m.num_bands, band_edges=tuple(m.band_edges) or None,
        band_tau=m.band_tau, band_method=m.band_method, band_split=m.band_split,
        use_modulator=m.use_modulator, k_base=m.k_base, p_band=m.p_band)
  return uae_lib.OfficialUAE(
      **common_kw, dct_enabled=m.dct_enabled, dct_count=m.dct_count, dct_count_min=m.dct_count_min,
      dct_count_max=m.dct_count_max, dct_apply_prob=m.dct_apply_prob,
      clean_pass=loss.clean_l1 > 0 or loss.clean_lpips > 0)


def build_discriminator(config) -> disc_lib.Discriminator:
  """The DINO discriminator named by `config.gan.backbone`."""
  return disc_lib.Discriminator(**DISC_SIZES[config.gan.backbone], dtype=compute_dtype(config))


def param_groups(config) -> tuple:
  """Top-level param subtrees of the UAE for this config."""
  with_mod = config.recipe == "paper" and config.model.use_modulator
  return ("encoder", "decoder") + (("modulator",) if with_mod else ())


def trainable_labels(config) -> dict:
  """'train' / 'frozen' label per top-level param subtree (`train.encoder_trainable`)."""
  return {k: ("train" if (k != "encoder" or config.train.encoder_trainable) else "frozen")
          for k in param_groups(config)}


def make_optimizers(config) -> tuple:
  """(generator optimiser with frozen subtrees zeroed, discriminator optimiser, lr schedule)."""
  total, warmup = total_steps(config), common.warmup_steps(config)
  sched = common.lr_schedule(config.optim.peak_lr, config.optim.end_lr, warmup, total)
  gen = optax.multi_transform({"train": common.adamw(sched, config.optim),
                               "frozen": optax.set_to_zero()}, trainable_labels(config))
  # The official D scheduler only steps on D updates, so it warms up from the D start and its
  # cosine never completes; optax's own update count (it only counts D updates) does the same.
  d_sched = common.lr_schedule(config.gan.disc_lr, config.gan.disc_end_lr, warmup, total)
  return gen, common.adamw(d_sched, config.optim), sched


# ------------------------------------------------------------------------------ config and state
def validate(config) -> None:
  """Checks the tokenizer config before any compute; raises ConfigError naming the key."""
  if config.recipe not in uae_lib.RECIPES:
    raise ConfigError(f"recipe={config.recipe!r}: expected one of {sorted(uae_lib.RECIPES)}")
  compute_dtype(config)
  if config.gan.backbone not in DISC_SIZES:
    raise ConfigError(f"gan.backbone={config.gan.backbone!r}: expected one of {sorted(DISC_SIZES)}")
  init = config.init
  for key in ("encoder", "official_uae", "from_stage"):
    if init[key] and not epath.Path(init[key]).exists():
      raise ConfigError(f"init.{key}={init[key]!r} does not exist")
  if config.gan.disc_backbone_path and not epath.Path(config.gan.disc_backbone_path).exists():
    raise ConfigError(f"gan.disc_backbone_path={config.gan.disc_backbone_path!r} does not exist")
  if not (init.encoder or init.from_stage or init.official_uae or init.allow_random_encoder):
    raise ConfigError("no initialisation: set init.encoder (stage 1), init.from_stage (stages 2-3) "
                      "or init.official_uae, or init.allow_random_encoder=True for a toy run")
  if init.official_uae and config.loss.semantic > 0 and not (init.encoder or init.allow_random_encoder):
    raise ConfigError("init.official_uae with loss.semantic > 0 needs init.encoder: the semantic "
                      "teacher is the original pretrained encoder, not the imported fine-tuned one")
  if config.gan.enabled and not config.gan.disc_backbone_path and not init.allow_random_encoder:
    raise ConfigError("gan.enabled needs gan.disc_backbone_path (DINO ViT-S/8 weights)")
  if config.gan.enabled and max(config.gan.d_start_frac, config.gan.g_start_frac) > 1:
    raise ConfigError("gan.d_start_frac and gan.g_start_frac are fractions of the stage (<= 1)")
  grid = encoders.latent_grid(config.model.encoder)
  if config.input.image_size != config.model.decoder.patch_size * grid:
    raise ConfigError(f"input.image_size={config.input.image_size} must be model.decoder.patch_size "
                      f"({config.model.decoder.patch_size}) x the encoder grid ({grid}) so the "
                      "reconstruction has the input's size")
  validate_spectrum_terms(config, grid)


def validate_spectrum_terms(config, grid: int) -> None:
  """Checks the optional Spectrum Matching keys of `config.loss` (ESM weight, DSM masking)."""
  from uae_jax.losses import spectrum  # pylint: disable=g-import-not-at-top
  loss = config.loss
  if loss.get("esm", 0.0) < 0:
    raise ConfigError(f"loss.esm={loss.esm} must be >= 0")
  if loss.get("esm", 0.0) > 0:
    if loss.get("esm_loss_type", "kl") not in spectrum.LOSS_TYPES:
      raise ConfigError(f"loss.esm_loss_type={loss.esm_loss_type!r}: expected one of "
                        f"{spectrum.LOSS_TYPES}")
    if loss.get("esm_center", "mean") not in spectrum.CENTERS:
      raise ConfigError(f"loss.esm_center={loss.esm_center!r}: expected one of {spectrum.CENTERS}")
  if not loss.get("dsm", False):
    return
  if config.recipe != "paper":
    raise ConfigError("loss.dsm needs recipe='paper' (the official recipe's decoder input, the "
                      "noised DCT-masked latent, is internal to its forward)")
  if grid % spectrum.DSM_BLOCK:
    raise ConfigError(f"loss.dsm needs a latent grid divisible by {spectrum.DSM_BLOCK}; this "
                      f"encoder's is {grid}x{grid}")
  choices = tuple(loss.get("dsm_choices", spectrum.DSM_CHOICES))
  if not choices or any(not 0 <= int(k) <= 2 * spectrum.DSM_BLOCK - 1 for k in choices):
    raise ConfigError(f"loss.dsm_choices={choices}: k counts removed anti-diagonals, "
                      f"0..{2 * spectrum.DSM_BLOCK - 1}")


def batch_spec(config) -> dict:
  """One example of a train batch: an image in [0, 1]."""
  s = config.input.image_size
  return {"image": jax.ShapeDtypeStruct((1, s, s, 3), jnp.float32)}


def init_state(config, rng) -> dict:
  """Fresh train state (boxed params, for sharding inference)."""
  images = jnp.zeros(batch_spec(config)["image"].shape, jnp.float32)
  k_model, k_disc, k_state = jax.random.split(rng, 3)
  params = build_model(config).init({"params": k_model, "noise": k_model}, images,
                                    train=False)["params"]
  gen_opt, disc_opt, _ = make_optimizers(config)
  state = {"step": jnp.zeros((), jnp.int32), "rng": jax.random.key_data(k_state),
           "params": params, "ema": params, "opt": gen_opt.init(params),
           "teacher": params["encoder"]}
  if config.gan.enabled:
    dv = build_discriminator(config).init(k_disc, 2.0 * images - 1.0)
    state["disc"] = {"params": dv["params"]["heads"], "spectral": dv[disc_lib.SPECTRAL]}
    state["disc_opt"] = disc_opt.init(dv["params"]["heads"])
  return state


def load_frozen(config) -> dict:
  """Host params of the frozen inputs: LPIPS VGG16 and (stage 3) the DINO discriminator backbone."""
  frozen = {"lpips": lpips_lib.load_lpips_params("vgg16")}
  if config.gan.enabled:
    disc_kw = DISC_SIZES[config.gan.backbone]
    if config.gan.disc_backbone_path:
      frozen["disc_backbone"] = disc_lib.load_backbone(config.gan.disc_backbone_path, disc_kw)
    else:
      logging.warning("=" * 78 + "\nDISCRIMINATOR BACKBONE IS RANDOM (gan.disc_backbone_path "
                      "unset). Fine for toy runs only.\n" + "=" * 78)
      x = jnp.zeros(batch_spec(config)["image"].shape, jnp.float32)
      frozen["disc_backbone"] = nn.unbox(build_discriminator(config).init(
          jax.random.key(config.seed + 7), x)["params"]["backbone"])
  return frozen


def _copy(tree):
  """Distinct buffers for trees that appear twice in the donated state (params and EMA)."""
  return jax.tree.map(jnp.copy, tree)


def initialize(config, state: dict, ctx) -> dict:
  """Start-of-stage weights: previous stage's EMA, an official checkpoint, or DINOv2."""
  init = config.init
  p_sh, p_abs = ctx.state_sh["params"], ctx.state_abs["params"]
  if init.from_stage:
    logging.info("init: EMA params and teacher from the previous stage at %s", init.from_stage)
    layout_error = ckpt_layout.checkpoint_layout_error(init.from_stage, p_abs)
    if layout_error:
      raise ConfigError(layout_error)
    prev, prev_step, prev_total = ckpt_lib.restore_subtrees(
        init.from_stage, {"ema": p_abs, "teacher": ctx.state_abs["teacher"]}, with_progress=True)
    if prev_total is not None and prev_step < prev_total and not init.allow_unfinished:
      raise ConfigError(f"init.from_stage={init.from_stage!r} stopped at step {prev_step} of "
                        f"{prev_total}; finish it or set init.allow_unfinished=True")
    return dict(state, params=prev["ema"], ema=_copy(prev["ema"]), teacher=prev["teacher"])
  enc = None
  if init.encoder:
    logging.info("init: encoder from %s", init.encoder)
    enc = ctx.place(encoders.load(init.encoder, dict(config.model.encoder)), p_sh["encoder"])
  if init.official_uae:
    logging.info("init: official UAE checkpoint %s", init.official_uae)
    params = ctx.place(uae_lib.load_official(init.official_uae, config.model), p_sh)
    # The semantic teacher is the original pretrained encoder (validate() insists on it when the
    # semantic loss is on), never the imported fine-tuned one.
    teacher = enc if enc is not None else params["encoder"]
    return dict(state, params=params, ema=_copy(params), teacher=_copy(teacher))
  if enc is not None:
    return dict(state, params=dict(state["params"], encoder=enc),
                ema=dict(state["ema"], encoder=_copy(enc)), teacher=_copy(enc))
  logging.warning("=" * 78 + "\nENCODER IS RANDOMLY INITIALISED (no init.encoder / from_stage). "
                  "The semantic band has no pretrained meaning; toy runs only.\n" + "=" * 78)
  return state


# ------------------------------------------------------------------------------ losses
def reconstruction_terms(config, lpips_params, x_hat, x, w_l1, w_lpips, prefix=""):
  """w_l1 * L1 + w_lpips * LPIPS and its parts (keys prefixed, e.g. 'clean_')."""
  parts = {f"{prefix}l1": reconstruction.l1_loss(x_hat, x)}
  total = w_l1 * parts[f"{prefix}l1"]
  if w_lpips:
    parts[f"{prefix}lpips"] = reconstruction.lpips_loss(lpips_params, x_hat, x,
                                                        compute_dtype(config))
    total = total + w_lpips * parts[f"{prefix}lpips"]
  return total, parts


def semantic_loss(config, model, params, teacher, out, x):
  """Student latent vs the frozen teacher's: band-0 MSE (paper) or zig-zag low-pass MSE (official)."""
  z_t = jax.lax.stop_gradient(model.apply({"params": {"encoder": teacher}}, x, method="encode"))
  if config.recipe == "official":
    return semantic.zigzag_lowfreq_mse(out["latent"], z_t, config.loss.semantic_first_k)
  teacher_bands = model.apply({"params": params}, z_t, method="split")
  return semantic.band_semantic_mse(out["bands"], teacher_bands, config.model.k_base)


def esm_term(config, model, params, out, x):
  """ESM on the fused clean latent (the `tokenize` output a generator models): a scalar.

  Paper recipe: fuse(clean bands); official recipe: the encoder's latent. Images go in as
  [-1, 1], the range the regulariser was defined on. Gradients reach the latent only.
  """
  from uae_jax.losses import spectrum  # pylint: disable=g-import-not-at-top
  loss = config.loss
  z = (model.apply({"params": params}, out["bands"], method="fuse") if config.recipe == "paper"
       else out["latent"])
  return spectrum.esm_loss(2.0 * x - 1.0, z, loss.get("esm_delta", 1.0),
                           loss.get("esm_loss_type", "kl"), center=loss.get("esm_center", "mean"),
                           blur_skip_height=loss.get("esm_blur_skip_height", 32))


def dsm_recon(config, model, params, out, x, rng):
  """(recon, target, k): DSM's shared block-DCT low-pass of the decoder's latent and the image.

  The decoder sees the low-passed fused (noised) latent; the target is the same low-pass of the
  image, so every reconstruction term is frequency aligned. k is drawn per step from
  `loss.dsm_choices` as an array (one compile for every k); k = 0 is the plain forward. The
  unmasked decode of the forward is then unused and XLA drops it.
  """
  from uae_jax.losses import spectrum  # pylint: disable=g-import-not-at-top
  k = spectrum.sample_dsm_k(jax.random.fold_in(rng, 0x5D5),
                            tuple(config.loss.get("dsm_choices", spectrum.DSM_CHOICES)))
  v = {"params": params}
  q_bar = spectrum.dsm_mask(model.apply(v, out["noised_bands"], method="fuse"), k)
  recon = model.apply(v, q_bar.astype(out["noised_bands"].dtype), method="decode")
  return recon, spectrum.dsm_mask(x, k), k


def generator_losses(config, model, params, teacher, x, lpips_params, rng):
  """Forward in train mode and the non-adversarial loss: (L_rec [+ w_sem L_sem], out, parts).

  Optional Spectrum Matching terms (off by default): `loss.esm` > 0 adds w_esm * ESM of the fused
  latent; `loss.dsm` replaces the reconstruction pair by its shared block-DCT low-pass.
  """
  out = model.apply({"params": params}, x, train=True, rngs={"noise": rng})
  loss = config.loss
  target, spectral = x, {}
  if loss.get("dsm", False):
    recon, target, k = dsm_recon(config, model, params, out, x, rng)
    out = dict(out, recon=recon)   # the GAN term (if on) judges the aligned reconstruction too
    spectral["dsm_k"] = k.astype(jnp.float32)
  total, parts = reconstruction_terms(config, lpips_params, out["recon"], target, loss.l1,
                                      loss.lpips)
  parts.update(spectral)
  if loss.get("esm", 0.0) > 0:
    parts["esm"] = esm_term(config, model, params, out, x)
    total = total + loss.esm * parts["esm"]
  if "recon_clean" in out:
    t, p = reconstruction_terms(config, lpips_params, out["recon_clean"], x, loss.clean_l1,
                                loss.clean_lpips, "clean_")
    total, parts = total + t, {**parts, **p}
  if loss.semantic > 0:
    parts["semantic"] = semantic_loss(config, model, params, teacher, out, x)
    total = total + loss.semantic * parts["semantic"]
  parts["rec_total"] = total
  return total, out, parts


def adversarial_loss(config, disc_vars, recon, rng):
  """-mean D(DiffAug(2 * recon - 1)): the generator's GAN term."""
  fake = diffaug.diff_augment(rng, 2.0 * recon - 1.0, config.gan.translation, config.gan.cutout)
  return gan.generator_loss(build_discriminator(config).apply(disc_vars, fake))


def _last_layer(tree):
  """The decoder's last-layer kernel inside a params-shaped tree."""
  return tree[LAST_LAYER[0]][LAST_LAYER[1]][LAST_LAYER[2]]


def adaptive_gan_grads(config, loss_fn, params):
  """Gradients of L_rec + w * L_G with VQGAN's adaptive w: one forward, one full backward.

  `loss_fn(params) -> ((l_rec, l_g), parts)`; w = gan.weight * ||g_rec|| / ||g_gan|| at the
  decoder's last layer (capped), held constant as in VQGAN. The two gradients w needs are read
  at the last-layer kernel only, so XLA prunes the rest of those two backward passes; the one
  full backward takes the combined cotangent (1, w).
  """
  (l_rec, l_g), vjp_fn, parts = jax.vjp(loss_fn, params, has_aux=True)
  one, zero = jnp.ones_like(l_rec), jnp.zeros_like(l_g)
  last_rec = _last_layer(vjp_fn((one, zero))[0])
  last_gan = _last_layer(vjp_fn((zero, one))[0])
  lam = gan.adaptive_weight(last_rec, last_gan, config.gan.max_weight)
  w = config.gan.weight * lam
  grads, = vjp_fn((one, w.astype(l_g.dtype)))
  return l_rec + w * l_g, grads, dict(parts, gan_g=l_g, adaptive_weight=lam, gan_weight=w)


def discriminator_update(config, disc_tx, state, frozen, params, x, rng):
  """One hinge D update on eval-mode reconstructions of the updated generator: (disc, opt, metrics)."""
  disc, d = build_discriminator(config), state["disc"]
  # The official code's eval-mode reconstruction keeps the DCT mask on when it is enabled.
  apply_mask = config.recipe == "official" and config.model.dct_enabled
  recon = build_model(config).apply({"params": params}, x, apply_mask, method="reconstruct")
  k_f, k_r = jax.random.split(rng)
  fake = gan.quantize_fake(2.0 * jax.lax.stop_gradient(recon) - 1.0)
  fake = diffaug.diff_augment(k_f, fake, config.gan.translation, config.gan.cutout)
  real = diffaug.diff_augment(k_r, 2.0 * x - 1.0, config.gan.translation, config.gan.cutout)

  def loss_fn(heads):
    variables = {"params": {"backbone": frozen["disc_backbone"], "heads": heads},
                 "spectral": d["spectral"]}
    l_fake, upd = disc.apply(variables, fake, train=True, mutable=[disc_lib.SPECTRAL])
    variables["spectral"] = upd[disc_lib.SPECTRAL]
    l_real, upd = disc.apply(variables, real, train=True, mutable=[disc_lib.SPECTRAL])
    return gan.hinge_d_loss(l_real, l_fake), (upd[disc_lib.SPECTRAL], l_real.mean(), l_fake.mean())

  (loss, (spectral, l_real, l_fake)), grads = jax.value_and_grad(loss_fn, has_aux=True)(d["params"])
  updates, disc_opt = disc_tx.update(grads, state["disc_opt"], d["params"])
  new = {"params": optax.apply_updates(d["params"], updates), "spectral": spectral}
  return new, disc_opt, {"gan_d": loss, "logits_real": l_real, "logits_fake": l_fake}


# ------------------------------------------------------------------------------ the step
def phase_at(config, step: int) -> tuple:
  """(d_on, g_on) of the GAN schedule at a host step; the trainer compiles one step per phase."""
  if not config.gan.enabled:
    return (False, False)
  return gan.gan_phase(step, total_steps(config), config.gan.d_start_frac, config.gan.g_start_frac)


def generator_grads(config, state, batch, frozen, rng, g_on: bool):
  """(loss, grads, parts) of the generator; with `g_on`, plus the adaptive GAN term.

  Without it the step is one forward and one backward: no discriminator forward at all.
  """
  model, x = build_model(config), batch["image"]
  k_noise, k_aug = jax.random.split(rng)
  losses = lambda p: generator_losses(config, model, p, state["teacher"], x, frozen["lpips"], k_noise)
  if not g_on:
    (loss, parts), grads = jax.value_and_grad(lambda p: losses(p)[::2], has_aux=True)(state["params"])
    return loss, grads, parts
  disc_vars = {"params": {"backbone": frozen["disc_backbone"], "heads": state["disc"]["params"]},
               "spectral": state["disc"]["spectral"]}

  def both(p):
    l_rec, out, parts = losses(p)
    return (l_rec, adversarial_loss(config, disc_vars, out["recon"], k_aug)), parts

  return adaptive_gan_grads(config, both, state["params"])


def make_train_step(config, phase=None):
  """Builds `train_step(state, batch, frozen) -> (state, metrics)` for one GAN phase.

  `phase` is `phase_at(config, step)` of the steps it will run; None means the GAN fully on
  (when the stage has one), the cost a full-size compile should measure.
  """
  d_on, g_on = phase if phase is not None else (config.gan.enabled,) * 2
  gen_tx, disc_tx, sched = make_optimizers(config)
  labels = trainable_labels(config)

  def train_step(state, batch, frozen):
    step = state["step"]
    rng = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), step)
    k_gen, k_disc = jax.random.split(rng)
    loss, grads, metrics = generator_grads(config, state, batch, frozen, k_gen, g_on)
    updates, opt = gen_tx.update(grads, state["opt"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    # EMA of the trained subtrees; frozen ones are copied so they stay bit-identical.
    ema = {k: (common.ema_update(state["ema"][k], params[k], config.optim.ema_decay)
               if labels[k] == "train" else params[k]) for k in params}
    new_state = dict(state, step=step + 1, params=params, opt=opt, ema=ema)
    if d_on:
      new_state["disc"], new_state["disc_opt"], d_metrics = discriminator_update(
          config, disc_tx, state, frozen, params, batch["image"], k_disc)
      metrics.update(d_metrics)
    if config.gan.enabled:
      metrics.update(d_on=jnp.float32(d_on), g_on=jnp.float32(g_on))
    trained = lambda t: {k: v for k, v in t.items() if labels[k] == "train"}
    metrics.update(loss=loss, lr=sched(step),
                   **common.norm_metrics(trained(grads), params, trained(updates)))
    return new_state, metrics

  return train_step


# ------------------------------------------------------------------------------ evaluation
class Evaluator:
  """Reconstruction metrics of the raw and EMA params, and the per-band image grid."""

  def __init__(self, config, ctx, frozen):
    from uae_jax.evaluate import recon_eval  # it builds models through this module
    self.rec = recon_eval.ReconstructionEvaluator(config, ctx.batch_sh, frozen["lpips"])

  def evaluate(self, state) -> dict:
    """PSNR / SSIM / LPIPS (and rFID when configured) as eval/... and eval_ema/... scalars."""
    out = {}
    for tag, key in (("eval", "params"), ("eval_ema", "ema")):
      out.update({f"{tag}/{k}": v for k, v in self.rec(state[key]).items()})
    return out

  def images(self, state) -> dict:
    """Original | reconstruction | cumulative band decodes of the EMA params."""
    return {"recon_ema": self.rec.band_grid(state["ema"])}


TASK = tasks.Task(
    validate=validate, batch_spec=batch_spec, init_state=init_state,
    make_train_step=make_train_step, make_evaluator=Evaluator, initialize=initialize,
    load_frozen=load_frozen, phase_at=phase_at)
