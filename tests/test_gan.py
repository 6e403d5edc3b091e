"""DiffAug, GAN losses, adaptive weight, schedule and fake quantisation."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from uae_jax.losses import diffaug
from uae_jax.losses import gan


def _images(key, shape):
  """Uniform [-1, 1) float32 images from NumPy (an eager jax.random call compiles per shape)."""
  return np.random.default_rng(key).uniform(-1.0, 1.0, shape).astype(np.float32)


# Jitted once per module: op-by-op (eager) calls compiled one tiny program per op and shape.
# The DiffAug tests share one batch shape, B4 (4, 16, 16, 3), so they share compiled programs.
_color = jax.jit(diffaug.adjust_color)
_translate = jax.jit(diffaug.translate)
_params = jax.jit(diffaug.sample_params, static_argnums=(1, 2, 3), static_argnames="translation")
_aug = jax.jit(diffaug.diff_augment, static_argnames=("translation", "cutout"))
B4 = (4, 16, 16, 3)


# ---------------------------------------------------------------------------------------------
# DiffAug


def test_color_neutral_factors_are_identity():
  x = _images(0, B4)
  b = np.zeros(4, np.float32)
  np.testing.assert_allclose(_color(x, b, b + 1.0, b + 1.0), x, atol=1e-6)


def test_color_ops_match_formulas():
  x = _images(1, B4)
  bri, sat, con = np.array([0.3, -0.2, 0.1, 0.4]), np.array([0.0, 1.7, 1.0, 0.6]), np.array(
      [0.5, 1.4, 0.9, 1.0])
  ref = x + bri[:, None, None, None]
  m = ref.mean(-1, keepdims=True)
  ref = (ref - m) * sat[:, None, None, None] + m
  m = ref.mean((1, 2, 3), keepdims=True)
  ref = (ref - m) * con[:, None, None, None] + m
  out = np.asarray(_color(x, bri, sat, con))
  np.testing.assert_allclose(out, ref, atol=1e-6)
  # Saturation 0 makes sample 0 grey: all channels equal their per-pixel mean (after brightness).
  np.testing.assert_allclose(out[0, ..., 0], out[0, ..., 1], atol=1e-6)
  # Brightness alone adds a constant.
  z = np.zeros(4, np.float32)
  np.testing.assert_allclose(_color(x, z + 0.25, z + 1, z + 1), x + 0.25, atol=1e-6)


def test_translate_known_shift_moves_pixels_and_fills_zeros():
  h, w = 6, 7
  xn = np.arange(2 * h * w * 3, dtype=np.float32).reshape(2, h, w, 3) + 1.0
  out = np.asarray(_translate(xn, np.array([2, 0]), np.array([-1, 0])))
  np.testing.assert_array_equal(out[1], xn[1])  # zero shift: unchanged
  for i in range(h):
    for j in range(w):
      si, sj = i + 2, j - 1
      want = xn[0, si, sj] if (0 <= si < h and 0 <= sj < w) else np.zeros(3)
      np.testing.assert_array_equal(out[0, i, j], want)
  assert (out[0, h - 2:] == 0).all() and (out[0, :, 0] == 0).all()
  # Shifts beyond the image read only padding.
  assert (np.asarray(_translate(xn, np.array([h + 3, -h]), np.array([0, 0]))) == 0).all()


def test_sample_params_ranges():
  p = jax.device_get(_params(jax.random.key(0), 4000, 256, 128))
  assert int(p["shift_h"].min()) == -32 and int(p["shift_h"].max()) == 32
  assert int(p["shift_w"].min()) == -16 and int(p["shift_w"].max()) == 16
  assert len(np.unique(np.asarray(p["shift_h"]))) == 65
  assert -0.5 <= float(p["brightness"].min()) and float(p["brightness"].max()) < 0.5
  assert 0.0 <= float(p["saturation"].min()) and float(p["saturation"].max()) < 2.0
  assert 0.5 <= float(p["contrast"].min()) and float(p["contrast"].max()) < 1.5
  # translation=0 draws no shift at all.
  p0 = jax.device_get(_params(jax.random.key(0), 100, 256, 256, translation=0.0))
  assert int(np.abs(p0["shift_h"]).max()) == 0 and int(np.abs(p0["shift_w"]).max()) == 0


def test_diff_augment_is_translation_then_color():
  x = _images(2, B4)
  rng = jax.random.key(5)
  p = _params(rng, 4, 16, 16)
  ref = _color(_translate(x, p["shift_h"], p["shift_w"]), p["brightness"], p["saturation"],
               p["contrast"])
  out = _aug(rng, x)
  assert out.dtype == jnp.float32 and out.shape == x.shape
  np.testing.assert_allclose(out, ref, atol=1e-6)
  # With translation 0 it is the colour op alone.
  np.testing.assert_allclose(
      _aug(rng, x, translation=0.0),
      _color(x, p["brightness"], p["saturation"], p["contrast"]), atol=1e-6)


def test_diff_augment_determinism_and_per_sample_independence():
  x = _images(3, B4)
  rng = jax.random.key(7)
  a = np.asarray(_aug(rng, x))
  np.testing.assert_array_equal(a, _aug(rng, x))
  assert float(np.abs(a - np.asarray(_aug(jax.random.key(8), x))).max()) > 1e-2
  # Output sample 0 depends only on input sample 0.
  x2 = x.copy()
  x2[1:] = _images(4, (3, 16, 16, 3))
  np.testing.assert_array_equal(np.asarray(_aug(rng, x2))[0], a[0])
  # Each sample gets its own draw: a repeated image is augmented differently.
  r = np.asarray(_aug(rng, np.broadcast_to(x[:1], x.shape)))
  assert float(np.abs(r[0] - r[1]).max()) > 1e-2


def test_diff_augment_is_differentiable():
  x = _images(9, B4)
  g = np.asarray(jax.jit(jax.grad(lambda x: jnp.sum(diffaug.diff_augment(jax.random.key(0), x)
                                                     ** 2)))(x))
  assert np.isfinite(g).all() and float(np.abs(g).max()) > 0


def _reference_cutout(h, w, ch, cw, oh, ow):
  """The reference's clamped index scatter, for one sample."""
  m = np.ones((h, w))
  rows = np.clip(np.arange(ch) + oh - ch // 2, 0, h - 1)
  cols = np.clip(np.arange(cw) + ow - cw // 2, 0, w - 1)
  m[np.ix_(rows, cols)] = 0
  return m


@pytest.mark.parametrize("ch,cw,oh,ow", [(3, 3, 4, 4), (3, 2, 0, 0), (4, 4, 8, 7), (2, 5, 7, 1)])
def test_cutout_mask_matches_reference_scatter(ch, cw, oh, ow):
  m = diffaug.cutout_mask(8, 8, ch, cw, jnp.array([oh]), jnp.array([ow]))[0]
  np.testing.assert_array_equal(m, _reference_cutout(8, 8, ch, cw, oh, ow))


def test_cutout_default_off_and_on():
  x = np.full(B4, 0.5, np.float32)
  rng = jax.random.key(1)
  p = _params(rng, 4, 16, 16, translation=0.0)
  colour = _color(x, p["brightness"], p["saturation"], p["contrast"])
  np.testing.assert_allclose(_aug(rng, x, translation=0.0), colour, atol=1e-6)
  out = _aug(rng, x, translation=0.0, cutout=0.25)
  zeros = np.asarray((out == 0).all(-1)).sum((1, 2))
  assert (zeros > 0).all() and (zeros <= 16).all()  # a 4x4 box, clipped at the borders


# ---------------------------------------------------------------------------------------------
# Losses, adaptive weight, schedule, quantisation


def test_hinge_and_generator_losses():
  hinge = jax.jit(gan.hinge_d_loss)
  real = np.array([2.0, 0.5, -1.0], np.float32)
  fake = np.array([-2.0, 0.0, 0.5], np.float32)
  # relu(1 - real) = [0, .5, 2] (mean 5/6); relu(1 + fake) = [0, 1, 1.5] (mean 5/6).
  np.testing.assert_allclose(hinge(real, fake), 5.0 / 6.0, rtol=1e-6)
  np.testing.assert_allclose(hinge(np.full((2, 4), 3.0, np.float32),
                                   np.full((2, 4), -3.0, np.float32)), 0.0)
  np.testing.assert_allclose(jax.jit(gan.generator_loss)(np.array([[1.0, 2.0], [3.0, 6.0]],
                                                                  np.float32)), -3.0)


def test_adaptive_weight_formula_cap_and_no_gradient():
  weight = jax.jit(gan.adaptive_weight, static_argnames="max_weight")
  g_rec = np.array([[3.0, 0.0], [0.0, 4.0]], np.float32)  # norm 5
  g_gan = np.array([0.0, 2.0], np.float32)                 # norm 2
  np.testing.assert_allclose(weight(g_rec, g_gan), 5.0 / (2.0 + 1e-6), rtol=1e-6)
  np.testing.assert_allclose(weight(g_rec, np.zeros(2, np.float32)), 1e4)  # 5e6 capped
  np.testing.assert_allclose(weight(g_rec, g_gan * 1e-3, max_weight=100.0), 100.0)
  # Pytrees: global norm over leaves.
  tree = {"a": np.array([3.0], np.float32), "b": np.array([4.0], np.float32)}
  np.testing.assert_allclose(weight(tree, np.array([1.0], np.float32)), 5.0 / (1.0 + 1e-6),
                             rtol=1e-6)
  grad = jax.jit(jax.grad(lambda g: gan.adaptive_weight(g, g_gan)))(g_rec)
  np.testing.assert_array_equal(grad, 0.0)


@pytest.mark.parametrize("step,d_on,g_on", [(0, False, False), (59, False, False),
                                            (60, True, False), (79, True, False),
                                            (80, True, True), (159, True, True)])
def test_schedule_switches_at_6_and_8_sixteenths(step, d_on, g_on):
  """The host-side phase the trainer compiles a step for: D from 6/16, the G term from 8/16."""
  assert gan.gan_phase(step, 160) == (d_on, g_on)


def test_quantize_fake():
  x = np.array([-1.5, -1.0, 0.0, 0.5, 1.0, 2.0, 0.001, -0.002], np.float32)
  # round((x+1)*127.5): 0, 0, 128 (127.5 rounds half to even), 191 (191.25), 255, 255, 128, 127.
  levels = np.array([0, 0, 128, 191, 255, 255, 128, 127])
  q = np.asarray(jax.jit(gan.quantize_fake)(x))
  np.testing.assert_allclose(q, levels / 127.5 - 1.0, atol=1e-7)
  np.testing.assert_allclose(q[:3], [-1.0, -1.0, 0.5 / 127.5], atol=1e-7)


def test_adaptive_gan_grads_match_two_separate_gradients():
  """The tokenizer's one-full-backward GAN gradient equals g_rec + w g_gan from two full grads."""
  import ml_collections
  from uae_jax.tasks import uae as uae_task
  rs = np.random.default_rng(0)
  f32 = lambda *shape: rs.standard_normal(shape).astype(np.float32)
  params = {"encoder": {"w": f32(5, 6)}, "decoder": {"pred": {"kernel": f32(6, 4)}}}
  x = f32(3, 5)

  def losses(p):
    h = jnp.tanh(x @ p["encoder"]["w"])
    y = h @ p["decoder"]["pred"]["kernel"]
    return (jnp.mean(jnp.abs(y - 0.3)), -jnp.mean(jnp.sin(y))), {"aux": jnp.sum(y)}

  cfg = ml_collections.ConfigDict({"gan": {"weight": 0.75, "max_weight": 1e4}})
  loss, grads, parts = jax.jit(lambda p: uae_task.adaptive_gan_grads(cfg, losses, p))(params)
  g_rec, g_gan = jax.device_get(jax.jit(lambda p: (jax.grad(lambda q: losses(q)[0][0])(p),
                                                   jax.grad(lambda q: losses(q)[0][1])(p)))(params))
  k = lambda t: t["decoder"]["pred"]["kernel"]
  lam = float(np.linalg.norm(k(g_rec)) / (np.linalg.norm(k(g_gan)) + 1e-6))
  w = 0.75 * lam
  np.testing.assert_allclose(float(parts["adaptive_weight"]), lam, rtol=1e-5)
  for a, r, g in zip(jax.tree.leaves(grads), jax.tree.leaves(g_rec), jax.tree.leaves(g_gan)):
    np.testing.assert_allclose(a, r + w * g, rtol=1e-5, atol=1e-7)
  (l_rec, l_g), _ = jax.jit(losses)(params)
  np.testing.assert_allclose(float(loss), float(l_rec + w * l_g), rtol=1e-6)
