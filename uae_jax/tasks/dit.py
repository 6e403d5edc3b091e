"""Class-conditional latent generation: a DiT (DiT^DH or LightningDiT) trained by flow matching
on the latents of a frozen, trained UAE. Pure functions; I/O only in `load_frozen`.

The train state is a plain dict pytree:
  step    int32 scalar
  rng     uint32[2] key data
  params  DiT params (the Fourier frequencies `t_embedder/freqs` are a fixed buffer: zero
          update, copied into the EMA)
  ema     EMA of params (decay `optim.ema_decay`, every step from init)
  opt     AdamW state
The step's frozen inputs are {'tokenizer': UAE EMA params, 'stats': latent mean/std}: the step
encodes each image batch on the fly with the UAE in eval mode (after a random horizontal flip),
normalises the latent per element and takes one flow-matching step on it; with
`latent.source='stored'` the batch holds latents precomputed by `python -m uae_jax.generate
latents` (image or mirror picked by the pipeline) and the tokenizer only decodes grids and
encodes the held-out evaluation images (docs/generation.md). Which latent (the tokenizer's own, band 0
only, or the progressive DCT schedule) is `config.latent` (uae_jax/generate/views.py); the
start-of-run weights may come from an official DiT^DH checkpoint (`init.dit`).

DoG-REPA (experimental, `config.repa`, off at weight 0): the hidden state of body block
`repa.depth` goes through a 3-layer SiLU MLP projector (params under `params['repa_projector']`,
trained and EMA'd with the DiT, dropped when sampling) and is aligned by 1 - cosine to the frozen
tokenizer's encoder features of the same (flipped, clean) images, optionally difference-of-
Gaussians filtered (docs/spectrum_matching.md#dog-repa-experimental).
"""
import os

import einops
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging

from uae_jax import tasks
from uae_jax.errors import ConfigError
from uae_jax.generate import latents
from uae_jax.generate import samplers
from uae_jax.generate import sampling
from uae_jax.generate import transport
from uae_jax.generate import views
from uae_jax.losses import spectrum
from uae_jax.metric_writers import image_grid
from uae_jax.models import dit as dit_lib
from uae_jax.tasks import common
from uae_jax.tasks.common import compute_dtype, total_steps


# ------------------------------------------------------------------------------ models
def build_model(config) -> nn.Module:
  """The DiT of `config.model`."""
  return dit_lib.build(config.model, compute_dtype(config))


REPA_KEY = "repa_projector"   # the projector's entry in the DiT params
REPA_TARGETS = ("encoder", "band0")


def repa_on(config) -> bool:
  """True when the DoG-REPA term is switched on (`repa.weight` > 0)."""
  return "repa" in config and config.repa.weight > 0


def build_projector(config) -> nn.Module:
  """REPA's projector from the DiT hidden state to the target feature width."""
  out_dim = latents.latent_shape(latents.tokenizer_config(config))[2]
  return dit_lib.RepaProjector(config.repa.proj_dim, out_dim, dtype=compute_dtype(config))


def dit_params(params) -> dict:
  """The DiT's own params: the REPA projector (training only) dropped."""
  return {k: v for k, v in params.items() if k != REPA_KEY} if REPA_KEY in params else params


def build_tokenizer(config):
  """(UAE config, UAE module) of the frozen tokenizer (eval mode, float32)."""
  uae_cfg = latents.tokenizer_config(config)
  return uae_cfg, latents.build_tokenizer(uae_cfg)


def lr_schedule(config) -> optax.Schedule:
  """Constant peak for `constant_epochs`, linear to `end_lr` at `decay_end_epochs`, then flat."""
  o = config.optim
  per_epoch = total_steps(config) / max(config.train.num_epochs, 1e-9)
  start = int(round(o.constant_epochs * per_epoch))
  length = max(int(round((o.decay_end_epochs - o.constant_epochs) * per_epoch)), 1)
  return optax.join_schedules([optax.constant_schedule(o.peak_lr),
                               optax.linear_schedule(o.peak_lr, o.end_lr, length)], [start])


def is_buffer(path) -> bool:
  """True for the fixed Fourier frequencies (`.../t_embedder/freqs`)."""
  return any(getattr(k, "key", None) == dit_lib.FREQS for k in path)


