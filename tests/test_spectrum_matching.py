"""Spectrum Matching: spectra, ESM, DSM, the KL-VAE and its task, against independent references.

References: scipy.fft.dctn for every DCT, numpy re-implementations of the radial bin map and the
DSM mask straight from their definitions, PyTorch depthwise conv + F.interpolate(bicubic) for the
image-to-latent-grid step, the closed-form Gaussian KL, the published SD kl-f8 parameter count.
"""
import numpy as np
import pytest
import scipy.fft

import jax
import jax.numpy as jnp
import flax.linen as nn

from uae_jax.losses import spectrum as sp
from uae_jax.models import kl_vae as kl_lib

# Bin populations of the 16-bin radial map, as listed for the original code.
POP_16 = [3, 5, 7, 13, 13, 15, 23, 19, 23, 31, 31, 31, 19, 11, 9, 3]
POP_32 = [8, 22, 32, 42, 58, 68, 78, 86, 106, 118, 128, 118, 74, 46, 28, 12]
# Published parameter count of Stable Diffusion's kl-f8 autoencoder (diffusers AutoencoderKL).
SD_KL_F8_PARAMS = 83_653_863
IMAGENET_RGB = [.4657, .1913, .0997, .0666, .0388, .0265, .0217, .0162, .0131, .0123, .0103,
                .0097, .0076, .0069, .0067, .0069]


# ------------------------------------------------------------------------------ numpy references
def np_bin_map(h, w, n=16):
  """The radial bin map written from its definition, loop by loop."""
  r_max = np.sqrt((h - 1) ** 2 + (w - 1) ** 2)
  out = np.zeros((h, w), int)
  for u in range(h):
    for v in range(w):
      out[u, v] = min(max(int(np.floor(np.sqrt(u * u + v * v) / r_max * n)), 0), n - 1)
  return out


def np_power(x, center=True, remove_dc=True, eps=1e-8):
  """Channel-mean DCT power with scipy (x: (B, H, W, C) float64)."""
  if center:
    x = x - x.mean(axis=(1, 2), keepdims=True)
  p = np.maximum(np.mean(scipy.fft.dctn(x, type=2, norm="ortho", axes=(1, 2)) ** 2, -1), eps)
  if remove_dc:
    p[:, 0, 0] = 0
  return p


def np_bands(p, n=16, eps=1e-8):
  """Mean per bin by explicit loops."""
  bmap = np_bin_map(p.shape[1], p.shape[2], n)
  out = np.zeros((p.shape[0], n))
  for j in range(n):
    sel = bmap == j
    out[:, j] = p[:, sel].sum(-1) / (max(sel.sum(), 1) + eps)
  return out


def torch_to_grid(x, hw, blur=True):
  """PyTorch: depthwise 7x7 sigma-1.2 Gaussian (zero padding 3), then bicubic to hw."""
  import torch
  import torch.nn.functional as F
  t = torch.from_numpy(np.asarray(x, np.float64)).permute(0, 3, 1, 2)
  if blur:
    ax = torch.arange(7, dtype=torch.float64) - 3
    yy, xx = torch.meshgrid(ax, ax, indexing="ij")
    k = torch.exp(-(xx ** 2 + yy ** 2) / (2 * 1.2 ** 2))
    k = (k / k.sum())[None, None].repeat(t.shape[1], 1, 1, 1)
    t = F.conv2d(t, k, padding=3, groups=t.shape[1])
  t = F.interpolate(t, size=tuple(hw), mode="bicubic", align_corners=False)
  return t.permute(0, 2, 3, 1).numpy()


def np_esm(x, z, delta, center=True, remove_dc=True, log1p=True, blur=True, eps=1e-8):
  """The whole ESM pipeline in numpy / scipy / torch: (loss, p_x, p_z)."""
  xd = torch_to_grid(x, z.shape[1:3], blur)
  sx = np_bands(np_power(xd, center, remove_dc)) * (np.arange(16) + 1.0) ** delta
  sz = np_bands(np_power(np.asarray(z, np.float64), center, remove_dc))
  f = (lambda s: np.log(s + eps + 1)) if log1p else (lambda s: s)
  px, pz = f(sx), f(sz)
  px, pz = px / (px.sum(-1, keepdims=True) + eps), pz / (pz.sum(-1, keepdims=True) + eps)
  return np.mean(np.sum(px * (np.log(px + eps) - np.log(pz + eps)), -1)), px, pz


