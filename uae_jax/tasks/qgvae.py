"""The QG-VAE task: quantised global autoencoder, its patch VQ-VAE baseline, and QGGAN.

State (a plain dict pytree):
  step      int32 scalar
  rng       uint32[2] key data
  params    {'encoder', 'decoder', 'codebook', ['offset']} of `models.qgvae.QuantisedAE`
  opt       AdamW state (lr 2e-4, weight decay 0.01 on everything, codebooks and offsets too)
  vq_stats  {'grad_mag': (codebooks, K)}: the reset statistic accumulated since the last reset
            (the model's `vq_stats` collection; sharded like the codebooks, checkpointed)
  vq_log    {'dead', 'moved'}: per-codebook means of the last reset (float32 scalars)
  disc, disc_opt   QGGAN only: the per-pixel U-Net discriminator and its AdamW state
Frozen inputs of the step: {'lpips': VGG16 LPIPS} (QGGAN's reconstruction loss and evaluation).

One step (docs/qgvae.md):
  G step: L = MSE + 0.25 L_codebook + 1.0 L_commit [+ pyramid term]; after `gan.start_step` (QGGAN)
          L = LPIPS + L1 + 0.25 L_codebook + L_commit + lambda L_G, lambda from the decoder's last
          conv. grad_mag += mean_D |dL/dE|, then AdamW.
  D step: QGGAN after `gan.start_step`, on odd steps: hinge loss on eval-mode reconstructions.
  After the update of step s, when (s + 1) % vq.reset_every == 0: the codebook reset.
"""
from __future__ import annotations

import functools
import json
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging

from uae_jax import tasks
from uae_jax.errors import ConfigError
from uae_jax.losses import gan
from uae_jax.losses import reconstruction
from uae_jax.losses import vq
from uae_jax.models import lpips as lpips_lib
from uae_jax.models import qgvae as qg
from uae_jax.tasks import common

KINDS = ("global", "patch")
ORDERINGS = ("none", "tail_dropout", "pyramid")
# The decoder's last layer for QGGAN's adaptive weight (the original's
# decoder.unet_blocks.out_conv.weight: the outermost hourglass level's output conv).
LAST_LAYER = ("decoder", "unet", "level0", "out_conv", "kernel")


# ------------------------------------------------------------------------------ config
def build_model(config) -> qg.QuantisedAE:
  """The autoencoder of `config.model` at `config.input.image_size`."""
  return qg.build(config.model, config.input.image_size, common.compute_dtype(config))


def build_discriminator(config) -> qg.QGDiscriminator:
  """QGGAN's per-pixel discriminator at the input size."""
  return qg.QGDiscriminator(width=config.input.image_size, c_int=config.gan.disc_channels,
                            res_blocks=config.gan.disc_res_blocks, ch_max=config.model.ch_max,
                            dtype=common.compute_dtype(config))


def validate(config) -> None:
  """Checks the QG-VAE config before any compute; raises ConfigError naming the key."""
  m, s = config.model, config.input.image_size
  common.compute_dtype(config)
  if m.kind not in KINDS:
    raise ConfigError(f"model.kind={m.kind!r}: expected one of {KINDS}")
  if s % (2 ** m.f) or (s & (s - 1)):
    raise ConfigError(f"input.image_size={s} must be a power of two divisible by 2^model.f")
  if m.kind == "global" and (m.tokens % m.heads):
    raise ConfigError(f"model.tokens={m.tokens} must be divisible by model.heads={m.heads}")
  if not 2 <= m.codebook_size <= 65536:
    raise ConfigError(f"model.codebook_size={m.codebook_size}: indices are stored as uint16")
  if config.order.mode not in ORDERINGS:
    raise ConfigError(f"order.mode={config.order.mode!r}: expected one of {ORDERINGS}")
  if m.kind == "patch" and config.order.mode != "none":
    raise ConfigError("order.mode must be 'none' for model.kind='patch' (local tokens have no order)")
  if config.order.mode == "pyramid" and s // 2 ** (config.order.pyramid_levels - 1) < 1:
    raise ConfigError(f"order.pyramid_levels={config.order.pyramid_levels} is too deep for {s} px")
  if config.vq.reset_every < 0:
    raise ConfigError("vq.reset_every must be >= 0 (0 = never)")


