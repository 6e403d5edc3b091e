"""GAN losses, the VQGAN adaptive weight and the stage-3 GAN schedule.

As in the official UAE/RAE code (`src/disc/gan_loss.py`, `src/train_stage1.py`;
docs/method.md#gan):

  D loss  = hinge_d_loss(D(aug(real)), D(aug(quantize_fake(x_hat_eval))))   (D in train mode)
  G term  = disc_weight * lambda * generator_loss(D(aug(x_hat)))            (D in eval mode)
  lambda  = adaptive_weight(dL_rec/dW, dL_G/dW),  W = decoder/pred/kernel, capped at 1e4
  d_on, g_on = gan_phase(step, total_steps)                                  (6/16 and 8/16)

The tokenizer task composes them (`uae_jax/tasks/uae.py: generator_grads`): one forward, two
backward passes of (L_rec, L_G) give both gradients at the decoder's last layer for lambda. The
trainer compiles one step per `gan_phase` (a host-side decision on the step number), so before
g_on the step has no discriminator forward and one backward, and before d_on no discriminator
update: no phase pays for work it does not use.
"""
import math

import jax
import jax.numpy as jnp


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


def _start_step(frac: float, total_steps: int) -> int:
  """First step index >= frac * total_steps (rounded to 1e-6 so 6/16 * 160 is exactly 60)."""
  return math.ceil(round(frac * total_steps, 6))


def gan_phase(step: int, total_steps: int, d_start_frac: float = 6 / 16,
              g_start_frac: float = 8 / 16) -> tuple:
  """(d_on, g_on) Python bools for a host step number: which compiled step the trainer runs."""
  return (step >= _start_step(d_start_frac, total_steps),
          step >= _start_step(g_start_frac, total_steps))


def quantize_fake(x):
  """Clamp to [-1, 1] and snap to the 256 uint8 levels, as the reference does for D-step fakes."""
  x = jnp.clip(x.astype(jnp.float32), -1.0, 1.0)
  return jnp.round((x + 1.0) * 127.5) / 127.5 - 1.0