def make_optimizer(config):
  """(AdamW after global-norm clipping, lr schedule); weight decay never touches the buffers.

  The buffers get no gradient (stop_gradient in the model), so Adam's update for them is
  exactly zero; the decay mask keeps them fixed for any `optim.weight_decay` too.
  """
  o, sched = config.optim, lr_schedule(config)
  decay_mask = lambda params: jax.tree_util.tree_map_with_path(
      lambda p, _: not is_buffer(p), params)
  chain = [optax.clip_by_global_norm(o.grad_clip)] if o.grad_clip > 0 else []
  chain.append(optax.adamw(sched, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay,
                           mask=decay_mask))
  return optax.chain(*chain), sched


# ------------------------------------------------------------------------------ config and state
def _check_choice(key: str, value, choices) -> None:
  """ConfigError naming `key` unless value is one of `choices`."""
  if value not in choices:
    raise ConfigError(f"{key}={value!r}: expected one of {sorted(choices)}")


def validate(config) -> None:
  """Checks the DiT config before any compute; raises ConfigError naming the key."""
  m = config.model
  compute_dtype(config)
  _check_choice("model.kind", m.kind, dit_lib.KINDS)
  _check_choice("model.size", m.size, dit_lib.SIZES)
  if m.kind == "ddt":
    _check_choice("model.head_size", m.head_size, dit_lib.HEAD_SIZES)
  _check_choice("transport.time_dist", config.transport.time_dist, transport.TIME_DISTS)
  _check_choice("transport.prediction", config.transport.prediction, transport.PREDICTIONS)
  _check_choice("sample.method", config.sample.method, samplers.METHODS)
  sampling.sampler_spec(config)
  if m.input_size % m.patch_size:
    raise ConfigError(f"model.input_size={m.input_size} is not a multiple of model.patch_size")
  uae_cfg = latents.tokenizer_config(config)
  views.validate(config, uae_cfg)
  if config.init.dit and not latents.epath.Path(config.init.dit).exists():
    raise ConfigError(f"init.dit={config.init.dit!r} does not exist")
  shape = latents.latent_shape(uae_cfg)
  if (m.input_size, m.input_size, m.in_channels) != shape:
    raise ConfigError(f"model.input_size={m.input_size}, model.in_channels={m.in_channels} do not "
                      f"fit the tokenizer's {shape[0]}x{shape[1]}x{shape[2]} latent "
                      f"({config.tokenizer.config})")
  if config.input.image_size != uae_cfg.input.image_size:
    raise ConfigError(f"input.image_size={config.input.image_size} but the tokenizer "
                      f"({config.tokenizer.config}) was trained at {uae_cfg.input.image_size}")
  if not config.tokenizer.workdir and not config.tokenizer.allow_random:
    raise ConfigError("tokenizer.workdir is empty: point it at a trained UAE run (or set "
                      "tokenizer.allow_random=True for a toy run)")
  if config.tokenizer.workdir and not latents.epath.Path(config.tokenizer.workdir).exists():
    raise ConfigError(f"tokenizer.workdir={config.tokenizer.workdir!r} does not exist")
  if config.optim.decay_end_epochs < config.optim.constant_epochs:
    raise ConfigError("optim.decay_end_epochs must be >= optim.constant_epochs")
  validate_repa(config, uae_cfg)
  validate_stored(config, uae_cfg, shape)


LATENT_SOURCES = ("tokenizer", "stored")


def latent_source(config) -> str:
  """'tokenizer' (on the fly) or 'stored' (`latent.dir`); 'tokenizer' for runs without the key."""
  return config.latent.get("source", "tokenizer")


def validate_stored(config, uae_cfg, shape) -> None:
  """Checks `latent.source`/`latent.dir` against each other, REPA, the schedule and the shards."""
  src, lat_dir = latent_source(config), config.latent.get("dir", "")
  _check_choice("latent.source", src, LATENT_SOURCES)
  if config.input.get("latent_dir", "") != lat_dir:
    raise ConfigError(f"input.latent_dir={config.input.get('latent_dir', '')!r} must equal "
                      f"latent.dir={lat_dir!r} (configs/dit.py ties them)")
  if src == "tokenizer":
    if lat_dir:
      raise ConfigError(f"latent.dir={lat_dir!r} is set but latent.source='tokenizer'")
    return
  if not lat_dir:
    raise ConfigError("latent.source='stored' needs latent.dir (python -m uae_jax.generate "
                      "latents --out=DIR)")
  if repa_on(config):
    raise ConfigError("repa.weight > 0 needs images (the encoder features): use "
                      "latent.source='tokenizer'")
  if config.latent.progressive.enabled:
    raise ConfigError("latent.progressive needs the latent at every step's count: use "
                      "latent.source='tokenizer'")
  from uae_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  manifest, _ = pipeline.open_latent_dir(lat_dir)
  if tuple(manifest["shape"]) != tuple(shape):
    raise ConfigError(f"latent.dir={lat_dir!r} holds {tuple(manifest['shape'])} latents, the "
                      f"tokenizer's are {tuple(shape)}")
  tag = views.stats_tag(config, uae_cfg) or "tokenize"
  if manifest.get("latent") != tag:
    raise ConfigError(f"latent.dir={lat_dir!r} holds the {manifest.get('latent')!r} latent, this "
                      f"config models {tag!r}")
  if bool(manifest.get("hflip")) != bool(config.train.hflip):
    raise ConfigError(f"latent.dir={lat_dir!r} was written with hflip={manifest.get('hflip')} "
                      f"but train.hflip={config.train.hflip}")