def batch_spec(config) -> dict:
  """One example of a train batch: an image in [0, 1]."""
  s = config.input.image_size
  return {"image": jax.ShapeDtypeStruct((1, s, s, 3), jnp.float32)}


def make_optimizers(config) -> tuple:
  """(autoencoder AdamW, discriminator AdamW): constant lr, no clipping, decay on every leaf."""
  o = config.optim
  ae = optax.adamw(o.lr, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay)
  disc = optax.adamw(config.gan.disc_lr, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay)
  return ae, disc


def init_state(config, rng) -> dict:
  """Fresh train state (boxed params and statistics, for sharding inference)."""
  x = jnp.zeros(batch_spec(config)["image"].shape, jnp.float32)
  k_model, k_disc, k_state = jax.random.split(rng, 3)
  variables = build_model(config).init({"params": k_model}, x)
  ae_tx, disc_tx = make_optimizers(config)
  params = variables["params"]
  state = {"step": jnp.zeros((), jnp.int32), "rng": jax.random.key_data(k_state),
           "params": params, "opt": ae_tx.init(params), "vq_stats": variables["vq_stats"],
           "vq_log": {"dead": jnp.zeros((), jnp.float32), "moved": jnp.zeros((), jnp.float32)}}
  if config.gan.enabled:
    d = build_discriminator(config).init(k_disc, x)["params"]
    state["disc"] = d
    state["disc_opt"] = disc_tx.init(d)
  return state


def load_frozen(config) -> dict:
  """Host params of the frozen VGG16 LPIPS (QGGAN loss and evaluation); builds the digits if used."""
  if config.input.source == "array_record" and config.input.get("name") == DIGITS_NAME:
    build_digits_dataset(config.input.data_dir)
  return {"lpips": lpips_lib.load_lpips_params("vgg16")}


def initialize(config, state, ctx) -> dict:
  """Nothing pretrained: QG-VAE trains from scratch."""
  return state


# ------------------------------------------------------------------------------ losses
def token_mask(config, rng, batch: int):
  """Training-time tail-dropout mask (B, T), or None when the ordering is not 'tail_dropout'."""
  if config.order.mode != "tail_dropout":
    return None
  t = qg.num_tokens(config.model, config.input.image_size)
  return vq.tail_dropout_mask(rng, batch, t, config.order.dropout_prob)


