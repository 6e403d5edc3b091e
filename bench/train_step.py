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


class Case:
  """One config's compiled train step, its state and batches, ready to be timed in rounds."""

  def __init__(self, name: str, stage: int, steps: int, phase: str = "full"):
    self.name, self.stage, self.phase, self.steps = name, stage, phase, steps
    self.config = c = make_config(name, stage, steps + 2, phase)
    self._wd = tempfile.TemporaryDirectory()
    self.trainer = tr = train.Trainer(c, self._wd.name, devices=jax.devices()[:1])
    it = pipeline.make_train_iterator(c.input)
    self.state, _ = tr.initial_state(it)
    self.batches = [pipeline.to_global_array({"image": next(it)["image"]}, tr.ctx.batch_sh)
                    for _ in range(steps)]
    self.step_fn = tr.step_fn(0)  # every step of a bench run is in the same GAN phase
    t = time.perf_counter()
    compiled = self.step_fn.lower(self.state, self.batches[0], tr.frozen).compile()
    self.compile_s = time.perf_counter() - t
    self.flops = float(compiled_cost(compiled).get("flops", 0.0))
    self.times = []
    self.time_round()  # warm-up, not kept
    self.times = []

  def time_round(self) -> float:
    """Seconds per step over this case's batches (the state carries on between rounds)."""
    t = time.perf_counter()
    for b in self.batches:
      self.state, m = self.step_fn(self.state, b, self.trainer.frozen)
    jax.block_until_ready(m)
    dt = (time.perf_counter() - t) / len(self.batches)
    self.times.append(dt)
    return dt

  def row(self, peak: float) -> dict:
    """The best round's numbers (the least disturbed by other load on the machine)."""
    dt, c = min(self.times), self.config
    self.trainer.close()
    self._wd.cleanup()
    return dict(config=self.name, stage=self.stage, phase=self.phase, batch=c.input.global_batch_size,
                image=c.input.image_size, compile_s=round(self.compile_s, 1), step_s=round(dt, 4),
                steps_per_s=round(1 / dt, 3), images_per_s=round(c.input.global_batch_size / dt, 1),
                gflops_per_step=round(self.flops / 1e9, 2),
                achieved_gflops=round(self.flops / dt / 1e9, 2),
                fraction_of_peak=round(self.flops / dt / peak, 3),
                rounds=[round(t, 4) for t in self.times], load_avg=round(os.getloadavg()[0], 2))


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--steps", type=int, default=10)
  p.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds; the best is kept")
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
    # Cases are timed in interleaved rounds and the best round is kept, so a burst of other load
    # on the machine does not land on one case only.
    built = [Case(name, stage, a.steps, phase) for stage, phase in cases]
    for _ in range(a.rounds):
      for case in built:
        case.time_round()
    for case in built:
      r = case.row(peak)
      rows.append(r)
      print(f"{name:5s} stage {case.stage} {case.phase:8s}: batch {r['batch']} @ {r['image']} px | "
            f"{r['steps_per_s']:.2f} steps/s | {r['images_per_s']:.1f} img/s | "
            f"{r['gflops_per_step']:.1f} GFLOP/step | {r['achieved_gflops']:.1f} GFLOP/s = "
            f"{100 * r['fraction_of_peak']:.1f}% of matmul peak | compile {r['compile_s']:.0f} s | "
            f"load {r['load_avg']}", flush=True)
    base = rows[-len(built)]
    for r in rows[-len(built) + 1:]:
      print(f"{name:5s} stage {r['stage']} {r['phase']:8s} / stage {base['stage']} "
            f"{base['phase']}: {base['step_s'] / r['step_s']:.3f}x the speed")
  print("RESULT " + json.dumps({"matmul_peak_gflops": round(peak / 1e9, 1), "rows": rows}))


if __name__ == "__main__":
  main()
