"""Train-step throughput on this machine: steps/s, images/s, XLA FLOPs and the fraction of peak.

    python -m bench.train_step [--steps 10] [--configs tiny,mid] [--stages 1,3]
    python -m bench.train_step --gan_phases=before_d,d_only,full [--configs tiny]

`--gan_phases` times stage 2 and the three phases of stage 3 (before the discriminator starts,
discriminator only, discriminator + generator GAN term), so the cost of each phase is visible.

The float32 matmul peak is measured in the same run (a jitted 2048^3 matmul), so the achieved
FLOP/s ratio compares like with like. `tiny` is the demo config (64 px, tiny encoder/decoder);
`mid` is a DINOv2-S encoder with the 'small' decoder at 128 px.
"""
import argparse
import json
import os
import tempfile
import time

from absl import flags

flags.FLAGS.mark_as_parsed()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from bench.common import compiled_cost, matmul_peak  # noqa: E402
from uae_jax import train  # noqa: E402
from uae_jax.data import pipeline  # noqa: E402
from uae_jax.metric_writers import quiet_library_logs  # noqa: E402


# Stage-3 phases as (d_start_frac, g_start_frac): a fraction of 1.0 never starts in the run.
GAN_PHASES = {"full": (0.0, 0.0), "before_d": (1.0, 1.0), "d_only": (0.0, 1.0)}


def make_config(name: str, stage: int, steps: int, phase: str = "full"):
  """The tiny demo config or the mid-size one, for a stage (and a stage-3 GAN phase)."""
  import importlib
  c = importlib.import_module(f"configs.stage{stage}").get_config(f"tiny,steps={steps}")
  c.gan.d_start_frac, c.gan.g_start_frac = GAN_PHASES[phase]
  if name == "mid":
    c.model.encoder.update(size="S", input_size=112, pos_embed_grid=8)
    c.model.decoder.update(size="small", patch_size=16)
    c.input.image_size = 128
  elif name != "tiny":
    raise ValueError(f"unknown bench config {name!r}")
  c.mesh.data, c.mesh.fsdp = 1, 1
  return c


def bench_one(name: str, stage: int, steps: int, peak: float, phase: str = "full") -> dict:
  """Compiles and times one config's train step on one device."""
  c = make_config(name, stage, steps + 2, phase)
  with tempfile.TemporaryDirectory() as wd:
    tr = train.Trainer(c, wd, devices=jax.devices()[:1])
    it = pipeline.make_train_iterator(c.input)
    state, _ = tr.initial_state(it)
    batches = []
    for _ in range(steps + 2):
      b = next(it)
      batches.append(pipeline.to_global_array({"image": b["image"]}, tr.ctx.batch_sh))
    step_fn = tr.step_fn(0)  # every step of a bench run is in the same GAN phase
    t = time.perf_counter()
    compiled = step_fn.lower(state, batches[0], tr.frozen).compile()
    compile_s = time.perf_counter() - t
    cost = compiled_cost(compiled)
    flops = float(cost.get("flops", 0.0))
    for b in batches[:2]:  # warm-up
      state, m = step_fn(state, b, tr.frozen)
    jax.block_until_ready(m)
    t = time.perf_counter()
    for b in batches[2:]:
      state, m = step_fn(state, b, tr.frozen)
    jax.block_until_ready(m)
    dt = (time.perf_counter() - t) / steps
    tr.close()
  return dict(config=name, stage=stage, phase=phase, batch=c.input.global_batch_size, image=c.input.image_size,
              compile_s=round(compile_s, 1), step_s=round(dt, 4), steps_per_s=round(1 / dt, 3),
              images_per_s=round(c.input.global_batch_size / dt, 1), gflops_per_step=round(flops / 1e9, 2),
              achieved_gflops=round(flops / dt / 1e9, 2), fraction_of_peak=round(flops / dt / peak, 3))


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--steps", type=int, default=10)
  p.add_argument("--configs", default="tiny,mid")
  p.add_argument("--stages", default="1,3")
  p.add_argument("--gan_phases", default="",
                 help="comma list of stage-3 phases (before_d,d_only,full) timed after stage 2, "
                      "instead of --stages")
  a = p.parse_args()
  quiet_library_logs()
  peak = matmul_peak()
  print(f"float32 matmul peak (2048^3, 1 device, {os.cpu_count()} cores): {peak / 1e9:.1f} GFLOP/s")
  rows = []
  cases = ([(2, "full")] + [(3, p) for p in a.gan_phases.split(",")] if a.gan_phases else
           [(int(s), "full") for s in a.stages.split(",")])
  for name in a.configs.split(","):
    for stage, phase in cases:
      r = bench_one(name, stage, a.steps, peak, phase)
      rows.append(r)
      print(f"{name:5s} stage {stage} {phase:8s}: batch {r['batch']} @ {r['image']} px | {r['steps_per_s']:.2f} steps/s "
            f"| {r['images_per_s']:.1f} img/s | {r['gflops_per_step']:.1f} GFLOP/step | "
            f"{r['achieved_gflops']:.1f} GFLOP/s = {100 * r['fraction_of_peak']:.1f}% of matmul peak "
            f"| compile {r['compile_s']:.0f} s", flush=True)
  print("RESULT " + json.dumps({"matmul_peak_gflops": round(peak / 1e9, 1), "rows": rows}))


if __name__ == "__main__":
  main()
