"""Tests for the band projector, band noise, the official DCT low-pass and the semantic losses."""
import jax
import numpy as np
import pytest
import scipy.fft
import scipy.ndimage

from uae_jax.losses import semantic
from uae_jax.models import bands as B


# Eager JAX compiles one program per op; the split tests run it under jit (the projector is
# hashable, so it is a static argument; the grid check raises while tracing). The noise tests stay
# eager: their ops are few and shared, while a jitted noise program compiled slower (measured).
_jit_split = jax.jit(B.BandProjector.split, static_argnums=(0, 2))


def _split(projector, z, first_band=0):
  """projector.split(z, first_band) under jit, as a numpy array."""
  return np.asarray(_jit_split(projector, z, first_band))


def _random_latent(shape, seed=0):
  """Standard-normal float32 latent of the given shape."""
  return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _photo_latent(photo_batch):
  """Real photos patchified 16x16 into a (4, 16, 16, 768) latent grid (the DINOv2-B shape)."""
  x = photo_batch.reshape(4, 16, 16, 16, 16, 3).transpose(0, 1, 3, 2, 4, 5)
  return np.ascontiguousarray(x.reshape(4, 16, 16, 768))


def _photo_grid(photo_batch, size):
  """Real photos average-pooled to a (4, size, size, 3) grid."""
  f = 256 // size
  return photo_batch.reshape(4, size, f, size, f, 3).mean(axis=(2, 4))


def _steps(height, width, num_bands, tau=0.02):
  """Independent float64 rho, edges and sigmoid steps s_1..s_{K-1} from the written definitions."""
  fy, fx = np.meshgrid(np.fft.fftfreq(height), np.fft.fftfreq(width), indexing="ij")
  rho = np.sqrt(fy ** 2 + fx ** 2) / 0.5
  edges = [k * np.sqrt(2) / num_bands for k in range(1, num_bands)]
  return rho, edges, [1 / (1 + np.exp(-(rho - e) / tau)) for e in edges]


def _step_multipliers(height, width, num_bands, band_split):
  """What step k of the split applies to the residual: L_k = 1 - s_{k+1} or M_k (K-1 of them)."""
  _, _, s = _steps(height, width, num_bands)
  if band_split == "lowpass":
    return [1 - s[k] for k in range(num_bands - 1)]
  return list(B.radial_masks(height, width, num_bands)[:-1])


def _numpy_split(z, steps):
  """Float64 numpy version of the iterative split, written out literally (K-1 step multipliers)."""
  z = np.asarray(z, np.float64)
  residual, out = z, []
  for mult in steps:
    spec = np.fft.fft2(residual, axes=(1, 2))
    band = np.fft.ifft2(mult[None, :, :, None] * spec, axes=(1, 2)).real
    out.append(band)
    residual = residual - band
  out.append(residual)
  return np.stack(out)


# ------------------------------------------------------------------ masks


