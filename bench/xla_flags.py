"""Our B/B stage-1 step (the `vs_torch` step) under different XLA:CPU flags, interleaved.

    python -m bench.xla_flags                                   # the default variants below
    python -m bench.xla_flags --variants "" " --xla_cpu_use_onednn=true" --rounds 3
    python -m bench.xla_flags --variants "" --host_mallocs system tcmalloc   # malloc A/B

XLA reads `XLA_FLAGS` once per process, so every variant runs in its own subprocess; the rounds
alternate the variants (A, B, C, A, B, C, ...) so a change in machine load hits them alike. Each
run prints its compile time, the best and median of three timed 2-step windows, the kernel
(system) CPU seconds and minor page faults per step, and the load. Each variant runs under each
`--host_mallocs` entry (uae_jax/host_malloc.py: glibc's malloc, or tcmalloc when installed).
(A flag string starting with `--` must be passed with a leading space, `" --xla_..."`, or
argparse takes it for an option.)
"""
import argparse
import os
import re
import statistics
import subprocess
import sys

from uae_jax import host_malloc

# The defaults: no flag; YNNPACK's dot path off (every dot through Eigen); oneDNN matmuls as
# custom calls. Flags that change numerics (fast math, flush-to-zero) are not candidates.
VARIANTS = ("", "--xla_cpu_experimental_ynn_fusion_type=",
            "--xla_cpu_experimental_onednn_custom_call=true")

_CHILD = """
import os, resource, sys, numpy as np
from uae_jax import host_malloc
host_malloc.use(sys.argv[1])
from bench import vs_torch as vt
model = vt.jax_model("B", "B")
params = vt.jax_params(model, 256)
x = np.random.default_rng(0).uniform(size=(4, 256, 256, 3)).astype(np.float32)
side = vt.JaxSide(model, params, x)
compile_s, _ = side.compile()
side.run(1)
r0 = resource.getrusage(resource.RUSAGE_SELF)
times = [side.run(2) for _ in range(3)]
r1 = resource.getrusage(resource.RUSAGE_SELF)
print(f"RESULT {compile_s:.2f} {min(times):.4f} {float(np.median(times)):.4f} "
      f"{os.getloadavg()[0]:.2f} {(r1.ru_stime - r0.ru_stime) / 6:.3f} "
      f"{(r1.ru_minflt - r0.ru_minflt) / 6:.0f}", flush=True)
"""
_KEYS = ("compile_s", "best_s", "median_s", "load", "sys_s_per_step", "faults_per_step")


def run_variant(flags: str, malloc: str = "system") -> dict:
  """One fresh process under `flags` and `malloc`: compile seconds, best / median seconds per
  step, load, kernel seconds and page faults per step."""
  env = dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS="cpu")
  env.pop("LD_PRELOAD", None)
  out = subprocess.run([sys.executable, "-c", _CHILD, malloc], env=env, capture_output=True,
                       text=True, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  m = re.search(r"RESULT (.+)", out.stdout)
  if m is None:
    return {"error": (out.stderr.strip().splitlines() or ["no output"])[-1]}
  return dict(zip(_KEYS, map(float, m.group(1).split())))


def main(argv=None):
  """Prints one line per run and a summary of the best step time per variant."""
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--variants", nargs="*", default=list(VARIANTS), help="XLA_FLAGS strings")
  p.add_argument("--rounds", type=int, default=2)
  p.add_argument("--host_mallocs", nargs="*", choices=host_malloc.CHOICES[1:],
                 default=["system"] + (["tcmalloc"] if host_malloc.find_tcmalloc() else []))
  args = p.parse_args(argv)
  runs = {(v, m): [] for v in args.variants for m in args.host_mallocs}
  for r in range(args.rounds):
    for v, m in runs:
      res = run_variant(v, m)
      runs[v, m].append(res)
      print(f"round {r} | {v or '(none)'} | {m} malloc | {res}", flush=True)
  base = [x["best_s"] for x in next(iter(runs.values())) if "best_s" in x]
  print("\n| XLA_FLAGS | malloc | best s/step per round | kernel s/step | page faults/step "
        "| ratio to the first variant |\n|---|---|---|---|---|---|")
  for (v, m), rs in runs.items():
    ok = [x for x in rs if "best_s" in x]
    best = [x["best_s"] for x in ok]
    ratio = statistics.median(base) / statistics.median(best) if best and base else float("nan")
    col = lambda key, fmt: " / ".join(format(x[key], fmt) for x in ok)
    print(f"| `{v or '(none)'}` | {m} | {col('best_s', '.2f')} | {col('sys_s_per_step', '.2f')} "
          f"| {col('faults_per_step', '.0f')} | {ratio:.3f} |")


if __name__ == "__main__":
  main()
