"""DiT benchmarks: train-step and sampling throughput here, the full DiT^DH-XL step compiled for a pod.

    python -m bench.dit                    # CPU rows (tiny, mid) + sampling + XL compiled at 8 devices
    python -m bench.dit --xl-devices 8,1x256,2x128  # also 256 devices (8-15 min each here)
    python -m bench.dit --no-xl            # only the measured CPU rows

Measured rows time the DiT step alone (AdamW + EMA, flow-matching loss on random normalised
latents; the frozen UAE encoder of the real step adds a DINOv2 forward, about 3 % of the
DiT^DH-XL step's FLOPs at 256 px) and report images/s, XLA FLOPs per step and the fraction of
this machine's measured float32 matmul peak. The sampling row times Euler with 50 grid points and
classifier-free guidance (2 x 49 evaluations), latents only.

The XL rows lower and compile (never run) the same step for DiT^DH-XL at 16 x 16 x 768 on N fake
CPU devices with the trainer's shardings (FSDP over all devices, per-device batch 4), in a
subprocess with `--xla_force_host_platform_device_count=N`, and report per-device state bytes,
`memory_analysis()`, `cost_analysis()` FLOPs per device, and the estimated step time and MFU on
TPU v5p (459 TFLOP/s bf16 per chip) at 50 % and 30 % matmul efficiency, collectives not modelled
(docs/scaling.md has the method).
Prints one `ROW {json}` per result and a final `RESULT {json}`.
"""
import argparse
import json
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
V5P_PEAK = 459e12


def _load() -> list:
  """1/5/15-minute load averages (timings on a shared machine are only as good as these)."""
  return [round(x, 2) for x in os.getloadavg()]


def _config(size: str, head: str, grid: int, channels: int, batch: int, steps: int = 100):
  """A DiT task config for synthetic-latent benchmarking (no tokenizer is read)."""
  sys.path.insert(0, REPO)
  from configs import dit as dit_cfg
  c = dit_cfg.get_config(f"tiny,steps={steps}")
  c.model.update(size=size, head_size=head, input_size=grid, in_channels=channels,
                 num_classes=1000)
  c.input.global_batch_size = batch
  return c