def validate_repa(config, uae_cfg) -> None:
  """Checks `config.repa` (only when switched on); ConfigError naming the key."""
  if "repa" not in config or config.repa.weight == 0:
    return
  r = config.repa
  if r.weight < 0:
    raise ConfigError(f"repa.weight={r.weight} must be >= 0")
  depth = dit_lib.SIZES[config.model.size].depth
  if not 1 <= r.depth <= depth:
    raise ConfigError(f"repa.depth={r.depth}: expected a body block in 1..{depth}")
  _check_choice("repa.target", r.target, REPA_TARGETS)
  if uae_cfg.get("task", "uae") != "uae":
    raise ConfigError(f"repa needs a UAE tokenizer (its frozen semantic encoder); "
                      f"{config.tokenizer.config} is a {uae_cfg.task}")
  if r.target == "band0" and views.is_official(uae_cfg):
    raise ConfigError("repa.target='band0' needs a paper-recipe UAE (the official one has no "
                      "band split)")
  if r.proj_dim < 1:
    raise ConfigError(f"repa.proj_dim={r.proj_dim} must be >= 1")
  if r.dog_sigmas is not None:
    sig = tuple(r.dog_sigmas)
    if len(sig) != 2 or not 0 <= sig[0] < sig[1]:
      raise ConfigError(f"repa.dog_sigmas={sig}: expected (low, high) with 0 <= low < high "
                        "(in DiT tokens), or None")


def batch_spec(config) -> dict:
  """One example of a train batch: an image in [0, 1] (or its stored latent) and its class label."""
  if latent_source(config) == "stored":
    m = config.model
    return {"latent": jax.ShapeDtypeStruct((1, m.input_size, m.input_size, m.in_channels),
                                           jnp.float32),
            "label": jax.ShapeDtypeStruct((1,), jnp.int32)}
  s = config.input.image_size
  return {"image": jax.ShapeDtypeStruct((1, s, s, 3), jnp.float32),
          "label": jax.ShapeDtypeStruct((1,), jnp.int32)}


def _dummy_inputs(config, batch: int = 1):
  """Zero (x, t, y) of the DiT's input shapes."""
  m = config.model
  return (jnp.zeros((batch, m.input_size, m.input_size, m.in_channels), jnp.float32),
          jnp.zeros((batch,), jnp.float32), jnp.zeros((batch,), jnp.int32))


def init_state(config, rng) -> dict:
  """Fresh train state (boxed params, for sharding inference)."""
  k_model, k_state = jax.random.split(rng)
  params = build_model(config).init({"params": k_model, "label_dropout": k_model},
                                    *_dummy_inputs(config))["params"]
  if repa_on(config):
    hidden = jnp.zeros((1, 1, dit_lib.SIZES[config.model.size].dim), jnp.float32)
    proj = build_projector(config).init(jax.random.fold_in(k_model, 1), hidden)["params"]
    params = {**params, REPA_KEY: proj}
  tx, _ = make_optimizer(config)
  return {"step": jnp.zeros((), jnp.int32), "rng": jax.random.key_data(k_state),
          "params": params, "ema": params, "opt": tx.init(params)}


def load_frozen(config) -> dict:
  """Host arrays of the frozen tokenizer (EMA params) and the latent statistics."""
  uae_cfg = latents.tokenizer_config(config)
  tok_params = latents.load_tokenizer_params(config, uae_cfg)
  stats = latent_stats(config, uae_cfg, tok_params)
  logging.info("latent statistics: mean |mean| %.4f, mean std %.4f",
               float(np.abs(stats["mean"]).mean()), float(stats["std"].mean()))
  return {"tokenizer": tok_params, "stats": {"mean": stats["mean"], "std": stats["std"]}}