def np_dsm(x, k, b=8):
  """Block DCT mask with scipy: zero (u, v) with u + v >= 2(b - 1) - (k - 1)."""
  if k == 0:
    return x.copy()
  out = np.empty_like(x)
  thresh = 2 * (b - 1) - (k - 1)
  u, v = np.meshgrid(np.arange(b), np.arange(b), indexing="ij")
  keep = (u + v < thresh)[None, :, :, None]
  for i in range(0, x.shape[1], b):
    for j in range(0, x.shape[2], b):
      coef = scipy.fft.dctn(x[:, i:i + b, j:j + b], type=2, norm="ortho", axes=(1, 2)) * keep
      out[:, i:i + b, j:j + b] = scipy.fft.idctn(coef, type=2, norm="ortho", axes=(1, 2))
  return out


# ------------------------------------------------------------------------------ spectra
@pytest.mark.parametrize("size,expected", [(16, POP_16), (32, POP_32)])
def test_bin_populations_match_reference_lists(size, expected):
  assert sp.bin_counts(size, size).tolist() == expected
  np.testing.assert_array_equal(sp.radial_bin_map(size, size), np_bin_map(size, size))


def test_bin_map_non_square_matches_definition():
  np.testing.assert_array_equal(sp.radial_bin_map(8, 24, 16), np_bin_map(8, 24, 16))


@pytest.mark.parametrize("center,remove_dc", [
    ("mean", True), pytest.param("none", False, marks=pytest.mark.slow)])
