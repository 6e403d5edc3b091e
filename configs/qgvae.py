"""QG-VAE (quantised global autoencoder), its patch VQ-VAE baseline, and QGGAN (docs/qgvae.md).

Variants (comma-separated, e.g. `--config=configs/qgvae.py:qggan,tiny`):
  (default)  the demo: 32 px, f 0, 64 tokens, 8 heads, D 64, K 512 = 72 bytes per image, batch 32,
             reset every 100 steps, MSE + 0.25 codebook + 1.0 commitment, tail dropout.
  qggan      the QGGAN default: 128 px, f 3, 256 tokens, 128 heads, D 64, K 512 = 288 bytes, 2 res
             blocks, batch 16, reset every 1000 steps, GAN from step 5000 (LPIPS + L1 + lambda L_G).
  patch      the patch VQ-VAE baseline at the same bytes: (S / 2^f)^2 local tokens from the same
             U-Net family with ONE shared codebook (f 2 at 32 px, f 3 at 128 px), no token order.
  pyramid    the Laplacian-pyramid ordering experiment instead of tail dropout.
  nogan      QGGAN size without the GAN (QG-VAE at 128 px).
  gan        the QGGAN losses (discriminator, LPIPS + L1, adaptive weight) at any size, e.g. the
             32 px demo: `:gan,total=100`. GAN start: `gan_start=N`, default total // 2 under
             `total` (a short run must reach the GAN phase), else 5000.
  digits     the scikit-learn digits (8 x 8, upscaled to the image size) instead of the photos.
  tiny       shrunk for this CPU: 16 px, 16 tokens, 4 heads, D 16, K 32, small U-Nets.
  steps=N    tiny run length (default 60).
  total=N    any variant for N steps, evaluated at the end (the small comparison in docs/qgvae.md).
CIFAR-10 / ImageNet are not bundled: point `input` at a prepared ArrayRecord or TFDS dataset
(docs/data.md); the defaults use the bundled photos (random 32 px crops of 48 px resizes).
"""
import os

import ml_collections

from configs import common
from uae_jax.data.config import default_input_config


def model_config(qggan: bool, patch: bool) -> ml_collections.ConfigDict:
  """The autoencoder section: demo or QGGAN size, global or patch tokens."""
  m = ml_collections.ConfigDict()
  m.kind = "patch" if patch else "global"
  m.tokens = 256 if qggan else 64           # C (global only; patch: (S / 2^f)^2)
  m.heads = 128 if qggan else 8             # per-head linear maps (global only)
  m.code_dim = 64                           # D
  m.codebook_size = 512                     # K
  # Feature-map downscale f. Patch baseline: f such that (S / 2^f)^2 = C, i.e. equal bytes.
  m.f = 3 if qggan else (2 if patch else 0)
  m.res_blocks = 2 if qggan else 1
  m.ch_min = 16
  m.ch_max = 128
  return m


def _gan_start(a) -> int:
  """The GAN start step: `gan_start` if given, half of a `total` run, else the original's 5000."""
  if a.gan_start >= 0:
    return a.gan_start
  return a.total // 2 if a.total else 5000


def get_config(arg=None):
  """QG-VAE config (demo size unless `qggan`; global tokens unless `patch`)."""
  a = common.parse_arg(arg, tiny=False, steps=60, qggan=False, patch=False, pyramid=False,
                       nogan=False, digits=False, total=0, gan=False,
                       gan_start=-1)
  c = ml_collections.ConfigDict()
  c.task = "qgvae"
  c.seed = 0
  c.compute_dtype = "float32"
  c.model = model_config(a.qggan, a.patch)

  c.vq = ml_collections.ConfigDict(dict(
      codebook_weight=0.25, commit_weight=1.0,     # the original's (reversed) weights
      reset_every=1000 if a.qggan else 100,        # R: steps between codebook resets (0 = never)
      reset_eps=1e-6, reset_jitter=1e-4))
  # Token ordering: 'tail_dropout' (the original's, default here), 'pyramid' (experiment), 'none'.
  c.order = ml_collections.ConfigDict(dict(
      mode="none" if a.patch else ("pyramid" if a.pyramid else "tail_dropout"),
      dropout_prob=1.0 / 3.0, pyramid_levels=3, pyramid_weight=1.0))
  c.gan = ml_collections.ConfigDict(dict(
      enabled=(a.qggan or a.gan) and not a.nogan, start_step=_gan_start(a), weight_scale=0.75,
      disc_channels=16, disc_res_blocks=2, disc_lr=2e-4))
  c.optim = ml_collections.ConfigDict(dict(lr=2e-4, b1=0.9, b2=0.999, eps=1e-8,
                                           weight_decay=0.01, warmup_epochs=0.0))

  c.input = default_input_config()
  c.input.image_size = 128 if a.qggan else 32
  c.input.global_batch_size = 16 if a.qggan else 32
  c.input.eval_global_batch_size = 16
  c.input.num_threads = 2
  c.num_train_examples = 80                  # the bundled photos' train split
  c.train = ml_collections.ConfigDict(dict(total_steps=-1, num_epochs=100.0))
  if a.digits:
    c.input.source = "array_record"
    c.input.name = "sklearn_digits"          # built on first use (uae_jax/tasks/qgvae.py)
    c.input.data_dir = os.path.join(os.environ.get("UAE_JAX_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "uae_jax"), "digits", "v1")
    c.num_train_examples = 1437

  # Codebooks, offsets and the reset statistic shard over their token axis, the per-head linear
  # maps over heads; the small convolutions stay replicated.
  rules = (("tokens", "fsdp"), ("heads", "fsdp"), ("codes", None), ("code_dim", None),
           ("pixels", None), ("conv_in", None), ("conv_out", None))
  common.trainer_keys(c, ckpt_every=1000, log_every=50, image_every=1000, eval_every=1000,
                      rules=rules)
  c.eval_batches = 0
  c.eval = ml_collections.ConfigDict(dict(uint8_mode="round"))

  if a.tiny:
    tiny(c, a.steps)
  if a.total:
    short_run(c, a.total)
  return c


def short_run(c: ml_collections.ConfigDict, total: int) -> ml_collections.ConfigDict:
  """A short comparison run of `total` steps: evaluate, save and write images only at its end."""
  c.train.total_steps = total
  c.ckpt.every_steps = c.image_every_steps = c.eval_every_steps = total
  c.log_every_steps = max(total // 12, 1)
  return c


def tiny(c: ml_collections.ConfigDict, steps: int) -> ml_collections.ConfigDict:
  """Shrinks the config for this 2-core CPU (same structure, 16 px, small codebooks)."""
  m = c.model
  global_ = m.kind == "global"
  m.update(tokens=16, heads=4, code_dim=16, codebook_size=32, ch_min=8, ch_max=16, res_blocks=1)
  # 16 px: global f 1 (8 x 8 maps) or patch f 2 (4 x 4 = 16 local tokens = the same 16 x 5 bits).
  m.f = 1 if global_ else 2
  c.input.image_size = 16
  c.input.global_batch_size = 8
  c.input.eval_global_batch_size = 8
  c.vq.reset_every = 10
  c.gan.start_step = steps // 2
  c.gan.disc_channels = 8
  c.gan.disc_res_blocks = 1
  c.optim.lr = 1e-3
  c.train.total_steps = steps
  return common.tiny_intervals(c, steps)
