"""Spectrum Matching autoencoders on the one trainer: SD-VAE, ESM-AE, DSM-AE (docs/spectrum_matching.md).

Variants (comma-separated, big_vision style): `sd` (default: KL 1e-6), `esm` (ESM 0.01, delta 1.0,
KL 0), `dsm` (DSM masking only, KL 0), `esm_dsm` (both); `size=f16d16|f8d4|f32d64|vq_f8d4|...`;
`tiny` shrinks it for a CPU (32 px bundled photos, a 16 x 16 x 4 latent), `steps=N`.
Examples: `--config=configs/kl_vae.py:esm`, `--config=configs/kl_vae.py:tiny,dsm,steps=200`.
"""
import ml_collections

from configs import common

VARIANTS = ("sd", "esm", "dsm", "esm_dsm")


def get_config(arg=None):
  """KL-VAE config (ImageNet 256 px, f16d16, the reference's recipe unless `tiny`)."""
  a = common.parse_arg(arg, tiny=False, steps=300, sd=False, esm=False, dsm=False, esm_dsm=False,
                       size="", gan=False)
  chosen = [v for v in VARIANTS if a[v]]
  if len(chosen) > 1:
    raise ValueError(f"choose one variant of {VARIANTS}, got {chosen}")
  variant = chosen[0] if chosen else "sd"
  c = ml_collections.ConfigDict()
  c.task = "kl_vae"
  c.variant = variant                # a label for logs; the switches below are what counts
  c.seed = 0
  c.model = ml_collections.ConfigDict(dict(size=a.size or "f16d16", channels=(),
                                           latent_channels=0))
  c.compute_dtype = "bfloat16"       # the reference trains in bf16 mixed precision

  c.input = common.default_input_config()
  c.input.source = "tfds"
  c.input.name = "imagenet2012"
  c.input.eval_split = "validation"
  c.input.global_batch_size = 128    # 16 per GPU x 8 in the reference
  c.input.num_workers = 16
  c.input.eval_max_examples = 10_000
  c.num_train_examples = common.IMAGENET_TRAIN_EXAMPLES
  c.train = ml_collections.ConfigDict(dict(total_steps=600_000, num_epochs=0.0))

  # AdamW (0.9, 0.999), wd 0.005, 5e-5 constant after 2000 warm-up steps, grad clip 1.0.
  c.optim = ml_collections.ConfigDict(dict(
      peak_lr=5e-5, end_lr=5e-5, warmup_steps=2000, warmup_epochs=0.0, b1=0.9, b2=0.999,
      eps=1e-8, weight_decay=0.005, grad_clip=1.0, ema_decay=0.9999))

  c.loss = ml_collections.ConfigDict(dict(
      l1=1.0, lpips=0.5, kl=1e-6, vq=1.0,
      esm=0.0, esm_delta=1.0, esm_loss_type="kl", esm_center="mean",
      # The original code skips the image blur when the latent grid is 32 high (f8 at 256 px);
      # 0 blurs at every size.
      esm_blur_skip_height=32,
      dsm=False, dsm_block=8, dsm_choices=(0, 8, 10, 12),
      log_spectra=True))
  # PatchGAN (64 ch, depth 3, hinge), from step 50001 with weight 0.5 and the adaptive lambda.
  c.gan = ml_collections.ConfigDict(dict(
      enabled=True, start_step=50_001, weight=0.5, max_weight=1e4, disc_lr=5e-5,
      base_channels=64, depth=3, conv_init_std=0.2))

  if variant in ("esm", "esm_dsm"):
    c.loss.update(kl=0.0, esm=0.01, esm_delta=1.0)
  if variant in ("dsm", "esm_dsm"):
    c.loss.update(kl=0.0, dsm=True)
  if variant == "dsm":
    c.train.total_steps = 1_000_000
  if c.model.size.startswith("vq"):
    c.loss.kl = 0.0

  common.trainer_keys(c, ckpt_every=10_000, log_every=100, image_every=10_000, eval_every=10_000,
                      mesh=dict(data=-1, fsdp=1))
  c.eval_batches = 0
  c.eval = ml_collections.ConfigDict(dict(uint8_mode="round", inception_path="", fid_stats="",
                                          fid_method="sqrtm"))

  if a.tiny:
    tiny(c, a.steps, a.size, a.gan)
  return c


def tiny(c, steps: int, size: str = "", gan: bool = False):
  """CPU-sized: 32 px bundled photos, the `tiny` f2 model (16 x 16 x 4 latent), float32."""
  c.model.size = size or "tiny"
  c.compute_dtype = "float32"
  c.input = common.default_input_config()
  c.input.image_size = 32
  c.input.global_batch_size = 8
  c.input.eval_global_batch_size = 8
  c.input.num_threads = 2
  c.num_train_examples = 0
  c.train.total_steps = steps
  c.optim.update(peak_lr=1e-3, end_lr=1e-4, warmup_steps=max(steps // 20, 1), ema_decay=0.9)
  # `gan` switches the PatchGAN on from the middle of the run (small discriminator).
  c.gan.update(enabled=bool(gan), start_step=steps // 2, base_channels=32)
  return common.tiny_intervals(c, steps, eval_batches=2)
