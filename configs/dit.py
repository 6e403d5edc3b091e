"""Class-conditional latent generation: DiT^DH-XL (or LightningDiT) on the latents of a trained UAE.

    python -m uae_jax.main --config=configs/dit.py --workdir=RUN \
        --config.tokenizer.config=configs/stage3.py --config.tokenizer.workdir=UAE_RUN
    python -m uae_jax.generate sample --config=configs/dit.py --workdir=RUN --num=50000 \
        --out=samples.npz

Arguments: `size=XL|L|B|S`, `kind=ddt|lightning`, `tiny` (this CPU: the tiny UAE of
`configs/stage1.py:tiny`, 8 x 8 x 64 latents, the bundled photos), `steps=N` (tiny only),
`tok=UAE_RUN` (same as `--config.tokenizer.workdir=UAE_RUN`), `band0` (paper recipe: model band 0
only), `progressive` (official recipe: the 64 -> 256 kept-coefficient schedule; `:tiny` scales it
to the 8 x 8 grid, 9 -> 64 over its one epoch), `repa=W` (REPA alignment of body block
`repa.depth` to the tokenizer's frozen encoder features with weight W; off at 0), `dog` (with
`repa=W`: DoG-filter the REPA target with the experimental default sigmas DOG_SIGMAS).
Hyper-parameters are the reference stage-2 recipe: AdamW (0.9, 0.95), constant 2e-4 for 40
epochs then linear to 2e-5 at epoch 800, grad clip 1.0, EMA 0.9995, batch 1024, logit-normal
training times with the 16 x 16 x 768 time shift, label dropout 0.1, Euler-50 sampling.
"""
import ml_collections
from ml_collections import config_dict

from configs import common
from uae_jax.data.config import default_input_config
from uae_jax.generate import views

# The experimental DoG-REPA band-pass (sigma_low, sigma_high) in DiT tokens; the paper states no
# filter, docs/spectrum_matching.md#dog-repa-experimental says why these values.
DOG_SIGMAS = (0.5, 2.0)


def repa_defaults() -> ml_collections.ConfigDict:
  """The `config.repa` section: DoG-REPA off (weight 0)."""
  # REPA (experimental DoG variant): 1 - cosine between a 3-layer SiLU MLP projection of the
  # hidden state after body block `depth` (REPA: 8 of SiT-XL's 28) and the frozen tokenizer's
  # encoder features of the clean image ('encoder': the DINOv2 tokens; 'band0': their band 0),
  # pooled to the DiT's token grid; `dog_sigmas` (low, high) in DiT tokens DoG-filters the
  # target, None = plain REPA. weight 0 = off (the step is then exactly the plain one).
  return ml_collections.ConfigDict(dict(
      weight=0.0, depth=8, proj_dim=2048, target="encoder",
      dog_sigmas=config_dict.placeholder(tuple)))


