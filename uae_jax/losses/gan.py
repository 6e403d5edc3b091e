"""GAN losses, the VQGAN adaptive weight and the stage-3 GAN schedule.

As in the official UAE/RAE code (`src/disc/gan_loss.py`, `src/train_stage1.py`;
docs/method.md#gan):

  D loss  = hinge_d_loss(D(aug(real)), D(aug(quantize_fake(x_hat_eval))))   (D in train mode)
  G term  = disc_weight * lambda * generator_loss(D(aug(x_hat)))            (D in eval mode)
  lambda  = adaptive_weight(dL_rec/dW, dL_G/dW),  W = decoder/pred/kernel, capped at 1e4
  d_on, g_on = gan_schedule_weights(step, total_steps)                       (6/16 and 8/16)

Intended use in a generator step (all inside one jitted function, no Python branching):

  g_rec, g_gan = last_layer_grads((rec_loss_fn, gan_loss_fn), params)
  lam = adaptive_weight(g_rec, g_gan)            # already stop_gradient'ed
  loss = rec_loss + jnp.where(g_on, disc_weight * lam * gan_loss, 0.0)

`rec_loss_fn` and `gan_loss_fn` map the generator params to L_rec_total (every reconstruction and
semantic term of the stage) and L_G; they must use the same rngs as the main loss so that XLA can
share the forward pass (a gradient w.r.t. the last kernel only needs dL/dx_hat and the decoder's
last hidden state, so the extra cost is small). Before g_on the GAN branch still runs (its value is
masked), which keeps one compiled step for the whole stage.
"""
import math
from collections.abc import Mapping
from typing import Callable, Sequence

import jax
import jax.numpy as jnp

DEFAULT_LAST_LAYER = ("decoder", "pred", "kernel")


def hinge_d_loss(logits_real, logits_fake):
  """Discriminator hinge loss 0.5 * (mean relu(1 - D(real)) + mean relu(1 + D(fake)))."""
  real = jnp.mean(jax.nn.relu(1.0 - logits_real.astype(jnp.float32)))
  fake = jnp.mean(jax.nn.relu(1.0 + logits_fake.astype(jnp.float32)))
  return 0.5 * (real + fake)


def generator_loss(logits_fake):
  """Generator adversarial loss -mean D(fake) (the reference's 'vanilla' g-loss)."""
  return -jnp.mean(logits_fake.astype(jnp.float32))


def _l2_norm(tree):
  """Global L2 norm of an array or pytree of arrays, in float32."""
  leaves = jax.tree.leaves(tree)
  return jnp.sqrt(sum(jnp.sum(jnp.square(l.astype(jnp.float32))) for l in leaves))


def adaptive_weight(grad_rec, grad_gan, max_weight: float = 1e4):
  """VQGAN adaptive weight clip(||g_rec|| / (||g_gan|| + 1e-6), 0, max_weight), no gradient."""
  w = _l2_norm(grad_rec) / (_l2_norm(grad_gan) + 1e-6)
  return jax.lax.stop_gradient(jnp.clip(w, 0.0, max_weight))


def _get_path(tree, path):
  for key in path:
    tree = tree[key]
  return tree


def _replace_path(tree, path, value):
  """Copy of nested mapping `tree` with the leaf at `path` replaced (other leaves shared)."""
  if not path:
    return value
  if not isinstance(tree, Mapping):
    raise TypeError(f"expected a mapping at {path[0]!r}, got {type(tree).__name__}")
  out = dict(tree)
  out[path[0]] = _replace_path(tree[path[0]], path[1:], value)
  return type(tree)(out) if not isinstance(tree, dict) else out


def last_layer_grads(loss_fns: Sequence[Callable], params,
                     path: Sequence[str] = DEFAULT_LAST_LAYER):
  """Gradients of each `loss_fn(params)` w.r.t. the one leaf at `path` (adaptive-weight inputs)."""
  path = tuple(path)
  kernel = _get_path(params, path)
  return tuple(jax.grad(lambda k, f=f: f(_replace_path(params, path, k)))(kernel)
               for f in loss_fns)


def _start_step(frac: float, total_steps):
  """First step index >= frac * total_steps (rounded to 1e-6 so 6/16 * 160 is exactly 60)."""
  if isinstance(total_steps, int):
    return math.ceil(round(frac * total_steps, 6))
  return jnp.ceil(frac * jnp.asarray(total_steps, jnp.float32) - 1e-6).astype(jnp.int32)


def gan_schedule_weights(step, total_steps, d_start_frac: float = 6 / 16,
                         g_start_frac: float = 8 / 16):
  """(d_on, g_on) jnp bools: D updates from d_start_frac, the G term from g_start_frac on."""
  step = jnp.asarray(step)
  d_on = step >= _start_step(d_start_frac, total_steps)
  g_on = step >= _start_step(g_start_frac, total_steps)
  return d_on, g_on


def quantize_fake(x):
  """Clamp to [-1, 1] and snap to the 256 uint8 levels, as the reference does for D-step fakes."""
  x = jnp.clip(x.astype(jnp.float32), -1.0, 1.0)
  return jnp.round((x + 1.0) * 127.5) / 127.5 - 1.0
