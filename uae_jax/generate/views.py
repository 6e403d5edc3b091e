"""Which latent of the frozen UAE a DiT models, and how samples go back to pixels (`config.latent`).

  default       the tokenizer's deterministic `tokenize` output: the fused clean bands (paper
                recipe) or the zig-zag DCT low-pass of its config (official recipe); decoded
                with `decode`.
  band0_only    paper recipe: only band 0 of the radial split (the semantic, lowest band);
                decoded as the fused latent of (band 0, zeros for the higher bands).
  progressive   the low-to-high band schedule of the official stage-2 training: the DiT's
                latent keeps the first `count` zig-zag DCT coefficients of the encoder latent
                (official recipe; the fused latent for the paper recipe), `count` growing by
                epoch through the perfect squares from `start_count` to `max_count`:
                  count = counts[clip(floor((epoch - hold_epochs) / interval_epochs), 0, last)]
                (epoch = step / steps per epoch, fractional for short runs), so with 64 -> 256
                on a 16 x 16 grid, hold 80 and interval 20: 64 until epoch 99,
                81 from epoch 100, ..., 256 from epoch 240. The count is computed inside the
                step from the step number (a traced integer feeding a mask: the compiled step is
                the same for every count). Samples are decoded as they are (no re-projection).
Statistics are computed once on the latent the DiT sees at the start (band 0; the start count),
stored with a tag in the file name, and kept fixed while the count grows, as the reference does.
"""
import math

import jax
import jax.numpy as jnp
import numpy as np

from uae_jax.errors import ConfigError
from uae_jax.models import bands as bands_lib


# ------------------------------------------------------------------------------ the schedule
def grid_coefficients(config) -> int:
  """H * W: the DCT coefficients per channel of the DiT's latent grid."""
  return int(config.model.input_size) ** 2


def start_count(config, uae_cfg=None) -> int:
  """First kept-coefficient count: `start_count`, or the tokenizer's own `dct_count` if -1."""
  p = config.latent.progressive
  if p.start_count > 0:
    return int(p.start_count)
  if uae_cfg is not None and "dct_count" in uae_cfg.model:
    return int(uae_cfg.model.dct_count)
  return grid_coefficients(config)


def band_counts(start: int, stop: int) -> list:
  """The schedule's counts: `start`, then every larger perfect square up to `stop` (and `stop`)."""
  counts = [start] + [k * k for k in range(math.isqrt(start) + 1, math.isqrt(stop) + 1)]
  return counts if counts[-1] == stop else counts + [stop]


def schedule_counts(config, uae_cfg=None) -> list:
  """The kept-coefficient counts of `config.latent.progressive`, in order."""
  p = config.latent.progressive
  stop = p.max_count if p.max_count > 0 else grid_coefficients(config)
  return band_counts(start_count(config, uae_cfg), stop)


def boundaries(num_counts: int, steps_per_epoch: float, hold_epochs: float,
               interval_epochs: float) -> list:
  """First step of count k = 1..num_counts-1: epoch >= hold + k * interval, epoch = step / spe.

  Computed once on the host in float64 (rounded to 1e-6 steps first, so that an exact epoch
  boundary is not lost to rounding); with whole-epoch hold and interval the count changes at
  the first step of an epoch, as the per-epoch update of the reference does.
  """
  return [int(math.ceil(round((hold_epochs + k * interval_epochs) * steps_per_epoch, 6)))
          for k in range(1, num_counts)]


def count_at(step, counts, bounds):
  """Kept coefficients at `step`: counts[number of boundaries <= step] (host int or traced)."""
  if isinstance(step, jax.Array):
    idx = jnp.sum(jnp.asarray(bounds, jnp.int32) <= step.astype(jnp.int32)) if bounds else 0
    return jnp.asarray(counts, jnp.int32)[idx]
  return int(counts[sum(b <= int(step) for b in bounds)])


# ------------------------------------------------------------------------------ the latent
def is_official(uae_cfg) -> bool:
  """True for an official-recipe tokenizer (its DCT low-pass replaces the band split)."""
  return uae_cfg.get("recipe", "paper") == "official"


def validate(config, uae_cfg) -> None:
  """ConfigError naming the `latent.*` key that does not fit the tokenizer."""
  lat = config.latent
  if lat.band0_only and lat.progressive.enabled:
    raise ConfigError("latent.band0_only and latent.progressive.enabled exclude each other")
  if lat.band0_only and is_official(uae_cfg):
    raise ConfigError("latent.band0_only needs a paper-recipe tokenizer (radial bands); "
                      f"{config.tokenizer.config} is the official recipe")
  if lat.progressive.enabled:
    n, counts = grid_coefficients(config), schedule_counts(config, uae_cfg)
    if not 1 <= counts[0] <= counts[-1] <= n:
      raise ConfigError(f"latent.progressive: counts {counts[0]}..{counts[-1]} must lie in "
                        f"[1, {n}] (the {config.model.input_size}^2 grid)")
    if lat.progressive.interval_epochs <= 0:
      raise ConfigError("latent.progressive.interval_epochs must be > 0")


def stats_tag(config, uae_cfg=None) -> str:
  """File-name tag of the statistics of this latent ('' for the plain `tokenize` output)."""
  if config.latent.band0_only:
    return "_band0"
  if config.latent.progressive.enabled:
    return f"_k{start_count(config, uae_cfg)}"
  return ""


def tokenize_method(config, official: bool):
  """`fn(module, images, count)` for `tokenizer.apply(..., method=fn)`: the DiT's latent."""
  if config.latent.band0_only:
    return lambda m, images, count=None: m.split(m.encode(images))[0]
  if config.latent.progressive.enabled:
    def lowpass(m, images, count):
      base = m.encode(images) if official else m.tokenize(images)
      return bands_lib.dct_lowpass(base, jnp.full((images.shape[0],), count, jnp.int32))
    return lowpass
  return lambda m, images, count=None: m.tokenize(images)


def stats_method(config, uae_cfg):
  """`fn(module, images)`: the latent the statistics are computed on (the schedule's start)."""
  fn = tokenize_method(config, is_official(uae_cfg))
  first = schedule_counts(config, uae_cfg)[0] if config.latent.progressive.enabled else None
  return lambda m, images: fn(m, images, first)


def decode_method(config):
  """`fn(module, z)` or 'decode': a generated latent -> image."""
  if not config.latent.band0_only:
    return "decode"

  def decode_band0(m, z):
    stack = jnp.zeros((m.num_bands,) + z.shape, z.dtype).at[0].set(z)
    return m.decode(m.fuse(stack))
  return decode_band0


def default_config():
  """The `config.latent` section: plain `tokenize` output, no schedule."""
  import ml_collections  # pylint: disable=g-import-not-at-top
  return ml_collections.ConfigDict(dict(
      band0_only=False,
      progressive=dict(enabled=False, start_count=-1, max_count=-1, hold_epochs=80.0,
                       interval_epochs=20.0)))


def with_defaults(config):
  """`config` with a default `latent` section when it has none (runs recorded before it existed)."""
  if "latent" not in config:
    config.latent = default_config()
  return config
