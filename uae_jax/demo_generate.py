"""`make demo-generate`: class-conditional generation on the scikit-learn digits, judged offline.

    python -m uae_jax.demo_generate --workdir=runs/demo_generate

1. The 1797 scikit-learn digits (10 classes), upscaled to 32 px, as ArrayRecord splits: train =
   the first 1437, test (held out) = the last 360 (built once, cached).
2. A tiny UAE (`configs/dit_digits.py:uae`) trained by the one trainer in `<workdir>/uae`.
3. Its latents (8 x 8 x 64) of the train digits, whole images (the eval transform: the trainer's
   random train crops would cut digits), normalised with their exact per-element statistics.
4. A tiny DiT^DH (`configs/dit_digits.py`) trained class-conditionally on the train latents with
   the DiT task's own loss, optimiser and EMA (label dropout 0.1), in this process: the 1437
   latents are computed once instead of re-encoded every step.
5. Samples of every class, Euler on the shifted grid, without guidance and with CFG.
6. The judge, independent of everything above: a scikit-learn MLP classifier trained on the real
   train images (16 x 16 grey); its accuracy on the held-out images is the reference. Reported:
   the fraction of samples it recognises as their requested class (chance 10 %), and the
   Frechet distance in its hidden-layer features between the samples and the held-out images,
   next to the same distance between held-out and train images (the floor).
`<workdir>/summary.md` (+ summary.json, samples_grid.png) holds the numbers and the grid.
"""
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app
from absl import flags
from absl import logging

_WORKDIR = flags.DEFINE_string("workdir", "runs/demo_generate", "Output directory.")
_UAE_STEPS = flags.DEFINE_integer("uae_steps", 150, "Training steps of the tiny UAE.")
_DIT_STEPS = flags.DEFINE_integer("dit_steps", 3000, "Training steps of the tiny DiT^DH.")
_PER_CLASS = flags.DEFINE_integer("per_class", 30, "Samples per class and guidance setting.")
_CFG = flags.DEFINE_float("cfg_scale", 4.0, "Classifier-free guidance scale of the guided set.")
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


def encode_all(config, images: np.ndarray, batch: int = 200):
  """Normalised latents of the train `images` and (tokenizer, params, stats).

  The statistics are the exact per-element mean and variance of these latents (float64), the
  same numbers `python -m uae_jax.generate stats` computes over the split without mirroring.
  """
  from uae_jax.generate import latents  # pylint: disable=g-import-not-at-top
  from uae_jax.tasks import dit as dit_task  # pylint: disable=g-import-not-at-top
  uae_cfg, tokenizer = dit_task.build_tokenizer(config)
  tok = latents.load_tokenizer_params(config, uae_cfg)
  fn = jax.jit(lambda p, x: tokenizer.apply({"params": p}, x, method="tokenize"))
  z = np.concatenate([np.asarray(fn(tok, images[i:i + batch]), np.float64)
                      for i in range(0, len(images), batch)])
  stats = {"mean": z.mean(0).astype(np.float32),
           "std": np.sqrt(z.var(0) + latents.STATS_EPS).astype(np.float32)}
  return latents.normalise(z, stats).astype(np.float32), (tokenizer, tok, stats)


# ------------------------------------------------------------------------------ the DiT
def train_dit(config, z: np.ndarray, labels: np.ndarray, steps: int, seed: int):
  """EMA params of the tiny DiT^DH after `steps` class-conditional flow-matching steps."""
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  from uae_jax.tasks import dit as dit_task  # pylint: disable=g-import-not-at-top
  model = dit_task.build_model(config)
  tx, _ = dit_task.make_optimizer(config)
  x0, t0, y0 = dit_task._dummy_inputs(config)  # pylint: disable=protected-access
  params = nn.unbox(jax.jit(model.init)({"params": jax.random.key(seed),
                                         "label_dropout": jax.random.key(seed)}, x0, t0, y0))
  params = params["params"]
  state = (params, jax.tree.map(jnp.copy, params), tx.init(params))

  @jax.jit
  def step(state, x1, y, rng):
    params, ema, opt = state
    grad_fn = jax.value_and_grad(lambda p: dit_task.loss_fn(
        config, model, p, x1, dit_task.class_labels(config, y), rng), has_aux=True)
    (loss, _), grads = grad_fn(params)
    updates, opt = tx.update(grads, opt, params)
    params = optax.apply_updates(params, updates)
    return (params, dit_task.ema_update(config, ema, params), opt), loss

  rng = np.random.default_rng(seed)
  key = jax.random.key(seed + 1)
  bs, losses = config.input.global_batch_size, []
  for i in range(steps):
    idx = rng.integers(0, len(z), bs)
    state, loss = step(state, z[idx], labels[idx], jax.random.fold_in(key, i))
    if i % 100 == 0 or i == steps - 1:
      losses.append((i, float(loss)))
      logging.info("DiT step %d/%d: loss %.4f", i, steps, float(loss))
  return state[1], losses


def generate(config, ema, tok_bundle, per_class: int, scale: float, seed: int) -> tuple:
  """(uint8 images (10 * per_class, S, S, 3), requested labels) with CFG `scale` (1 = none)."""
  from uae_jax.generate import sampling  # pylint: disable=g-import-not-at-top
  from uae_jax.tasks import dit as dit_task  # pylint: disable=g-import-not-at-top
  tokenizer, tok, stats = tok_bundle
  n_cls = config.model.num_classes
  mode = "cfg" if scale != 1.0 else "none"
  spec = sampling.sampler_spec(config, mode=mode, scale=scale, t_min=0.0, t_max=1.0)
  gen = jax.jit(sampling.make_generate(dit_task.build_model(config), tokenizer,
                                       config.transport.prediction, spec, n_cls))
  labels = np.repeat(np.arange(n_cls, dtype=np.int32), per_class)
  m = config.model
  noise = jax.random.normal(jax.random.key(seed), (len(labels), m.input_size, m.input_size,
                                                   m.in_channels))
  images = gen(ema, None, tok, stats, noise, labels, jax.random.key(seed + 1))
  return np.asarray(images), labels


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
  config.tokenizer.workdir = train_tokenizer(workdir, uae_steps)
  t = tick("tokenizer", t)
  train_x, train_y = load_split(config, "train")
  test_x, test_y = load_split(config, "test")
  z, tok_bundle = encode_all(config, train_x)
  t = tick("latents", t)
  ema, losses = train_dit(config, z, train_y, dit_steps, seed)
  t = tick("dit", t)
  sets = [generate(config, ema, tok_bundle, per_class, s, seed + 7) for s in (1.0, cfg_scale)]
  t = tick("sampling", t)
  judge = Judge(train_x, train_y, seed)
  recon = jax.jit(lambda p, x: tok_bundle[0].apply({"params": p}, x, method="reconstruct"))
  recon_x = np.clip(np.asarray(recon(tok_bundle[1], test_x)), 0, 1)
  rows = [_row("held-out real (Frechet vs train: the floor)", judge, test_x, test_y, train_x),
          _row("UAE reconstructions of held-out", judge, recon_x, test_y, test_x),
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
             "num_points": config.sample.num_points, "dit_loss": losses, "seconds": secs,
             "seconds_total": time.time() - t_start,
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
  app.run(main)
