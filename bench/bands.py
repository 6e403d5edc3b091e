"""Benchmark of the band split: jitted FFT reference vs the matmul (MXU) fast path.

Usage: python -m bench.bands [--batch 64] [--size 16] [--channels 768] [--bands 4] [--runs 7]
                            [--band-split lowpass|residual_bandpass]

Both splits cost the same (one fixed operator); the split's frequency content is measured by
bench/band_energy.py.
"""
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
  fft = jax.jit(proj(method="fft").split)
  mm = jax.jit(proj(method="matmul").split)

  t_fft = _time(fft, z, args.runs)
  t_mm = _time(mm, z, args.runs)
  diff = float(np.max(np.abs(np.asarray(fft(z)) - np.asarray(mm(z)))))
  print(f"band split ({args.band_split}) z={shape} K={args.bands} on {jax.devices()[0].platform} "
        f"x{jax.device_count()}, median of {args.runs}:")
  print(f"  fft    : {t_fft * 1e3:9.2f} ms")
  print(f"  matmul : {t_mm * 1e3:9.2f} ms")
  print(f"  ratio fft/matmul: {t_fft / t_mm:.3f}")
  print(f"  max |fft - matmul|: {diff:.3e}")
  print("RESULT " + json.dumps({"benchmark": "bands", "shape": list(shape), "bands": args.bands,
                                "band_split": args.band_split,
                                "fft_ms": t_fft * 1e3, "matmul_ms": t_mm * 1e3,
                                "max_abs_diff": diff}))


if __name__ == "__main__":
  main()
