"""The DiT's latent: the progressive low-to-high DCT band schedule and band-0-only training.

Counts are checked against the reference schedule written out by hand (64 -> 81 -> ... -> 256,
64 held until epoch 99, full band from epoch 240); the latents against an independent numpy DCT
(scipy's orthonormal DCT-II) and the zig-zag order of the specification.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.fft

from configs import dit as dit_config
from uae_jax.errors import ConfigError
from uae_jax.generate import latents
from uae_jax.generate import views
from uae_jax.tasks import dit as dit_task

SQUARES_64_256 = [64, 81, 100, 121, 144, 169, 196, 225, 256]


def _full_config(**progressive):
  """Full-size DiT config (16 x 16 grid) with the schedule on; 1251 steps per epoch."""
  c = dit_config.get_config("progressive")
  c.train.total_steps = 1251 * 800
  c.latent.progressive.update(start_count=64, **progressive)
  return c


def test_reference_schedule_counts_by_epoch():
  c = _full_config()
  assert views.schedule_counts(c) == SQUARES_64_256
  schedule = dit_task.band_schedule(c, None)
  expected = {0: 64, 79: 64, 99: 64, 100: 81, 119: 81, 120: 100, 160: 144, 239: 225, 240: 256,
              799: 256}
  for epoch, want in expected.items():
    for step in (epoch * 1251, epoch * 1251 + 1250):  # first and last step of the epoch
      assert dit_task.band_count(schedule, step) == want, (epoch, step)
      assert int(dit_task.band_count(schedule, jnp.int32(step))) == want, (epoch, step)


def test_schedule_off_and_non_square_ends():
  c = dit_config.get_config("")
  assert dit_task.band_count(dit_task.band_schedule(c, None), 10**6) is None
  assert views.band_counts(9, 64) == [9, 16, 25, 36, 49, 64]
  assert views.band_counts(10, 50) == [10, 16, 25, 36, 49, 50]


def test_tiny_schedule_uses_tokenizer_count_and_grid():
  c = dit_config.get_config("tiny,progressive,steps=300")
  uae_cfg = latents.tokenizer_config(c)
  assert uae_cfg.model.dct_count == 9 and c.model.input_size == 8
  schedule = dit_task.band_schedule(c, uae_cfg)
  assert schedule == ([9, 16, 25, 36, 49, 64], [30, 60, 90, 120, 150])
  assert [dit_task.band_count(schedule, s) for s in (0, 29, 30, 149, 150, 299)] == \
      [9, 9, 16, 49, 64, 64]


def _zigzag_rank(n):
  """Rank of each (row u, col v) in the official zig-zag: by u + v; even diagonals run u up
  ((0, 10), (1, 9), ... on u + v = 10), odd ones v up."""
  cells = sorted(((u + v, (v if (u + v) % 2 else u)), u, v) for u in range(n) for v in range(n))
  rank = np.empty((n, n), int)
  for r, (_, u, v) in enumerate(cells):
    rank[u, v] = r
  return rank


def _tokenizer(recipe):
  """(uae config, module, params) of the tiny tokenizer of `recipe`, random weights."""
  c = dit_config.get_config("tiny")
  if recipe == "official":
    c.tokenizer.config = "configs/official_stage1.py:tiny"
  uae_cfg = latents.tokenizer_config(c)
  module = latents.build_tokenizer(uae_cfg)
  params = jax.jit(lambda k: module.init({"params": k, "noise": k}, jnp.zeros((1, 64, 64, 3)),
                                         train=False))(jax.random.key(0))["params"]
  return c, uae_cfg, module, params


@pytest.fixture(scope="module")
def official_tok():
  """The tiny official-recipe tokenizer."""
  return _tokenizer("official")


class _Identity:
  """Stands in for the tokenizer: its latent is the input itself (for the mask arithmetic)."""

  def encode(self, x):
    """Identity."""
    return x

  tokenize = encode


def test_schedule_mask_per_epoch_keeps_count_coefficients():
  c = dit_config.get_config("tiny,progressive,steps=300")
  schedule = dit_task.band_schedule(c, latents.tokenizer_config(c))
  z = np.asarray(jax.random.normal(jax.random.key(0), (2, 8, 8, 3)), np.float64)
  ref = scipy.fft.dctn(z, axes=(1, 2), norm="ortho")
  fn = jax.jit(lambda x, step: views.tokenize_method(c, True)(
      _Identity(), x, dit_task.band_count(schedule, step)))
  for step, count in ((0, 9), (45, 16), (90, 36), (149, 49), (299, 64)):
    coef = scipy.fft.dctn(np.asarray(fn(jnp.asarray(z, jnp.float32), jnp.int32(step)), np.float64),
                          axes=(1, 2), norm="ortho")
    keep = _zigzag_rank(8) < count
    assert int((np.abs(coef).max(axis=(0, 3)) > 1e-4).sum()) == count, step
    np.testing.assert_allclose(coef[:, keep], ref[:, keep], atol=1e-4)


@pytest.mark.slow
def test_progressive_latent_keeps_exactly_count_coefficients(official_tok):
  c, uae_cfg, module, params = official_tok
  c.latent.progressive.enabled = True
  images = jax.random.uniform(jax.random.key(1), (2, 64, 64, 3))
  method = views.tokenize_method(c, views.is_official(uae_cfg))
  fn = jax.jit(lambda p, x, k: module.apply({"params": p}, x, k, method=method))
  full = np.asarray(fn(params, images, jnp.int32(64)), np.float64)  # all 64 kept: the encoder z
  ref = scipy.fft.dctn(full, axes=(1, 2), norm="ortho")
  scale = np.abs(ref).max()
  for count in (9, 25, 40):  # 9, 40: part of a diagonal, so the zig-zag direction matters
    coef = scipy.fft.dctn(np.asarray(fn(params, images, jnp.int32(count)), np.float64),
                          axes=(1, 2), norm="ortho")
    keep = _zigzag_rank(8) < count
    assert keep.sum() == count
    assert np.abs(coef[:, ~keep]).max() < 1e-5 * scale, count      # everything else removed
    np.testing.assert_allclose(coef[:, keep], ref[:, keep], atol=1e-4 * scale)  # the rest kept


@pytest.mark.slow
def test_band0_latent_and_decode():
  c, uae_cfg, module, params = _tokenizer("paper")
  c.latent.band0_only = True
  views.validate(c, uae_cfg)
  images = jax.random.uniform(jax.random.key(1), (2, 64, 64, 3))
  apply = lambda method: jax.jit(lambda p, x: module.apply({"params": p}, x, method=method))
  z0 = apply(lambda m, x: views.tokenize_method(c, False)(m, x, None))(params, images)
  bands = apply(lambda m, x: m.split(m.encode(x)))(params, images)
  np.testing.assert_allclose(z0, bands[0], atol=1e-6)
  assert float(jnp.abs(bands[1:]).max()) > 0  # the higher bands exist and are left out
  img = apply(views.decode_method(c))(params, z0)
  want = apply(lambda m, b: m.decode(m.fuse(b)))(
      params, jnp.stack([z0] + [jnp.zeros_like(z0)] * 3))
  np.testing.assert_allclose(img, want, atol=1e-5)
  assert views.stats_tag(c) == "_band0"


def test_latent_config_errors():
  c = dit_config.get_config("tiny")
  c.tokenizer.config = "configs/official_stage1.py:tiny"
  uae_cfg = latents.tokenizer_config(c)
  c.latent.band0_only = True
  with pytest.raises(ConfigError, match="band0_only needs a paper-recipe"):
    views.validate(c, uae_cfg)
  c.latent.progressive.enabled = True
  with pytest.raises(ConfigError, match="exclude each other"):
    views.validate(c, uae_cfg)
  c.latent.band0_only = False
  c.latent.progressive.max_count = 100  # more than the 8 x 8 grid holds
  with pytest.raises(ConfigError, match=r"latent.progressive: counts 9..100"):
    views.validate(c, uae_cfg)
