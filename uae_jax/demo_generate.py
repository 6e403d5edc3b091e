"""`make demo-generate`: class-conditional generation on the scikit-learn digits, judged offline.

    python -m uae_jax.demo_generate --workdir=runs/demo_generate

1. The 1797 scikit-learn digits (10 classes), upscaled to 32 px, as ArrayRecord splits: train =
   the first 1437, test (held out) = the last 360 (built once, cached).
2. A tiny UAE (`configs/dit_digits.py:uae`) trained by the one trainer in `<workdir>/uae`.
3. The latents of the whole train digits (ADM centre crop, no mirrors: digits are not
   mirror-symmetric), encoded once with the frozen UAE in eval mode, stored with their exact
   per-element statistics in `<workdir>/latents` (`python -m uae_jax.generate latents`).
   A tiny DiT^DH (`configs/dit_digits.py`) is trained class-conditionally on them by the same
   trainer in `<workdir>/dit` (checkpoints, metrics.jsonl, resume), each step normalising its
   8 x 8 x 64 latents with those statistics (`latent.source='stored'`: no encoder pass per step).
4. Samples of every class with `python -m uae_jax.generate sample`'s library function (Euler on
   the shifted grid), without guidance and with CFG, as ADM-format .npz files in `<workdir>`.
5. The judge, independent of everything above: a scikit-learn MLP classifier trained on the real
   train images (16 x 16 grey); its accuracy on the held-out images is the reference. Reported:
   the fraction of samples it recognises as their requested class (chance 10 %), and the
   Frechet distance in its hidden-layer features between the samples and the held-out images,
   next to the same distance between held-out and train images (the floor).
`<workdir>/summary.md` (+ summary.json, samples_grid.png) holds the numbers and the grid. A
second run resumes the UAE and DiT runs (or skips them when finished) and samples again.
"""
import json
import os
import shutil
import sys
import time

import jax
import numpy as np
from absl import app
from absl import flags

from uae_jax import host_malloc

_WORKDIR = flags.DEFINE_string("workdir", "runs/demo_generate", "Output directory.")
_UAE_STEPS = flags.DEFINE_integer("uae_steps", 150, "Training steps of the tiny UAE.")
_DIT_STEPS = flags.DEFINE_integer("dit_steps", 3000, "Training steps of the tiny DiT^DH.")
_PER_CLASS = flags.DEFINE_integer("per_class", 30, "Samples per class and guidance setting.")
_CFG = flags.DEFINE_float("cfg_scale", 6.0, "Classifier-free guidance scale of the guided set.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the DiT and the samples.")


# ------------------------------------------------------------------------------ data and tokenizer
def load_split(config, split: str):
  """(images float32 (N, S, S, 3) in [0, 1], labels (N,)) of a whole split, eval transform."""
  from uae_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  cfg = config.input.copy_and_resolve_references()
  cfg.eval_max_examples = 0
  images, labels = [], []
  for batch in pipeline.make_eval_iterator(cfg, split=split):
    keep = np.asarray(batch["mask"]).astype(bool)
    images.append(np.asarray(batch["image"])[keep])
    labels.append(np.asarray(batch["label"])[keep])
  return np.concatenate(images), np.concatenate(labels).astype(np.int32)


def train_tokenizer(workdir: str, steps: int) -> str:
  """Trains (or resumes, or skips) the tiny UAE in `<workdir>/uae`; returns that workdir."""
  from configs import dit_digits  # pylint: disable=g-import-not-at-top
  from uae_jax import train  # pylint: disable=g-import-not-at-top
  wd = os.path.join(workdir, "uae")
  done = os.path.join(wd, "summary.json")
  if os.path.exists(done) and json.load(open(done)).get("final_step") == steps:
    return wd
  train.train_and_evaluate(dit_digits.uae_config(steps), wd)
  return wd


