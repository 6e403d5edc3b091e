"""PSNR / SSIM / LPIPS evaluation metrics against scikit-image on real photo pairs."""
import io

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from uae_jax.evaluate import metrics
from uae_jax.models import lpips as lpips_lib


def _jpeg(img: np.ndarray, quality: int = 20) -> np.ndarray:
  """Re-encodes a [0, 1] float HWC image as JPEG and decodes it back to [0, 1] float."""
  buf = io.BytesIO()
  Image.fromarray(np.round(img * 255).astype(np.uint8)).save(buf, "JPEG", quality=quality)
  return np.asarray(Image.open(buf), np.float32) / 255.0


@pytest.fixture(scope="module")
def jpeg_batch(photo_batch):
  """JPEG-q20 re-encodings of photo_batch."""
  return np.stack([_jpeg(im) for im in photo_batch])


# Jitted once per shape: un-jitted JAX compiles one small program per operation, which costs
# more than the single compile of the whole function.
_psnr = jax.jit(metrics.psnr)
_ssim = jax.jit(metrics.ssim)
_ssim_tm = jax.jit(metrics.ssim_torchmetrics_convention)
_to_uint8 = jax.jit(metrics.to_uint8, static_argnums=1)
_lpips = jax.jit(lpips_lib.lpips_distance)


def _sk_ssim(a, b, **kw):
  """scikit-image SSIM in the Gaussian (Wang et al.) convention."""
  return structural_similarity(a.astype(np.float64), b.astype(np.float64), data_range=1.0,
                               channel_axis=-1, gaussian_weights=True, sigma=1.5,
                               use_sample_covariance=False, **kw)


def test_psnr_matches_skimage(photo_batch, jpeg_batch):
  ours = np.asarray(_psnr(photo_batch, jpeg_batch))
  ref = [peak_signal_noise_ratio(a.astype(np.float64), b.astype(np.float64), data_range=1)
         for a, b in zip(photo_batch, jpeg_batch)]
  assert ours.shape == (4,)
  np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-4)
  # Astronaut vs JPEG-q20: 27.42623 dB from dm-pix, scikit-image and torchmetrics alike (same crop;
  # docs/method.md#reference-values).
  assert abs(ours[0] - 27.42623) < 1e-4
  # uint8 inputs give the same numbers (no uint8 wrap-around in the difference).
  p8, j8 = np.asarray(_to_uint8(photo_batch, "round")), np.asarray(_to_uint8(jpeg_batch, "round"))
  u8 = _psnr(p8, j8)
  pairs = zip(p8, j8)
  ref_u8 = [peak_signal_noise_ratio(a, b, data_range=255) for a, b in pairs]
  np.testing.assert_allclose(u8, ref_u8, rtol=0, atol=1e-4)
  assert float(_psnr(photo_batch[0], photo_batch[0])) == pytest.approx(100.0)


def test_ssim_matches_skimage(photo_batch, jpeg_batch):
  ours = np.asarray(_ssim(photo_batch, jpeg_batch))
  ref = [_sk_ssim(a, b) for a, b in zip(photo_batch, jpeg_batch)]
  np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-4)
  assert float(_ssim(photo_batch[:1], photo_batch[:1])[0]) == pytest.approx(1.0, abs=1e-6)


def test_ssim_torchmetrics_convention(photo_batch, jpeg_batch):
  ours = np.asarray(_ssim_tm(photo_batch, jpeg_batch))
  # Independent reference: skimage's full map on the reflect-padded pair, minus the 5 px frame
  # (there the 11x11 window never reaches the padded border), averaged like torchmetrics.
  ref = []
  for a, b in zip(photo_batch, jpeg_batch):
    pa, pb = (np.pad(v, ((5, 5), (5, 5), (0, 0)), mode="reflect") for v in (a, b))
    _, full = _sk_ssim(pa, pb, full=True)
    ref.append(full[5:-5, 5:-5].mean())
  np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-4)
  # torchmetrics 1.9.0 gave 0.866380 for astronaut (docs/method.md#reference-values).
  assert abs(ours[0] - 0.866380) < 1e-4
  gap = np.abs(ours - np.asarray(_ssim(photo_batch, jpeg_batch)))
  assert np.all(gap > 5e-4) and np.all(gap < 1e-2)


