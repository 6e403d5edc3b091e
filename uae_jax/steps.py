"""Pure train/eval step builders: one train step per stage, compiled from the config. No I/O.

The train state is a plain dict pytree:
  step      int32 scalar
  rng       uint32[2] key data (checkpointable)
  params    UAE params {'encoder', 'decoder'[, 'modulator']}
  ema       EMA of params (frozen subtrees are copied, not averaged)
  opt       generator optax state
  teacher   frozen copy of the initial pretrained encoder params (semantic loss target)
  disc      {'params': heads, 'spectral': u/v} and disc_opt, only when the stage has a GAN
The frozen DINO backbone of the discriminator and the LPIPS VGG16 are separate, non-donated
arguments: they never change and are not checkpointed per step.
"""
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax

from uae_jax.losses import diffaug
from uae_jax.losses import gan
from uae_jax.losses import reconstruction
from uae_jax.losses import semantic
from uae_jax.models import bands as bands_lib
from uae_jax.models import discriminator as disc_lib
from uae_jax.models import uae as uae_lib

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
# Path of the decoder's last layer: the VQGAN adaptive weight compares gradients there.
LAST_LAYER = ("decoder", "pred", "kernel")

DISC_SIZES = {
    "S8": {},  # DINO v1 ViT-S/8 defaults of the module
    "tiny": dict(dim=32, depth=4, num_heads=2, mlp_hidden=64, image_size=32, key_depths=(0, 1, 2, 3)),
}


def compute_dtype(config) -> Any:
  """The compute dtype named in the config."""
  if config.compute_dtype not in DTYPES:
    raise ValueError(f"compute_dtype={config.compute_dtype!r}: expected one of {sorted(DTYPES)}")
  return DTYPES[config.compute_dtype]


def build_model(config) -> uae_lib.UAE:
  """The UAE module described by `config.model`."""
  m = config.model
  return uae_lib.UAE(
      encoder=dict(m.encoder), decoder=dict(m.decoder), recipe=config.recipe,
      num_bands=m.num_bands, band_edges=tuple(m.band_edges) or None, band_tau=m.band_tau,
      band_method=m.band_method, use_modulator=m.use_modulator, dct_enabled=m.dct_enabled,
      dct_count=m.dct_count, dct_count_min=m.dct_count_min, dct_count_max=m.dct_count_max,
      dct_apply_prob=m.dct_apply_prob, dtype=compute_dtype(config))


def build_discriminator(config) -> disc_lib.Discriminator:
  """The DINO discriminator named by `config.gan.backbone`."""
  if config.gan.backbone not in DISC_SIZES:
    raise ValueError(f"gan.backbone={config.gan.backbone!r}: expected one of {sorted(DISC_SIZES)}")
  return disc_lib.Discriminator(**DISC_SIZES[config.gan.backbone], dtype=compute_dtype(config))


