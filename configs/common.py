"""Shared pieces of the configs: argument parsing, the trainer-level keys every task's config
has, the tokenizer base and its CPU-sized `tiny`.

A config file's `get_config(arg)` takes a big_vision-style argument string, e.g.
`--config=configs/stage3.py:tiny` or `--config=configs/stage1.py:tiny,steps=40`.
"""
from typing import Optional

import ml_collections

from uae_jax.data.config import default_input_config
from uae_jax.models import encoders

IMAGENET_TRAIN_EXAMPLES = 1_281_167


def parse_arg(arg, **defaults):
  """Parses 'tiny,steps=40' into a ConfigDict over `defaults` (flags without '=' become True)."""
  out = ml_collections.ConfigDict(defaults)
  for part in filter(None, (arg or "").split(",")):
    key, _, value = part.partition("=")
    if key not in out:
      raise KeyError(f"config argument {key!r} is unknown; known: {sorted(out.keys())}")
    if not value:
      out[key] = True
    else:
      out[key] = type(defaults[key])(value) if not isinstance(defaults[key], bool) else value in ("1", "true", "True")
  return out


# Logical axis -> mesh axis for the ViT-based tasks: FSDP shards the model width.
VIT_SHARDING_RULES = (("embed", "fsdp"), ("mlp", None), ("heads", None))


def trainer_keys(c: ml_collections.ConfigDict, ckpt_every: int, log_every: int, image_every: int,
                 eval_every: int, mesh: Optional[dict] = None,
                 rules: tuple = VIT_SHARDING_RULES) -> ml_collections.ConfigDict:
  """Sets the keys the trainer reads from every task's config: checkpoint (keep 3, async), log,
  image and eval intervals, the mesh (default: data 1, FSDP over all devices) and the rules."""
  c.ckpt = ml_collections.ConfigDict(dict(every_steps=ckpt_every, keep=3, async_save=True))
  c.log_every_steps = log_every
  c.image_every_steps = image_every
  c.eval_every_steps = eval_every
  c.mesh = ml_collections.ConfigDict(mesh or dict(data=1, fsdp=-1))
  c.sharding_rules = rules
  return c