def latent_stats(config, uae_cfg, tok_params, recompute: bool = False) -> dict:
  """The statistics of the latent `config.latent` selects (computed and stored on first use).

  With stored latents: the statistics the latents command wrote next to them.
  """
  if latent_source(config) == "stored":
    return latents.load_stats(os.path.join(config.latent.dir, latents.STORED_STATS),
                              latents.latent_shape(uae_cfg))
  return latents.ensure_stats(config, uae_cfg, tok_params, recompute,
                              method=views.stats_method(config, uae_cfg),
                              tag=views.stats_tag(config, uae_cfg))


def initialize(config, state: dict, ctx) -> dict:
  """Start-of-run weights: an official DiT^DH checkpoint (or converted directory) in `init.dit`."""
  if not config.init.dit:
    return state
  from uae_jax.convert import dit as dit_convert  # pylint: disable=g-import-not-at-top
  logging.info("init: DiT params (%s) from %s", config.init.dit_which, config.init.dit)
  loaded = dit_convert.load(config.init.dit, dict(config.model), config.init.dit_which)
  params = ctx.place(loaded, dit_params(ctx.state_sh["params"]))
  if REPA_KEY in state["params"]:  # the projector is new: keep its fresh init
    params = {**params, REPA_KEY: state["params"][REPA_KEY]}
  return dict(state, params=params, ema=jax.tree.map(jnp.copy, params))


# ------------------------------------------------------------------------------ the step
def band_schedule(config, uae_cfg) -> tuple:
  """(counts, first step of each later count) of the progressive schedule; ((), ()) when off."""
  p = config.latent.progressive
  if not p.enabled:
    return (), ()
  counts = views.schedule_counts(config, uae_cfg)
  per_epoch = total_steps(config) / max(config.train.num_epochs, 1e-9)
  return counts, views.boundaries(len(counts), per_epoch, p.hold_epochs, p.interval_epochs)


def band_count(schedule, step):
  """Kept DCT coefficients at `step` (traced or host int), or None when the schedule is off."""
  counts, bounds = schedule
  return views.count_at(step, counts, bounds) if counts else None


def encode_batch(config, tokenizer, frozen, images, rng=None, count=None):
  """Normalised latents (B, H, W, C) of an image batch; random horizontal flip when `rng`.

  The latent is the one `config.latent` selects; `count` is the progressive schedule's number
  of kept DCT coefficients at this step (None when the schedule is off).
  """
  return encode_with_target(config, tokenizer, frozen, images, rng, count)[0]


def repa_target_method(config):
  """`fn(module, images)`: the frozen encoder features REPA aligns to, (B, H, W, D)."""
  if config.repa.target == "band0":
    return lambda m, images: m.split(m.encode(images))[0]
  return lambda m, images: m.encode(images)


def encode_with_target(config, tokenizer, frozen, images, rng=None, count=None, target=False):
  """(normalised latents, REPA target features or None) of one image batch, both frozen.

  The flip (when `rng`) is shared, so the target features belong to the image the DiT sees.
  """
  if rng is not None and config.train.hflip:
    flip = jax.random.bernoulli(rng, 0.5, (images.shape[0],))
    images = jnp.where(flip[:, None, None, None], images[:, :, ::-1], images)
  from uae_jax.models import uae as uae_lib  # pylint: disable=g-import-not-at-top
  method = views.tokenize_method(config, isinstance(tokenizer, uae_lib.OfficialUAE))
  if target:  # one apply: XLA's CSE shares the encoder pass of the latent and of the target
    latent_fn, feats_fn = method, repa_target_method(config)
    method = lambda m, im, c: (latent_fn(m, im, c), feats_fn(m, im))
    z, feats = tokenizer.apply({"params": frozen["tokenizer"]}, images, count, method=method)
    feats = jax.lax.stop_gradient(tokens_on_grid(feats.astype(jnp.float32), config))
  else:
    z = tokenizer.apply({"params": frozen["tokenizer"]}, images, count, method=method)
    feats = None
  return jax.lax.stop_gradient(latents.normalise(z.astype(jnp.float32), frozen["stats"])), feats