def total_steps(config) -> int:
  """Steps of this stage: explicit, or epochs * examples // global batch."""
  if config.train.total_steps > 0:
    return int(config.train.total_steps)
  return int(config.train.num_epochs * config.num_train_examples // config.input.global_batch_size)


def lr_schedule(peak: float, end: float, warmup: int, total: int) -> optax.Schedule:
  """Linear warm-up from 0 to `peak`, then cosine to `end` at the end of the stage."""
  return optax.warmup_cosine_decay_schedule(0.0, peak, max(warmup, 0), max(total, warmup + 1), end)


def _adamw(lr, o) -> optax.GradientTransformation:
  """AdamW of the recipe (optionally after global-norm clipping)."""
  chain = [optax.clip_by_global_norm(o.grad_clip)] if o.grad_clip > 0 else []
  return optax.chain(*chain, optax.adamw(lr, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay))


def param_groups(config) -> tuple:
  """Top-level param subtrees of the UAE for this config."""
  with_mod = config.recipe == "paper" and config.model.use_modulator
  return ("encoder", "decoder") + (("modulator",) if with_mod else ())


def trainable_labels(config) -> dict:
  """'train' / 'frozen' label per top-level param subtree (the encoder is frozen in stage 1)."""
  return {k: ("train" if (k != "encoder" or config.train.encoder_trainable) else "frozen")
          for k in param_groups(config)}


def make_optimizers(config) -> tuple:
  """(generator optimiser with frozen subtrees zeroed, discriminator optimiser, schedules)."""
  total = total_steps(config)
  # An "epoch" is total / num_epochs steps, whether total_steps is explicit or derived.
  warmup = int(config.optim.warmup_epochs * total / max(config.train.num_epochs, 1e-9))
  sched = lr_schedule(config.optim.peak_lr, config.optim.end_lr, warmup, total)
  gen = optax.multi_transform({"train": _adamw(sched, config.optim), "frozen": optax.set_to_zero()},
                              trainable_labels(config))
  # The official D scheduler only steps on D updates, so it warms up from the D start and its
  # cosine never completes (reference §3.2); optax's own update count reproduces exactly that.
  d_sched = lr_schedule(config.gan.disc_lr, config.gan.disc_end_lr, warmup, total)
  disc = _adamw(d_sched, config.optim)
  return gen, disc, sched


def init_state(config, rng, images) -> dict:
  """Fresh train state (boxed params, for sharding inference); `images` fixes the shapes."""
  model = build_model(config)
  k_model, k_disc, k_state = jax.random.split(rng, 3)
  variables = model.init({"params": k_model, "noise": k_model}, images, train=False)
  params = variables["params"]
  gen_opt, disc_opt, _ = make_optimizers(config)
  state = {
      "step": jnp.zeros((), jnp.int32),
      "rng": jax.random.key_data(k_state),
      "params": params,
      "ema": params,
      "opt": gen_opt.init(params),
      "teacher": params["encoder"],
  }
  if config.gan.enabled:
    disc = build_discriminator(config)
    dv = disc.init(k_disc, 2.0 * images - 1.0)
    state["disc"] = {"params": dv["params"]["heads"], "spectral": dv[disc_lib.SPECTRAL]}
    state["disc_opt"] = disc_opt.init(dv["params"]["heads"])
  return state


def init_disc_backbone(config, rng, images):
  """Random discriminator backbone params (boxed); real runs load DINO ViT-S/8 weights instead."""
  disc = build_discriminator(config)
  return disc.init(rng, 2.0 * images - 1.0)["params"]["backbone"]


def _ema_update(ema, params, labels, decay):
  """EMA of the trained subtrees; frozen ones are copied so they stay bit-identical."""
  out = {}
  for k in params:
    if labels[k] == "train":
      out[k] = jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, ema[k], params[k])
    else:
      out[k] = params[k]
  return out


