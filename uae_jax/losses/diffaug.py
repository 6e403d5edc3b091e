"""Differentiable augmentation (DiffAug) applied to the discriminator's inputs.

Port of the StyleGAN-T `DiffAug.aug` used by the official UAE/RAE code (`src/disc/diffaug.py`,
`prob=1.0`, `cutout=0.0`; docs/method.md#gan), for NHWC images in [-1, 1].
The reference applies, in this order (checked against its source):

  1. translation by integer shifts t_h, t_w in [-round(r*H), round(r*H)] (r = 0.125), reading
     out-of-range pixels from a 1-pixel zero pad;
  2. colour: brightness `x += u - 0.5`, saturation `x = (x - mean_C) * 2u + mean_C`, contrast
     `x = (x - mean_CHW) * (u + 0.5) + mean_CHW`;
  3. cutout (a zeroed box of round(cutout*H) x round(cutout*W)); cutout=0 makes it a no-op.

All magnitudes are drawn per sample from one (7, B) block of U(0, 1) draws (the reference's
`rand01` layout: rows 0-1 translation, 2-4 colour, 5-6 cutout). Everything runs in float32 and
is differentiable w.r.t. the image (the generator step backpropagates through it). Real and fake
batches must be augmented with independent keys.
"""
import jax
import jax.numpy as jnp


def translate(x, shift_h, shift_w):
  """out[b, i, j] = x[b, i + shift_h[b], j + shift_w[b]], zero where that is outside the image."""
  b, h, w, c = x.shape
  # Same values as the reference's clamped gather into a 1-pixel zero pad, written as a vmapped
  # dynamic_slice of a fully padded copy: XLA then sees the batch dimension of the gather and keeps
  # it batch-sharded (a fancy-index gather was computed replicated on every device; see
  # docs/scaling.md, finding 1).
  xp = jnp.pad(x, ((0, 0), (h, h), (w, w), (0, 0)))
  sh = jnp.clip(shift_h, -h, h) + h
  sw = jnp.clip(shift_w, -w, w) + w
  return jax.vmap(lambda img, i, j: jax.lax.dynamic_slice(img, (i, j, 0), (h, w, c)))(xp, sh, sw)


def adjust_color(x, brightness, saturation, contrast):
  """Per-sample brightness offset, saturation factor and contrast factor, in the reference order."""
  bc = lambda t: t.astype(jnp.float32)[:, None, None, None]
  x = x + bc(brightness)
  mean = x.mean(axis=-1, keepdims=True)
  x = (x - mean) * bc(saturation) + mean
  mean = x.mean(axis=(1, 2, 3), keepdims=True)
  return (x - mean) * bc(contrast) + mean


def cutout_mask(h, w, size_h: int, size_w: int, offset_h, offset_w):
  """(B, H, W) mask that zeroes a size_h x size_w box centred at (offset_h, offset_w), clamped."""
  # The reference zeroes rows clamp(offset - size//2 + a, 0, H-1) for a < size: a contiguous,
  # clamped range, so an interval test reproduces it.
  def axis_mask(n, size, offset):
    lo = jnp.clip(offset - size // 2, 0, n - 1)
    hi = jnp.clip(offset - size // 2 + size - 1, 0, n - 1)
    r = jnp.arange(n)[None, :]
    return (r >= lo[:, None]) & (r <= hi[:, None])
  box = axis_mask(h, size_h, offset_h)[:, :, None] & axis_mask(w, size_w, offset_w)[:, None, :]
  return 1.0 - box.astype(jnp.float32)


def sample_params(rng, batch: int, h: int, w: int, translation: float = 0.125):
  """Per-sample shifts, colour factors and cutout draws, from one (7, B) block of U(0, 1)."""
  u = jax.random.uniform(rng, (7, batch), jnp.float32)
  # Python round, as the reference (ties to even: round(0.125 * 4) == 0).
  dh, dw = round(h * translation), round(w * translation)
  # The clip only guards against u * (2d + 1) rounding up to 2d + 1 in float32.
  shift = lambda t, d: jnp.clip(jnp.floor(t * (2 * d + 1)).astype(jnp.int32) - d, -d, d)
  return dict(shift_h=shift(u[0], dh), shift_w=shift(u[1], dw), brightness=u[2] - 0.5,
              saturation=2.0 * u[3], contrast=u[4] + 0.5, cutout_u_h=u[5], cutout_u_w=u[6])


def diff_augment(rng, x, translation: float = 0.125, cutout: float = 0.0):
  """DiffAug of a (B, H, W, C) batch in [-1, 1]: translation, colour, optional cutout; float32."""
  x = x.astype(jnp.float32)
  b, h, w, _ = x.shape
  p = sample_params(rng, b, h, w, translation)
  x = translate(x, p["shift_h"], p["shift_w"])
  x = adjust_color(x, p["brightness"], p["saturation"], p["contrast"])
  ch, cw = round(h * cutout), round(w * cutout)
  if ch > 0 and cw > 0:  # an empty box (the default) leaves the image unchanged
    off_h = jnp.floor(p["cutout_u_h"] * (h + (1 - ch % 2))).astype(jnp.int32)
    off_w = jnp.floor(p["cutout_u_w"] * (w + (1 - cw % 2))).astype(jnp.int32)
    x = x * cutout_mask(h, w, ch, cw, off_h, off_w)[..., None]
  return x