def tokens_on_grid(feats, config):
  """Features (B, H, W, D) -> (B, g*g, D) row-major tokens on the DiT's g x g token grid.

  The encoder grid is the latent grid, g = H / patch_size: average pooling over each patch.
  """
  p = config.model.patch_size
  return einops.reduce(feats, "b (h p) (w q) d -> b (h w) d", "mean", p=p, q=p)


def class_labels(config, labels):
  """Dataset labels for the DiT: negative (unlabelled) and out-of-range ones become the null class."""
  n = config.model.num_classes
  return jnp.where((labels >= 0) & (labels < n), labels, n).astype(jnp.int32)


def loss_fn(config, model, params, x1, labels, rng, train: bool = True, target=None):
  """(loss, (per-sample MSE, t, extra metrics)) of the DiT on normalised latents x1.

  With REPA on and `target` (B, N, D) frozen features, loss = flow matching + repa.weight *
  (1 - mean token cosine) and the extras are {'fm_loss', 'repa_loss'}; otherwise the plain
  flow-matching loss and no extras.
  """
  k_t, k_drop = jax.random.split(rng)
  repa = target is not None and repa_on(config)
  captured = {}

  def apply(x_t, t):
    """The DiT at (x_t, t); with REPA it also keeps the body's hidden state in `captured`."""
    if not repa:
      return model.apply({"params": params}, x_t, t, labels, train=train,
                         rngs={"label_dropout": k_drop})
    v, captured["hidden"] = model.apply({"params": dit_params(params)}, x_t, t, labels,
                                        train=train, rngs={"label_dropout": k_drop},
                                        return_hidden=config.repa.depth)
    return v

  loss, per, t = transport.flow_matching_loss(
      apply, x1, k_t, config.transport.time_dist, sampling.time_shift_alpha(config),
      config.transport.prediction)
  if not repa:
    return loss, (per, t, {})
  r = repa_term(config, params[REPA_KEY], captured["hidden"], target)
  return loss + config.repa.weight * r, (per, t, {"fm_loss": loss, "repa_loss": r})


def repa_term(config, proj_params, hidden, target):
  """1 - mean cosine between projected DiT tokens and the (DoG-filtered) frozen target tokens.

  REPA's negative cosine shifted by 1 (0 at perfect alignment; the gradient is the same).
  """
  projected = build_projector(config).apply({"params": proj_params}, hidden)
  sig = config.repa.dog_sigmas
  g = config.model.input_size // config.model.patch_size
  return 1.0 + spectrum.repa_loss(projected, target, None if sig is None else tuple(sig), (g, g))


def ema_update(config, ema, params):
  """EMA of the trained leaves; the fixed buffers are copied so they stay bit-identical."""
  d = config.optim.ema_decay
  return jax.tree_util.tree_map_with_path(
      lambda p, e, q: q if is_buffer(p) else d * e + (1.0 - d) * q, ema, params)