def test_to_uint8_round_vs_truncate():
  x = np.array([0.0, 0.5, 1 / 510, 0.999, 254.5 / 255, 254.49 / 255, 7 / 255, 1.0, 1.3, -0.2],
               np.float32)
  np.testing.assert_array_equal(metrics.to_uint8(x, "round"),
                                [0, 128, 1, 255, 255, 254, 7, 255, 255, 0])
  np.testing.assert_array_equal(metrics.to_uint8(x, "truncate"),
                                [0, 127, 0, 254, 254, 254, 7, 255, 255, 0])
  assert metrics.to_uint8(x).dtype == jnp.uint8
  # Exact uint8 levels survive both quantisers.
  levels = np.arange(256, dtype=np.float32) / 255
  for mode in ("round", "truncate"):
    np.testing.assert_array_equal(metrics.to_uint8(levels, mode), np.arange(256))
  with pytest.raises(ValueError, match="mode"):
    metrics.to_uint8(x, "nearest")


def test_reconstruction_metrics(photo_batch, jpeg_batch):
  params = lpips_lib.load_lpips_params()
  x = photo_batch[:, 64:128, 64:128]
  # A continuous-valued "reconstruction" (not on uint8 levels) so the quantiser matters.
  noise = np.random.default_rng(0).normal(0, 2 / 255, x.shape).astype(np.float32)
  x_hat = np.clip(x + noise, 0, 1)
  fn = jax.jit(metrics.reconstruction_metrics, static_argnames="uint8_mode")
  out = fn(params, x_hat, x)
  x8 = np.asarray(metrics.to_uint8(x))
  xh8 = np.asarray(metrics.to_uint8(x_hat, "round"))
  ref_psnr = [peak_signal_noise_ratio(a, b, data_range=255) for a, b in zip(x8, xh8)]
  ref_ssim = [_sk_ssim(a / 255.0, b / 255.0) for a, b in zip(x8, xh8)]
  ref_lpips = _lpips(params, x8 / 127.5 - 1, xh8 / 127.5 - 1)
  np.testing.assert_allclose(out["psnr"], ref_psnr, rtol=0, atol=1e-4)
  np.testing.assert_allclose(out["ssim"], ref_ssim, rtol=0, atol=1e-4)
  np.testing.assert_allclose(out["lpips"], ref_lpips, rtol=0, atol=1e-5)
  same = fn(params, x, x)
  np.testing.assert_allclose(same["psnr"], 100.0, rtol=1e-6)
  np.testing.assert_allclose(same["ssim"], 1.0, atol=1e-6)
  np.testing.assert_allclose(same["lpips"], 0.0, atol=1e-10)  # ~1e-16 of XLA:CPU rounding.


# A second compile of the whole metric set (LPIPS included) for the other quantiser. By default
# truncation is checked by test_to_uint8_round_vs_truncate and end to end by the recon CLI test
# (tests/test_evaluate.py, `--uint8 truncate` against scikit-image / lpips-jax).
@pytest.mark.slow
def test_truncation_loses_psnr_to_rounding(photo_batch):
  params = lpips_lib.load_lpips_params()
  x = photo_batch[:, 64:128, 64:128]
  noise = np.random.default_rng(0).normal(0, 2 / 255, x.shape).astype(np.float32)
  x_hat = np.clip(x + noise, 0, 1)
  fn = jax.jit(metrics.reconstruction_metrics, static_argnames="uint8_mode")
  # Truncation floors every pixel (half a level low on average), so it loses PSNR to rounding.
  trunc, out = fn(params, x_hat, x, uint8_mode="truncate"), fn(params, x_hat, x)
  assert np.all(np.asarray(trunc["psnr"]) < np.asarray(out["psnr"]))
  xt8 = np.asarray(_to_uint8(x_hat, "truncate"))
  ref = [peak_signal_noise_ratio(a, b, data_range=255)
         for a, b in zip(np.asarray(_to_uint8(x, "round")), xt8)]
  np.testing.assert_allclose(trunc["psnr"], ref, rtol=0, atol=1e-4)


def test_reconstruction_metrics_collection_means():
  rng = np.random.default_rng(0)
  batches = [{k: rng.uniform(0, 30, 4).astype(np.float32) for k in ("psnr", "ssim", "lpips")}
             for _ in range(3)]
  # The last batch is padded: only its first two entries are real images.
  masks = [np.ones(4, bool), np.ones(4, bool), np.array([1, 1, 0, 0], bool)]
  acc = metrics.ReconstructionMetrics.empty()
  for b, m in zip(batches, masks):
    acc = acc.merge(metrics.ReconstructionMetrics.single_from_model_output(
        **{k: jnp.asarray(v) for k, v in b.items()}, mask=jnp.asarray(m)))
  got = acc.compute()
  for k in ("psnr", "ssim", "lpips"):
    expected = np.concatenate([b[k][m] for b, m in zip(batches, masks)]).mean()
    np.testing.assert_allclose(got[k], expected, rtol=1e-6)