def dit_step_fn(config):
  """(state init fn, jittable step(state, x1, labels)) of the DiT alone."""
  import jax
  import optax
  from uae_jax.tasks import dit as dit_task
  tx, _ = dit_task.make_optimizer(config)
  model = dit_task.build_model(config)

  def step(state, x1, labels):
    rng = jax.random.fold_in(jax.random.key(0), state["step"])
    (loss, _), grads = jax.value_and_grad(
        lambda p: dit_task.loss_fn(config, model, p, x1, labels, rng), has_aux=True)(
            state["params"])
    updates, opt = tx.update(grads, state["opt"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    return dict(state, step=state["step"] + 1, params=params, opt=opt,
                ema=dit_task.ema_update(config, state["ema"], params)), loss

  return step


def measure_train(name: str, config, steps: int, peak: float) -> dict:
  """Images/s, FLOPs/step and fraction of the matmul peak of the DiT step on one device."""
  import flax.linen as nn
  import jax
  import jax.numpy as jnp
  from bench.common import compiled_cost
  from uae_jax.tasks import dit as dit_task
  m, b = config.model, config.input.global_batch_size
  state = jax.jit(lambda k: nn.unbox(dit_task.init_state(config, k)))(jax.random.key(0))
  x1 = jax.random.normal(jax.random.key(1), (b, m.input_size, m.input_size, m.in_channels))
  labels = jnp.arange(b, dtype=jnp.int32) % m.num_classes
  step = jax.jit(dit_step_fn(config), donate_argnums=0)
  t0 = time.perf_counter()
  compiled = step.lower(state, x1, labels).compile()
  compile_s = time.perf_counter() - t0
  flops = compiled_cost(compiled).get("flops", float("nan"))
  state, loss = step(state, x1, labels)
  loss.block_until_ready()
  t0 = time.perf_counter()
  for _ in range(steps):
    state, loss = step(state, x1, labels)
  loss.block_until_ready()
  dt = (time.perf_counter() - t0) / steps
  return dict(row=name, size=m.size, head=m.head_size, latent=[m.input_size, m.input_size,
              m.in_channels], batch=b, compile_s=round(compile_s, 1), step_s=round(dt, 4),
              images_per_s=round(b / dt, 1), gflops_per_step=round(flops / 1e9, 2),
              fraction_of_peak=round(flops / dt / peak, 3), loadavg=_load())


def measure_sampling(config, batch: int, num_points: int = 50, scale: float = 1.5) -> dict:
  """Images/s (latents) of Euler-50 with CFG for the config's DiT (random weights)."""
  import flax.linen as nn
  import jax
  import jax.numpy as jnp
  from uae_jax.generate import samplers, sampling
  from uae_jax.tasks import dit as dit_task
  m = config.model
  params = jax.jit(lambda k: nn.unbox(dit_task.init_state(config, k))["params"])(jax.random.key(0))
  spec = sampling.SamplerSpec("euler", num_points, sampling.time_shift_alpha(config),
                              samplers.Guidance("cfg", scale))
  fn = jax.jit(sampling.make_latent_sampler(dit_task.build_model(config), "velocity", spec,
                                            m.num_classes))
  noise = jax.random.normal(jax.random.key(1), (batch, m.input_size, m.input_size, m.in_channels))
  labels = jnp.arange(batch, dtype=jnp.int32) % m.num_classes
  fn(params, None, noise, labels, jax.random.key(2)).block_until_ready()
  t0 = time.perf_counter()
  fn(params, None, noise, labels, jax.random.key(2)).block_until_ready()
  dt = time.perf_counter() - t0
  return dict(row="sample_euler50_cfg", size=m.size, batch=batch, nfe=2 * (num_points - 1),
              seconds=round(dt, 2), images_per_s=round(batch / dt, 2), loadavg=_load())


def compile_xl(n_devices: int, per_device_batch: int = 4, dtype: str = "bfloat16",
               data: int = 1) -> dict:
  """Compiles (not runs) the DiT^DH-XL step on `n_devices` fake devices; memory and FLOPs.

  Mesh `data` x `n_devices / data` (FSDP). The body is 1152 = 2^7 x 9 wide, so with more than
  128 FSDP devices its `embed` dimension does not divide and is replicated: use data=2 at 256.
  """
  import flax.linen as nn
  import jax
  import jax.numpy as jnp
  import numpy as np
  from bench.common import compiled_cost
  from uae_jax import sharding as sharding_lib
  from uae_jax.tasks import dit as dit_task
  config = _config("XL", "DH", 16, 768, per_device_batch * n_devices)
  config.compute_dtype = dtype
  mesh = sharding_lib.make_mesh({"data": data, "fsdp": -1})
  boxed = jax.eval_shape(lambda k: dit_task.init_state(config, k), jax.random.key(0))
  state_sh = sharding_lib.logical_shardings(boxed, mesh, config.sharding_rules)
  state_abs = sharding_lib.abstract_with_shardings(nn.unbox(boxed), state_sh)
  b, bsh = config.input.global_batch_size, sharding_lib.batch_sharding(mesh)
  x1 = jax.ShapeDtypeStruct((b, 16, 16, 768), jnp.float32, sharding=bsh)
  labels = jax.ShapeDtypeStruct((b,), jnp.int32, sharding=bsh)
  step = jax.jit(dit_step_fn(config), in_shardings=(state_sh, bsh, bsh),
                 out_shardings=(state_sh, None), donate_argnums=0)
  t0 = time.perf_counter()
  compiled = step.lower(state_abs, x1, labels).compile()
  compile_s = time.perf_counter() - t0
  flops = compiled_cost(compiled).get("flops", float("nan"))
  mem = compiled.memory_analysis()
  state_bytes = sum(int(np.prod(s.sharding.shard_shape(s.shape))) * s.dtype.itemsize
                    for s in jax.tree.leaves(state_abs))
  out = dict(row="xl_compiled", devices=n_devices, mesh=f"{data}x{n_devices // data}",
             global_batch=b, compute_dtype=dtype,
             compile_s=round(compile_s, 1), tflops_per_device=round(flops / 1e12, 3),
             state_gib_per_device=round(state_bytes / 2**30, 3), loadavg=_load())
  for k in ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes"):
    out[k.replace("_size_in_bytes", "_gib")] = round(getattr(mem, k, 0) / 2**30, 3)
  for mfu in (0.5, 0.3):
    out[f"v5p_step_ms_at_{int(mfu * 100)}pct"] = round(flops / (mfu * V5P_PEAK) * 1e3, 1)
  out["v5p_images_per_s_per_chip_at_50pct"] = round(per_device_batch / (flops / (0.5 * V5P_PEAK)), 1)
  return out


def _subprocess_xl(mesh: str) -> dict:
  """compile_xl on a 'DATAxFSDP' mesh (or 'N' = 1xN) in a fresh process with fake CPU devices."""
  data, _, fsdp = mesh.rpartition("x")
  data, n = int(data or 1), int(data or 1) * int(fsdp)
  env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={n}",
             JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
  code = ("import json; from bench.dit import compile_xl; "
          f"print('XL ' + json.dumps(compile_xl({n}, data={data})))")
  res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                       cwd=REPO, check=False)
  for line in res.stdout.splitlines():
    if line.startswith("XL "):
      return json.loads(line[3:])
  return dict(row="xl_compiled", devices=n, mesh=f"{data}x{n // data}",
              error=res.stderr.strip().splitlines()[-1:])


def main():
  """Runs the rows asked for and prints them."""
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--steps", type=int, default=5)
  ap.add_argument("--xl-devices", default="8",
                  help="comma-separated meshes of the XL compile: N (= 1xN) or DATAxFSDP, "
                       "e.g. 8,1x128,2x128")
  ap.add_argument("--no-xl", action="store_true")
  a = ap.parse_args()
  rows = []
  if not a.no_xl:  # first: the subprocesses need the machine more than the measured rows
    rows += [_subprocess_xl(m) for m in a.xl_devices.split(",") if m]
    for r in rows:
      print("ROW " + json.dumps(r), flush=True)
  sys.path.insert(0, REPO)
  from bench.common import matmul_peak
  peak = matmul_peak()
  print(f"float32 matmul peak: {peak / 1e9:.1f} GFLOP/s", flush=True)
  for name, cfg in (("train_tiny", _config("tiny", "tiny", 8, 64, 16)),
                    ("train_mid", _config("small_cpu", "small_cpu", 16, 64, 16))):
    rows.append(measure_train(name, cfg, a.steps, peak))
    print("ROW " + json.dumps(rows[-1]), flush=True)
  rows.append(measure_sampling(_config("tiny", "tiny", 8, 64, 16), 16))
  print("ROW " + json.dumps(rows[-1]), flush=True)
  print("RESULT " + json.dumps({"matmul_peak_gflops": round(peak / 1e9, 1), "rows": rows}))


if __name__ == "__main__":
  main()