def make_train_step(config):
  """Builds `train_step(state, batch, frozen) -> (state, metrics)`."""
  tx, sched = make_optimizer(config)
  model = build_model(config)
  uae_cfg, tokenizer = build_tokenizer(config)
  schedule = band_schedule(config, uae_cfg)
  stored = latent_source(config) == "stored"

  def train_step(state, batch, frozen):
    step = state["step"]
    rng = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), step)
    k_flip, k_loss = jax.random.split(rng)
    count = band_count(schedule, step)
    if stored:  # flipped (or not) by the pipeline; no tokenizer pass
      x1, target = latents.normalise(batch["latent"].astype(jnp.float32), frozen["stats"]), None
    else:
      x1, target = encode_with_target(config, tokenizer, frozen, batch["image"], k_flip, count,
                                      target=repa_on(config))
    labels = class_labels(config, batch["label"])
    grad_fn = jax.value_and_grad(lambda p: loss_fn(config, model, p, x1, labels, k_loss,
                                                   target=target), has_aux=True)
    (loss, (per, t, extra)), grads = grad_fn(state["params"])
    updates, opt = tx.update(grads, state["opt"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    new_state = dict(state, step=step + 1, params=params, opt=opt,
                     ema=ema_update(config, state["ema"], params))
    late = (t > 0.5).astype(jnp.float32)
    metrics = dict(loss=loss, lr=sched(step), t_mean=jnp.mean(t), latent_std=jnp.std(x1),
                   loss_t_hi=jnp.sum(per * late) / jnp.maximum(jnp.sum(late), 1.0),
                   loss_t_lo=jnp.sum(per * (1 - late)) / jnp.maximum(jnp.sum(1 - late), 1.0),
                   **extra, **common.norm_metrics(grads, params, updates))
    if count is not None:
      metrics["band_count"] = count.astype(jnp.float32)
    return new_state, metrics

  return train_step


# ------------------------------------------------------------------------------ evaluation
class Evaluator:
  """Held-out flow-matching loss (raw and EMA params, fixed noise) and class-conditional grids."""

  def __init__(self, config, ctx, frozen):
    self.config, self.ctx, self.frozen = config, ctx, frozen
    self.model = build_model(config)
    uae_cfg, self.tokenizer = build_tokenizer(config)
    self._schedule = band_schedule(config, uae_cfg)
    self._loss = jax.jit(self._eval_loss, out_shardings=ctx.replicated)
    e = config.eval
    n_cls = min(config.model.num_classes, e.grid_classes)
    self.grid_labels = np.repeat(np.arange(n_cls, dtype=np.int32), e.grid_per_class)
    m = config.model
    self.grid_noise = np.asarray(jax.random.normal(
        jax.random.key(e.seed), (len(self.grid_labels), m.input_size, m.input_size,
                                 m.in_channels)), np.float32)
    self._gen = {}
    spec = sampling.sampler_spec(config, num_points=e.grid_num_points)
    self._gen["samples_ema"] = self._generate_fn(spec)
    if spec.guidance.active:
      self._gen["samples_ema_noguide"] = self._generate_fn(
          sampling.sampler_spec(config, num_points=e.grid_num_points, mode="none"))

  def _generate_fn(self, spec):
    """Jitted generate() for one sampler spec (replicated inputs: the grid is small)."""
    gen = sampling.make_generate(self.model, self.tokenizer, self.config.transport.prediction,
                                 spec, self.config.model.num_classes,
                                 decode=views.decode_method(self.config))
    return jax.jit(lambda p, tok, st, noise, y, rng: gen(dit_params(p), None, tok, st, noise, y,
                                                         rng),
                   out_shardings=self.ctx.replicated)

  def _eval_loss(self, params, frozen, images, labels, mask, rng, step):
    """(sum of masked per-sample losses, count) of one eval batch; no label dropout, no flip.

    The latent is the one the train step sees at `step` (the progressive schedule's count).
    """
    count = band_count(self._schedule, step)
    x1 = encode_batch(self.config, self.tokenizer, frozen, images, None, count)
    labels = class_labels(self.config, labels)
    _, (per, _, _) = loss_fn(self.config, self.model, params, x1, labels, rng, train=False)
    m = mask.astype(jnp.float32)
    return jnp.sum(per * m), jnp.sum(m)

  def evaluate(self, state) -> dict:
    """eval/loss and eval_ema/loss over `eval_batches` batches of the eval split."""
    from uae_jax.data import pipeline  # pylint: disable=g-import-not-at-top
    sums = {"eval/loss": [0.0, 0.0], "eval_ema/loss": [0.0, 0.0]}
    it = pipeline.make_eval_iterator(self.config.input)
    for i, batch in enumerate(it):
      if self.config.eval_batches and i >= self.config.eval_batches:
        break
      g = pipeline.to_global_array({k: batch[k] for k in ("image", "label", "mask")},
                                   self.ctx.batch_sh)
      rng = jax.random.fold_in(jax.random.key(self.config.eval.seed), i)
      for name, key in (("eval/loss", "params"), ("eval_ema/loss", "ema")):
        s, n = jax.device_get(self._loss(state[key], self.frozen, g["image"], g["label"],
                                         g["mask"], rng, state["step"]))
        sums[name][0] += float(s)
        sums[name][1] += float(n)
    return {k: s / max(n, 1.0) for k, (s, n) in sums.items()}

  def images(self, state) -> dict:
    """One row per class of EMA samples (with the configured guidance, and without it)."""
    out = {}
    rng = jax.random.key(self.config.eval.seed)
    per = self.config.eval.grid_per_class
    for name, fn in self._gen.items():
      imgs = np.asarray(jax.device_get(fn(state["ema"], self.frozen["tokenizer"],
                                          self.frozen["stats"], self.grid_noise,
                                          self.grid_labels, rng)), np.float32) / 255.0
      out[name] = image_grid([list(imgs[i:i + per]) for i in range(0, len(imgs), per)])
    return out


TASK = tasks.Task(
    validate=validate, batch_spec=batch_spec, init_state=init_state,
    make_train_step=make_train_step, make_evaluator=Evaluator, initialize=initialize,
    load_frozen=load_frozen)
