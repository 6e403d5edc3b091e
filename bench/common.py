"""Measurement helpers shared by the benchmarks: the machine's matmul peak and compiled costs."""
import time

import jax
import jax.numpy as jnp


def matmul_peak(n: int = 2048, reps: int = 10) -> float:
  """Measured float32 matmul FLOP/s of this machine (best of `reps`), the baseline for ratios."""
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
  f = jax.jit(lambda x, y: x @ y)
  f(a, a).block_until_ready()
  best = float("inf")
  for _ in range(reps):
    t = time.perf_counter()
    f(a, a).block_until_ready()
    best = min(best, time.perf_counter() - t)
  return 2 * n**3 / best


def compiled_cost(compiled) -> dict:
  """XLA's cost analysis of a compiled function as one dict (older JAX returns a list)."""
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return dict(cost or {})
