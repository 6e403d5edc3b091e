"""Training pieces every task shares: step counts, dtype, the AdamW + schedule recipe, EMA."""
from typing import Any

import jax
import jax.numpy as jnp
import optax

from uae_jax.errors import ConfigError

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def compute_dtype(config) -> Any:
  """The compute dtype named in `config.compute_dtype` (master weights stay float32)."""
  if config.compute_dtype not in DTYPES:
    raise ConfigError(f"compute_dtype={config.compute_dtype!r}: expected one of {sorted(DTYPES)}")
  return DTYPES[config.compute_dtype]


def total_steps(config) -> int:
  """Steps of this run: explicit, or epochs * examples // global batch."""
  if config.train.total_steps > 0:
    return int(config.train.total_steps)
  return int(config.train.num_epochs * config.num_train_examples // config.input.global_batch_size)


def warmup_steps(config) -> int:
  """Warm-up length: `optim.warmup_epochs` of the run's epochs, whether total_steps is explicit."""
  return int(config.optim.warmup_epochs * total_steps(config) / max(config.train.num_epochs, 1e-9))


def lr_schedule(peak: float, end: float, warmup: int, total: int) -> optax.Schedule:
  """Linear warm-up with multiplier (t + 1) / W, then cosine to `end` at the end of the run.

  The (t + 1) matches the official PyTorch LambdaLR, whose first update already uses lr / W; the
  plain optax warm-up starts at exactly 0, which makes the first update a no-op.
  """
  base = optax.warmup_cosine_decay_schedule(0.0, peak, max(warmup, 0), max(total, warmup + 1), end)
  return lambda count: base(count + 1)


def adamw(lr, optim_cfg) -> optax.GradientTransformation:
  """AdamW with the config's betas, eps and weight decay (after global-norm clipping if set)."""
  o = optim_cfg
  chain = [optax.clip_by_global_norm(o.grad_clip)] if o.get("grad_clip", 0) > 0 else []
  return optax.chain(*chain, optax.adamw(lr, b1=o.b1, b2=o.b2, eps=o.eps,
                                         weight_decay=o.weight_decay))


def ema_update(ema, params, decay: float):
  """Exponential moving average of a parameter tree."""
  return jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, ema, params)


def norm_metrics(grads, params, updates) -> dict:
  """Global L2 norms of gradients, parameters and updates (the usual health scalars)."""
  return {"l2_grads": optax.global_norm(grads), "l2_params": optax.global_norm(params),
          "l2_updates": optax.global_norm(updates)}


# --------------------------------------------------- alternating GAN phases (KL-VAE, QG-VAE)
GAN_PHASES = ("plain", "g", "d")


def alternating_gan_phase(config, step: int) -> str:
  """'plain' without a GAN or before `gan.start_step`, then 'g' on even and 'd' on odd steps."""
  if not config.gan.enabled or step < config.gan.start_step:
    return "plain"
  return "d" if step % 2 == 1 else "g"


def gan_phase_update(config, branches: dict, phase, flag: str):
  """update(state, *args) -> (state, metrics) for an alternating GAN (`config.gan.enabled`,
  `config.gan.start_step`); without the GAN, just `branches['plain']`.

  Runs `branches[phase]` (each `fn(state, *args) -> (state, metrics)`, keyed by GAN_PHASES), or,
  with phase=None, all three behind a traced switch on `state['step']` (for callers that do not
  track phases; it compiles every branch). Every branch's metrics are padded with zeros to the
  union of their keys, so each log line has the same columns, and `flag` is 1.0 on
  discriminator steps.
  """
  if not config.gan.enabled:
    return branches["plain"]

  def update(state, *args):
    keys = {}
    for fn in branches.values():
      keys.update(jax.eval_shape(fn, state, *args)[1])

    def padded(fn):
      def run(s):
        new, m = fn(s, *args)
        return new, {k: m[k] if k in m else jnp.zeros(v.shape, v.dtype) for k, v in keys.items()}
      return run
    if phase is not None:
      new, metrics = padded(branches[phase])(state)
      return new, dict(metrics, **{flag: jnp.float32(phase == "d")})
    step = state["step"]
    on = step >= config.gan.start_step
    d_turn = on & (step % 2 == 1)
    which = jnp.where(d_turn, 2, jnp.where(on, 1, 0))
    new, metrics = jax.lax.switch(which, [padded(branches[p]) for p in GAN_PHASES], state)
    return new, dict(metrics, **{flag: d_turn.astype(jnp.float32)})
  return update
