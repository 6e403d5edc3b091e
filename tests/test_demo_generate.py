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


def _records(n: int = 6, h: int = 40, w: int = 48):
  """`n` in-memory records (random uint8 h x w RGB images, label = index) for the pipeline."""
  rng = np.random.default_rng(0)
  return [{"image": rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "label": np.int64(i)}
          for i in range(n)]


def _train_batches(src, crop: str, n: int = 2):
  """The first `n` train batches (with record indices) of `src` at 32 px, train_crop=`crop`."""
  from uae_jax.data import config as data_config, pipeline  # pylint: disable=g-import-not-at-top
  c = data_config.default_input_config()
  c.update(image_size=32, global_batch_size=3, num_threads=1, prefetch_buffer_size=1,
           train_crop=crop)
  it = pipeline.make_train_iterator(c, source=src, process_index=0, process_count=1,
                                    keep_index=True)
  return [next(it) for _ in range(n)]


def test_train_crop_center_is_the_eval_transform():
  """input.train_crop='center' (the demo's whole digits) gives the ADM centre crop exactly."""
  from uae_jax.data import transforms  # pylint: disable=g-import-not-at-top
  src = _records()
  for batch in _train_batches(src, "center"):
    for img, idx, lab in zip(batch["image"], batch["index"], batch["label"]):
      ref = transforms.eval_transform(Image.fromarray(src[idx]["image"]), 32)
      assert img.shape == (32, 32, 3) and lab == idx
      np.testing.assert_array_equal(img, ref)
  # The default random crop of the 1.5x-resized image is a different (zoomed-in) view.
  rand = _train_batches(src, "random", 1)[0]
  ref = np.stack([transforms.eval_transform(Image.fromarray(src[i]["image"]), 32)
                  for i in rand["index"]])
  assert np.abs(rand["image"] - ref).mean() > 0.05
  with pytest.raises(ValueError, match="train_crop"):
    _train_batches(src, "middle", 1)


def test_demo_configs_read_whole_digits():
  """Both demo configs use the centre crop; the DiT's checkpoint/log intervals fit its length."""
  from configs import dit_digits  # pylint: disable=g-import-not-at-top
  uae, dit = dit_digits.get_config("uae,steps=7"), dit_digits.get_config("steps=3000,tok=/x")
  assert uae.input.train_crop == dit.input.train_crop == "center" and not dit.train.hflip
  assert dit.ckpt.every_steps == 3000 and dit.log_every_steps == 100
  assert dit.image_every_steps == 0 and dit.tokenizer.workdir == "/x"


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
