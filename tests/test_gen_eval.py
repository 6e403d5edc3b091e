"""Generation evaluation suite (ADM evaluator definitions) vs independent references.

* precision/recall: a numpy implementation written here from Kynkaenniemi et al.'s definition
  (k-th nearest neighbour radius within each set, self excluded; a point is covered if it lies in
  some ball of the other set, boundary included), on clouds with known overlap, and torch-fidelity
  0.4.0's `calculate_precision_recall_full` (stored in tests/golden/inception_golden.npz);
* Inception Score: a numpy reference on fixed logits (10 splits, mean and std), torch-fidelity's
  `isc_features_to_metric`, and the closed form of a confident, class-balanced set;
* Frechet distance vs its closed form for commuting covariances;
* the file readers: exact streamed reads, and one clear error per kind of bad input;
* slow: end-to-end `gen` on real photos, and 2 JAX processes vs 1 (same five numbers).
The Inception taps themselves (pool / spatial / logits, both preprocessing protocols) are checked
against pytorch-fid and torch-fidelity in tests/test_inception.py.
"""
import json
import os
import socket
import subprocess
import sys
import zipfile

import jax
import numpy as np
import pytest

from uae_jax.errors import LoadError
from uae_jax.evaluate import cli
from uae_jax.evaluate import fid as fid_lib
from uae_jax.evaluate import gen_eval
from uae_jax.evaluate import inception as inc

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(HERE, "golden"))
import make_inception_golden as golden  # noqa: E402


@pytest.fixture(scope="module")
def gold():
  with np.load(os.path.join(HERE, "golden", "inception_golden.npz"), allow_pickle=False) as z:
    return {k: z[k] for k in z.files}


# ------------------------------------------------------------------------------------------------
# Independent references.


def np_precision_recall(real, fake, k=3):
  """Kynkaenniemi et al. 2019 by definition, float64, all pairs at once."""
  real, fake = np.asarray(real, np.float64), np.asarray(fake, np.float64)

  def d2(a, b):
    return ((a[:, None, :] - b[None, :, :]) ** 2).sum(-1)

  # Radius = distance to the k-th nearest *other* point: sorted row incl. self (0) at index k.
  r_real = np.sort(d2(real, real), axis=1)[:, k]
  r_fake = np.sort(d2(fake, fake), axis=1)[:, k]
  precision = np.mean([np.any(d2(f[None], real)[0] <= r_real) for f in fake])
  recall = np.mean([np.any(d2(r[None], fake)[0] <= r_fake) for r in real])
  return float(precision), float(recall)


def np_inception_score(logits, num_splits=10):
  """improved-GAN IS by definition: per split exp(E KL(p(y|x) || p(y))); mean and std."""
  x = np.asarray(logits, np.float64)
  p = np.exp(x - x.max(1, keepdims=True))
  p /= p.sum(1, keepdims=True)
  scores = []
  for part in np.array_split(p, num_splits):
    py = part.mean(0)
    kl = [sum(pi * np.log(pi / qi) for pi, qi in zip(row, py) if pi > 0) for row in part]
    scores.append(np.exp(np.mean(kl)))
  return float(np.mean(scores)), float(np.std(scores))


@pytest.fixture(scope="module")
def pr8():
  return gen_eval.ManifoldPR(gen_eval.make_mesh(), k=3, chunk=64)


# ------------------------------------------------------------------------------------------------
# Precision / recall.


def test_precision_recall_matches_numpy_definition(pr8):
  rng = np.random.default_rng(0)
  real = rng.standard_normal((300, 32)).astype(np.float32)
  fake = (rng.standard_normal((250, 32)) + 0.3).astype(np.float32)
  ours = pr8(real, fake)
  ref = np_precision_recall(real, fake)
  assert ours == ref, (ours, ref)
  assert 0.2 < ref[0] < 1.0 and 0.2 < ref[1] < 1.0  # a genuinely partial overlap