def make_train_step(config: ml_collections.ConfigDict):
  """Builds `train_step(state, batch, lpips_params, disc_backbone) -> (state, metrics)`."""
  model = build_model(config)
  loss_cfg = config.loss
  recipe = config.recipe
  n_steps = total_steps(config)
  gan_on = bool(config.gan.enabled)
  disc = build_discriminator(config) if gan_on else None
  use_sem = loss_cfg.semantic > 0
  use_clean = recipe == "official" and (loss_cfg.clean_l1 > 0 or loss_cfg.clean_lpips > 0)
  lpips_dtype = compute_dtype(config)

  def rec_terms(lpips_params, x_hat, x, w_l1, w_lpips, prefix):
    parts = {f"{prefix}l1": reconstruction.l1_loss(x_hat, x)}
    total = w_l1 * parts[f"{prefix}l1"]
    if w_lpips:
      parts[f"{prefix}lpips"] = reconstruction.lpips_loss(lpips_params, x_hat, x, lpips_dtype)
      total = total + w_lpips * parts[f"{prefix}lpips"]
    return total, parts

  def semantic_loss(params, teacher, out, x):
    z_t = jax.lax.stop_gradient(model.apply({"params": {"encoder": teacher}}, x,
                                            method=uae_lib.UAE.encode))
    if recipe == "official":
      return semantic.zigzag_lowfreq_mse(out["latent"], z_t, loss_cfg.semantic_first_k)
    teacher_bands = model.apply({"params": params}, z_t, method=uae_lib.UAE.split)
    return semantic.band_semantic_mse(out["bands"], teacher_bands, loss_cfg.k_base)

  def gen_losses(params, state, batch, lpips_params, disc_vars, rng):
    """(L_rec_total, L_G) and metrics; L_G is 0 without a GAN."""
    x = batch["image"]
    k_noise, k_aug = jax.random.split(rng)
    out = model.apply({"params": params}, x, train=True, noise_tau=loss_cfg.noise_tau,
                      k_base=loss_cfg.k_base, p_band=loss_cfg.p_band, clean_pass=use_clean,
                      rngs={"noise": k_noise})
    total, parts = rec_terms(lpips_params, out["recon"], x, loss_cfg.l1, loss_cfg.lpips, "")
    if use_clean:
      t, p = rec_terms(lpips_params, out["recon_clean"], x, loss_cfg.clean_l1,
                       loss_cfg.clean_lpips, "clean_")
      total, parts = total + t, {**parts, **p}
    if use_sem:
      parts["semantic"] = semantic_loss(params, state["teacher"], out, x)
      total = total + loss_cfg.semantic * parts["semantic"]
    g_loss = jnp.zeros((), jnp.float32)
    if gan_on:
      fake = diffaug.diff_augment(k_aug, 2.0 * out["recon"] - 1.0, config.gan.translation,
                                  config.gan.cutout)
      g_loss = gan.generator_loss(disc.apply(disc_vars, fake))
      parts["gan_g"] = g_loss
    parts["rec_total"] = total
    return (total, g_loss), parts

  def disc_step(state, params, batch, disc_backbone, rng):
    """One hinge D update on eval-mode reconstructions of the updated generator."""
    x = batch["image"]
    apply_mask = recipe == "official" and config.model.dct_enabled  # reference §7 bug 2
    recon = model.apply({"params": params}, x, apply_mask, method=uae_lib.UAE.reconstruct)
    fake = gan.quantize_fake(2.0 * jax.lax.stop_gradient(recon) - 1.0)
    k_f, k_r = jax.random.split(rng)
    fake = diffaug.diff_augment(k_f, fake, config.gan.translation, config.gan.cutout)
    real = diffaug.diff_augment(k_r, 2.0 * x - 1.0, config.gan.translation, config.gan.cutout)
    d = state["disc"]

    def loss_fn(heads):
      variables = {"params": {"backbone": disc_backbone, "heads": heads}, "spectral": d["spectral"]}
      lf, upd = disc.apply(variables, fake, train=True, mutable=[disc_lib.SPECTRAL])
      variables["spectral"] = upd[disc_lib.SPECTRAL]
      lr_, upd = disc.apply(variables, real, train=True, mutable=[disc_lib.SPECTRAL])
      return gan.hinge_d_loss(lr_, lf), (upd[disc_lib.SPECTRAL], lr_.mean(), lf.mean())

    (loss, (spectral, lreal, lfake)), grads = jax.value_and_grad(loss_fn, has_aux=True)(d["params"])
    updates, disc_opt = disc_tx.update(grads, state["disc_opt"], d["params"])
    new = {"params": optax.apply_updates(d["params"], updates), "spectral": spectral}
    return new, disc_opt, {"gan_d": loss, "logits_real": lreal, "logits_fake": lfake}

  gen_tx, disc_tx, sched = make_optimizers(config)
  labels = trainable_labels(config)

  def train_step(state, batch, lpips_params, disc_backbone):
    params = state["params"]
    step = state["step"]
    rng = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), step)
    k_gen, k_disc = jax.random.split(rng)
    disc_vars = None
    metrics = {}
    if gan_on:
      d_on, g_on = gan.gan_schedule_weights(step, n_steps, config.gan.d_start_frac,
                                            config.gan.g_start_frac)
      disc_vars = {"params": {"backbone": disc_backbone, "heads": state["disc"]["params"]},
                   "spectral": state["disc"]["spectral"]}
    f = lambda p: gen_losses(p, state, batch, lpips_params, disc_vars, k_gen)
    if gan_on:
      # One forward, two backward passes: the adaptive weight needs both gradients separately.
      (l_rec, l_g), vjp_fn, parts = jax.vjp(f, params, has_aux=True)
      g_rec, = vjp_fn((jnp.ones_like(l_rec), jnp.zeros_like(l_g)))
      g_gan, = vjp_fn((jnp.zeros_like(l_rec), jnp.ones_like(l_g)))
      get = lambda t: t[LAST_LAYER[0]][LAST_LAYER[1]][LAST_LAYER[2]]
      lam = gan.adaptive_weight(get(g_rec), get(g_gan), config.gan.max_weight)
      w = jnp.where(g_on, config.gan.weight * lam, 0.0)
      grads = jax.tree.map(lambda a, b: a + w * b, g_rec, g_gan)
      loss = l_rec + w * l_g
      metrics.update(adaptive_weight=lam, gan_weight=w, d_on=d_on.astype(jnp.float32))
    else:
      def f_rec(p):
        (l_rec, _), parts = f(p)
        return l_rec, parts
      (loss, parts), grads = jax.value_and_grad(f_rec, has_aux=True)(params)
    updates, opt = gen_tx.update(grads, state["opt"], params)
    new_params = optax.apply_updates(params, updates)
    new_state = dict(state)
    new_state.update(
        step=step + 1, params=new_params, opt=opt,
        ema=_ema_update(state["ema"], new_params, labels, config.optim.ema_decay))
    if gan_on:
      def run_d(_):
        return disc_step(state, new_params, batch, disc_backbone, k_disc)
      def skip_d(_):
        zero = jnp.zeros((), jnp.float32)
        return state["disc"], state["disc_opt"], {"gan_d": zero, "logits_real": zero,
                                                  "logits_fake": zero}
      new_state["disc"], new_state["disc_opt"], d_metrics = jax.lax.cond(d_on, run_d, skip_d, None)
      metrics.update(d_metrics)
    trained = {k: v for k, v in grads.items() if labels[k] == "train"}
    metrics.update(parts)
    metrics.update(
        loss=loss, lr=sched(step), l2_grads=optax.global_norm(trained),
        l2_params=optax.global_norm(new_params),
        l2_updates=optax.global_norm({k: v for k, v in updates.items() if labels[k] == "train"}))
    return new_state, metrics

  return train_step