def pyramid_loss(config, model, params, x, zh):
  """Prefix reconstructions against the matching box-filtered pyramid level of the target.

  Level j = 1 .. L-1 keeps the first max(1, T / 4^j) tokens (a 2^j coarser image has 4^j fewer
  pixels) and compares both images after 2^j x 2^j mean pooling; mean MSE over the levels.
  """
  t = zh.shape[1]
  terms = []
  for j in range(1, config.order.pyramid_levels):
    keep = max(1, t // 4 ** j)
    mask = (jnp.arange(t) < keep).astype(zh.dtype)[None, :, None]
    prefix = model.apply({"params": params}, zh * mask, method="decode")
    terms.append(jnp.mean(jnp.square(vq.avg_pool(prefix, 2 ** j) - vq.avg_pool(x, 2 ** j))))
  return sum(terms) / len(terms)


def forward_terms(config, params, x, rng, frozen, perceptual: bool):
  """The generator's loss terms (no adversarial term) and its forward outputs.

  perceptual=False: {'mse', 'codebook', 'commit'[, 'pyramid']} (QG-VAE). perceptual=True: LPIPS +
  L1 instead of MSE (QGGAN once the GAN is on).
  """
  model = build_model(config)
  mask = token_mask(config, rng, x.shape[0])
  if config.order.mode == "pyramid":
    z = model.apply({"params": params}, x, method="encode")
    q = model.apply({"params": params}, z, method="quantize")
    out = {"recon": model.apply({"params": params}, q["zh"], method="decode"),
           "indices": q["indices"], "codebook_loss": q["codebook_loss"],
           "commit_loss": q["commit_loss"], "zh": q["zh"]}
  else:
    out = model.apply({"params": params}, x, mask)
  terms = {"codebook": out["codebook_loss"], "commit": out["commit_loss"]}
  if perceptual:
    terms["lpips"] = reconstruction.lpips_loss(frozen["lpips"], out["recon"], x,
                                               common.compute_dtype(config))
    terms["l1"] = reconstruction.l1_loss(out["recon"], x)
  else:
    terms["mse"] = jnp.mean(jnp.square(out["recon"] - x))
  if config.order.mode == "pyramid":
    terms["pyramid"] = pyramid_loss(config, model, params, x, out["zh"])
  return terms, out


def weighted_sum(config, terms: dict):
  """Sum of the non-adversarial terms with their weights."""
  total = vq.vq_loss(terms["codebook"], terms["commit"], config.vq.codebook_weight,
                     config.vq.commit_weight)
  for k in ("mse", "lpips", "l1"):
    if k in terms:
      total = total + terms[k]
  if "pyramid" in terms:
    total = total + config.order.pyramid_weight * terms["pyramid"]
  return total


def _get(tree, path):
  """Leaf of a nested dict at `path`."""
  for k in path:
    tree = tree[k]
  return tree


def plain_grads(config, params, x, rng, frozen):
  """(loss, grads, metrics) of the non-GAN generator loss."""
  def loss_fn(p):
    terms, out = forward_terms(config, p, x, rng, frozen, perceptual=False)
    return weighted_sum(config, terms), (terms, out["indices"])
  (loss, (terms, idx)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
  return loss, grads, dict(terms), idx


def gan_grads(config, params, disc_params, x, rng, frozen):
  """(loss, grads, metrics) of QGGAN's G loss: LPIPS + L1 + VQ + lambda * (-mean D(x_hat)).

  lambda = 0.75 ||dLPIPS/dW|| / ||dL_G/dW + 1e-6|| at the decoder's last conv W: one forward, one
  full backward, and two backwards that XLA prunes to the path down to W.
  """
  disc = build_discriminator(config)

  def parts(p):
    terms, out = forward_terms(config, p, x, rng, frozen, perceptual=True)
    l_g = gan.generator_loss(disc.apply({"params": disc_params}, out["recon"]))
    rest = weighted_sum(config, {k: v for k, v in terms.items() if k != "lpips"})
    return (terms["lpips"], rest, l_g), (terms, out["indices"])

  (l_lpips, rest, l_g), vjp_fn, (terms, idx) = jax.vjp(parts, params, has_aux=True)
  one, zero = jnp.ones((), jnp.float32), jnp.zeros((), jnp.float32)
  g_lp = _get(vjp_fn((one, zero, zero))[0], LAST_LAYER)
  g_gan = _get(vjp_fn((zero, zero, one))[0], LAST_LAYER)
  lam = vq.qggan_adaptive_weight(g_lp, g_gan, config.gan.weight_scale)
  grads, = vjp_fn((one, one, lam))
  loss = l_lpips + rest + lam * l_g
  return loss, grads, dict(terms, gan_g=l_g, gan_lambda=lam), idx


# ------------------------------------------------------------------------------ the step
def _usage_metrics(config, idx) -> dict:
  """Batch perplexity / codes used per codebook (all positions pooled for the shared codebook)."""
  if config.model.kind == "patch":
    idx = idx.reshape(-1, 1)
  u = vq.usage(idx, config.model.codebook_size)
  return {"vq/perplexity": u["perplexity"], "vq/codes_used": u["codes_used"]}


def generator_update(config, tx, state, x, rng, frozen, use_gan=None):
  """One G step: (params, opt, grad_mag, metrics).

  use_gan: True / False = QGGAN's or the plain generator loss (the compiled phase knows which);
  None = chosen from the step behind a traced cond (both compiled).
  """
  params = state["params"]
  if not config.gan.enabled:
    loss, grads, terms, idx = plain_grads(config, params, x, rng, frozen)
  else:
    on = state["step"] >= config.gan.start_step
    gan_fn = lambda p: gan_grads(config, p, state["disc"], x, rng, frozen)
    shapes = jax.eval_shape(gan_fn, params)[2]

    def plain_padded(p):
      loss, grads, terms, idx = plain_grads(config, p, x, rng, frozen)
      pad = {k: jnp.zeros(v.shape, v.dtype) for k, v in shapes.items() if k not in terms}
      return loss, grads, dict(terms, **pad), idx

    def gan_padded(p):
      loss, grads, terms, idx = gan_fn(p)
      return loss, grads, dict(terms, mse=jnp.mean(jnp.zeros(()))), idx

    if use_gan is None:
      loss, grads, terms, idx = jax.lax.cond(on, gan_padded, plain_padded, params)
    else:
      loss, grads, terms, idx = (gan_padded if use_gan else plain_padded)(params)
  grad_mag = vq.accumulate(state["vq_stats"]["grad_mag"], grads["codebook"])
  updates, opt = tx.update(grads, state["opt"], params)
  new_params = optax.apply_updates(params, updates)
  metrics = dict(terms, loss=loss, **_usage_metrics(config, idx),
                 **common.norm_metrics(grads, params, updates))
  return new_params, opt, grad_mag, metrics


def discriminator_update(config, tx, state, x):
  """One D step on eval-mode reconstructions: (disc params, disc opt, metrics)."""
  recon = jax.lax.stop_gradient(
      build_model(config).apply({"params": state["params"]}, x, method="reconstruct"))
  disc = build_discriminator(config)

  def loss_fn(d):
    real, fake = disc.apply({"params": d}, x), disc.apply({"params": d}, recon)
    return gan.hinge_d_loss(real, fake), (real.mean(), fake.mean())

  (loss, (lr, lf)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["disc"])
  updates, opt = tx.update(grads, state["disc_opt"], state["disc"])
  return optax.apply_updates(state["disc"], updates), opt, {"loss": loss, "gan_d": loss,
                                                            "logits_real": lr, "logits_fake": lf}


def maybe_reset(config, params, grad_mag, vq_log, step, rng):
  """The codebook reset after the update of step `step` when (step + 1) % reset_every == 0."""
  r = config.vq.reset_every
  if r <= 0:
    return params, grad_mag, vq_log

  def do(operand):
    book, m, _ = operand
    book, m, stats = vq.reset_codebook(book, m, rng, config.vq.reset_eps, config.vq.reset_jitter)
    return book, m, stats

  book, m, log = jax.lax.cond((step + 1) % r == 0, do, lambda o: o,
                              (params["codebook"], grad_mag, vq_log))
  return dict(params, codebook=book), m, log


def phase_at(config, step: int) -> str:
  """The schedule phase of host step `step`: 'plain' (QG-VAE, or QGGAN before `gan.start_step`),
  then QGGAN's alternating 'g' (even steps) and 'd' (odd steps). The trainer compiles one step
  per phase, so the plain phase carries no discriminator, LPIPS or adaptive-weight work."""
  return common.alternating_gan_phase(config, step)


def make_train_step(config, phase=None):
  """Builds `train_step(state, batch, frozen) -> (state, metrics)` for one phase of `phase_at`.

  phase=None builds every phase behind a traced switch on the step (for callers that do not
  track phases; it compiles all of them).
  """
  ae_tx, disc_tx = make_optimizers(config)

  def g_branch(use_gan):
    def run(state, x, rng, frozen):
      params, opt, grad_mag, metrics = generator_update(config, ae_tx, state, x, rng, frozen,
                                                        use_gan)
      return dict(state, params=params, opt=opt, vq_stats={"grad_mag": grad_mag}), metrics
    return run

  def d_branch(state, x, rng, frozen):
    d, d_opt, metrics = discriminator_update(config, disc_tx, state, x)
    return dict(state, disc=d, disc_opt=d_opt), metrics

  branches = {"plain": g_branch(False), "g": g_branch(True), "d": d_branch}
  update = common.gan_phase_update(config, branches, phase, "d_step")

  def train_step(state, batch, frozen):
    step, x = state["step"], batch["image"]
    # One key per step, derived and used by counter hashes (vq.hash_*): a Threefry fold_in, split
    # or draw each put a loop into the step that XLA:CPU spends seconds compiling. Tail dropout
    # and the reset read disjoint salts of it.
    rng = vq.hash_fold_in(jax.random.wrap_key_data(state["rng"]), step)
    k_g, k_reset = vq.hash_fold_in(rng, 1), vq.hash_fold_in(rng, 2)
    new, metrics = update(state, x, k_g, frozen)
    dead_now = jnp.mean(jnp.sum(new["vq_stats"]["grad_mag"] <= 0, -1).astype(jnp.float32))
    params, grad_mag, log = maybe_reset(config, new["params"], new["vq_stats"]["grad_mag"],
                                        new["vq_log"], step, k_reset)
    new = dict(new, step=step + 1, params=params, vq_stats={"grad_mag": grad_mag}, vq_log=log)
    metrics.update({"vq/dead_in_window": dead_now, "vq/dead_at_reset": log["dead"],
                    "vq/moved_at_reset": log["moved"], "lr": jnp.asarray(config.optim.lr)})
    return new, metrics

  return train_step


# ------------------------------------------------------------------------------ digits data
DIGITS_NAME = "sklearn_digits"
DIGITS_TRAIN = 1437          # the first 80 % of scikit-learn's 1797 digits; the rest is 'test'


def digits_dir() -> str:
  """Cache directory of the scikit-learn digits as ArrayRecord shards ($UAE_JAX_CACHE/digits/v1)."""
  import os  # pylint: disable=g-import-not-at-top
  cache = os.environ.get("UAE_JAX_CACHE") or os.path.join(os.path.expanduser("~"), ".cache",
                                                           "uae_jax")
  return os.path.join(cache, "digits", "v1")


def build_digits_dataset(root: str = "", size: int = 32) -> str:
  """Writes scikit-learn's 8 x 8 digits, bicubic-upscaled to `size` px RGB PNGs, as train/test
  ArrayRecord splits with `data.prepare` (once; later calls return the directory)."""
  import os  # pylint: disable=g-import-not-at-top
  import tempfile  # pylint: disable=g-import-not-at-top
  from PIL import Image  # pylint: disable=g-import-not-at-top
  from sklearn import datasets  # pylint: disable=g-import-not-at-top
  from uae_jax.data import prepare  # pylint: disable=g-import-not-at-top
  root = os.path.abspath(root or digits_dir())
  try:
    for split in ("train", "test"):
      prepare.load_manifest(root, split)
    return root
  except (FileNotFoundError, ValueError):
    pass
  digits = datasets.load_digits()
  with tempfile.TemporaryDirectory() as tmp:
    for i, (img, label) in enumerate(zip(digits.images, digits.target)):
      split = "train" if i < DIGITS_TRAIN else "test"
      folder = os.path.join(tmp, split, str(label))
      os.makedirs(folder, exist_ok=True)
      grey = Image.fromarray(np.uint8(np.round(img * 255.0 / 16.0)), "L")
      grey.resize((size, size), Image.BICUBIC).convert("RGB").save(
          os.path.join(folder, f"{i:04d}.png"))
    for split in ("train", "test"):
      prepare.prepare_split(os.path.join(tmp, split), root, split=split, overwrite=True,
                            progress=False)
  return root


# ------------------------------------------------------------------------------ evaluation
def prefix_lengths(config) -> list:
  """Token counts of the progressive decodes: T/16, T/8, T/4, T/2 (at least 1), then T."""
  t = qg.num_tokens(config.model, config.input.image_size)
  return sorted({max(1, t // d) for d in (16, 8, 4, 2)} | {t})


def index_entropy_bits(indices: np.ndarray, codebook_size: int, shared: bool) -> float:
  """Empirical entropy of the indices in bits per image: sum over token positions of the entropy
  of that position's index histogram (one histogram over all positions for a shared codebook).

  An estimate of what a static per-position entropy coder would need; on a small eval set it is
  biased low (at most log2(#images) bits per position).
  """
  def entropy(col):
    p = np.bincount(col, minlength=codebook_size).astype(np.float64)
    p = p[p > 0] / p.sum()
    return float(-(p * np.log2(p)).sum())
  if shared:
    return entropy(indices.reshape(-1)) * indices.shape[1]
  return float(sum(entropy(indices[:, t]) for t in range(indices.shape[1])))


class Evaluator:
  """PSNR / SSIM / LPIPS of the eval split, bytes per image, and progressive-prefix decodes."""

  def __init__(self, config, ctx, frozen):
    from uae_jax.evaluate import recon_eval  # pylint: disable=g-import-not-at-top
    self.config, self.ctx, self.frozen = config, ctx, frozen
    model = build_model(config)
    mode = config.eval.uint8_mode

    def step(params, lpips_params, images):
      idx = model.apply({"params": params}, images, method="indices")
      recon = model.apply({"params": params}, idx, method="decode_indices")
      return recon_eval.eval_metrics(lpips_params, recon, images, mode), idx

    self._step = jax.jit(step)
    # The prefix length is traced (a mask), so all progressive decodes share one compile.
    self._prefix = jax.jit(
        lambda params, idx, keep: model.apply({"params": params}, idx, keep,
                                              method="decode_indices"))
    self._index = jax.jit(lambda params, x: model.apply({"params": params}, x, method="indices"))

  def _batches(self):
    """Global eval batches of at most `config.eval_batches` batches (0 = all)."""
    from uae_jax.data import pipeline  # pylint: disable=g-import-not-at-top
    it = pipeline.make_eval_iterator(self.config.input)
    for i, b in enumerate(it):
      if self.config.eval_batches and i >= self.config.eval_batches:
        break
      local = {"image": np.asarray(b["image"], np.float32), "mask": np.asarray(b["mask"], bool)}
      yield pipeline.to_global_array(local, self.ctx.batch_sh)

  def run(self, params) -> tuple:
    """(metrics dict, indices (N, T) uint16, eval images (N, S, S, 3)) over the eval split."""
    per, idxs, imgs = {"psnr": [], "ssim": [], "lpips": []}, [], []
    for g in self._batches():
      m, idx = self._step(params, self.frozen["lpips"], g["image"])
      host = jax.device_get({"m": m, "idx": idx, "mask": g["mask"], "x": g["image"]})
      valid = np.asarray(host["mask"], bool)
      for k in per:
        per[k].append(np.asarray(host["m"][k], np.float64)[valid])
      idxs.append(np.asarray(host["idx"])[valid].astype(np.uint16))
      imgs.append(np.asarray(host["x"])[valid])
    idx = np.concatenate(idxs)
    out = {k: float(np.mean(np.concatenate(v))) for k, v in per.items()}
    k = self.config.model.codebook_size
    out["bytes_fixed"] = qg.bits_per_image(self.config.model, self.config.input.image_size) / 8
    out["bytes_entropy"] = index_entropy_bits(idx, k, self.config.model.kind == "patch") / 8
    return out, idx, np.concatenate(imgs)

  def evaluate(self, state) -> dict:
    """eval/psnr, eval/ssim, eval/lpips, eval/bytes_fixed, eval/bytes_entropy."""
    return {f"eval/{k}": v for k, v in self.run(state["params"])[0].items()}

  def progressive(self, params, images, num: int = 4) -> list:
    """Rows [original, decode of the first n tokens for each prefix length] for `num` images."""
    x = jnp.asarray(images[:num])
    idx = self._index(params, x)
    cols = [np.asarray(self._prefix(params, idx, jnp.int32(n)))
            for n in prefix_lengths(self.config)]
    return [[np.asarray(x[i])] + [c[i] for c in cols] for i in range(x.shape[0])]

  def images(self, state) -> dict:
    """original | progressive decodes (T/16 .. T tokens) of the first eval images."""
    from uae_jax.metric_writers import image_grid  # pylint: disable=g-import-not-at-top
    g = next(iter(self._batches()))
    host = jax.device_get({"x": g["image"], "mask": g["mask"]})
    x = np.asarray(host["x"])[np.asarray(host["mask"], bool)]
    return {"progressive": image_grid(self.progressive(state["params"], x))}


# ------------------------------------------------------------------------------ compressed files
FILE_VERSION = 1


def write_indices(path: str, indices: np.ndarray, config, source: str, step: int) -> None:
  """Writes a compact `.npz`: uint16 indices (N, T) plus the model reference (config JSON, run)."""
  meta = {"version": FILE_VERSION, "source": source, "step": int(step),
          "config": config.to_json_best_effort()}
  with open(path, "wb") as f:
    np.savez_compressed(f, indices=np.asarray(indices, np.uint16),
                        meta=np.frombuffer(json.dumps(meta).encode(), np.uint8))


def read_indices(path: str) -> tuple:
  """(indices uint16 (N, T), meta dict) of a file from `write_indices`; LoadError if it is not one."""
  from uae_jax.errors import LoadError  # pylint: disable=g-import-not-at-top
  try:
    with np.load(path, allow_pickle=False) as z:
      indices, meta = np.asarray(z["indices"]), json.loads(bytes(z["meta"]).decode())
  except FileNotFoundError as e:
    raise LoadError(f"{path}: no such file") from e
  except Exception as e:  # pylint: disable=broad-except
    raise LoadError(f"{path}: not a QG-VAE index file ({type(e).__name__}: {e})") from e
  if indices.dtype != np.uint16 or indices.ndim != 2 or meta.get("version") != FILE_VERSION:
    raise LoadError(f"{path}: expected uint16 (N, T) indices of file version {FILE_VERSION}")
  return indices, meta


def decode_file_indices(config, params, indices: np.ndarray, batch: int = 16) -> np.ndarray:
  """Reconstructions (N, S, S, 3) float32 of stored indices; checks them against the config."""
  from uae_jax.errors import LoadError  # pylint: disable=g-import-not-at-top
  t = qg.num_tokens(config.model, config.input.image_size)
  if indices.shape[1] != t or int(indices.max(initial=0)) >= config.model.codebook_size:
    raise LoadError(f"indices {indices.shape} (max {int(indices.max(initial=0))}) do not fit "
                    f"{t} tokens of {config.model.codebook_size} codes")
  model = build_model(config)
  fn = jax.jit(lambda p, i: model.apply({"params": p}, i, method="decode_indices"))
  out = [np.asarray(fn(params, jnp.asarray(indices[i:i + batch], jnp.int32)))
         for i in range(0, len(indices), batch)]
  return np.concatenate(out)



# ------------------------------------------------------------------------------ compress CLI
def restore_run(workdir: str, step=None) -> tuple:
  """(config, params on one device, step) of a QG-VAE training run directory."""
  from uae_jax.checkpoint import manager as ckpt_lib  # pylint: disable=g-import-not-at-top
  from uae_jax.evaluate import cli as eval_cli  # pylint: disable=g-import-not-at-top
  config, step = eval_cli.run_config_and_step(workdir, step)
  if config.get("task") != "qgvae":
    raise ConfigError(f"--workdir {workdir}: a {config.get('task')!r} run, not a qgvae run")
  abstract = jax.eval_shape(functools.partial(init_state, config), jax.random.key(0))
  dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=dev),
                        nn.unbox(abstract["params"]))
  # move=False: evaluating never moves a run's (possibly damaged) checkpoints aside.
  params = ckpt_lib.restore_subtrees(workdir, {"params": target}, step, move=False)["params"]
  return config, params, step


def compress_report(config, params, input_config, max_images: int = 0) -> tuple:
  """(metrics, indices, images) of a run on `input_config`'s eval split, on this host's devices."""
  import copy  # pylint: disable=g-import-not-at-top
  from uae_jax import sharding as sharding_lib  # pylint: disable=g-import-not-at-top
  cfg = copy.deepcopy(config)
  cfg.input = input_config
  cfg.eval_batches = 0
  if max_images:
    cfg.input.eval_max_examples = max_images
  mesh = sharding_lib.make_mesh(ml_mesh(), jax.devices()[:1])
  ctx = sharding_lib.Placement(mesh, None, None)
  ev = Evaluator(cfg, ctx, {"lpips": load_frozen(cfg)["lpips"]})
  metrics, idx, images = ev.run(params)
  metrics["num_images"] = int(len(idx))
  metrics["tokens"] = int(idx.shape[1])
  return metrics, idx, images, ev


def ml_mesh():
  """A one-device mesh config."""
  import ml_collections  # pylint: disable=g-import-not-at-top
  return ml_collections.ConfigDict(dict(data=1, fsdp=1))


def add_compress_args(p) -> None:
  """The arguments of `compress` (shared by `python -m uae_jax.evaluate compress`)."""
  p.add_argument("--workdir", required=True, help="a qgvae training run (QG-VAE or patch baseline)")
  p.add_argument("--out", default="", help="output directory (default WORKDIR/compress)")
  p.add_argument("--data", default="", help="'photos', 'array_record:DIR' or 'tfds:NAME' "
                 "(default: the run's own eval data)")
  p.add_argument("--split", default="")
  p.add_argument("--max-images", type=int, default=0, help="0 = the whole eval split")


def add_decompress_args(p) -> None:
  """The arguments of `decompress`."""
  p.add_argument("--file", required=True, help="an indices.npz written by compress")
  p.add_argument("--workdir", required=True, help="the run whose decoder reads the indices")
  p.add_argument("--out", required=True, help="output .npz of uint8 images")


def _as_load_error(fn, *args):
  """fn(*args), with missing files and unreadable data reported as one-line LoadErrors."""
  from uae_jax.errors import LoadError  # pylint: disable=g-import-not-at-top
  try:
    return fn(*args)
  except (FileNotFoundError, ValueError) as e:
    raise LoadError(f"{type(e).__name__}: {e}") from e


def run_compress(args) -> dict:
  """`compress`: indices.npz (uint16 + model reference), metrics.json and progressive.png."""
  return _as_load_error(_compress, args)


def run_decompress(args) -> dict:
  """`decompress`: an indices file decoded by the run's decoder into uint8 images (.npz)."""
  return _as_load_error(_decompress, args)


def _decompress(args) -> dict:
  """run_decompress without the error translation."""
  config, params, _ = restore_run(args.workdir)
  indices, meta = read_indices(args.file)
  recon = decode_file_indices(config, params, indices)
  np.savez_compressed(args.out, images=np.uint8(np.round(np.clip(recon, 0, 1) * 255)))
  out = {"images": int(len(recon)), "out": args.out, "source": meta["source"]}
  print(json.dumps(out))
  return out


def _compress(args) -> dict:
  """run_compress without the error translation."""
  import os  # pylint: disable=g-import-not-at-top
  from PIL import Image  # pylint: disable=g-import-not-at-top
  from uae_jax.evaluate import cli as eval_cli  # pylint: disable=g-import-not-at-top
  from uae_jax.metric_writers import image_grid  # pylint: disable=g-import-not-at-top
  config, params, step = restore_run(args.workdir)
  out = args.out or os.path.join(args.workdir, "compress")
  os.makedirs(out, exist_ok=True)
  inp = eval_cli.apply_data_arg(config.input, args.data, split=args.split)
  metrics, idx, images, ev = compress_report(config, params, inp, args.max_images)
  write_indices(os.path.join(out, "indices.npz"), idx, config, args.workdir, step)
  metrics["file_bytes"] = os.path.getsize(os.path.join(out, "indices.npz"))
  Image.fromarray(image_grid(ev.progressive(params, images, num=min(6, len(images))))).save(
      os.path.join(out, "progressive.png"))
  metrics["prefix_tokens"] = prefix_lengths(config)
  with open(os.path.join(out, "metrics.json"), "w") as f:
    json.dump(metrics, f, indent=1)
  print(json.dumps(metrics))
  return metrics


def compress_main(argv=None) -> int:
  """`python -m uae_jax.tasks.qgvae {compress, decompress}`; the evaluate CLI's `compress` is the
  same code. Bad input prints one line `error: ...` and returns 2."""
  import argparse  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  from uae_jax.errors import UserError  # pylint: disable=g-import-not-at-top
  from uae_jax.evaluate import cli as eval_cli  # pylint: disable=g-import-not-at-top
  p = argparse.ArgumentParser(prog="python -m uae_jax.tasks.qgvae")
  sub = p.add_subparsers(dest="cmd", required=True)
  add_compress_args(sub.add_parser("compress", help="encode an eval split to uint16 indices; "
                                   "metrics, figure"))
  add_decompress_args(sub.add_parser("decompress", help="decode an indices file back to images"))
  args = p.parse_args(argv)
  try:
    (run_decompress if args.cmd == "decompress" else run_compress)(args)
    return 0
  except UserError as e:
    print(f"error: {eval_cli.one_line(e)}", file=sys.stderr)
    return 2


TASK = tasks.Task(
    validate=validate, batch_spec=batch_spec, init_state=init_state,
    make_train_step=make_train_step, make_evaluator=Evaluator, initialize=initialize,
    load_frozen=load_frozen, phase_at=phase_at)


if __name__ == "__main__":
  import sys as _sys  # pylint: disable=g-import-not-at-top
  _sys.exit(compress_main(_sys.argv[1:]))
