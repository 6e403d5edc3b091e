"""QG-VAE train step on this machine: images/s, the codebook search and reset share, memory.

    python -m bench.qgvae [--sizes tiny,qggan] [--steps 5] [--batch 0] [--no-memory | --memory-only]

For each size (`tiny` = configs/qgvae.py:tiny, 16 px; `qggan` = the QGGAN default at 128 px, timed
with the GAN not yet on, i.e. the plain G step of the first 5000 iterations):
  * the jitted train step on one device: steps/s and images/s (best of --steps after compile);
  * the codebook search alone (distances + argmin + gather + both VQ losses, forward and backward,
    on the step's (B, C, D) tokens) and one reset round (sort + gather of every codebook); their
    share of the step (the reset runs every R steps, so its amortised share is t_reset / R / t_step);
  * `qggan` only: the train step compiled (never run) for 8 fake devices with the trainer's
    shardings, and XLA's per-device memory analysis (arguments, outputs, temporaries).
    `--memory-only` does just this compile (no timing on one device).
Prints readable lines and a final `RESULT {json}` line.
"""
import argparse
import json
import os
import subprocess
import sys
import time

from absl import flags

flags.FLAGS.mark_as_parsed()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from configs import qgvae as qg_config  # noqa: E402
from uae_jax.losses import vq  # noqa: E402
from uae_jax.tasks import qgvae as task  # noqa: E402


def best_time(fn, *args, reps: int = 5) -> float:
  """Best wall time of `reps` calls of a jitted fn (after one warm-up call)."""
  jax.block_until_ready(fn(*args))
  best = float("inf")
  for _ in range(reps):
    t = time.perf_counter()
    jax.block_until_ready(fn(*args))
    best = min(best, time.perf_counter() - t)
  return best


def make_config(size: str, batch: int):
  """configs/qgvae.py at `size` ('tiny' or 'qggan'), one device, optional batch override."""
  c = qg_config.get_config("tiny" if size == "tiny" else "qggan")
  c.mesh.data, c.mesh.fsdp = 1, 1
  if batch:
    c.input.global_batch_size = batch
  return c


def time_step(c, steps: int) -> dict:
  """Step time of the jitted train step on one device with random images."""
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  state = jax.jit(lambda k: nn.unbox(task.init_state(c, k)))(jax.random.key(0))
  frozen = jax.device_put(task.load_frozen(c))
  s, b = c.input.image_size, c.input.global_batch_size
  batch = {"image": jax.random.uniform(jax.random.key(1), (b, s, s, 3))}
  step = jax.jit(task.make_train_step(c, "plain"))
  t0 = time.perf_counter()
  compiled = step.lower(state, batch, frozen).compile()
  compile_s = time.perf_counter() - t0
  t_step = best_time(lambda st: compiled(st, batch, frozen)[1]["loss"], state, reps=steps)
  # Search: quantize forward + backward on the step's token shapes and codebooks.
  book = state["params"]["codebook"]
  t = task.qg.num_tokens(c.model, s)
  z = jax.random.normal(jax.random.key(2), (b, t, c.model.code_dim))
  shared = c.model.kind == "patch"

  def search(z, book):
    cb = book[0] if shared else book
    def f(z, cb):
      o = vq.quantize(z, cb)
      return jnp.sum(o["q_st"]) + vq.vq_loss(o["codebook_loss"], o["commit_loss"])
    return jax.grad(f, argnums=(0, 1))(z, cb)

  t_search = best_time(jax.jit(search), z, book, reps=steps)
  m = jax.random.uniform(jax.random.key(3), book.shape[:2]) * (
      jax.random.uniform(jax.random.key(4), book.shape[:2]) < 0.5)
  t_reset = best_time(jax.jit(lambda bk, mm: vq.reset_codebook(bk, mm, jax.random.key(5))[0]),
                      book, m, reps=steps)
  r = c.vq.reset_every
  return {"batch": b, "image_size": s, "compile_s": compile_s, "step_s": t_step,
          "images_per_s": b / t_step, "search_s": t_search, "search_share": t_search / t_step,
          "reset_s": t_reset, "reset_every": r, "reset_share_amortised": t_reset / r / t_step}


