"""Semantic-encoder forward throughput: images/s and the fraction of the float32 matmul peak.

    python -m bench.encoders [--kinds dinov2,clip,siglip2,mae] [--batch 8] [--reps 5] [--full-run]

For each encoder kind of `uae_jax.models.encoders`:
  tiny  the CPU test size (64 px tokenizer images, 8 x 8 latent grid): compiled and timed;
  full  the official size (DINOv2-B/14 and CLIP-L/14 at 224 px, SigLIP2-B/16 at 256 px, from
        256 px tokenizer images; MAE-B/16 at 224 px from 224 px images, its 14 x 14 grid): compiled
        only, giving XLA's FLOP count per image (`cost_analysis`); with --full-run it is also timed
        on one small batch.
The achieved FLOP/s (XLA FLOPs / measured time) is divided by a float32 matmul peak measured in the
same process, so the ratio compares like with like on this machine.
"""
import argparse
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from bench.common import compiled_cost, matmul_peak
from uae_jax.models import encoders


def encoder_config(kind: str, tiny: bool) -> dict:
  """The registry's full-size config of `kind`, or its CPU test size."""
  cfg = dict(encoders.DEFAULTS[kind])
  if tiny:
    cfg.update(encoders.TINY[kind])
  return cfg


def compile_forward(cfg: dict, batch: int, image_size: int):
  """(compiled forward, params, images spec, FLOPs per call) without running anything big."""
  model = encoders.build(cfg)
  images = jax.ShapeDtypeStruct((batch, image_size, image_size, 3), jnp.float32)
  import flax.linen as nn
  abstract = jax.eval_shape(lambda: nn.unbox(model.init(jax.random.key(0), jnp.zeros(
      images.shape, images.dtype))))
  fwd = jax.jit(lambda p, x: model.apply(p, x))
  t = time.perf_counter()
  compiled = fwd.lower(abstract, images).compile()
  compile_s = time.perf_counter() - t
  cost = compiled_cost(compiled)
  return model, compiled, float(cost.get("flops", 0.0)), compile_s


def time_forward(model, compiled, batch: int, image_size: int, reps: int) -> float:
  """Best wall time (s) of one compiled forward over `reps` runs on random weights and images."""
  import flax.linen as nn
  x = jax.random.uniform(jax.random.key(1), (batch, image_size, image_size, 3))
  params = jax.jit(lambda: nn.unbox(model.init(jax.random.key(0), x)))()
  compiled(params, x).block_until_ready()
  best = float("inf")
  for _ in range(reps):
    t = time.perf_counter()
    compiled(params, x).block_until_ready()
    best = min(best, time.perf_counter() - t)
  return best


def bench_kind(kind: str, args, peak: float) -> dict:
  """Tiny timed + full compiled (and optionally timed) numbers for one encoder kind."""
  out = {"kind": kind}
  for size, tiny in (("tiny", True), ("full", False)):
    cfg = encoder_config(kind, tiny)
    batch = args.batch if tiny else args.full_batch
    # The tokenizer image: decoder patch 8 x the tiny 8 x 8 grid, else patch 16 x the full grid.
    image = 64 if tiny else 16 * encoders.latent_grid(cfg)
    model, compiled, flops, compile_s = compile_forward(cfg, batch, image)
    row = {"batch": batch, "image_px": image, "encoder_px": cfg["input_size"],
           "gflops_per_image": flops / batch / 1e9, "compile_s": compile_s}
    if tiny or args.full_run:
      secs = time_forward(model, compiled, batch, image, args.reps if tiny else 1)
      row.update(images_per_s=batch / secs, peak_fraction=flops / secs / peak,
                 load=os.getloadavg()[0])
    out[size] = row
    print(f"{kind:8s} {size:4s} batch {batch:2d} {image}->{cfg['input_size']} px  "
          f"{row['gflops_per_image']:8.3f} GFLOP/img  compile {compile_s:5.1f} s"
          + (f"  {row['images_per_s']:8.2f} img/s  {100 * row['peak_fraction']:5.1f} % of peak"
             if "images_per_s" in row else "  (compiled only)")
          + f"  load {os.getloadavg()[0]:.1f}", flush=True)
  return out


def main(argv=None):
  """Parses flags, measures the matmul peak, benchmarks each kind, prints a RESULT line."""
  p = argparse.ArgumentParser(description=__doc__)
  p.add_argument("--kinds", default="dinov2,clip,siglip2,mae")
  p.add_argument("--batch", type=int, default=8, help="tiny-size batch")
  p.add_argument("--full-batch", type=int, default=2, help="full-size batch")
  p.add_argument("--reps", type=int, default=5)
  p.add_argument("--full-run", action="store_true", help="also time the full-size forward")
  p.add_argument("--quick", action="store_true", help="(accepted for bench.run_all)")
  args = p.parse_args(argv)
  peak = matmul_peak()
  print(f"float32 matmul peak: {peak / 1e9:.1f} GFLOP/s on {jax.devices()[0].platform}")
  results = [bench_kind(k.strip(), args, peak) for k in args.kinds.split(",") if k.strip()]
  print("RESULT " + json.dumps({"peak_gflops": peak / 1e9, "encoders": results}))
  return results


if __name__ == "__main__":
  np.set_printoptions(precision=3)
  main()
