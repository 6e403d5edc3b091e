"""Cost of the Spectrum Matching terms and the KL-VAE train step.

  python bench/spectrum_matching.py                       # tiny and mid sizes, this machine
  python bench/spectrum_matching.py --sizes f16d16:256 --batch 32   # on an accelerator

For each `size:image_px` it times the jitted KL-VAE train step (no GAN, LPIPS on, as the recipe)
with no regulariser, with ESM (weight 0.01) and with DSM, and reports the extra time of each term
as a fraction of the plain step; then images/s and the fraction of the measured matmul peak
(XLA's FLOP count of the step / time / peak of a large float32 matmul on the same device).
Prints one JSON line per size.
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

from configs import kl_vae as cfg_lib  # noqa: E402
from uae_jax.models import lpips as lpips_lib  # noqa: E402
from uae_jax.tasks import kl_vae as task  # noqa: E402

# Named sizes: 'mid' is a 3-level f4 model at 64 px (16 x 16 latent) between tiny and f16d16.
CUSTOM = {"mid": dict(size="tiny", channels=(64, 128, 128), latent_channels=8)}


def matmul_peak(n: int = 2048, reps: int = 5) -> float:
  """Measured FLOP/s of an n x n float32 matmul on the default device."""
  a = jnp.ones((n, n), jnp.float32)
  f = jax.jit(lambda x: x @ x)
  f(a).block_until_ready()
  t = time.perf_counter()
  for _ in range(reps):
    out = f(a)
  out.block_until_ready()
  return 2 * n ** 3 * reps / (time.perf_counter() - t)


def config_for(size: str, px: int, batch: int, variant: str):
  """A tiny-style config with the named model at `px` pixels and one regulariser variant."""
  c = cfg_lib.get_config("tiny" + ("," + variant if variant != "sd" else ""))
  c.input.image_size, c.input.global_batch_size = px, batch
  if size in CUSTOM:
    c.model.update(CUSTOM[size])
  else:
    c.model.size = size
  return c


def time_step(c, frozen, reps: int) -> tuple:
  """(seconds per step, XLA FLOPs per step) of the jitted train step."""
  state = nn.unbox(task.init_state(c, jax.random.key(0)))
  step = jax.jit(task.make_train_step(c), donate_argnums=0)
  x = {"image": jnp.asarray(np.random.default_rng(0).random(
      (c.input.global_batch_size, c.input.image_size, c.input.image_size, 3)), jnp.float32)}
  lowered = step.lower(state, x, frozen)
  flops = (lowered.compile().cost_analysis() or {}).get("flops", float("nan"))
  state, m = step(state, x, frozen)
  jax.block_until_ready(m["loss"])
  t = time.perf_counter()
  for _ in range(reps):
    state, m = step(state, x, frozen)
  jax.block_until_ready(m["loss"])
  return (time.perf_counter() - t) / reps, float(flops)


def main():
  """Runs the benchmark and prints JSON lines."""
  p = argparse.ArgumentParser()
  p.add_argument("--sizes", default="tiny:32,mid:64")
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--reps", type=int, default=3)
  args = p.parse_args()
  frozen = {"lpips": lpips_lib.load_lpips_params("vgg16")}
  peak = matmul_peak()
  for spec in args.sizes.split(","):
    size, px = spec.split(":")
    res = {"size": size, "image_px": int(px), "batch": args.batch, "device": jax.devices()[0].platform,
           "matmul_peak_flops": peak}
    for variant in ("sd", "esm", "dsm"):
      c = config_for(size, int(px), args.batch, variant)
      if variant == "sd":
        c.loss.log_spectra = False  # the plain step pays for no spectrum at all
      res[f"{variant}_step_s"], res[f"{variant}_flops"] = time_step(c, frozen, args.reps)
    base = res["sd_step_s"]
    res["esm_extra_fraction"] = (res["esm_step_s"] - base) / base
    res["dsm_extra_fraction"] = (res["dsm_step_s"] - base) / base
    res["images_per_s"] = args.batch / base
    res["peak_fraction"] = res["sd_flops"] / base / peak
    print(json.dumps(res), flush=True)


if __name__ == "__main__":
  main()
