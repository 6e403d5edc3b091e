"""Latent -> image generation pieces shared by the sampling CLI, the DiT task's evaluator and bench.

`make_generate(...)` returns one pure function
  generate(params, guide_params, tok_params, stats, noise, labels, rng) -> uint8 (B, S, S, 3)
that runs the sampler over the whole grid (`lax.fori_loop`), de-normalises the latent, decodes it
with the frozen UAE decoder and quantises like the reference samplers (clip to [0, 1], x * 255,
truncate to uint8). Jit it once; the batch axis of noise/labels may be sharded over the mesh.
"""
import dataclasses
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from uae_jax.errors import ConfigError
from uae_jax.generate import latents
from uae_jax.generate import samplers
from uae_jax.generate import transport

LABEL_SAMPLING = ("equal", "random")


@dataclasses.dataclass(frozen=True)
class SamplerSpec:
  """How to sample: method, grid points, time shift, guidance, SDE diffusion."""
  method: str = "euler"
  num_points: int = 50
  alpha: float = 1.0
  guidance: samplers.Guidance = samplers.Guidance()
  diffusion_form: str = "sigma"
  diffusion_norm: float = 1.0

  @property
  def grid(self) -> np.ndarray:
    """The shifted time grid."""
    return samplers.time_grid(self.num_points, self.alpha)


def sampler_spec(config, **overrides) -> SamplerSpec:
  """The SamplerSpec of `config.sample` (CLI flags override fields by name)."""
  s = config.sample
  kw = dict(method=s.method, num_points=s.num_points, alpha=time_shift_alpha(config),
            diffusion_form=s.diffusion_form, diffusion_norm=s.diffusion_norm)
  g = dict(mode=s.guidance, scale=s.cfg_scale, t_min=s.cfg_t_min, t_max=s.cfg_t_max)
  for k, v in overrides.items():
    if v is None:
      continue
    if k in ("mode", "scale", "t_min", "t_max"):
      g[k] = v
    else:
      kw[k] = v
  spec = SamplerSpec(guidance=samplers.Guidance(**g), **kw)
  try:
    samplers.check(spec.method, spec.guidance, spec.diffusion_form)
  except ValueError as e:
    raise ConfigError(f"sampling: {e}") from None
  if spec.num_points < 2:
    raise ConfigError(f"sampling: num_points={spec.num_points} must be >= 2")
  return spec


def time_shift_alpha(config) -> float:
  """alpha of the time shift: sqrt(dim / base), dim = H*W*C of the latent unless set."""
  tr, m = config.transport, config.model
  if not tr.time_shift:
    return 1.0
  dim = tr.shift_dim if tr.shift_dim > 0 else m.input_size**2 * m.in_channels
  return transport.shift_alpha(dim, tr.shift_base)


def labels_for(num: int, num_classes: int, mode: str, seed: int) -> np.ndarray:
  """Class labels of `num` samples: 'equal' (each class num/num_classes times, shuffled) or 'random'."""
  rng = np.random.default_rng(seed)
  if mode == "equal":
    return rng.permutation(np.arange(num) % num_classes).astype(np.int32)
  if mode == "random":
    return rng.integers(0, num_classes, num).astype(np.int32)
  raise ValueError(f"label sampling {mode!r}: expected one of {LABEL_SAMPLING}")


def to_uint8(images):
  """[0, 1] floats -> uint8 by clip, x 255 and truncation (the reference samplers' quantisation)."""
  return (jnp.clip(images, 0.0, 1.0) * 255.0).astype(jnp.uint8)


def velocity_fn(model, prediction: str):
  """v(params, x, t_vec, y): the model's output as a float32 velocity."""
  def v(params, x, t, y):
    out = model.apply({"params": params}, x, t, y).astype(jnp.float32)
    return transport.as_velocity(out, x, t, prediction)
  return v


def make_latent_sampler(model, prediction: str, spec: SamplerSpec, num_classes: int,
                        guide_model: Optional[Any] = None):
  """sample(params, guide_params, noise, labels, rng) -> normalised latents."""
  v = velocity_fn(model, prediction)
  v_guide = velocity_fn(guide_model, prediction) if guide_model is not None else None
  grid = spec.grid

  def sample(params, guide_params, noise, labels, rng):
    cond = lambda x, t: v(params, x, t, labels)
    if spec.guidance.mode == "autoguidance":
      other = lambda x, t: v_guide(guide_params, x, t, labels)
    else:
      other = lambda x, t: v(params, x, t, jnp.full_like(labels, num_classes))
    f = samplers.guided_velocity(cond, other, spec.guidance)
    return samplers.sample(f, noise.astype(jnp.float32), grid, spec.method, rng,
                           spec.diffusion_form, spec.diffusion_norm)

  return sample


def make_generate(model, tokenizer, prediction: str, spec: SamplerSpec, num_classes: int,
                  guide_model: Optional[Any] = None, decode="decode"):
  """generate(params, guide_params, tok_params, stats, noise, labels, rng) -> uint8 images.

  `decode` is the tokenizer method turning a latent into an image (`views.decode_method`).
  """
  sample = make_latent_sampler(model, prediction, spec, num_classes, guide_model)

  def generate(params, guide_params, tok_params, stats, noise, labels, rng):
    z = latents.denormalise(sample(params, guide_params, noise, labels, rng), stats)
    return to_uint8(tokenizer.apply({"params": tok_params}, z, method=decode))

  return generate