def make_band_decode(config: ml_collections.ConfigDict):
  """Builds `band_decode(params, images) -> (recon, cumulative (K, B, H, W, 3))` for image grids.

  Paper recipe: decode the fused latent of b_0, b_0+b_1, ... (higher bands zeroed). Official
  recipe: decode zig-zag DCT low-passes keeping 1/K, 2/K, ... of the coefficients.
  """
  model = build_model(config)
  k = config.model.num_bands

  def band_decode(params, images):
    v = {"params": params}
    recon = model.apply(v, images, method=uae_lib.UAE.reconstruct)
    z = model.apply(v, images, method=uae_lib.UAE.encode)
    outs = []
    if config.recipe == "paper":
      b = model.apply(v, z, method=uae_lib.UAE.split)
      for i in range(k):
        kept = b * (jnp.arange(k) <= i).astype(b.dtype)[:, None, None, None, None]
        outs.append(model.apply(v, model.apply(v, kept, method=uae_lib.UAE.fuse),
                                method=uae_lib.UAE.decode))
    else:
      n = z.shape[1] * z.shape[2]
      for i in range(k):
        zi = bands_lib.dct_lowpass(z, max(1, n * (i + 1) // k))
        outs.append(model.apply(v, zi, method=uae_lib.UAE.decode))
    return recon, jnp.stack(outs)

  return band_decode
