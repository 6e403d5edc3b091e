"""The diffusability study of Spectrum Matching on the labelled scikit-learn digits.

  nice -n 10 python bench/diffusability.py                  # default size (150 / 200 steps)
  python bench/diffusability.py --tok-steps 1000 --dit-steps 3000 --image-size 32 --out DIR

Four tokenizers on the same digits (scikit-learn's 8 x 8 digits, bicubic-upscaled to
`--image-size` px RGB as `tasks/qgvae.py: build_digits_dataset` does; first 1437 train, last
360 test). At the default 16 px every latent is on an 8 x 8 grid:
  sd    the tiny KL-VAE, KL 1e-6               (configs/kl_vae.py:tiny,     8 x 8 x 4 latent)
  esm   the same, ESM 0.01, delta 1, KL 0       (configs/kl_vae.py:tiny,esm)
  dsm   the same, DSM masking only, KL 0        (configs/kl_vae.py:tiny,dsm; one 8 x 8 block)
  uae   the tiny paper-recipe UAE, encoder trained too (no pretrained encoder offline),
        decoder patch size / 8                  (configs/stage1.py:tiny,     8 x 8 x 64 latent)
each trained for `--tok-steps` steps with its own task's train step (batch `--batch`, no GAN,
the same reconstruction loss for all: L1, plus `--lpips` x LPIPS if asked).
Then per tokenizer:
  rPSNR   of the test reconstructions (clamped to [0, 1]);
  KL      mean KL(target || latent) of the 16-bin band distributions, analysis settings, delta 1
          (uae_jax/evaluate/latent_spectrum.py; on an 8 x 8 grid several bins hold 1-2
          coefficients, so it is a coarse measure);
  the same tiny DiT (configs/dit.py:tiny, 64 tokens: patch 1 on 8 x 8, patch 2 on 16 x 16;
  the time shift fixed to alpha = 1 for all) trained `--dit-steps` steps by flow matching on
  the per-element normalised train latents (no flips: digits are not mirror-symmetric), then:
  fm_train   mean training loss over the last 10 % of steps;
  fm_test    held-out flow-matching loss of the EMA on the test latents (fixed noise and times);
  acc, fd    class accuracy and classifier-space Frechet distance of `--per-class` samples per
             class (Euler, config points, no guidance), decoded and judged by the generation
             demo's judge: a scikit-learn MLP trained on the real train digits (16 x 16 grey);
             fd is the Frechet distance of its hidden features of the samples vs of the real
             test digits. References: the real train digits (the floor) and each tokenizer's
             reconstructions of the test digits.
Measured: 41 min for --tok-steps 200 --dit-steps 400 on 2 cores at load 9-10 (other jobs),
cold compile cache; the default is about half of that (DiT steps dominate).
Writes `<out>/diffusability.json` and `<out>/diffusability.md` (the table), atomically.
"""
import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from configs import dit as dit_cfg  # noqa: E402
from configs import kl_vae as kl_cfg  # noqa: E402
from configs import stage1  # noqa: E402
from uae_jax.evaluate import fid as fid_lib  # noqa: E402
from uae_jax.evaluate import latent_spectrum as ls  # noqa: E402
from uae_jax.generate import sampling  # noqa: E402
from uae_jax.losses import spectrum  # noqa: E402
from uae_jax.tasks import dit as dit_task  # noqa: E402

DIGITS_TRAIN = 1437
VARIANTS = ("sd", "esm", "dsm", "uae")


def log(msg: str) -> None:
  """Progress line with the load average (timings here are taken on a shared machine)."""
  print(f"[{time.strftime('%H:%M:%S')} load {os.getloadavg()[0]:.1f}] {msg}", flush=True)


# ------------------------------------------------------------------------------ data
def digits(size: int = 32) -> dict:
  """scikit-learn digits as [0, 1] RGB (N, size, size, 3), upscaled as the digits dataset is."""
  from PIL import Image
  from sklearn import datasets
  d = datasets.load_digits()
  imgs = np.stack([np.asarray(Image.fromarray(np.uint8(np.round(im * 255.0 / 16.0)), "L")
                              .resize((size, size), Image.BICUBIC).convert("RGB"), np.float32)
                   for im in d.images]) / 255.0
  y = d.target.astype(np.int32)
  return {"train": imgs[:DIGITS_TRAIN], "train_y": y[:DIGITS_TRAIN],
          "test": imgs[DIGITS_TRAIN:], "test_y": y[DIGITS_TRAIN:]}


def batches(x: np.ndarray, batch: int, seed: int, y=None):
  """Endless shuffled mini-batches (epoch by epoch) of x (and y)."""
  rs = np.random.default_rng(seed)
  while True:
    order = rs.permutation(len(x))
    for i in range(0, len(order) - batch + 1, batch):
      idx = order[i:i + batch]
      yield (x[idx], None if y is None else y[idx])


