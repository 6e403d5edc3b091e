"""The offline generation demo on the scikit-learn digits (`make demo-generate`, uae_jax/demo_generate.py).

    configs/dit_digits.py:uae     the tiny UAE (paper recipe, stage 1: random frozen tiny DINOv2,
                                  trained decoder) on the 1797 digits upscaled to 32 px
    configs/dit_digits.py         the tiny DiT^DH on that UAE's 8 x 8 x 64 latents, 10 classes

Arguments: `uae` (the tokenizer config), `steps=N` (either part's training steps), `tok=UAE_RUN`,
`lat=DIR` (train on the latents stored in DIR instead of encoding each batch on the fly).
The DiT uses 2 x 2 patches of the 8 x 8 latent (16 tokens) to fit a few CPU minutes. Both parts
read whole digits (`input.train_crop="center"`, no flip): the official random crop of the
1.5x-upscaled image would cut them.

    python -m uae_jax.main --config=configs/dit_digits.py:uae,steps=150 --workdir=runs/demo_generate/uae
    python -m uae_jax.generate latents --config=configs/dit_digits.py:tok=runs/demo_generate/uae \
        --no-hflip --out=runs/demo_generate/latents
    python -m uae_jax.main --workdir=runs/demo_generate/dit \
        --config=configs/dit_digits.py:steps=3000,tok=runs/demo_generate/uae,lat=runs/demo_generate/latents
The digits are written once as ArrayRecord train (first 1437) / test (last 360) splits under
$UAE_JAX_CACHE/digits/v1 (the same files as `configs/qgvae.py:digits`).
"""
import os

from configs import common
from configs import dit
from configs import stage1

DIGITS_TRAIN = 1437
IMAGE_SIZE = 32


def digits_input(c) -> None:
  """Points `c.input` at the digits ArrayRecord splits (built on first use by the demo)."""
  c.input.source = "array_record"
  c.input.name = "sklearn_digits"
  c.input.data_dir = os.path.join(os.environ.get("UAE_JAX_CACHE") or os.path.join(
      os.path.expanduser("~"), ".cache", "uae_jax"), "digits", "v1")
  c.input.image_size = IMAGE_SIZE
  c.input.train_crop = "center"                  # whole digits: a random crop would cut them
  c.input.num_threads = 2
  c.num_train_examples = DIGITS_TRAIN


def uae_config(steps: int):
  """Tiny paper-recipe UAE on 32 px digits: 8 x 8 x 64 latent, decoder patch 4, L1 only."""
  c = stage1.get_config(f"tiny,steps={steps}")
  digits_input(c)
  c.model.decoder.patch_size = 4                 # 8 x 8 latent -> 32 px
  c.loss.lpips = 0.0                             # L1 is enough for 32 px digits (and cheaper)
  c.input.global_batch_size = 32
  c.input.eval_global_batch_size = 40
  c.optim.update(peak_lr=2e-3, end_lr=2e-4)
  c.ckpt.keep = 1
  c.image_every_steps = 0
  c.eval_every_steps = 0                         # the demo judges reconstructions itself
  c.eval_batches = 1
  return c


def get_config(arg=None):
  """The demo's tiny DiT (default) or its tokenizer (`uae`)."""
  a = common.parse_arg(arg, uae=False, steps=400, tok="", lat="")
  if a.uae:
    return uae_config(a.steps)
  c = dit.get_config(f"tiny,steps={a.steps}")
  c.tokenizer.config = "configs/dit_digits.py:uae"
  c.tokenizer.workdir = a.tok
  digits_input(c)
  c.train.hflip = False                          # digits are not mirror-symmetric
  if a.lat:  # stored latents (`python -m uae_jax.generate latents --no-hflip --out=LAT`)
    c.latent.update(source="stored", dir=a.lat)
  # 2 x 2 latent patches: 16 tokens of 256 values, 4 x cheaper than one token per position.
  c.model.patch_size = 2
  c.input.global_batch_size = 32
  c.input.eval_global_batch_size = 40
  c.model.class_dropout_prob = 0.1
  c.optim.update(peak_lr=2e-3, end_lr=2e-4, ema_decay=0.995)
  c.sample.update(num_points=25, cfg_scale=6.0)
  # The trainer's per-step overhead on a 2-core CPU: one checkpoint (the last step), metrics
  # fetched every 100 steps, no image grids (the demo samples and judges itself), one eval batch.
  c.ckpt.update(every_steps=a.steps, keep=1)
  c.log_every_steps = min(100, a.steps)
  c.image_every_steps = 0
  c.eval_every_steps = a.steps
  c.eval_batches = 1
  return c