@pytest.mark.parametrize("k", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("hw", [(16, 16), (16, 12), (7, 5)])
def test_masks_partition_of_unity(k, hw):
  masks = B.radial_masks(*hw, num_bands=k)
  assert masks.shape == (k, *hw)
  np.testing.assert_allclose(masks.sum(0), 1.0, atol=1e-6)
  assert masks.min() >= 0.0 and masks.max() <= 1.0
  # DC is in band 0; the corner frequency (rho = sqrt 2) in the last band.
  assert masks[0, 0, 0] > 0.999
  if hw[0] % 2 == 0 and hw[1] % 2 == 0:
    assert masks[-1, hw[0] // 2, hw[1] // 2] > 0.999


def test_masks_match_formula():
  h, w, tau = 16, 12, 0.05
  edges = (0.3, 0.9)
  masks = B.radial_masks(h, w, 3, edges, tau)
  fy, fx = np.meshgrid(np.fft.fftfreq(h), np.fft.fftfreq(w), indexing="ij")
  rho = np.sqrt(fy ** 2 + fx ** 2) / 0.5
  s = [1 / (1 + np.exp(-(rho - e) / tau)) for e in edges]
  np.testing.assert_allclose(masks, np.stack([1 - s[0], s[0] - s[1], s[1]]), atol=1e-12)


def test_default_edges():
  p = B.BandProjector(16, 16, num_bands=4)
  np.testing.assert_allclose(p.edges, [np.sqrt(2) / 4, np.sqrt(2) / 2, 3 * np.sqrt(2) / 4])
  assert B.BandProjector(16, 16, 4, edges=list(p.edges)) == p  # hashable, normalised to tuple
  assert hash(B.BandProjector(16, 16, 4, edges=list(p.edges))) == hash(p)


@pytest.mark.parametrize("kwargs, match", [
    (dict(num_bands=0), "num_bands"),
    (dict(num_bands=3, edges=(0.5,)), "entries"),
    (dict(num_bands=3, edges=(0.5, 0.5)), "strictly increasing"),
    (dict(num_bands=3, edges=(0.9, 0.5)), "strictly increasing"),
    (dict(num_bands=2, tau=0.0), "tau"),
    (dict(num_bands=2, tau=-1.0), "tau"),
])
def test_mask_argument_validation(kwargs, match):
  with pytest.raises(ValueError, match=match):
    B.radial_masks(16, 16, **kwargs)
  with pytest.raises(ValueError, match=match):
    B.BandProjector(16, 16, **kwargs)


def test_projector_method_validation():
  with pytest.raises(ValueError, match="method"):
    B.BandProjector(16, 16, method="dft")


# ------------------------------------------------------------------ split


# The default K = 4 by default; other K only under -m slow.
@pytest.mark.parametrize("k", [pytest.param(2, marks=pytest.mark.slow),
                               pytest.param(3, marks=pytest.mark.slow), 4,
                               pytest.param(8, marks=pytest.mark.slow)])
@pytest.mark.parametrize("method", ["fft", "dense", "separable"])
def test_bands_sum_to_input_random(k, method):
  for hw in [(16, 16), (16, 12)]:
    z = _random_latent((2, *hw, 8), seed=k)
    bands = _split(B.BandProjector(*hw, num_bands=k, method=method), z)
    assert bands.shape == (k, 2, *hw, 8)
    assert np.max(np.abs(bands.sum(0) - z)) <= 1e-5


@pytest.mark.parametrize("method", ["fft", "matmul"])
def test_bands_sum_to_input_photo(photo_batch, method):
  z = _photo_latent(photo_batch)
  grid = _photo_grid(photo_batch, 32)
  for k in [2, 3, 4, 8]:
    bands = _split(B.BandProjector(16, 16, num_bands=k, method=method), z)
    assert np.max(np.abs(bands.sum(0) - z)) <= 1e-5
    bands = _split(B.BandProjector(32, 32, num_bands=k, method=method), grid)
    assert np.max(np.abs(bands.sum(0) - grid)) <= 1e-5


@pytest.mark.parametrize("method", ["fft", "dense", "separable"])
def test_constant_grid_in_band0(method):
  z = np.broadcast_to(np.linspace(-2, 3, 6, dtype=np.float32), (2, 16, 12, 6))
  bands = _split(B.BandProjector(16, 12, 4, method=method), z)
  np.testing.assert_allclose(bands[0], z, atol=1e-5)
  assert np.max(np.abs(bands[1:])) <= 1e-5


# K = 4 by default (K = 2, 3, 8 only under -m slow).
@pytest.mark.parametrize("k", [pytest.param(2, marks=pytest.mark.slow),
                               pytest.param(3, marks=pytest.mark.slow), 4,
                               pytest.param(8, marks=pytest.mark.slow)])
def test_fft_equals_matmul_and_float64(k):
  cases = [(hw, "lowpass") for hw in [(16, 16), (16, 12), (9, 7)]]
  cases.append(((16, 12), "residual_bandpass"))
  for hw, split in cases:
    z = _random_latent((3, *hw, 5), seed=10 + k)
    p = B.BandProjector(*hw, num_bands=k, band_split=split)
    fft, mm, sep = map(np.asarray, jax.jit(lambda z: (
        B.split_bands_fft(z, p.masks, split), B.split_bands_matmul(z, p.operator),
        B.split_bands_separable(z, p.multipliers)))(z))
    assert np.max(np.abs(fft - mm)) <= 1e-5
    assert np.max(np.abs(fft - sep)) <= 1e-5
    ref = _numpy_split(z, _step_multipliers(*hw, k, split))
    assert np.max(np.abs(mm - ref)) <= 1e-5
    assert np.max(np.abs(fft - ref)) <= 1e-5
    assert np.max(np.abs(sep - ref)) <= 1e-5


def test_hartley_matrix_orthonormal_involution():
  for n in (1, 2, 7, 16):
    t = B.hartley_matrix(n)
    np.testing.assert_allclose(t, t.T, atol=1e-12)
    np.testing.assert_allclose(t @ t, np.eye(n), atol=1e-12)


def test_separable_path_chosen_by_size_equals_fft(photo_batch):
  """method='matmul' takes the dense operator on small grids, the separable one on large ones;
  both equal the FFT reference within 1e-5 (latent-sized channels, real photo content)."""
  assert B.fast_path(8, 8) == "dense" and B.fast_path(16, 16) == "separable"
  z = _photo_latent(photo_batch)[:2]
  p = B.BandProjector(16, 16, 4)
  fft = _split(B.BandProjector(16, 16, 4, method="fft"), z)
  fast = _split(p, z)
  assert np.max(np.abs(fast - fft)) <= 1e-5
  np.testing.assert_allclose(_split(p, z, first_band=1), fast[1:], atol=1e-6)
  # Any grid works, not only squares or powers of two.
  z = _random_latent((2, 10, 6, 4), seed=5)
  for split in B.BAND_SPLITS:
    q = B.BandProjector(10, 6, 3, band_split=split)
    ref, sep = jax.jit(lambda z: (B.split_bands_fft(z, q.masks, split),
                                  B.split_bands_separable(z, q.multipliers)))(z)
    assert np.max(np.abs(np.asarray(sep) - np.asarray(ref))) <= 1e-5


def test_separable_rejects_uneven_multipliers():
  mult = np.ones((2, 8, 8))
  mult[0, 1, 0] = 0.5  # not mirrored at -1: not even in fy
  with pytest.raises(ValueError, match="even"):
    B.split_bands_separable(_random_latent((1, 8, 8, 2)), mult)
  with pytest.raises(ValueError, match="grid"):
    B.split_bands_separable(_random_latent((1, 8, 6, 2)), np.ones((2, 8, 8)))


def test_default_split_is_lowpass():
  assert B.BandProjector(16, 16).band_split == "lowpass"
  z = _random_latent((2, 16, 16, 3), seed=4)
  new = _split(B.BandProjector(16, 16, 4), z)
  old = _split(B.BandProjector(16, 16, 4, band_split="residual_bandpass"), z)
  # Band 0 is the same low-pass 1 - s_1 in both; the higher bands differ.
  np.testing.assert_allclose(new[0], old[0], atol=1e-6)
  assert np.max(np.abs(new[3] - old[3])) > 0.05
  with pytest.raises(ValueError, match="band_split"):
    B.BandProjector(16, 16, band_split="bandpass")


@pytest.mark.parametrize("split", B.BAND_SPLITS)
def test_operator_real_symmetric_and_sums_to_identity(split):
  op64 = B.band_operator(B.radial_masks(16, 12, 4), split)
  assert op64.shape == (4, 192, 192) and op64.dtype == np.float64
  # Even radial multipliers -> even real kernels -> symmetric circulant blocks.
  np.testing.assert_allclose(op64, np.swapaxes(op64, 1, 2), atol=1e-12)
  np.testing.assert_allclose(op64.sum(0), np.eye(192), atol=1e-12)
  p = B.BandProjector(16, 12, 4, band_split=split)
  assert p.operator.dtype == np.float32 and p.operator.shape == (4, 192, 192)
  np.testing.assert_allclose(p.operator, op64, atol=1e-7)


def test_split_first_band_and_grid_check():
  z = _random_latent((2, 8, 8, 3))
  for method in ["fft", "matmul", "dense", "separable"]:
    p = B.BandProjector(8, 8, 4, method=method)
    full = _split(p, z)
    np.testing.assert_allclose(_split(p, z, first_band=2), full[2:], atol=1e-6)
    with pytest.raises(ValueError, match="grid"):
      _split(p, _random_latent((2, 8, 6, 3)))


def _band_energy_fractions(bands):
  """Fraction of the total energy in each band."""
  e = np.sum(np.square(np.asarray(bands, np.float64)), axis=tuple(range(1, bands.ndim)))
  return e / e.sum()


def test_band_energy_smooth_image(photo_batch):
  # A smooth image: the photos at 32x32, Gaussian-blurred, mean removed (DC would make it trivial).
  grid = _photo_grid(photo_batch, 32)
  smooth = scipy.ndimage.gaussian_filter(grid, sigma=(0, 1.5, 1.5, 0), mode="wrap")
  smooth = (smooth - smooth.mean(axis=(1, 2), keepdims=True)).astype(np.float32)
  frac = _band_energy_fractions(_split(B.BandProjector(32, 32, 4), smooth))
  assert frac[0] > 0.9, frac
  assert frac[1] > frac[2] and frac[1] > frac[3], frac
  assert np.all(frac[1:] < 0.05), frac
  # A single low-frequency cosine lies entirely in band 0.
  x = np.cos(2 * np.pi * np.arange(32) / 32).astype(np.float32)
  wave = np.broadcast_to(x[None, None, :, None], (1, 32, 32, 1))
  frac = _band_energy_fractions(_split(B.BandProjector(32, 32, 4), wave))
  assert frac[0] > 0.999, frac


def test_residual_bandpass_split_leaks_edge_transitions_into_last_band():
  # Pins the old, literal reading (band_split="residual_bandpass"): applying M_k to the residual
  # r_k gives G_k = M_k prod_{j<k}(1 - M_j), so at every edge e_k (M_{k-1} = M_k = 1/2 there) a
  # quarter of the amplitude is taken by no intermediate band and ends up in the last band.
  g = B.band_multipliers(B.radial_masks(1, 4001, 4, tau=0.02), "residual_bandpass")[:, 0, :2001]
  rho = np.abs(np.fft.fftfreq(4001)[:2001]) / 0.5
  for e in B.BandProjector(16, 16, 4).edges[:2]:
    i = np.argmin(np.abs(rho - e))
    np.testing.assert_allclose(g[-1, i], 0.25, atol=0.01)
  np.testing.assert_allclose(g.sum(0), 1.0, atol=1e-12)
  np.testing.assert_allclose(g[0], B.radial_masks(1, 4001, 4)[0, 0, :2001], atol=1e-12)


def _outside_fraction(mult, rho, num_bands, tau=0.02):
  """Per band: fraction of sum_f G_k(f)^2 at radii outside [e_k - 4 tau, e_{k+1} + 4 tau]."""
  bounds = [0.0] + [k * np.sqrt(2) / num_bands for k in range(1, num_bands)] + [np.sqrt(2)]
  out = []
  for k in range(num_bands):
    inside = (rho >= bounds[k] - 4 * tau) & (rho <= bounds[k + 1] + 4 * tau)
    g2 = np.square(mult[k])
    out.append(g2[~inside].sum() / g2.sum())
  return np.array(out)


@pytest.mark.parametrize("k", [2, 4, 8])
def test_lowpass_bands_are_disjoint_annuli(k):
  # Fine 512 x 512 grid (the continuous multipliers) and the 16 x 16 DINOv2-B latent grid.
  for n in (512, 16):
    rho, _, s = _steps(n, n, k)
    new = B.band_multipliers(B.radial_masks(n, n, k))
    assert np.all(_outside_fraction(new, rho, k) < 1e-3), _outside_fraction(new, rho, k)
    # Closed form: G_k = (1 - s_{k+1}) prod_{j<=k} s_j, with s_0 = 1 and s_K = 0.
    full = [np.ones_like(rho)] + s + [np.zeros_like(rho)]
    ref = [(1 - full[j + 1]) * np.prod(full[1:j + 1], axis=0) for j in range(k)]
    np.testing.assert_allclose(new, np.stack(ref), atol=1e-12)
    old = B.band_multipliers(B.radial_masks(n, n, k), "residual_bandpass")
    if k == 2:
      # One step only: both splits apply 1 - s_1 to z.
      np.testing.assert_allclose(old, new, atol=1e-15)
    else:
      # The same bound fails for the old split: its last band collects every edge transition.
      assert _outside_fraction(old, rho, k)[-1] > 1e-2
  # At the default K = 4 each band's multiplier is its nominal mask M_k to 1e-7.
  np.testing.assert_allclose(B.band_multipliers(B.radial_masks(512, 512, 4)),
                             B.radial_masks(512, 512, 4), atol=1e-7)


def test_photo_latent_last_band_share_drops(photo_batch):
  # Real photos patchified to a (4, 16, 16, 768) grid, per-image channel mean removed. Share of the
  # energy partition sum_f G_k |Z_f|^2 in the last band (bench/band_energy.py measures more).
  z = _photo_latent(photo_batch).astype(np.float64)
  z = z - z.mean(axis=(1, 2), keepdims=True)
  spec = np.sum(np.abs(np.fft.fft2(z, axes=(1, 2))) ** 2, axis=(0, 3))
  for k, ratio in ((4, 0.7), (8, 0.2)):
    share = {split: np.sum(B.BandProjector(16, 16, k, band_split=split).multipliers[-1] * spec)
             / spec.sum() for split in B.BAND_SPLITS}
    assert share["lowpass"] < ratio * share["residual_bandpass"], (k, share)
    new = _band_energy_fractions(_split(B.BandProjector(16, 16, k), z.astype(np.float32)))
    old = _band_energy_fractions(
        _split(B.BandProjector(16, 16, k, band_split="residual_bandpass"), z.astype(np.float32)))
    assert new[-1] < old[-1], (k, new, old)


def test_band_energy_white_noise():
  p = B.BandProjector(16, 16, 4)
  frac = _band_energy_fractions(_split(p, _random_latent((8, 16, 16, 64), seed=3)))
  # White noise: band k's expected share is mean_f G_k(f)^2 / sum_k mean_f G_k(f)^2.
  g2 = np.square(B.band_multipliers(B.radial_masks(16, 16, 4))).mean(axis=(1, 2))
  np.testing.assert_allclose(frac, g2 / g2.sum(), atol=0.02)
  assert np.all(frac > 0.05), frac
  assert np.all(frac < 0.6), frac


def test_split_sharded_matches_single_device():
  mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  z = _random_latent((8, 16, 16, 4), seed=5)
  zs = jax.device_put(z, sharding)
  for method in ["fft", "matmul"]:
    p = B.BandProjector(16, 16, 4, method=method)
    single = np.asarray(jax.jit(p.split)(z))
    sharded = jax.jit(p.split)(zs)
    assert len(sharded.sharding.device_set) == 8
    np.testing.assert_allclose(np.asarray(sharded), single, atol=1e-6)


# ------------------------------------------------------------------ noise


def test_noise_leaves_semantic_bands_bit_identical():
  p = B.BandProjector(16, 16, 4)
  bands = p.split(_random_latent((4, 16, 16, 8)))
  for k_base in [1, 2]:
    noisy = np.asarray(B.inject_band_noise(bands, jax.random.key(0), p, k_base=k_base))
    assert noisy.shape == bands.shape and noisy.dtype == np.float32
    for k in range(4):
      if k < k_base:
        assert np.array_equal(noisy[k], np.asarray(bands[k]))
      else:
        assert not np.allclose(noisy[k], np.asarray(bands[k]))


def test_noise_off_in_eval_and_edge_cases():
  p = B.BandProjector(16, 16, 4)
  bands = p.split(_random_latent((4, 16, 16, 8)))
  rng = jax.random.key(1)
  assert B.inject_band_noise(bands, rng, p, deterministic=True) is bands
  assert B.inject_band_noise(bands, rng, p, k_base=4) is bands
  for kwargs in [dict(p_band=0.0), dict(tau_noise=0.0)]:
    np.testing.assert_array_equal(np.asarray(B.inject_band_noise(bands, rng, p, **kwargs)),
                                  np.asarray(bands))


def test_noise_is_band_limited_and_scaled():
  p = B.BandProjector(16, 16, 4)
  bands = np.asarray(p.split(_random_latent((16, 16, 16, 32))))
  diff = np.asarray(B.inject_band_noise(bands, jax.random.key(2), p, k_base=0)) - bands
  # Summed over bands the noise is sigma_b * eps_b with sigma_b = 0.8 u_b <= 0.8.
  std = diff.sum(0).std(axis=(1, 2, 3))
  assert np.all(std < 0.8 * 1.1) and std.max() > 0.3
  # Each band's noise stays in its annulus (within 4 tau of its edges); the old residual band-pass
  # split fails this for the last band, whose noise then reaches down to band 0's edge.
  rho = _steps(16, 16, 4)[0]
  old = B.BandProjector(16, 16, 4, band_split="residual_bandpass")
  diff_old = np.asarray(B.inject_band_noise(old.split(bands.sum(0)), jax.random.key(2), old,
                                            k_base=0)) - np.asarray(old.split(bands.sum(0)))
  for d, bound in ((diff, 1e-3), (diff_old, None)):
    # RMS amplitude spectrum per band over samples and channels: (K, H, W).
    amp = np.sqrt(np.mean(np.abs(np.fft.fft2(d, axes=(2, 3))) ** 2, axis=(1, 4)))
    frac = _outside_fraction(amp, rho, 4)
    if bound:
      assert np.all(frac < bound), frac
    else:
      assert frac[-1] > 1e-2, frac
  # Independent per-band Bernoulli masks: with p_band=0.5 some (band, sample) pairs are clean.
  diff = np.asarray(B.inject_band_noise(bands, jax.random.key(3), p, p_band=0.5)) - bands
  clean = np.all(diff[1:] == 0, axis=(2, 3, 4))
  assert clean.any() and not clean.all()


def test_noise_jits_with_static_projector():
  p = B.BandProjector(8, 8, 4)
  bands = p.split(_random_latent((2, 8, 8, 4)))
  f = jax.jit(B.inject_band_noise, static_argnames=("projector", "k_base", "deterministic"))
  out = f(bands, jax.random.key(0), projector=p, k_base=1)
  np.testing.assert_allclose(out, B.inject_band_noise(bands, jax.random.key(0), p), atol=1e-6)
  assert np.array_equal(np.asarray(out[0]), np.asarray(bands[0]))


# ------------------------------------------------------------------ DCT / zig-zag


def test_dct_matrix_orthonormal_and_matches_scipy():
  for n in [1, 5, 16]:
    m = B.dct_matrix(n)
    np.testing.assert_allclose(m @ m.T, np.eye(n), atol=1e-12)
    np.testing.assert_allclose(m, scipy.fft.dct(np.eye(n), type=2, norm="ortho", axis=0),
                               atol=1e-12)


def test_dct2_matches_scipy_and_round_trips():
  z = _random_latent((2, 16, 12, 5), seed=7)
  f = np.asarray(B.dct2(z))
  ref = scipy.fft.dctn(z.astype(np.float64), type=2, norm="ortho", axes=(1, 2))
  assert np.max(np.abs(f - ref)) <= 1e-5
  assert np.max(np.abs(np.asarray(B.idct2(f)) - z)) <= 1e-5


def test_zigzag_first_entries():
  order = B.zigzag_order(16, 16)
  assert list(order[:12]) == [0, 16, 1, 2, 17, 32, 48, 33, 18, 3, 4, 19]
  assert sorted(order) == list(range(256))
  rank = B.zigzag_rank(16, 16)
  assert rank.shape == (16, 16) and rank[0, 0] == 0 and rank[1, 0] == 1 and rank[0, 1] == 2
  np.testing.assert_array_equal(rank.reshape(-1)[order], np.arange(256))
  # Non-square grids: still a permutation, diagonal by diagonal.
  order = B.zigzag_order(4, 6)
  assert sorted(order) == list(range(24))
  s = [(i // 6) + (i % 6) for i in order]
  assert s == sorted(s)


def _prefix_set(k):
  """The first k zig-zag positions of the 16x16 grid as a set of (ky, kx)."""
  return {divmod(int(i), 16) for i in B.zigzag_order(16, 16)[:k]}


def test_zigzag_prefixes_from_reference():
  diag = lambda smax: {(y, x) for y in range(16) for x in range(16) if y + x <= smax}
  assert _prefix_set(36) == diag(7)
  assert len(diag(9)) == 55
  assert _prefix_set(64) == diag(9) | {(y, 10 - y) for y in range(0, 9)}  # (0,10) .. (8,2)
  assert len(diag(14)) == 120
  assert _prefix_set(128) == diag(14) | {(15 - i, i) for i in range(0, 8)}  # (15,0) .. (8,7)


def test_dct_lowpass():
  z = _random_latent((3, 16, 16, 4), seed=8)
  # Keep everything: identity; keep only DC: the per-channel spatial mean.
  np.testing.assert_allclose(B.dct_lowpass(z, 256), z, atol=1e-5)
  np.testing.assert_allclose(B.dct_lowpass(z, 1), np.broadcast_to(
      z.mean(axis=(1, 2), keepdims=True), z.shape), atol=1e-5)
  # Per-sample keep: each sample keeps exactly its own prefix (same mask for every channel).
  keep = np.array([1, 36, 64])
  out = np.asarray(B.dct_lowpass(z, keep))
  for b in range(3):
    f = scipy.fft.dctn(out[b:b + 1].astype(np.float64), norm="ortho", axes=(1, 2))
    fz = scipy.fft.dctn(z[b:b + 1].astype(np.float64), norm="ortho", axes=(1, 2))
    kept = (B.zigzag_rank(16, 16) < keep[b])[None, :, :, None]
    np.testing.assert_allclose(f, np.where(kept, fz, 0.0), atol=1e-5)
  with pytest.raises(ValueError, match="keep"):
    B.dct_lowpass(z, np.array([1, 2]))


_OFFICIAL = dict(count=36, count_min=32, count_max=40, apply_prob=0.5)


def test_official_mask_eval_is_deterministic():
  z = _random_latent((2, 16, 16, 4), seed=9)
  apply, keep = B.official_keep_counts(jax.random.key(0), 2, False, **_OFFICIAL)
  assert bool(apply) and keep.tolist() == [36, 36]
  out0 = np.asarray(B.official_band_mask(z, jax.random.key(0), False, **_OFFICIAL))
  out1 = np.asarray(B.official_band_mask(z, jax.random.key(1), False, **_OFFICIAL))
  np.testing.assert_array_equal(out0, out1)
  np.testing.assert_allclose(out0, B.dct_lowpass(z, 36), atol=1e-7)
  assert np.max(np.abs(out0 - z)) > 0.1  # the eval mask really low-passes


def test_official_mask_train_counts_and_coin():
  keys = jax.random.split(jax.random.key(0), 400)
  draw = jax.jit(jax.vmap(lambda k: B.official_keep_counts(k, 16, True, **_OFFICIAL)))
  apply, keep = map(np.asarray, draw(keys))
  assert keep.min() == 32 and keep.max() == 40  # inclusive on both ends
  assert 0.4 < apply.mean() < 0.6  # one coin per batch, p = 0.5
  assert len(np.unique(keep[0])) > 1  # per-sample draws
  _, keep = B.official_keep_counts(jax.random.key(1), 16, True, per_sample=False, **_OFFICIAL)
  assert len(np.unique(np.asarray(keep))) == 1


def test_official_mask_train_output():
  z = _random_latent((4, 16, 16, 4), seed=11)
  rng = jax.random.key(3)
  cfg = dict(_OFFICIAL, apply_prob=0.0)
  np.testing.assert_array_equal(np.asarray(B.official_band_mask(z, rng, True, **cfg)), z)
  cfg = dict(_OFFICIAL, apply_prob=1.0)
  _, keep = B.official_keep_counts(rng, 4, True, **cfg)
  np.testing.assert_allclose(B.official_band_mask(z, rng, True, **cfg), B.dct_lowpass(z, keep),
                             atol=1e-7)
  assert B.official_band_mask(z, rng, True, enabled=False, **cfg) is z


# ------------------------------------------------------------------ semantic losses


def test_zigzag_lowfreq_mse():
  s = _random_latent((2, 16, 16, 6), seed=12)
  t = _random_latent((2, 16, 16, 6), seed=13)
  assert float(semantic.zigzag_lowfreq_mse(s, s)) == 0.0
  for k in [36, 64, 128]:
    fs = scipy.fft.dctn(s.astype(np.float64), norm="ortho", axes=(1, 2)).reshape(2, 256, 6)
    ft = scipy.fft.dctn(t.astype(np.float64), norm="ortho", axes=(1, 2)).reshape(2, 256, 6)
    idx = B.zigzag_order(16, 16)[:k]
    ref = np.mean((fs[:, idx] - ft[:, idx]) ** 2)
    np.testing.assert_allclose(float(semantic.zigzag_lowfreq_mse(s, t, first_k=k)), ref,
                               rtol=1e-6)


def test_band_semantic_mse():
  s = _random_latent((4, 2, 8, 8, 3), seed=14)
  t = _random_latent((4, 2, 8, 8, 3), seed=15)
  for k_base in [1, 2, 4]:
    ref = np.mean([np.mean((s[k].astype(np.float64) - t[k]) ** 2) for k in range(k_base)])
    np.testing.assert_allclose(float(semantic.band_semantic_mse(s, t, k_base)), ref, rtol=1e-6)
  assert float(semantic.band_semantic_mse(s, s, 1)) == 0.0
  with pytest.raises(ValueError, match="k_base"):
    semantic.band_semantic_mse(s, t, 0)