def base(size: str = "XL", kind: str = "ddt") -> ml_collections.ConfigDict:
  """Full-size DiT config on ImageNet 256 px latents of a DINOv2-B UAE (16 x 16 x 768)."""
  c = ml_collections.ConfigDict()
  c.task = "dit"
  c.stage = "dit"
  c.recipe = ""
  c.seed = 0

  # The frozen tokenizer: its run's config file spec and workdir (newest checkpoint's EMA), and
  # the latent statistics file ('' = <tokenizer.workdir>/latent_stats_<source>_<split>.npz,
  # computed on first use).
  c.tokenizer = ml_collections.ConfigDict(dict(config="configs/stage3.py", workdir="", stats="",
                                               allow_random=False))

  # Start-of-run DiT weights: an official stage-2 DiT^DH checkpoint (.pt training dict with
  # 'model'/'ema', or a state dict .pt/.safetensors) or a `python -m uae_jax.convert dit` output
  # directory; `dit_which` picks the entry of a training dict.
  c.init = ml_collections.ConfigDict(dict(dit="", dit_which="ema"))

  # Which latent the DiT models (uae_jax/generate/views.py, docs/generation.md):
  #   band0_only         paper recipe: only band 0 (semantic) of the radial split;
  #   progressive.*      official stage-2 schedule: keep the first `count` zig-zag DCT
  #                      coefficients, count = perfect squares from start_count (-1: the
  #                      tokenizer's dct_count, 64 at 16 x 16) to max_count (-1: H * W = 256),
  #                      held for hold_epochs + interval_epochs, then one step every interval.
  c.latent = views.default_config()
  #   source             'tokenizer': encode each batch on the fly with the frozen UAE (random
  #                      flip); 'stored': read the latents `python -m uae_jax.generate latents
  #                      --out=DIR` wrote (dir=DIR: its shards, stats and manifest).
  c.latent.source = "tokenizer"
  c.latent.dir = ""

  c.model = ml_collections.ConfigDict(dict(
      kind=kind,                # 'ddt' (DiT^DH: body + wide head) | 'lightning' (plain DiT)
      size=size, head_size="DH", in_channels=768, input_size=16, patch_size=1,
      num_classes=1000, class_dropout_prob=0.1, mlp_ratio=4.0, qk_norm=False, num_freqs=256,
      rope_theta=10000.0, scan_blocks=False, remat_policy="none"))
  c.compute_dtype = "float32"   # 'bfloat16': bf16 compute, float32 master weights

  c.transport = ml_collections.ConfigDict(dict(
      time_dist="logit_normal",  # 'logit_normal' (current reference configs) | 'uniform'
      time_shift=True, shift_base=4096,
      shift_dim=-1,              # -1: H * W * C of the latent (196,608 -> alpha = 6.928)
      prediction="velocity"))    # 'velocity' | 'x' (clean-latent prediction, velocity loss)

  c.repa = repa_defaults()

  c.sample = ml_collections.ConfigDict(dict(
      method="euler",            # 'euler' | 'heun' | 'rk4' | 'euler_maruyama'
      num_points=50,             # grid points (49 steps)
      guidance="cfg",            # 'none' | 'cfg' | 'autoguidance'
      cfg_scale=1.0, cfg_t_min=0.0, cfg_t_max=1.0,
      diffusion_form="sigma", diffusion_norm=1.0,   # euler_maruyama only
      num_samples=50_000, batch_size=256, label_sampling="equal", seed=42, params="ema",
      guide_config="", guide_workdir=""))          # autoguidance: the guide model's run

  c.input = default_input_config()
  c.input.source = "tfds"
  c.input.name = "imagenet2012"
  c.input.eval_split = "validation"
  c.input.global_batch_size = 1024
  c.input.num_workers = 16
  c.input.num_threads = 1
  c.input.prefetch_buffer_size = 2
  c.input.eval_max_examples = 10_000
  c.num_train_examples = common.IMAGENET_TRAIN_EXAMPLES

  c.train = ml_collections.ConfigDict(dict(num_epochs=800.0, total_steps=-1, hflip=True))
  c.optim = ml_collections.ConfigDict(dict(
      peak_lr=2e-4, end_lr=2e-5, constant_epochs=40.0, decay_end_epochs=800.0, warmup_epochs=0.0,
      b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.0, grad_clip=1.0, ema_decay=0.9995))

  common.trainer_keys(c, ckpt_every=5000, log_every=100, image_every=10_000, eval_every=10_000)
  c.eval_batches = 10
  c.eval = ml_collections.ConfigDict(dict(seed=0, grid_classes=10, grid_per_class=4,
                                          grid_num_points=50))
  return c


def tiny(c: ml_collections.ConfigDict, steps: int) -> ml_collections.ConfigDict:
  """Shrinks to this 2-core CPU: the tiny UAE's 8 x 8 x 64 latents, 10 photo classes, 64 px."""
  c.tokenizer.config = "configs/stage1.py:tiny"
  c.model.update(size="tiny", head_size="tiny", in_channels=64, input_size=8, num_classes=10)
  c.input = default_input_config()
  c.input.image_size = 64
  c.input.global_batch_size = 16
  c.input.eval_global_batch_size = 16
  c.input.num_threads = 2
  c.num_train_examples = 0
  c.train.total_steps = steps
  c.train.num_epochs = 1.0
  c.optim.update(peak_lr=1e-3, end_lr=1e-4, constant_epochs=0.5, decay_end_epochs=1.0,
                 ema_decay=0.99)
  c.sample.update(num_points=25, num_samples=100, batch_size=20)
  c.repa.update(depth=1, proj_dim=64)
  # The schedule in the one epoch of a tiny run: 9 -> 16 -> ... -> 64 coefficients of the 8 x 8
  # grid, one step every tenth of the run after the first.
  c.latent.progressive.update(hold_epochs=0.0, interval_epochs=0.1)
  common.tiny_intervals(c, steps)
  c.eval.update(grid_per_class=4, grid_num_points=25)
  return c


def get_config(arg=None):
  """DiT config (full size unless `tiny`)."""
  a = common.parse_arg(arg, tiny=False, steps=300, size="XL", kind="ddt", tok="",
                       band0=False, progressive=False, repa=0.0, dog=False)
  c = base(a.size, a.kind)
  if a.tiny:
    tiny(c, a.steps)
  c.latent.band0_only = a.band0
  c.latent.progressive.enabled = a.progressive
  c.tokenizer.workdir = a.tok
  c.repa.weight = a.repa
  if a.dog:
    c.repa.dog_sigmas = DOG_SIGMAS
  stored_latents(c)
  return c


def stored_latents(c: ml_collections.ConfigDict) -> None:
  """Ties the train pipeline's `input.latent_dir` to `latent.dir` (set it after replacing input)."""
  c.input.latent_dir = c.latent.get_ref("dir")
