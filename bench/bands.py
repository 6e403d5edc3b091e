"""Benchmark of the band split: jitted FFT reference vs the two matmul (MXU) fast paths.

Usage: python -m bench.bands [--batch 64] [--size 16] [--channels 768] [--bands 4] [--runs 7]
                            [--band-split lowpass|residual_bandpass]

Times the FFT reference, the dense (K, H*W, H*W) operator and the separable real-DFT (Hartley)
path, says which one `method='matmul'` picks for the grid, and prints each one's speed-up over the
FFT and its max difference from it. Both band splits cost the same (one fixed operator); the
split's frequency content is measured by bench/band_energy.py.
"""
import os
import argparse
import functools
import json
import statistics
import time

import jax
import numpy as np

from uae_jax.models import bands as bands_lib


def _time(fn, z, runs):
  """Median wall time (s) of fn(z) over `runs` calls after one warm-up/compile call."""
  fn(z).block_until_ready()
  times = []
  for _ in range(runs):
    start = time.perf_counter()
    fn(z).block_until_ready()
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def main():
  """Times both split paths and prints times, their ratio and the max abs difference."""
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--batch", type=int, default=64)
  parser.add_argument("--size", type=int, default=16)
  parser.add_argument("--channels", type=int, default=768)
  parser.add_argument("--bands", type=int, default=4)
  parser.add_argument("--runs", type=int, default=7)
  parser.add_argument("--band-split", default="lowpass", choices=bands_lib.BAND_SPLITS)
  args = parser.parse_args()

  shape = (args.batch, args.size, args.size, args.channels)
  z = jax.device_put(np.random.default_rng(0).standard_normal(shape).astype(np.float32))
  proj = functools.partial(bands_lib.BandProjector, args.size, args.size, args.bands,
                           band_split=args.band_split)
  fns = {m: jax.jit(proj(method=m).split) for m in ("fft", "dense", "separable")}
  ref = np.asarray(fns["fft"](z))
  times = {m: _time(f, z, args.runs) for m, f in fns.items()}
  diffs = {m: float(np.max(np.abs(np.asarray(f(z)) - ref))) for m, f in fns.items() if m != "fft"}
  chosen = bands_lib.fast_path(args.size, args.size)
  print(f"band split ({args.band_split}) z={shape} K={args.bands} on {jax.devices()[0].platform} "
        f"x{jax.device_count()}, median of {args.runs}, load {os.getloadavg()[0]:.2f}/"
        f"{os.cpu_count()} cores:")
  for m, t in times.items():
    extra = "" if m == "fft" else (f" | fft/{m} {times['fft'] / t:6.2f}x | max |fft - {m}| "
                                   f"{diffs[m]:.2e}" + ("  <- method='matmul'" if m == chosen else ""))
    print(f"  {m:9s}: {t * 1e3:9.2f} ms{extra}")
  print("RESULT " + json.dumps({"benchmark": "bands", "shape": list(shape), "bands": args.bands,
                                "band_split": args.band_split, "matmul_path": chosen,
                                "fft_ms": times["fft"] * 1e3, "dense_ms": times["dense"] * 1e3,
                                "separable_ms": times["separable"] * 1e3,
                                "speedup_vs_fft": times["fft"] / times[chosen],
                                "max_abs_diff": max(diffs.values()),
                                "load": os.getloadavg()[0]}))


if __name__ == "__main__":
  main()