def test_precision_recall_disjoint_identical_and_duplicates(pr8):
  rng = np.random.default_rng(1)
  real = rng.standard_normal((120, 16)).astype(np.float32)
  assert pr8(real, real + 100.0) == (0.0, 0.0)
  assert pr8(real, real.copy()) == (1.0, 1.0)
  # Duplicated points count as neighbours (radius 0 for a 4-fold duplicate), as ADM's partition.
  dup = np.repeat(real[:30], 4, axis=0)
  # (ADM's |u|^2 - 2 u.v + |v|^2 leaves float32 round-off, ~1e-7 of |u|^2 ~ 16, instead of 0.)
  np.testing.assert_allclose(pr8.radii(dup), 0.0, atol=1e-5)
  assert pr8(real, dup) == np_precision_recall(real, dup)


def test_float16_distances_as_adm_with_float32_fallback(pr8):
  rng = np.random.default_rng(7)
  # The shapes of test_precision_recall_matches_numpy_definition: the float32 side reuses pr8's
  # compiled kernels, only the float16 ones compile here.
  real = rng.standard_normal((300, 32)).astype(np.float32)
  fake = (rng.standard_normal((250, 32)) + 0.3).astype(np.float32)
  f32 = pr8
  f16 = gen_eval.ManifoldPR(gen_eval.make_mesh(), k=3, chunk=64, distance_dtype="float16")
  # float16 rounding only moves boundary points.
  np.testing.assert_allclose(f16(real, fake), f32(real, fake), atol=0.03)
  # Squared norms ~3e6 overflow float16 (max 65504): every chunk falls back to float32 exactly.
  big_r, big_f = real * 300, fake * 300
  assert f16(big_r, big_f) == f32(big_r, big_f)


def test_precision_recall_matches_torch_fidelity(gold, pr8):
  ours = pr8(gold["prc_real"], gold["prc_fake"])
  # torch-fidelity's means are float32: 0.88 is stored as 0.87999999523.
  np.testing.assert_allclose(ours, (gold["prc_precision"], gold["prc_recall"]), rtol=1e-7)
  assert 0 < ours[0] < 1 and 0 < ours[1] < 1


def test_sharding_and_chunking_do_not_change_radii(pr8):
  rng = np.random.default_rng(2)
  x = rng.standard_normal((203, 24)).astype(np.float32)  # not a multiple of 8 devices or chunks
  one = gen_eval.ManifoldPR(gen_eval.make_mesh(jax.devices()[:1]), k=3, chunk=1000)
  # Different shapes may change XLA's matmul summation order: equal up to float32 round-off.
  np.testing.assert_allclose(pr8.radii(x), one.radii(x), rtol=1e-6)
  ref = np.sort(((x[:, None].astype(np.float64) - x[None]) ** 2).sum(-1), axis=1)[:, 3]
  np.testing.assert_allclose(pr8.radii(x), ref, rtol=2e-5)


# ------------------------------------------------------------------------------------------------
# Inception Score, Frechet distance.


def test_inception_score_matches_numpy_reference():
  rng = np.random.default_rng(3)
  logits = 4.0 * rng.standard_normal((250, 40))
  ref = np_inception_score(logits, 10)
  # ADM: consecutive splits of `split_size` (25 -> 10 splits); equal splits when None.
  for ours in (gen_eval.inception_score(logits, split_size=25),
               gen_eval.inception_score(logits, split_size=None, num_splits=10)):
    np.testing.assert_allclose(ours, ref, rtol=1e-10)
  assert ref[1] > 0.01  # the splits differ, so the std is checked too


def test_inception_score_matches_torch_fidelity(gold):
  ours = gen_eval.inception_score(gold["isc_logits"], split_size=None, num_splits=10)
  np.testing.assert_allclose(ours, (gold["isc_mean"], gold["isc_std"]), rtol=1e-9)


def test_confident_class_balanced_set_scores_number_of_classes():
  classes = inc.NUM_LOGITS
  labels = np.tile(np.arange(classes), 10)  # each split of 1008 holds every class once
  logits = np.where(np.arange(classes)[None] == labels[:, None], 1000.0, 0.0)
  mean, std = gen_eval.inception_score(logits, split_size=classes)
  assert mean == pytest.approx(classes, rel=1e-12) and std == pytest.approx(0.0, abs=1e-9)
  # One class only: IS 1.
  assert gen_eval.inception_score(logits[:1].repeat(50, 0), split_size=10)[0] == \
      pytest.approx(1.0)