def encode_latents(workdir: str, tok_workdir: str) -> str:
  """Stores the train digits' latents + statistics in `<workdir>/latents` (once per tokenizer)."""
  from uae_jax.generate import cli  # pylint: disable=g-import-not-at-top
  out = os.path.join(workdir, "latents")
  manifest = os.path.join(out, "manifest.json")
  tok_done = os.path.join(tok_workdir, "summary.json")
  if (os.path.exists(manifest) and json.load(open(manifest)).get("tokenizer_workdir") == tok_workdir
      and os.path.getmtime(manifest) > os.path.getmtime(tok_done)):
    return out  # written after the tokenizer finished: still its latents
  cli.encode_latents(cli.parser().parse_args([
      "latents", f"--config=configs/dit_digits.py:tok={tok_workdir}", "--no-hflip",
      f"--out={out}"]))
  return out


def train_dit(workdir: str, tok_workdir: str, steps: int, seed: int, lat_dir: str = "") -> str:
  """Trains (or resumes, or skips) the tiny DiT^DH with the trainer in `<workdir>/dit`."""
  from configs import dit_digits  # pylint: disable=g-import-not-at-top
  from uae_jax import train  # pylint: disable=g-import-not-at-top
  wd = os.path.join(workdir, "dit")
  done = os.path.join(wd, "summary.json")
  if os.path.exists(done) and json.load(open(done)).get("final_step") == steps:
    return wd
  arg = f"steps={steps},tok={tok_workdir}" + (f",lat={lat_dir}" if lat_dir else "")
  config = dit_digits.get_config(arg)
  config.seed = seed
  train.train_and_evaluate(config, wd)
  return wd


def dit_losses(dit_workdir: str) -> list:
  """(step, train loss) pairs the trainer wrote to `<dit_workdir>/metrics.jsonl`."""
  path = os.path.join(dit_workdir, "metrics.jsonl")
  out = []
  if os.path.exists(path):
    for line in open(path):
      rec = json.loads(line)
      if "loss" in rec and "step" in rec:
        out.append((int(rec["step"]), round(float(rec["loss"]), 4)))
  return out