def memory_8_devices(batch: int) -> dict:
  """Compiles the QGGAN-size step for 8 fake devices (subprocess) and returns XLA's memory analysis."""
  code = f"""
import json, os
from absl import flags; flags.FLAGS.mark_as_parsed()
import jax, flax.linen as nn
from configs import qgvae as qg_config
from uae_jax import sharding as sh
from uae_jax.tasks import qgvae as task
c = qg_config.get_config("qggan")
c.input.global_batch_size = {batch}
mesh = sh.make_mesh(c.mesh)
boxed = jax.eval_shape(lambda k: task.init_state(c, k), jax.random.key(0))
state_sh = sh.logical_shardings(boxed, mesh, c.sharding_rules)
state = sh.abstract_with_shardings(nn.unbox(boxed), state_sh)
s = c.input.image_size
batch = {{"image": jax.ShapeDtypeStruct(({batch}, s, s, 3), jax.numpy.float32,
                                        sharding=sh.batch_sharding(mesh))}}
frozen = jax.eval_shape(lambda: task.load_frozen(c))
rep = sh.replicated(mesh)
frozen = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=rep), frozen)
step = jax.jit(task.make_train_step(c, "plain"), out_shardings=(state_sh, None), donate_argnums=0)
import time
t0, c0 = time.perf_counter(), time.process_time()
comp = step.lower(state, batch, frozen).compile()
wall, cpu = time.perf_counter() - t0, time.process_time() - c0
ma = comp.memory_analysis()
book_sh = state_sh["params"]["codebook"].spec
print("RESULT " + json.dumps({{
    "devices": jax.device_count(), "global_batch": {batch},
    "argument_mb": ma.argument_size_in_bytes / 2**20, "output_mb": ma.output_size_in_bytes / 2**20,
    "temp_mb": ma.temp_size_in_bytes / 2**20, "alias_mb": ma.alias_size_in_bytes / 2**20,
    "codebook_spec": str(book_sh), "compile_wall_s": wall, "compile_cpu_s": cpu,
    "loadavg": os.getloadavg()}}))
"""
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  out = subprocess.run([sys.executable, "-c", code], env=env, cwd=root, capture_output=True,
                       text=True, check=False)
  lines = [l for l in out.stdout.splitlines() if l.startswith("RESULT ")]
  if not lines:
    return {"error": out.stderr[-2000:]}
  return json.loads(lines[-1][len("RESULT "):])


def main(argv=None):
  """Runs the requested sizes and prints the results."""
  p = argparse.ArgumentParser(prog="python -m bench.qgvae")
  p.add_argument("--sizes", default="tiny,qggan")
  p.add_argument("--steps", type=int, default=5)
  p.add_argument("--batch", type=int, default=0, help="override the batch (0 = the config's)")
  p.add_argument("--qggan-batch", type=int, default=4, help="timed batch at the QGGAN size")
  p.add_argument("--no-memory", action="store_true")
  p.add_argument("--memory-only", action="store_true",
                 help="only the QGGAN-size compile on 8 fake devices (no timing)")
  p.add_argument("--memory-batch", type=int, default=16, help="global batch of that compile")
  args = p.parse_args(argv)
  from uae_jax.metric_writers import quiet_library_logs  # pylint: disable=g-import-not-at-top
  quiet_library_logs()
  result = {}
  # --memory-only: no timed sizes, just the QGGAN-size compile on 8 fake devices below.
  for size in ([] if args.memory_only else args.sizes.split(",")):
    c = make_config(size, args.batch or (args.qggan_batch if size == "qggan" else 0))
    r = time_step(c, args.steps)
    result[size] = r
    print(f"{size}: batch {r['batch']} @ {r['image_size']} px: {r['step_s'] * 1e3:.1f} ms/step, "
          f"{r['images_per_s']:.1f} img/s (compile {r['compile_s']:.0f} s); codebook search "
          f"{r['search_s'] * 1e3:.2f} ms = {100 * r['search_share']:.1f} % of the step; reset "
          f"{r['reset_s'] * 1e3:.2f} ms every {r['reset_every']} steps = "
          f"{100 * r['reset_share_amortised']:.3f} % amortised", flush=True)
  if args.memory_only or ("qggan" in args.sizes.split(",") and not args.no_memory):
    result["qggan_8dev"] = mem = memory_8_devices(args.memory_batch)
    print(f"qggan on 8 fake devices, global batch {args.memory_batch}: {json.dumps(mem)}",
          flush=True)
  print("RESULT " + json.dumps(result))


if __name__ == "__main__":
  main()