@pytest.mark.parametrize("method", ["sqrtm", "eigh"])
def test_frechet_distance_closed_form(method):
  rng = np.random.default_rng(4)
  d = 24
  q, _ = np.linalg.qr(rng.standard_normal((d, d)))
  l1, l2 = rng.uniform(0.1, 3.0, d), rng.uniform(0.1, 3.0, d)
  mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
  s1, s2 = (q * l1) @ q.T, (q * l2) @ q.T  # commuting: sqrt(s1 s2) = Q diag(sqrt(l1 l2)) Q^T
  closed = np.sum((mu1 - mu2) ** 2) + np.sum(l1 + l2 - 2 * np.sqrt(l1 * l2))
  got = fid_lib.frechet_distance(mu1, s1, mu2, s2, method=method)
  assert got == pytest.approx(closed, rel=1e-9)


def test_mean_cov_is_float64_numpy_cov():
  rng = np.random.default_rng(5)
  f = (rng.standard_normal((1000, 12)) * 50 + 1e3).astype(np.float32)
  mu, sigma = gen_eval.mean_cov(f, chunk=128)
  np.testing.assert_allclose(mu, f.astype(np.float64).mean(0), rtol=1e-12)
  np.testing.assert_allclose(sigma, np.cov(f.astype(np.float64), rowvar=False), rtol=1e-8)


# ------------------------------------------------------------------------------------------------
# Files: streamed reading and bad inputs.


@pytest.mark.parametrize("compressed", [False, True])
def test_npz_images_streams_exact_rows(tmp_path, compressed):
  x = np.random.default_rng(6).integers(0, 256, (7, 5, 4, 3), dtype=np.uint8)
  path = str(tmp_path / "s.npz")
  (np.savez_compressed if compressed else np.savez)(path, x, np.arange(7))
  r = gen_eval.NpzImages(path)
  assert len(r) == 7 and r.shape == x.shape
  np.testing.assert_array_equal(r.read(4, 7), x[4:])
  np.testing.assert_array_equal(r.read(0, 3), x[:3])  # backwards seek
  r.close()
  assert gen_eval.label_summary(path)["sampling"] == "equal (1 per class)"


def _error(fn, *args):
  """The LoadError message raised by fn(*args)."""
  with pytest.raises(LoadError) as e:
    fn(*args)
  return str(e.value)