def test_power_and_bands_match_scipy(center, remove_dc):
  x = np.random.default_rng(0).normal(size=(3, 16, 12, 5))
  p = np.asarray(sp.channel_agg_power(x, center, remove_dc))
  ref = np_power(x, center == "mean", remove_dc)
  np.testing.assert_allclose(p, ref, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(np.asarray(sp.radial_band_energy(jnp.asarray(ref, jnp.float32))),
                             np_bands(ref), rtol=1e-5, atol=1e-7)


def test_white_noise_band_energies_flat():
  # Orthonormal DCT of iid N(0, 1) is iid N(0, 1): every bin mean estimates 1 with standard error
  # sqrt(2 / (count * C * B)).
  b, c, s = 16, 8, 32
  x = jax.random.normal(jax.random.key(0), (b, s, s, c))
  # Jitted: eager JAX compiles one program per op.
  e = np.asarray(jax.jit(lambda x: sp.radial_band_energy(sp.channel_agg_power(x, "none", False)))(
      x)).mean(0)
  se = np.sqrt(2.0 / (np.asarray(POP_32) * c * b))
  assert np.all(np.abs(e - 1.0) < 4 * se), (e, se)


@pytest.mark.parametrize("in_size,out,blur", [
    (64, 16, True), pytest.param(64, 32, True, marks=pytest.mark.slow),
    pytest.param(48, 16, False, marks=pytest.mark.slow)])
def test_image_to_latent_grid_matches_torch(in_size, out, blur):
  x = np.random.default_rng(1).uniform(-1, 1, size=(2, in_size, in_size, 3))
  skip = 0 if blur else out  # blur_skip_height=out reproduces the skip quirk at this size
  got = np.asarray(sp.image_to_latent_grid(jnp.asarray(x, jnp.float32), (out, out),
                                           blur_skip_height=skip))
  np.testing.assert_allclose(got, torch_to_grid(x, (out, out), blur), atol=2e-5)


@pytest.mark.slow
def test_blur_skip_quirk_at_32_is_an_option():
  x = jnp.asarray(np.random.default_rng(2).uniform(-1, 1, (1, 64, 64, 3)), jnp.float32)
  quirk = sp.image_to_latent_grid(x, (32, 32))
  always = sp.image_to_latent_grid(x, (32, 32), blur_skip_height=0)
  np.testing.assert_allclose(np.asarray(quirk), torch_to_grid(np.asarray(x), (32, 32), False),
                             atol=2e-5)
  np.testing.assert_allclose(np.asarray(always), torch_to_grid(np.asarray(x), (32, 32), True),
                             atol=2e-5)


# ------------------------------------------------------------------------------ ESM
@pytest.mark.parametrize("delta,loss_type", [
    (1.0, "kl"), pytest.param(0.4, "kl", marks=pytest.mark.slow),
    pytest.param(1.0, "l2", marks=pytest.mark.slow)])
def test_esm_matches_numpy_pipeline(delta, loss_type):
  rs = np.random.default_rng(3)
  x = rs.uniform(-1, 1, (3, 64, 64, 3))
  z = rs.normal(size=(3, 16, 16, 4)) * 2.0
  ref, px, pz = np_esm(x, z, delta)
  if loss_type == "l2":
    ref = np.mean((pz - px) ** 2)
  got = float(jax.jit(sp.esm_loss, static_argnums=(2, 3))(
      jnp.asarray(x, jnp.float32), jnp.asarray(z, jnp.float32), delta, loss_type))
  np.testing.assert_allclose(got, ref, rtol=2e-4, atol=1e-7)


def test_esm_zero_at_target_positive_elsewhere():
  rs = np.random.default_rng(4)
  sx = jnp.asarray(rs.uniform(0.1, 5, (2, 16)), jnp.float32)
  target = sx * (jnp.arange(16) + 1.0)
  p_t = sp.band_distribution(sx, 1.0)
  # Equal band means: zero; without log1p any proportional spectrum is zero too.
  assert float(sp.distribution_loss(p_t, sp.band_distribution(target))) == pytest.approx(0, abs=1e-6)
  p_nolog = sp.band_distribution(sx, 1.0, log1p=False)
  assert float(sp.distribution_loss(p_nolog, sp.band_distribution(7.0 * target, log1p=False))
               ) == pytest.approx(0, abs=1e-6)
  other = jnp.asarray(rs.uniform(0.1, 5, (2, 16)), jnp.float32)
  assert float(sp.distribution_loss(p_t, sp.band_distribution(other))) > 1e-3


def test_esm_gradient_reaches_only_the_latent():
  rs = np.random.default_rng(5)
  x = jnp.asarray(rs.uniform(-1, 1, (2, 64, 64, 3)), jnp.float32)
  z = jnp.asarray(rs.normal(size=(2, 16, 16, 4)), jnp.float32)
  gx, gz = jax.jit(jax.grad(lambda a, b: sp.esm_loss(a, b, 1.0), argnums=(0, 1)))(x, z)
  assert float(jnp.abs(gx).max()) == 0.0
  assert float(jnp.abs(gz).max()) > 0.0


@pytest.mark.slow
def test_esm_gradient_matches_finite_difference():
  rs = np.random.default_rng(5)
  x = jnp.asarray(rs.uniform(-1, 1, (2, 64, 64, 3)), jnp.float32)
  z = jnp.asarray(rs.normal(size=(2, 16, 16, 4)), jnp.float32)
  gz = jax.grad(lambda b: sp.esm_loss(x, b, 1.0))(z)
  # The gradient is the derivative of the numpy pipeline (finite difference along gz).
  d = gz / jnp.linalg.norm(gz)
  h = 1e-2
  fd = (np_esm(np.asarray(x), np.asarray(z + h * d), 1.0)[0]
        - np_esm(np.asarray(x), np.asarray(z - h * d), 1.0)[0]) / (2 * h)
  np.testing.assert_allclose(float(jnp.sum(gz * d)), fd, rtol=2e-2)


def test_real_photo_spectrum_near_imagenet_rgb_row(photo_batch):
  # f16 at 256 px: the image brought to the 16 x 16 grid, analysis settings (no centring, DC kept).
  x = 2.0 * jnp.asarray(photo_batch) - 1.0
  z = jnp.zeros((x.shape[0], 16, 16, 4))
  p = np.asarray(jax.jit(lambda x, z: sp.analysis_distributions(x, z, 1.0)["image"])(x, z)).mean(0)
  diff = p - np.asarray(IMAGENET_RGB)
  # Four photos, not ImageNet: the DC-dominated first bins differ most (measured: +0.12, -0.07,
  # -0.03, -0.02, the rest within 0.007; docs/spectrum_matching.md).
  assert np.abs(diff).max() < 0.15 and np.abs(diff[4:]).max() < 0.01, diff
  assert np.all(np.diff(p[:6]) < 0)  # decays like the measured ImageNet curve


# ------------------------------------------------------------------------------ DSM
def test_dsm_kept_counts_and_identity():
  assert [int(sp.dsm_keep_mask(k).sum()) for k in (0, 8, 10, 12)] == [64, 28, 15, 6]
  x = jax.random.normal(jax.random.key(1), (2, 16, 16, 3))
  np.testing.assert_array_equal(np.asarray(jax.jit(sp.dsm_mask, static_argnums=1)(x, 0)),
                                np.asarray(x))


@pytest.mark.parametrize("k", [8, pytest.param(3, marks=pytest.mark.slow)])
def test_dsm_matches_scipy_blocks(k):
  x = np.random.default_rng(6).normal(size=(2, 16, 24, 3))
  np.testing.assert_allclose(np.asarray(sp.dsm_mask(jnp.asarray(x, jnp.float32), k)),
                             np_dsm(x, k), atol=2e-5)


def test_dsm_same_mask_for_image_and_latent_one_compile():
  rs = np.random.default_rng(7)
  x = jnp.asarray(rs.normal(size=(2, 64, 64, 3)), jnp.float32)
  z = jnp.asarray(rs.normal(size=(2, 16, 16, 4)), jnp.float32)
  f = jax.jit(sp.dsm_pair)
  for k in (0, 8, 10, 12):
    xb, zb = f(x, z, jnp.int32(k))
    np.testing.assert_allclose(np.asarray(xb), np_dsm(np.asarray(x), k), atol=2e-5)
    np.testing.assert_allclose(np.asarray(zb), np_dsm(np.asarray(z), k), atol=2e-5)
  assert f._cache_size() == 1
  ks = np.asarray(jax.vmap(sp.sample_dsm_k)(jax.random.split(jax.random.key(0), 800)))
  counts = np.array([(ks == k).sum() for k in sp.DSM_CHOICES])
  assert set(np.unique(ks)) == set(sp.DSM_CHOICES) and np.all(np.abs(counts - 200) < 60)


# ------------------------------------------------------------------------------ DoG-REPA
def test_dog_filter_matches_scipy_and_repa_cosine():
  from scipy.ndimage import gaussian_filter
  x = np.random.default_rng(8).normal(size=(1, 12, 12, 2))
  ref = (gaussian_filter(x, (0, 1.0, 1.0, 0), mode="constant", truncate=3.0)
         - gaussian_filter(x, (0, 2.0, 2.0, 0), mode="constant", truncate=3.0))
  np.testing.assert_allclose(np.asarray(sp.dog_filter(jnp.asarray(x, jnp.float32), 1.0, 2.0)),
                             ref, atol=1e-5)
  t = jnp.asarray(x.reshape(1, 144, 2), jnp.float32)
  assert float(sp.repa_loss(t, t)) == pytest.approx(-1.0, abs=1e-6)
  assert float(sp.repa_loss(-t, t)) == pytest.approx(1.0, abs=1e-6)
  filt = sp.dog_filter(jnp.asarray(x, jnp.float32), 0.0, 2.0).reshape(1, 144, 2)
  assert float(sp.repa_loss(filt, t, (0.0, 2.0), (12, 12))) == pytest.approx(-1.0, abs=1e-6)


# ------------------------------------------------------------------------------ the KL-VAE
def _count(tree):
  return int(sum(np.prod(l.shape) for l in jax.tree.leaves(nn.unbox(tree))))


def _abstract_params(name, size):
  m = kl_lib.build(name)
  x = jnp.zeros((1, size, size, 3))
  v = jax.eval_shape(lambda: m.init({"params": jax.random.key(0), "sample": jax.random.key(1)}, x))
  out = jax.eval_shape(lambda p: m.apply(p, x, rngs={"sample": jax.random.key(1)}), v)
  return v["params"], out


def np_vae_params(channels, c_lat, in_ch=3):
  """Parameter count of the architecture written out layer by layer from its description."""
  conv = lambda i, o, k: i * o * k * k + o
  gn = lambda ch: 2 * ch
  res = lambda i, o: gn(i) + conv(i, o, 3) + gn(o) + conv(o, o, 3) + (conv(i, o, 1) if i != o else 0)
  attn = lambda ch: gn(ch) + 4 * conv(ch, ch, 1)
  mid = lambda ch: 2 * res(ch, ch) + attn(ch)
  enc, prev = conv(in_ch, channels[0], 3), channels[0]
  for i, ch in enumerate(channels):
    enc += res(prev, ch) + res(ch, ch)
    prev = ch
    if i < len(channels) - 1:
      enc += conv(ch, ch, 3)
  enc += mid(prev) + gn(prev) + conv(prev, 2 * c_lat, 3)
  rev = channels[::-1]
  dec, prev = conv(c_lat, rev[0], 3) + mid(rev[0]), rev[0]
  for i, ch in enumerate(rev):
    dec += res(prev, ch) + 2 * res(ch, ch)
    prev = ch
    if i < len(rev) - 1:
      dec += conv(ch, ch, 3)
  dec += gn(prev) + conv(prev, 3, 3)
  return enc + dec + conv(2 * c_lat, 2 * c_lat, 1) + conv(c_lat, c_lat, 1)


def test_kl_vae_shapes_and_parameter_counts():
  params, out = _abstract_params("f16d16", 256)
  assert out["z"].shape == (1, 16, 16, 16) and out["recon"].shape == (1, 256, 256, 3)
  assert _count(params) == np_vae_params((128, 128, 256, 256, 512), 16)
  f8, out8 = _abstract_params("f8d4", 256)
  assert out8["z"].shape == (1, 32, 32, 4)
  assert _count(f8) == SD_KL_F8_PARAMS


def test_kl_closed_form_and_logvar_clamp():
  rs = np.random.default_rng(9)
  mean, logvar = rs.normal(size=(2, 4, 4, 3)), rs.normal(size=(2, 4, 4, 3))
  ref = np.sum(0.5 * (mean ** 2 + np.exp(logvar) - 1.0 - logvar), axis=(1, 2, 3))
  np.testing.assert_allclose(np.asarray(kl_lib.kl_divergence(jnp.asarray(mean), jnp.asarray(logvar))),
                             ref, rtol=1e-5)
  m = kl_lib.build("tiny")
  moments = jnp.concatenate([jnp.zeros((1, 2, 2, 4)), jnp.full((1, 2, 2, 4), 100.0)], -1)
  _, lv = m.apply({}, moments, method="posterior")
  assert float(lv.max()) == 20.0


@pytest.mark.slow
def test_vq_keeps_height_and_width_order():
  m = kl_lib.build("tiny_vq", codebook_size=16, channels=(32, 64, 64))
  x = jax.random.uniform(jax.random.key(2), (1, 32, 64, 3), minval=-1, maxval=1)
  v = m.init(jax.random.key(3), x)
  out = m.apply(v, x)
  assert out["z"].shape == (1, 8, 16, 4) and out["indices"].shape == (1, 8, 16)
  # Each position holds its own nearest codeword (no transposition of the grid).
  h = m.apply(v, m.apply(v, x, method="encode"), method=lambda mod, t: mod.quant_proj(t))
  book = np.asarray(nn.unbox(v["params"])["quantizer"]["codebook"])
  d = ((np.asarray(h)[..., None, :] - book) ** 2).sum(-1)
  np.testing.assert_array_equal(np.asarray(out["indices"]), d.argmin(-1))


# ------------------------------------------------------------------------------ the task
def _tiny_config(**over):
  from configs import kl_vae as cfg
  c = cfg.get_config(over.pop("arg", "tiny,steps=4"))
  c.input.image_size = 32
  c.model.channels = (32, 32)
  c.loss.lpips = 0.0
  for k, v in over.items():
    node = c
    *path, leaf = k.split(".")
    for p in path:
      node = node[p]
    node[leaf] = v
  return c


def test_config_variants_and_validation():
  from configs import kl_vae as cfg
  from uae_jax.errors import ConfigError
  from uae_jax.tasks import kl_vae as task
  sd, esm, dsm = (cfg.get_config(v) for v in ("sd", "esm", "dsm"))
  assert (sd.loss.kl, sd.loss.esm, sd.loss.dsm) == (1e-6, 0.0, False)
  assert (esm.loss.kl, esm.loss.esm, esm.loss.esm_delta) == (0.0, 0.01, 1.0)
  assert (dsm.loss.kl, dsm.loss.esm, dsm.loss.dsm) == (0.0, 0.0, True)
  assert sd.model.size == "f16d16" and sd.gan.start_step == 50_001
  bad = cfg.get_config("tiny,dsm")
  bad.input.image_size = 40  # latent 10 x 10: not divisible by 8
  with pytest.raises(ConfigError, match="dsm"):
    task.validate(bad)


@pytest.mark.slow
@pytest.mark.parametrize("arg", ["tiny,steps=4", "tiny,esm,steps=4", "tiny,dsm,steps=4",
                                 "tiny,esm_dsm,gan,steps=4"])
def test_train_steps_sharded(arg, tmp_path):
  from uae_jax import train
  from uae_jax.data import pipeline
  c = _tiny_config(arg=arg)
  c.input.image_size = 64  # 16 x 16 latent: DSM has 2 x 2 blocks
  c.model.channels = (32, 32, 32)
  tr = train.Trainer(c, str(tmp_path))
  it = pipeline.make_train_iterator(c.input)
  state, _ = tr.initial_state(it)
  ms = []
  for _ in range(4):
    state, m = tr.train_step(state, tr.global_batch(it), tr.frozen)
    ms.append(jax.device_get(m))
    assert np.isfinite(ms[-1]["loss"])
  assert int(state["step"]) == 4
  if "gan" in arg:  # one compiled step per phase: plain, plain, g (step 2 = start), d (odd)
    assert [m["d_turn"] for m in ms] == [0.0, 0.0, 0.0, 1.0]
    assert ms[1]["gan_g"] == 0 and ms[2]["gan_g"] != 0 and ms[2]["adaptive_weight"] > 0
    assert ms[3]["gan_d"] > 0 and ms[2]["gan_d"] == 0


@pytest.mark.slow
def test_tiny_run_psnr_improves(tmp_path):
  from uae_jax import train
  c = _tiny_config(arg="tiny,steps=40")
  c.eval_every_steps, c.image_every_steps, c.log_every_steps = 40, 0, 10
  summary = train.train_and_evaluate(c, str(tmp_path))
  assert summary["eval_end"]["eval/psnr"] > summary["eval_start"]["eval/psnr"] + 2.0


def test_gan_phases_follow_the_schedule():
  """KL-VAE GAN phases (one compiled step each): plain before gan.start_step, then G on even and
  D on odd steps; no GAN: always plain."""
  from uae_jax.tasks import kl_vae as task
  c = _tiny_config(arg="tiny,esm_dsm,gan,steps=4")
  c.gan.start_step = 10
  assert [task.phase_at(c, s) for s in (0, 9, 10, 11, 12)] == ["plain", "plain", "g", "d", "g"]
  c.gan.enabled = False
  assert {task.phase_at(c, s) for s in (0, 10, 11)} == {"plain"}
  assert task.TASK.phase_at is task.phase_at


def test_tokenizer_interface_shares_params():
  from configs import kl_vae as cfg
  from uae_jax.tasks import kl_vae as task
  c = cfg.get_config("tiny")
  x = jnp.full((1, 32, 32, 3), 0.5)
  tree = lambda m, **kw: jax.tree.structure(jax.eval_shape(
      lambda: nn.unbox(m.init({"params": jax.random.key(0), "sample": jax.random.key(0),
                               "noise": jax.random.key(0)}, x, **kw))["params"]))
  assert tree(task.build_tokenizer(c), train=False) == tree(task.build_model(c))
  assert task.latent_grid(c) == (16, 16, 4)