# ------------------------------------------------------------------------------ tokenizers
def tokenizer_config(variant: str, steps: int, batch: int, lpips: float = 0.0, size: int = 16):
  """The tokenizer config of a study variant (`size` px digits, no GAN, L1 [+ lpips LPIPS])."""
  if variant == "uae":
    c = stage1.get_config(f"tiny,steps={steps}")
    c.train.encoder_trainable = True      # no pretrained encoder offline: train it
    c.model.decoder.patch_size = size // 8  # the tiny encoder's 8 x 8 grid -> `size` px
  else:
    c = kl_cfg.get_config(f"tiny,steps={steps}" + ("" if variant == "sd" else f",{variant}"))
  c.input.image_size = size
  c.input.global_batch_size = batch
  # The same reconstruction loss for all four: L1 (+ LPIPS if asked; VGG16 at 32 px costs
  # minutes of compile per tokenizer here). The spectrum diagnostics are not logged.
  c.loss.lpips = lpips
  if variant != "uae":
    c.loss.log_spectra = False
  return c


def train_tokenizer(variant: str, data: dict, steps: int, batch: int, seed: int,
                    lpips: float = 0.0) -> tuple:
  """(config, tokenizer module, EMA params, seconds) after `steps` steps of the variant's task."""
  from uae_jax import tasks
  c = tokenizer_config(variant, steps, batch, lpips, data["train"].shape[1])
  task = tasks.get(c.task)
  task.validate(c)
  state = jax.jit(lambda k: nn.unbox(task.init_state(c, k)))(jax.random.key(seed))
  frozen = jax.device_put(task.load_frozen(c))
  phase = task.phase_at(c, 0) if task.phase_at is not None else None
  step_fn = task.make_train_step(c, phase) if phase is not None else task.make_train_step(c)
  step_fn = jax.jit(step_fn, donate_argnums=0)
  it = batches(data["train"], batch, seed)
  t0, losses = time.time(), []
  for i in range(steps):
    state, m = step_fn(state, {"image": jnp.asarray(next(it)[0])}, frozen)
    if (i + 1) % max(steps // 5, 1) == 0:
      losses.append(float(m["loss"]))
      log(f"{variant} tokenizer step {i + 1}/{steps}: loss {losses[-1]:.4f}")
  return c, ls.tokenizer_module(c), jax.device_get(state["ema"]), time.time() - t0


def encode_all(tok, params, images: np.ndarray, chunk: int = 128) -> np.ndarray:
  """Deterministic latents of [0, 1] images (N, h, w, C)."""
  f = jax.jit(lambda p, x: tok.apply({"params": p}, x, method="tokenize"))
  return np.concatenate([np.asarray(f(params, jnp.asarray(images[i:i + chunk])))
                         for i in range(0, len(images), chunk)])


def decode_all(tok, params, z: np.ndarray, chunk: int = 128) -> np.ndarray:
  """[0, 1] clamped images of latents."""
  f = jax.jit(lambda p, z: jnp.clip(tok.apply({"params": p}, z, method="decode"), 0.0, 1.0))
  return np.concatenate([np.asarray(f(params, jnp.asarray(z[i:i + chunk])))
                         for i in range(0, len(z), chunk)])


def latent_kl(images: np.ndarray, z: np.ndarray, delta: float = 1.0) -> float:
  """Mean KL(target || latent) with the analysis settings."""
  d = spectrum.analysis_distributions(2.0 * jnp.asarray(images) - 1.0, jnp.asarray(z), delta)
  return float(np.mean(np.asarray(d["kl"])))


# ------------------------------------------------------------------------------ the DiT
def dit_config(shape: tuple, steps: int, batch: int):
  """configs/dit.py:tiny sized for a latent (h, w, C): (h / patch)^2 = 64 tokens, 10 classes,
  alpha 1."""
  c = dit_cfg.get_config(f"tiny,steps={steps}")
  h, _, ch = shape
  c.model.update(in_channels=int(ch), input_size=int(h), patch_size=max(1, int(h) // 8),
                 num_classes=10)
  c.input.global_batch_size = batch
  c.transport.shift_dim = 4096  # the same time distribution for every latent (alpha = 1)
  return c


def train_dit(c, z_train: np.ndarray, y_train: np.ndarray, seed: int) -> tuple:
  """(EMA params, mean loss of the last 10 % of steps) of `train.total_steps` DiT steps."""
  model = dit_task.build_model(c)
  tx, _ = dit_task.make_optimizer(c)
  state = jax.jit(lambda k: nn.unbox(dit_task.init_state(c, k)))(jax.random.key(seed))

  @jax.jit
  def step(state, x1, y):
    rng = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), state["step"])
    loss, grads = jax.value_and_grad(
        lambda p: dit_task.loss_fn(c, model, p, x1, y, rng)[0])(state["params"])
    updates, opt = tx.update(grads, state["opt"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    return dict(state, step=state["step"] + 1, params=params, opt=opt,
                ema=dit_task.ema_update(c, state["ema"], params)), loss

  steps, it, tail = c.train.total_steps, batches(z_train, c.input.global_batch_size, seed,
                                                 y_train), []
  for i in range(steps):
    x1, y = next(it)
    state, loss = step(state, jnp.asarray(x1), jnp.asarray(y))
    if i >= steps - max(steps // 10, 1):
      tail.append(float(loss))
    if (i + 1) % max(steps // 5, 1) == 0:
      log(f"  DiT step {i + 1}/{steps}: loss {float(loss):.4f}")
  return jax.device_get(state["ema"]), float(np.mean(tail))


def held_out_fm(c, ema, z_test: np.ndarray, y_test: np.ndarray, repeats: int = 4) -> float:
  """Flow-matching loss of the EMA on the test latents, fixed noise/times, no label dropout."""
  model = dit_task.build_model(c)
  f = jax.jit(lambda p, x, y, r: dit_task.loss_fn(c, model, p, x, y, r, train=False)[0])
  return float(np.mean([f(ema, jnp.asarray(z_test), jnp.asarray(y_test), jax.random.key(100 + r))
                        for r in range(repeats)]))


def sample_images(c, ema, tok, tok_params, stats, per_class: int, seed: int) -> tuple:
  """(uint8 images, labels) of per_class Euler samples per class, decoded by the tokenizer."""
  spec = sampling.sampler_spec(c)
  gen = jax.jit(sampling.make_generate(dit_task.build_model(c), tok, c.transport.prediction, spec,
                                       c.model.num_classes))
  labels = np.repeat(np.arange(10, dtype=np.int32), per_class)
  shape = (len(labels), c.model.input_size, c.model.input_size, c.model.in_channels)
  noise = jax.random.normal(jax.random.key(seed), shape, jnp.float32)
  st = {k: jnp.asarray(v) for k, v in stats.items()}
  imgs = gen(ema, None, tok_params, st, noise, jnp.asarray(labels), jax.random.key(seed + 1))
  return np.asarray(imgs), labels


# ------------------------------------------------------------------------------ the judge
def judge_features(images: np.ndarray) -> np.ndarray:
  """[0, 1] or uint8 RGB (N, 32, 32, 3) -> 16 x 16 grey (N, 256) (2 x 2 area means)."""
  x = np.asarray(images, np.float64)
  x = x / 255.0 if x.max() > 1.5 else x
  g = x.mean(-1)
  n, h, w = g.shape
  return g.reshape(n, 16, h // 16, 16, w // 16).mean((2, 4)).reshape(n, -1)


class Judge:
  """The generation demo's judge (uae_jax/demo_generate.py), rebuilt here: a scikit-learn MLP
  (64 ReLU units) on the real train digits' 16 x 16 grey pixels; accuracy, and the Frechet
  distance in its hidden-layer features against the real test digits."""

  def __init__(self, data: dict, seed: int = 0):
    from sklearn.neural_network import MLPClassifier
    self.clf = MLPClassifier(hidden_layer_sizes=(64,), max_iter=500, random_state=seed)
    self.clf.fit(judge_features(data["train"]), data["train_y"])
    ref = self.hidden(data["test"])
    self.mu, self.sigma = ref.mean(0), np.cov(ref, rowvar=False)

  def hidden(self, images: np.ndarray) -> np.ndarray:
    """ReLU hidden-layer activations (the classifier's feature space)."""
    return np.maximum(judge_features(images) @ self.clf.coefs_[0] + self.clf.intercepts_[0], 0.0)

  def __call__(self, images: np.ndarray, labels: np.ndarray) -> dict:
    """{'acc', 'fd'} of images with their intended labels."""
    f = self.hidden(images)
    fd = fid_lib.frechet_distance(f.mean(0), np.cov(f, rowvar=False), self.mu, self.sigma,
                                  method="eigh")
    return {"acc": float(np.mean(self.clf.predict(judge_features(images)) == labels)),
            "fd": float(fd)}


# ------------------------------------------------------------------------------ the study
def run_variant(variant: str, data: dict, judge: Judge, args) -> dict:
  """Tokenizer -> latents -> DiT -> samples -> judged: one row of the table."""
  t0 = time.time()
  c, tok, params, tok_s = train_tokenizer(variant, data, args.tok_steps, args.batch, args.seed,
                                         args.lpips)
  z_train, z_test = (encode_all(tok, params, data[k]) for k in ("train", "test"))
  recon = decode_all(tok, params, z_test)
  se = np.mean((recon - data["test"]) ** 2, axis=(1, 2, 3))
  row = {"variant": variant, "latent": list(z_test.shape[1:]), "tok_seconds": tok_s,
         "rpsnr": float(np.mean(-10 * np.log10(np.maximum(se, 1e-10)))),
         "latent_kl": latent_kl(data["test"], z_test),
         "recon_judge": judge(recon, data["test_y"])}
  mean, std = z_train.mean(0), np.sqrt(z_train.var(0) + 1e-5)
  norm = lambda z: ((z - mean) / std).astype(np.float32)
  dc = dit_config(z_train.shape[1:], args.dit_steps, args.dit_batch)
  ema, row["fm_train"] = train_dit(dc, norm(z_train), data["train_y"], args.seed)
  row["fm_test"] = held_out_fm(dc, ema, norm(z_test), data["test_y"])
  imgs, labels = sample_images(dc, ema, tok, params, {"mean": mean, "std": std}, args.per_class,
                               args.seed)
  row.update({f"sample_{k}": v for k, v in judge(imgs, labels).items()})
  row["seconds"] = time.time() - t0
  log(f"{variant}: " + json.dumps({k: v for k, v in row.items() if k != "variant"}))
  return row, imgs


def markdown(rows: list, real: dict, args) -> str:
  """The results table."""
  lines = [f"Digits, {args.image_size} px; tokenizers {args.tok_steps} steps (batch "
           f"{args.batch}), DiT "
           f"{args.dit_steps} steps (batch {args.dit_batch}), {10 * args.per_class} samples; "
           f"seed {args.seed}. Judge on the real test digits: acc {real['acc']:.3f}; FD of the "
           f"real train digits (floor) {real['fd_train_floor']:.2f}.", "",
           "| tokenizer | latent | rPSNR | latent KL (delta 1) | FM loss train / test | "
           "sample acc | sample FD | recon acc / FD |", "|---|---|---|---|---|---|---|---|"]
  for r in rows:
    lines.append(f"| {r['variant']} | {'x'.join(map(str, r['latent']))} | {r['rpsnr']:.2f} | "
                 f"{r['latent_kl']:.4f} | {r['fm_train']:.4f} / {r['fm_test']:.4f} | "
                 f"{r['sample_acc']:.3f} | {r['sample_fd']:.2f} | "
                 f"{r['recon_judge']['acc']:.3f} / {r['recon_judge']['fd']:.2f} |")
  return "\n".join(lines) + "\n"


def write_atomic(path: str, text: str) -> None:
  """Temporary file, then rename."""
  tmp = f"{path}.tmp-{os.getpid()}"
  with open(tmp, "w") as f:
    f.write(text)
  os.replace(tmp, path)


def main():
  """Runs the study and writes the table."""
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--image-size", type=int, default=16, help="16 or 32 (multiple of 16)")
  p.add_argument("--tok-steps", type=int, default=150)
  p.add_argument("--dit-steps", type=int, default=200)
  p.add_argument("--batch", type=int, default=16, help="tokenizer batch")
  p.add_argument("--dit-batch", type=int, default=32)
  p.add_argument("--lpips", type=float, default=0.0, help="LPIPS weight of every tokenizer")
  p.add_argument("--per-class", type=int, default=20, help="DiT samples per class")
  p.add_argument("--variants", default="uae,sd,esm,dsm")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--out", default="/tmp/diffusability")
  p.add_argument("--compile-cache", default="/tmp/uae_jax_jit_cache",
                 help="persistent XLA cache: the three KL-VAEs share most compiled functions")
  args = p.parse_args()
  if args.compile_cache:
    jax.config.update("jax_compilation_cache_dir", args.compile_cache)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  os.makedirs(args.out, exist_ok=True)
  data = digits(args.image_size)
  judge = Judge(data)
  real = judge(data["test"], data["test_y"])
  real["fd_train_floor"] = judge(data["train"], data["train_y"])["fd"]
  log(f"judge on real test digits: {real}")
  rows, grids = [], {}
  for v in args.variants.split(","):
    row, imgs = run_variant(v, data, judge, args)
    rows.append(row)
    grids[v] = imgs
  np.savez(os.path.join(args.out, "samples.npz"), **grids)
  result = {"args": vars(args), "real_test_judge": real, "rows": rows,
            "device": jax.devices()[0].platform}
  write_atomic(os.path.join(args.out, "diffusability.json"), json.dumps(result, indent=1))
  table = markdown(rows, real, args)
  write_atomic(os.path.join(args.out, "diffusability.md"), table)
  print(table)


if __name__ == "__main__":
  main()