def generate(dit_workdir: str, per_class: int, scale: float, seed: int) -> tuple:
  """(uint8 images, requested labels): `python -m uae_jax.generate sample` as a library call.

  Equal label sampling (`per_class` of each digit), Euler on the config's grid, CFG `scale` on
  the whole interval (1 = no guidance). The same `seed` gives every setting the same noise.
  """
  from uae_jax.generate import cli  # pylint: disable=g-import-not-at-top
  num = 10 * per_class
  devices = jax.device_count()
  batch = -(-num // devices) * devices  # one chunk, padded to split evenly over the devices
  name = "samples_noguide.npz" if scale == 1.0 else f"samples_cfg{scale:g}.npz"
  out = os.path.join(os.path.dirname(dit_workdir), name)
  args = cli.parser().parse_args([
      "sample", f"--workdir={dit_workdir}", f"--out={out}", f"--num={num}", f"--batch={batch}",
      "--guidance=" + ("none" if scale == 1.0 else "cfg"), f"--cfg-scale={scale}",
      "--cfg-interval=0,1", "--label-sampling=equal", f"--seed={seed}"])
  shutil.rmtree(out + ".parts", ignore_errors=True)  # chunks of an earlier DiT: never reused
  cli.sample(args)
  with np.load(out, allow_pickle=False) as f:
    return f["arr_0"], f["arr_1"].astype(np.int32)


def reconstruct(tok_workdir: str, images: np.ndarray) -> np.ndarray:
  """The trained tiny UAE's reconstructions of `images`, clipped to [0, 1]."""
  from configs import dit_digits  # pylint: disable=g-import-not-at-top
  from uae_jax.tasks import dit as dit_task  # pylint: disable=g-import-not-at-top
  from uae_jax.generate import latents  # pylint: disable=g-import-not-at-top
  config = dit_digits.get_config(f"tok={tok_workdir}")
  uae_cfg, tokenizer = dit_task.build_tokenizer(config)
  tok = latents.load_tokenizer_params(config, uae_cfg)
  fn = jax.jit(lambda p, x: tokenizer.apply({"params": p}, x, method="reconstruct"))
  return np.clip(np.asarray(fn(tok, images)), 0, 1)


# ------------------------------------------------------------------------------ the judge
def features(images: np.ndarray) -> np.ndarray:
  """16 x 16 grey pixels in [0, 1] of (N, 32, 32, 3) images (uint8 or float), flattened."""
  x = np.asarray(images, np.float64)
  if x.max() > 1.5:
    x = x / 255.0
  grey = x.mean(-1)
  n, h, w = grey.shape
  return grey.reshape(n, 16, h // 16, 16, w // 16).mean((2, 4)).reshape(n, 256)


class Judge:
  """A scikit-learn MLP on real train digits: class predictions and hidden-layer features."""

  def __init__(self, train_images, train_labels, seed: int = 0, max_iter: int = 500):
    from sklearn.neural_network import MLPClassifier  # pylint: disable=g-import-not-at-top
    self.clf = MLPClassifier(hidden_layer_sizes=(64,), max_iter=max_iter, random_state=seed)
    self.clf.fit(features(train_images), train_labels)

  def accuracy(self, images, labels) -> float:
    """Fraction of images classified as their label."""
    return float(np.mean(self.clf.predict(features(images)) == labels))

  def hidden(self, images) -> np.ndarray:
    """ReLU hidden-layer activations (the classifier's feature space)."""
    h = features(images) @ self.clf.coefs_[0] + self.clf.intercepts_[0]
    return np.maximum(h, 0.0)

  def frechet(self, a, b) -> float:
    """Frechet distance between the hidden features of two image sets."""
    from uae_jax.evaluate.fid import frechet_distance  # pylint: disable=g-import-not-at-top
    fa, fb = self.hidden(a), self.hidden(b)
    return frechet_distance(fa.mean(0), np.cov(fa, rowvar=False), fb.mean(0),
                            np.cov(fb, rowvar=False), method="eigh")


# ------------------------------------------------------------------------------ the run
def _row(name: str, judge: Judge, images, labels, heldout) -> dict:
  """One line of the results table."""
  return {"set": name, "class_correct": judge.accuracy(images, labels),
          "frechet_vs_heldout": judge.frechet(images, heldout), "n": int(len(images))}


def _grid(sets, per_row: int = 8) -> np.ndarray:
  """One row per class: `per_row` unguided samples | `per_row` guided samples."""
  from uae_jax.metric_writers import image_grid  # pylint: disable=g-import-not-at-top
  (a, la), (b, lb) = sets
  rows = []
  for c in range(10):
    rows.append([x / 255.0 for x in a[la == c][:per_row]] + [np.ones_like(a[0], np.float32)]
                + [x / 255.0 for x in b[lb == c][:per_row]])
  return image_grid(rows)


def _markdown(s: dict) -> str:
  """summary.md text."""
  lines = ["# Class-conditional generation demo (scikit-learn digits)", "",
           "Judge: scikit-learn MLP (64 hidden units) on 16 x 16 grey pixels, trained on the "
           f"{s['n_train']} real train digits; accuracy on the {s['n_heldout']} held-out digits "
           f"**{100 * s['judge_heldout_accuracy']:.1f} %**. Chance is 10 %.", "",
           "| images | n | recognised as requested class | Frechet distance to held-out |",
           "|---|---|---|---|"]
  for r in s["rows"]:
    lines.append(f"| {r['set']} | {r['n']} | {100 * r['class_correct']:.1f} % | "
                 f"{r['frechet_vs_heldout']:.3f} |")
  lines += ["", f"Frechet floor (held-out real vs train real): {s['frechet_floor']:.3f}.", "",
            "![samples](samples_grid.png)", "",
            "Grid: one row per class 0-9; left the unguided samples, right CFG scale "
            f"{s['cfg_scale']}.", "",
            f"Tiny UAE {s['uae_steps']} steps; tiny DiT^DH {s['dit_steps']} steps (batch "
            f"{s['dit_batch']}), Euler with {s['num_points']} grid points. Wall time "
            f"{s['seconds_total']:.0f} s (" + ", ".join(
                f"{k} {v:.0f} s" for k, v in s["seconds"].items()) + "); load average at the "
            f"end {s['loadavg']}."]
  return "\n".join(lines) + "\n"


def run_demo(workdir: str, uae_steps: int, dit_steps: int, per_class: int, cfg_scale: float,
             seed: int = 0) -> dict:
  """The whole demo; writes and returns the summary."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  from configs import dit_digits  # pylint: disable=g-import-not-at-top
  from uae_jax.tasks import qgvae  # pylint: disable=g-import-not-at-top
  t_start, secs = time.time(), {}
  tick = lambda name, t: secs.__setitem__(name, time.time() - t) or time.time()
  os.makedirs(workdir, exist_ok=True)
  config = dit_digits.get_config(f"steps={dit_steps}")
  qgvae.build_digits_dataset(config.input.data_dir, dit_digits.IMAGE_SIZE)
  t = time.time()
  tok_wd = train_tokenizer(workdir, uae_steps)
  t = tick("tokenizer", t)
  lat_dir = encode_latents(workdir, tok_wd)
  t = tick("latents", t)
  dit_wd = train_dit(workdir, tok_wd, dit_steps, seed, lat_dir)
  t = tick("dit", t)
  sets = [generate(dit_wd, per_class, s, seed + 42) for s in (1.0, cfg_scale)]
  t = tick("sampling", t)
  train_x, train_y = load_split(config, "train")
  test_x, test_y = load_split(config, "test")
  judge = Judge(train_x, train_y, seed)
  rows = [_row("held-out real (Frechet vs train: the floor)", judge, test_x, test_y, train_x),
          _row("UAE reconstructions of held-out", judge, reconstruct(tok_wd, test_x), test_y,
               test_x),
          _row("DiT samples, no guidance", judge, *sets[0], test_x),
          _row(f"DiT samples, CFG {cfg_scale}", judge, *sets[1], test_x)]
  tick("judge", t)
  grid = _grid(sets)
  Image.fromarray(grid).resize((grid.shape[1] * 2, grid.shape[0] * 2), Image.NEAREST).save(
      os.path.join(workdir, "samples_grid.png"))
  summary = {"rows": rows, "judge_heldout_accuracy": rows[0]["class_correct"],
             "frechet_floor": rows[0]["frechet_vs_heldout"], "n_train": int(len(train_x)),
             "n_heldout": int(len(test_x)), "cfg_scale": cfg_scale, "uae_steps": uae_steps,
             "dit_steps": dit_steps, "dit_batch": config.input.global_batch_size,
             "num_points": config.sample.num_points, "dit_loss": dit_losses(dit_wd),
             "seconds": secs, "seconds_total": time.time() - t_start,
             "loadavg": [round(x, 2) for x in os.getloadavg()]}
  json.dump(summary, open(os.path.join(workdir, "summary.json"), "w"), indent=1)
  with open(os.path.join(workdir, "summary.md"), "w") as f:
    f.write(_markdown(summary))
  return summary


def main(argv):
  """Runs the demo and prints summary.md."""
  del argv
  s = run_demo(_WORKDIR.value, _UAE_STEPS.value, _DIT_STEPS.value, _PER_CLASS.value, _CFG.value,
               _SEED.value)
  print(_markdown(s))


if __name__ == "__main__":
  host_malloc.use_from_argv(sys.argv[1:])
  app.run(main)
