"""Generation-evaluation throughput: Inception feature extraction images/s, and a TPU estimate.

Measures the sharded feature extractor of `python -m uae_jax.evaluate gen` (pool + sFID spatial
tap + IS logits, ADM/TF1 preprocessing) on uint8 256 x 256 images on this machine's devices, reads
the compiled FLOPs per image from XLA's cost analysis, and estimates the time for FID-50k on a TPU
v5e-8 (8 chips x 197 TFLOP/s bf16 peak):

  features: 60k images (50k samples + the 10k ADM reference images, which are cached after the
  first run) x FLOPs/image / (8 x peak x utilisation). The network runs in float32 with HIGHEST
  matmul precision, which TPUs emulate with ~6 bf16 passes, so the estimate is given at the bf16
  peak (a lower bound) and at peak / 6 (what float32 HIGHEST costs);
  precision/recall: the k-NN searches are matmuls, 2 x D FLOPs per pair, for (50k^2 + 10k^2)
  pairs (radii) + 2 x 50k x 10k pairs (coverage), counted from the formula (XLA's cost analysis
  counts a scan body once).

Weights are seeded random (FLOPs and speed do not depend on the values); `--inception PATH` uses a
real file instead.

  .venv/bin/python -m bench.gen_eval                     # batch 8 per device, 3 timed batches
  .venv/bin/python -m bench.gen_eval --per-device-batch 16 --batches 5
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Optional, Sequence

import numpy as np

V5E_BF16_PEAK = 197e12      # FLOP/s per chip
V5E_CHIPS = 8
F32_HIGHEST_PASSES = 6      # bf16 passes per float32 HIGHEST matmul on TPU (approximate)
SAMPLES, REF_IMAGES, DIM = 50_000, 10_000, 2048


def _variables(path: str):
  """Real weights from `path`, else the seeded random FID Inception with the classifier."""
  from uae_jax.evaluate import inception as inc
  if path:
    return inc.load_inception(path)
  here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  sys.path.insert(0, os.path.join(here, "tests", "golden"))
  import make_inception_golden as golden  # pylint: disable=g-import-not-at-top
  shapes = inc.torch_state_dict_shapes(with_logits=True)
  shapes.update({"fc.bias": (inc.NUM_LOGITS,)})
  return inc.convert_state_dict(golden.random_state_dict(shapes, golden.SEED))


def _flops(compiled) -> float:
  """Total FLOPs from `compiled.cost_analysis()` (a dict, or a list of dicts in older JAX)."""
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0]
  return float(cost.get("flops", 0.0))


def measure(per_device_batch: int, batches: int, size: int, inception: str) -> dict:
  """Images/s of the jitted sharded extractor, FLOPs/image, and the TPU v5e-8 estimate."""
  import jax
  from uae_jax.evaluate import gen_eval
  ext = gen_eval.GenFeatureExtractor(_variables(inception), "tf1", per_device_batch)
  shape = (size, size, 3)
  t0 = time.perf_counter()
  compiled = ext.lower(shape).compile()
  compile_s = time.perf_counter() - t0
  flops_per_image = _flops(compiled) / per_device_batch  # per-device program = its share
  rng = np.random.default_rng(0)
  host = rng.integers(0, 256, (ext.batch,) + shape, dtype=np.uint8)
  x = jax.device_put(host, ext.batch_sh)
  jax.block_until_ready(compiled(ext.variables, x))  # warm-up
  t0 = time.perf_counter()
  for _ in range(batches):
    out = compiled(ext.variables, x)
  jax.block_until_ready(out)
  seconds = time.perf_counter() - t0
  images_per_s = batches * ext.batch / seconds
  feature_flops = (SAMPLES + REF_IMAGES) * flops_per_image
  pr_flops = 2 * DIM * (SAMPLES ** 2 + REF_IMAGES ** 2 + 2 * SAMPLES * REF_IMAGES)
  pod = V5E_CHIPS * V5E_BF16_PEAK
  return {
      "devices": ext.mesh.size, "device_kind": jax.devices()[0].device_kind,
      "global_batch": ext.batch, "image_size": size, "compile_seconds": round(compile_s, 1),
      "images_per_s": round(images_per_s, 2),
      "gflops_per_image": round(flops_per_image / 1e9, 3),
      "achieved_gflops_per_s": round(images_per_s * flops_per_image / 1e9, 1),
      "cpu_hours_for_60k_images": round((SAMPLES + REF_IMAGES) / images_per_s / 3600, 2),
      "v5e8_features_seconds_at_bf16_peak": round(feature_flops / pod, 2),
      "v5e8_features_seconds_at_f32_highest_peak": round(
          feature_flops * F32_HIGHEST_PASSES / pod, 2),
      "v5e8_features_seconds_f32_highest_at_40pct": round(
          feature_flops * F32_HIGHEST_PASSES / (0.4 * pod), 2),
      "pr_tflops": round(pr_flops / 1e12, 1),
      "v5e8_pr_seconds_f32_highest_at_40pct": round(
          pr_flops * F32_HIGHEST_PASSES / (0.4 * pod), 2),
  }


def main(argv: Optional[Sequence[str]] = None) -> int:
  """Command-line entry point: prints a summary and a final RESULT {json} line."""
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--per-device-batch", type=int, default=8)
  p.add_argument("--batches", type=int, default=3, help="timed batches after one warm-up")
  p.add_argument("--image-size", type=int, default=256, help="sample size (ADM 256)")
  p.add_argument("--inception", default="", help="real weights (default: seeded random)")
  args = p.parse_args(argv)
  res = measure(args.per_device_batch, args.batches, args.image_size, args.inception)
  print(f"feature extraction on {res['devices']} x {res['device_kind']}: "
        f"{res['images_per_s']} images/s (global batch {res['global_batch']}, "
        f"{res['gflops_per_image']} GFLOP/image, {res['achieved_gflops_per_s']} GFLOP/s; "
        f"compile {res['compile_seconds']} s)")
  print(f"FID-50k here: {res['cpu_hours_for_60k_images']} h for 50k samples + 10k references")
  print(f"TPU v5e-8 estimate for 60k images: {res['v5e8_features_seconds_at_bf16_peak']} s at "
        f"the bf16 peak, {res['v5e8_features_seconds_at_f32_highest_peak']} s at the float32-"
        f"HIGHEST peak, {res['v5e8_features_seconds_f32_highest_at_40pct']} s at 40 % of it; "
        f"precision/recall {res['pr_tflops']} TFLOP -> "
        f"{res['v5e8_pr_seconds_f32_highest_at_40pct']} s")
  print("RESULT " + json.dumps(res))
  return 0


if __name__ == "__main__":
  sys.exit(main())