def test_bad_sample_files(tmp_path):
  p = str(tmp_path / "s.npz")
  np.savez(p, np.zeros((4, 8, 8, 3), np.float32))
  assert "float32" in (m := _error(gen_eval.NpzImages, p)) and p in m and "uint8" in m
  np.savez(p, np.zeros((4, 8, 8), np.uint8))
  assert "(4, 8, 8)" in _error(gen_eval.NpzImages, p)
  np.savez(p, images=np.zeros((4, 8, 8, 3), np.uint8))
  assert "no array 'arr_0'" in _error(gen_eval.NpzImages, p)
  np.savez(p, np.zeros((40, 8, 8, 3), np.uint8))
  data = open(p, "rb").read()
  with open(p, "wb") as f:
    f.write(data[: len(data) // 2])  # truncated download: the zip directory is gone
  assert "not a readable .npz" in (m := _error(gen_eval.NpzImages, p)) and p in m
  with open(p, "wb") as f:
    f.write(b"garbage" * 100)
  assert "not a readable .npz" in _error(gen_eval.NpzImages, p)
  assert "no such file" in _error(gen_eval.NpzImages, str(tmp_path / "missing.npz"))


def test_truncated_member_inside_a_valid_zip(tmp_path):
  p = str(tmp_path / "s.npz")
  x = np.zeros((10, 8, 8, 3), np.uint8)
  with zipfile.ZipFile(p, "w") as z:  # a header promising 10 images but only 5 images of data
    with z.open("arr_0.npy", "w") as f:
      np.lib.format.write_array_header_1_0(f, {"descr": "|u1", "fortran_order": False,
                                               "shape": x.shape})
      f.write(x[:5].tobytes())
  assert "truncated" in _error(gen_eval.NpzImages, p)


def test_bad_reference_files(tmp_path):
  p = str(tmp_path / "ref.npz")
  d = inc.FEATURE_DIM
  mu, sigma = np.zeros(d), np.eye(d)
  np.savez(p, mu=mu, sigma=sigma)
  ref = gen_eval.load_reference(p)  # our fid-stats layout: FID only
  assert ref.images is None and ref.spatial_stats is None and ref.pool_stats[0].shape == (d,)
  bad = sigma.copy()
  bad[3, 3] = np.nan
  np.savez(p, mu=mu, sigma=bad)
  assert "'sigma' contains 1 NaN" in (m := _error(gen_eval.load_reference, p)) and p in m
  np.savez(p, mu=mu, sigma=np.eye(d - 1))
  assert "does not match" in _error(gen_eval.load_reference, p)
  np.savez(p, mu=np.zeros(10), sigma=np.eye(10))
  assert "expected 2048" in _error(gen_eval.load_reference, p)
  np.savez(p, mu=mu)
  assert "no 'sigma'" in _error(gen_eval.load_reference, p)
  np.savez(p, mu=mu, sigma=sigma, mu_s=np.zeros(2023), sigma_s=np.eye(2000))
  assert "'sigma_s'" in _error(gen_eval.load_reference, p)
  np.savez(p, something=np.zeros(3))
  assert "neither statistics" in _error(gen_eval.load_reference, p)
  np.savez(p, mu=mu.astype("U1"), sigma=sigma)
  assert "dtype" in _error(gen_eval.load_reference, p)


def test_cli_reports_bad_input_as_one_line(tmp_path, capsys):
  s, r = str(tmp_path / "s.npz"), str(tmp_path / "r.npz")
  np.savez(s, np.zeros((4, 8, 8, 3), np.float64))
  np.savez(r, mu=np.zeros(2048), sigma=np.eye(2048))
  with pytest.raises(SystemExit) as e:
    cli.main(["gen", f"--samples={s}", f"--ref={r}"])
  assert e.value.code == 2
  err = capsys.readouterr().err.strip()
  assert err.count("\n") == 0 and s in err and "float64" in err


# ------------------------------------------------------------------------------------------------
# End to end (slow): real photos through the seeded Inception; 2 processes vs 1.


def _seeded_weights(gold):
  """The golden test's seeded FID Inception (with the 1008-way classifier), as a state dict."""
  shapes, offset = {}, 0
  for key, n in zip(gold["keys"], gold["shapes_len"]):
    shapes[str(key)] = tuple(int(d) for d in gold["shapes_flat"][offset:offset + n])
    offset += n
  return golden.random_state_dict(shapes, golden.SEED)


def _photo_sets(photos, n_ref=24, n_fake=20, size=64, seed=0):
  """Random crops of the bundled photos: a reference set and a partly different sample set."""
  from PIL import Image
  rng = np.random.default_rng(seed)
  names = sorted(photos)

  def crops(which, n):
    out = []
    for i in range(n):
      im = photos[which[i % len(which)]]
      s = int(rng.integers(min(im.shape[:2]) // 3, min(im.shape[:2])))
      y, x = rng.integers(0, im.shape[0] - s + 1), rng.integers(0, im.shape[1] - s + 1)
      out.append(np.asarray(Image.fromarray(im[y:y + s, x:x + s]).resize((size, size))))
    return np.stack(out).astype(np.uint8)
  return crops(names[:4], n_ref), crops(names[2:], n_fake)


@pytest.mark.slow
def test_gen_on_photos_matches_numpy_references(tmp_path, gold, photos):
  """Full pipeline; P/R and IS recomputed from its own features by the numpy references."""
  ref_imgs, fake_imgs = _photo_sets(photos)
  s, r = str(tmp_path / "s.npz"), str(tmp_path / "r.npz")
  np.savez(s, fake_imgs)
  np.savez(r, ref_imgs)
  variables = inc.convert_state_dict(_seeded_weights(gold))
  opts = gen_eval.GenEvalOptions(per_device_batch=2, fid_method="eigh", is_split_size=5,
                                 progress=False, cache_dir=str(tmp_path / "cache"))
  res = gen_eval.evaluate_generation(s, r, variables, opts)
  ext = gen_eval.GenFeatureExtractor(variables, "tf1", per_device_batch=2)
  fake = ext(gen_eval.NpzImages(s), progress=False)
  real = ext(gen_eval.NpzImages(r), progress=False)
  assert (res["precision"], res["recall"]) == np_precision_recall(real["pool"], fake["pool"])
  assert 0 < res["precision"] < 1 or 0 < res["recall"] < 1
  np.testing.assert_allclose(res["inception_score"], np_inception_score(fake["logits"], 4)[0],
                             rtol=1e-9)
  mu1, s1 = np.mean(fake["pool"].astype(np.float64), 0), np.cov(fake["pool"], rowvar=False)
  mu2, s2 = np.mean(real["pool"].astype(np.float64), 0), np.cov(real["pool"], rowvar=False)
  assert res["fid"] == pytest.approx(fid_lib.frechet_distance(mu1, s1, mu2, s2, method="eigh"),
                                     rel=1e-6)
  assert res["num_samples"] == 20 and res["num_reference_images"] == 24
  assert os.listdir(tmp_path / "cache")  # reference features cached; second run reads them
  again = gen_eval.evaluate_generation(s, r, variables, opts)
  assert again["fid"] == res["fid"] and again["sfid"] == res["sfid"]


DRIVER = """
import functools, os, sys
sys.path.insert(0, os.getcwd())
import jax
pid, nproc, port = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
jax.distributed.initialize = functools.partial(
    jax.distributed.initialize, coordinator_address=f"localhost:{port}", num_processes=nproc,
    process_id=pid)
from uae_jax.evaluate import cli
cli.main(sys.argv[4:])
"""


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_give_the_same_numbers_as_one(tmp_path, gold, photos):
  from uae_jax.convert import torch_io
  ref_imgs, fake_imgs = _photo_sets(photos, n_ref=18, n_fake=13, seed=1)
  s, r, w = str(tmp_path / "s.npz"), str(tmp_path / "r.npz"), str(tmp_path / "inc.safetensors")
  np.savez(s, fake_imgs, np.arange(13) % 4)
  np.savez(r, ref_imgs)
  torch_io.write_safetensors(_seeded_weights(gold), w)
  args = ["gen", f"--samples={s}", f"--ref={r}", f"--inception={w}", "--per-device-batch=2",
          "--fid-method=eigh", "--is-split-size=4", "--no-cache", "--no-progress", "--multihost"]
  port = _free_port()
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=2")
  logs = [open(tmp_path / f"p{i}.log", "w+") for i in range(2)]
  procs = [subprocess.Popen([sys.executable, "-c", DRIVER, str(i), "2", str(port), *args,
                             f"--out={tmp_path}/pod.json"], cwd=REPO, env=env, stdout=log,
                            stderr=subprocess.STDOUT) for i, log in enumerate(logs)]
  try:  # the single-process reference runs meanwhile, on a mesh of the same 4-device shape
    single = gen_eval.evaluate_generation(
        s, r, inc.load_inception(w),
        gen_eval.GenEvalOptions(per_device_batch=2, fid_method="eigh", is_split_size=4,
                                use_cache=False, progress=False),
        mesh=gen_eval.make_mesh(jax.devices()[:4]))
  finally:
    for p in procs:
      p.wait(timeout=900)
  for p, log in zip(procs, logs):
    log.seek(0)
    assert p.returncode == 0, log.read()[-4000:]
  pod = json.load(open(tmp_path / "pod.json"))
  assert pod["processes"] == 2 and pod["devices"] == 4 and pod["num_samples"] == 13
  assert pod["labels"]["num_classes"] == 4
  for k in ("fid", "sfid", "inception_score", "precision", "recall"):
    assert pod[k] == pytest.approx(single[k], rel=1e-6, abs=1e-9), k