def tiny_intervals(c: ml_collections.ConfigDict, steps: int,
                   eval_batches: int = 1) -> ml_collections.ConfigDict:
  """A tiny run's intervals: a checkpoint at half and at the end, ten log lines, images and an
  evaluation of `eval_batches` batches at the end."""
  c.ckpt.every_steps = max(steps // 2, 1)
  c.log_every_steps = max(steps // 10, 1)
  c.image_every_steps = steps
  c.eval_every_steps = steps
  c.eval_batches = eval_batches
  return c


def uae_base(recipe: str = "paper", encoder: str = "dinov2") -> ml_collections.ConfigDict:
  """Full-size defaults shared by every tokenizer stage (DINOv2-B with registers, ViT-XL decoder).

  `encoder` picks the semantic encoder (dinov2 | clip | siglip2 | mae) at its full size; its latent
  grid (hence the image size), width, pixel statistics and official-recipe DCT counts follow from
  `models/encoders.py`.

  The stage switches (`train.encoder_trainable`, `loss.semantic`, `model.noise_tau`,
  `gan.enabled`) are left off here; each `configs/stage*.py` writes the ones it turns on.
  """
  c = ml_collections.ConfigDict()
  c.task = "uae"
  c.stage = 0                        # a label for logs and checkpoints; no code branches on it
  c.recipe = recipe                  # 'paper' | 'official' (docs/method.md)
  c.seed = 0

  c.model = ml_collections.ConfigDict()
  if encoder not in encoders.DEFAULTS:
    raise KeyError(f"encoder={encoder!r}: expected one of {sorted(encoders.DEFAULTS)}")
  c.model.encoder = ml_collections.ConfigDict(dict(encoders.DEFAULTS[encoder],
                                                   remat_policy="none", scan_blocks=False,
                                                   attention=ml_collections.FieldReference(None, str)))
  # remat_policy: 'none' | 'full' | 'dots' | 'dots_no_batch'. scan_blocks: one nn.scan over
  # stacked block params (faster compiles; layout conversion in uae_jax/models/scan_utils.py).
  # attention: None (einsum on CPU, jax.nn.dot_product_attention elsewhere) | 'xla' | 'cudnn' |
  # 'einsum' (docs/speed.md).
  c.model.decoder = ml_collections.ConfigDict(dict(size="XL", patch_size=16, remat_policy="none",
                                                   scan_blocks=False, weight_init="jax",
                                                   attention=ml_collections.FieldReference(None, str)))
  # weight_init: 'jax' (Flax defaults) | 'torch_default' (nn.Linear's uniform +-1/sqrt(fan_in),
  # what the official decoder uses: the official recipe's configs set it).
  c.model.num_bands = 4
  c.model.band_edges = ()           # () = e_k = k*sqrt(2)/K
  c.model.band_tau = 0.02
  c.model.band_method = "matmul"    # 'matmul' (MXU fast path) | 'fft' (reference)
  c.model.band_split = "lowpass"    # 'lowpass' (disjoint annuli) | 'residual_bandpass'
  c.model.use_modulator = recipe == "paper"
  c.model.k_base = 1                # bands below k_base are semantic: aligned, never noised
  c.model.noise_tau = 0.0           # train-mode latent noise scale (sigma = noise_tau * U(0,1))
  c.model.p_band = 1.0              # probability that each high band is noised
  # Official recipe only: DCT zig-zag low-pass of the latent.
  c.model.dct_enabled = False
  official = encoders.OFFICIAL_RECIPE[encoder]
  c.model.dct_count = official["dct_count"]
  c.model.dct_count_min = official["dct_count_min"]
  c.model.dct_count_max = official["dct_count_max"]
  c.model.dct_apply_prob = 0.5
  c.compute_dtype = "float32"        # 'bfloat16' for bf16 compute with float32 master weights

  c.input = default_input_config()
  # The reconstruction has the input's size: decoder patch x encoder grid (256 px for the 16 x 16
  # grids of DINOv2 / CLIP / SigLIP2, 224 px for MAE-B/16's 14 x 14).
  c.input.image_size = c.model.decoder.patch_size * encoders.latent_grid(c.model.encoder)
  c.input.source = "tfds"
  c.input.name = "imagenet2012"
  c.input.eval_split = "validation"
  c.input.num_workers = 16
  # Buffers are per worker: 16 x (1 + 2) batches of 512 x 256^2 float32 stays near 10 GB per host.
  c.input.num_threads = 1
  c.input.prefetch_buffer_size = 2
  c.input.eval_max_examples = 10_000
  c.num_train_examples = IMAGENET_TRAIN_EXAMPLES

  c.train = ml_collections.ConfigDict()
  c.train.num_epochs = 16.0
  c.train.total_steps = -1           # -1: num_epochs * num_train_examples // global batch
  c.train.encoder_trainable = False

  c.optim = ml_collections.ConfigDict(dict(
      peak_lr=2e-4, end_lr=2e-5, warmup_epochs=1.0, b1=0.9, b2=0.95, eps=1e-8,
      weight_decay=0.0, grad_clip=0.0, ema_decay=0.9978))

  c.loss = ml_collections.ConfigDict(dict(
      l1=1.0, lpips=1.0, semantic=0.0,
      # Official recipe only: clean-reconstruction pass and zig-zag semantic loss.
      clean_l1=0.0, clean_lpips=0.0, semantic_first_k=official["semantic_first_k"],
      # Spectrum Matching (docs/spectrum_matching.md), off by default: ESM weight on the fused
      # latent (target flattened by (j + 1)^esm_delta), and DSM's shared block-DCT masking of the
      # decoder's latent and the image (paper recipe, latent grid divisible by 8).
      esm=0.0, esm_delta=1.0, esm_loss_type="kl", esm_center="mean", esm_blur_skip_height=32,
      dsm=False, dsm_choices=(0, 8, 10, 12)))

  c.gan = ml_collections.ConfigDict(dict(
      enabled=False, backbone="S8", weight=0.75, max_weight=1e4, d_start_frac=6 / 16,
      g_start_frac=8 / 16, translation=0.125, cutout=0.0, disc_lr=2e-4, disc_end_lr=2e-5,
      disc_backbone_path=""))

  c.init = ml_collections.ConfigDict(dict(
      encoder="",           # pretrained encoder weights (python -m uae_jax.convert dinov2|clip|siglip2)
      official_uae="",      # official PyTorch UAE checkpoint to import (official recipe)
      from_stage="",        # previous stage's workdir (or checkpoint dir): start from its EMA
      allow_unfinished=False,  # accept a from_stage run that stopped before its last step
      allow_random_encoder=False))

  trainer_keys(c, ckpt_every=1000, log_every=100, image_every=2500, eval_every=2500)
  c.eval_batches = 0                 # 0 = the whole eval split (capped by eval_max_examples)
  # uint8 quantisation of reconstructions ('round', or 'truncate' as the official code); rFID runs
  # when both the converted FID Inception weights and the reference statistics are given.
  # fid_preprocessing: 'pytorch-fid' or 'tf1' (TF1 bilinear, (x-128)/128: ADM's and the official
  # UAE evaluator's protocol; docs/generation_eval.md).
  c.eval = ml_collections.ConfigDict(dict(uint8_mode="round", inception_path="", fid_stats="",
                                          fid_method="sqrtm", fid_preprocessing="pytorch-fid"))
  return c


def tiny(c: ml_collections.ConfigDict, steps: int) -> ml_collections.ConfigDict:
  """Shrinks a tokenizer config so it runs on this 2-core CPU: tiny encoder/decoder, 64 px, photos."""
  # 64 px images, encoder input 112 px -> an 8 x 8 latent grid, decoder patch 8 -> 64 px again.
  c.model.encoder.update(encoders.TINY[c.model.encoder.kind])
  c.model.decoder.update(size="tiny", patch_size=8)
  c.model.dct_count, c.model.dct_count_min, c.model.dct_count_max = 9, 8, 64
  c.model.band_method = "matmul"
  c.input = default_input_config()
  c.input.image_size = 64
  c.input.global_batch_size = 8
  c.input.eval_global_batch_size = 8
  c.input.num_threads = 2
  c.num_train_examples = 0           # unused: total_steps is set
  c.train.total_steps = steps
  c.optim.peak_lr = 1e-3
  c.optim.end_lr = 1e-4
  c.optim.warmup_epochs = 0.0
  c.optim.ema_decay = 0.9
  c.gan.backbone = "tiny"
  c.init.allow_random_encoder = True
  return tiny_intervals(c, steps)
