"""`make demo-generate`: the offline judge (scikit-learn) and, slow, the whole demo at toy length."""
import os

import numpy as np
import pytest
from PIL import Image
from sklearn import datasets

from uae_jax import demo_generate


def _digits_32():
  """(images (N, 32, 32, 3) uint8, labels) made like the demo's digits dataset."""
  d = datasets.load_digits()
  imgs = [np.asarray(Image.fromarray(np.uint8(np.round(x * 255.0 / 16.0)), "L")
                     .resize((32, 32), Image.BICUBIC).convert("RGB")) for x in d.images]
  return np.stack(imgs), d.target.astype(np.int32)


def test_judge_recognises_real_digits_and_not_noise():
  x, y = _digits_32()
  judge = demo_generate.Judge(x[:1437], y[:1437], max_iter=100)  # the demo fits to convergence
  assert judge.accuracy(x[1437:], y[1437:]) > 0.85           # held-out real digits
  noise = np.random.default_rng(0).integers(0, 256, (200, 32, 32, 3)).astype(np.uint8)
  wanted = np.arange(200) % 10
  assert judge.accuracy(noise, wanted) < 0.3                 # about chance
  floor = judge.frechet(x[1437:], x[:1437])
  assert judge.frechet(noise, x[1437:]) > 10 * floor          # noise is far from digits
  assert abs(judge.frechet(x[:500], x[:500])) < 1e-3 * floor


def test_features_are_16x16_grey_means():
  img = np.zeros((1, 32, 32, 3), np.uint8)
  img[0, :2, :2] = 255                                        # one 2 x 2 block -> one feature
  f = demo_generate.features(img)
  assert f.shape == (1, 256) and f[0, 0] == 1.0 and f[0, 1:].sum() == 0


@pytest.mark.slow
def test_demo_end_to_end_toy_length(tmp_path, monkeypatch):
  monkeypatch.setenv("UAE_JAX_CACHE", str(tmp_path / "cache"))
  s = demo_generate.run_demo(str(tmp_path / "demo"), uae_steps=4, dit_steps=4, per_class=2,
                             cfg_scale=2.0)
  assert [r["n"] for r in s["rows"]] == [360, 360, 20, 20]
  assert s["judge_heldout_accuracy"] > 0.85
  text = open(tmp_path / "demo" / "summary.md").read()
  assert "recognised as requested class" in text and "Frechet floor" in text
  assert os.path.exists(tmp_path / "demo" / "samples_grid.png")
