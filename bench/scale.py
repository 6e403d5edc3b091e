"""The TPU-pod scale path without a TPU: compile the full-size train step on fake CPU meshes.

    python -m bench.scale                      # sizes 1, 8, 64, 256 + the levers at 8 devices
    python -m bench.scale --sizes 1,8 --no-levers
    python -m bench.scale --only 8:base        # one case, in this process's subprocess
    python -m bench.scale --json out.json      # also write every result as JSON

For the full-size stage-3 configuration (DINOv2-B/14 + registers encoder and its frozen teacher,
ViT-XL decoder, modulator, DINO ViT-S/8 discriminator with its heads, both AdamW states and the
EMA, LPIPS VGG16) it lowers and compiles `steps.make_train_step` exactly as the trainer jits it
(state shardings from the logical rules, donated state) on meshes of N fake CPU devices, with
abstract arguments only (`jax.ShapeDtypeStruct` + `NamedSharding`): nothing is allocated or run.
Each case runs in its own subprocess with `--xla_force_host_platform_device_count=N` and a
per-device batch of 2 (global batch 2 N), and reports:

  * per-device bytes of the state (sum of shard sizes, from the shardings), split by subtree;
  * `compiled.memory_analysis()`: argument, output, alias, temp (and peak when reported);
  * `compiled.cost_analysis()` FLOPs and bytes accessed of the per-device program;
  * the activations the generator's backward keeps (vjp residuals, per image and per device);
  * lowering and compile wall time;
  * the collectives in the compiled HLO (static counts and result bytes).

CPU caveats: XLA:CPU schedules, fuses and assigns buffers differently from XLA:TPU, so temp
bytes are indicative (the ratios between levers are the useful part), and HloCostAnalysis counts
a while-loop body once, so FLOPs of `scan_blocks` variants are undercounted (use unscanned ones).
Prints one `CASE {json}` line per case and a final `RESULT {json}` line with all of them.

Roofline (`--roofline`): compiles the full-size tokenizer stage-3 step and the DiT^DH-XL
flow-matching step (which encodes its images with the frozen UAE inside the step) on one fake
device, walks every top-level instruction of the optimised HLO (FLOPs of each dot and
convolution from its shapes, bytes from its operand and result shapes), and places each on the
roofline of TPU v5p / v5e / v6e (published bf16 peak FLOP/s and HBM bandwidth, `TPUS`): the
step's arithmetic intensity, the ridge point of each chip, which operation classes fall below it
and the roofline-bound step time and MFU. XLA:CPU fuses differently from XLA:TPU, so the bytes
are an upper bound on what TPU fusion leaves; docs/scaling.md has the numbers and caveats.
"""
import argparse
import json
import os
import re
import subprocess
import sys
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Lever variants (config overrides), compared at one mesh size.
VARIANTS = {
    "base": {},
    "remat_full": {"model.encoder.remat_policy": "full", "model.decoder.remat_policy": "full"},
    "remat_dots": {"model.encoder.remat_policy": "dots", "model.decoder.remat_policy": "dots"},
    "scan": {"model.encoder.scan_blocks": True, "model.decoder.scan_blocks": True},
    "scan_remat_full": {"model.encoder.scan_blocks": True, "model.decoder.scan_blocks": True,
                        "model.encoder.remat_policy": "full", "model.decoder.remat_policy": "full"},
    "bf16": {"compute_dtype": "bfloat16"},
}
COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")
_DTYPE_BYTES = {"f64": 8, "s64": 8, "u64": 8, "f32": 4, "s32": 4, "u32": 4, "bf16": 2, "f16": 2,
                "s16": 2, "u16": 2, "s8": 1, "u8": 1, "pred": 1, "s4": 0.5, "u4": 0.5}
_INSTR = re.compile(r"=\s*(?P<shape>\(.*?\)|[a-z0-9]+\[[0-9,]*\](?:\{[^}]*\})?)\s+"
                    r"(?P<op>" + "|".join(COLLECTIVES) + r")(?P<start>-start)?\(")
_ARRAY = re.compile(r"([a-z0-9]+)\[([0-9,]*)\]")


def _shape_bytes(shape: str) -> float:
  """Bytes of an HLO shape string (an array or a tuple of arrays)."""
  total = 0.0
  for dtype, dims in _ARRAY.findall(shape):
    n = 1
    for d in filter(None, dims.split(",")):
      n *= int(d)
    total += n * _DTYPE_BYTES.get(dtype, 4)
  return total


def count_collectives(hlo_text: str) -> dict:
  """Static count and result bytes per collective kind in an HLO module's text."""
  out = {op: {"count": 0, "bytes": 0.0} for op in COLLECTIVES}
  for m in _INSTR.finditer(hlo_text):
    shape = m.group("shape")
    nbytes = _shape_bytes(shape)
    if m.group("start") and shape.startswith("("):
      nbytes /= 2  # async start tuples hold (operands, results): count the results only
    out[m.group("op")]["count"] += 1
    out[m.group("op")]["bytes"] += nbytes
  return out


# Published per-chip peaks (Google Cloud TPU system-architecture pages): dense bf16 FLOP/s and
# HBM bytes/s. The ridge point peak / bandwidth is the arithmetic intensity (FLOP per byte) an
# operation needs to be compute-bound.
TPUS = {"v5p": (459e12, 2765e9), "v5e": (197e12, 819e9), "v6e": (918e12, 1640e9)}
_HLO_DEF = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = (\(.*?\)|[a-z0-9]+\[[0-9,]*\])(?:\{[^}]*\})? "
                      r"([\w\-]+)\((.*?)\)(.*)$")
_SKIP = {"parameter", "constant", "bitcast", "tuple", "get-tuple-element", "after-all"}


def _parse_hlo(hlo_text: str):
  """{computation: [(name, shape, op, operands, attrs)]} and {name: shape} of an HLO module."""
  comps, shapes, current = {}, {}, None
  for line in hlo_text.splitlines():
    head = re.match(r"^(?:ENTRY )?%?([\w.\-]+) \(.*\{\s*$", line)
    if head:
      current = "ENTRY" if line.startswith("ENTRY") else head.group(1)
      comps[current] = []
      continue
    m = _HLO_DEF.match(line)
    if m and current:
      name, shape, op, args, attrs = m.groups()
      operands = re.findall(r"%([\w.\-]+)", args)
      comps[current].append((name, shape, op, operands, attrs))
      shapes[name] = shape
  return comps, shapes


def _elements(shape: str) -> int:
  """Element count of an array shape string (first array of a tuple)."""
  m = _ARRAY.search(shape)
  return int(np.prod([int(d) for d in m.group(2).split(",") if d])) if m else 0


def _dims(shape: str) -> list:
  """Dimensions of an array shape string."""
  return [int(d) for d in _ARRAY.search(shape).group(2).split(",") if d]


def _matmul_flops(inst, shapes) -> float:
  """2 * output elements * contracted size of a dot or convolution instruction."""
  _, shape, op, operands, attrs = inst
  if op == "dot":
    lhs = _dims(shapes[operands[0]])
    contract = re.search(r"lhs_contracting_dims=\{([0-9,]*)\}", attrs).group(1)
    k = int(np.prod([lhs[int(i)] for i in contract.split(",") if i]))
    return 2.0 * _elements(shape) * k
  kernel = _dims(shapes[operands[1]])  # convolution: kernel spatial x input features
  out_features = _dims(shape)[-1] if "->b01f" in attrs else kernel[-1]
  return 2.0 * _elements(shape) * int(np.prod(kernel)) / max(out_features, 1)


def hlo_op_costs(hlo_text: str) -> list:
  """Per top-level instruction: {'kind', 'flops', 'bytes'} from the compiled HLO text.

  kind: 'matmul' (dot / convolution, fused or not), 'layout' (transpose / copy), 'reduce'
  (norms, softmax, loss, optimizer norms), 'elementwise'. Bytes: result + operands (what a
  non-fused kernel reads and writes); elementwise FLOPs: result elements x body instructions.
  """
  comps, shapes = _parse_hlo(hlo_text)
  rows = []
  for inst in comps.get("ENTRY", []):
    name, shape, op, operands, attrs = inst
    if op in _SKIP or op == "while":
      continue
    body = [inst]
    if op == "fusion":
      body = comps.get(re.search(r"calls=%?([\w.\-]+)", attrs).group(1), [])
    ops = {b[2] for b in body}
    mm = [b for b in body if b[2] in ("dot", "convolution")]
    nbytes = _shape_bytes(shape) + sum(_shape_bytes(shapes.get(o, "")) for o in operands)
    if mm:
      kind, flops = "matmul", sum(_matmul_flops(b, shapes) for b in mm)
    else:
      kind = ("reduce" if "reduce" in ops else "layout" if ops & {"transpose", "copy"}
              else "elementwise")
      flops = float(_elements(shape) * max(1, len([b for b in body if b[2] not in _SKIP])))
    rows.append({"kind": kind, "flops": flops, "bytes": nbytes})
  return rows


def roofline(rows: list, batch: int) -> dict:
  """Per TPU: step intensity, ridge, roofline time and MFU bound, and per-kind breakdown."""
  flops = sum(r["flops"] for r in rows)
  nbytes = sum(r["bytes"] for r in rows)
  out = {"per_device_batch": batch, "gflop": flops / 1e9, "gbytes": nbytes / 1e9,
         "intensity": flops / max(nbytes, 1), "tpus": {}}
  for chip, (peak, bw) in TPUS.items():
    ridge = peak / bw
    kinds = {}
    for r in rows:
      k = kinds.setdefault(r["kind"], {"count": 0, "gflop": 0.0, "gbytes": 0.0, "time_s": 0.0,
                                        "below_ridge": 0, "time_below_s": 0.0})
      t = max(r["flops"] / peak, r["bytes"] / bw)
      below = r["flops"] < ridge * r["bytes"]
      k["count"] += 1
      k["gflop"] += r["flops"] / 1e9
      k["gbytes"] += r["bytes"] / 1e9
      k["time_s"] += t
      k["below_ridge"] += int(below)
      k["time_below_s"] += t if below else 0.0
    total = sum(k["time_s"] for k in kinds.values())
    mm = kinds.get("matmul", {}).get("gflop", 0.0) * 1e9
    out["tpus"][chip] = {"ridge": ridge, "roofline_step_s": total,
                         "mfu_bound": mm / peak / max(total, 1e-12),
                         "images_per_s_bound": batch / max(total, 1e-12), "kinds": kinds}
  return out


def _set(config, dotted: str, value):
  """config['a.b.c'] = value for a dotted key."""
  node = config
  *path, leaf = dotted.split(".")
  for p in path:
    node = node[p]
  node[leaf] = type(node[leaf])(value) if not isinstance(node[leaf], bool) else bool(value)


def _partitionable_translate(x, shift_h, shift_w):
  """DiffAug translation as per-sample dynamic slices (a proposed fix for losses/diffaug.py).

  Same values as `diffaug.translate` (zeros outside the image), but `vmap(dynamic_slice)` lowers
  to a gather with an explicit batch dimension that the SPMD partitioner keeps batch-sharded,
  while the reference's fancy-index gather makes XLA all-reduce a replicated result and run
  the discriminator on most of the global batch on every device (see docs/scaling.md).
  """
  import jax
  import jax.numpy as jnp
  b, h, w, c = x.shape
  xp = jnp.pad(x, ((0, 0), (h, h), (w, w), (0, 0)))
  sh = jnp.clip(shift_h, -h, h) + h
  sw = jnp.clip(shift_w, -w, w) + w
  return jax.vmap(lambda img, i, j: jax.lax.dynamic_slice(img, (i, j, 0), (h, w, c)))(xp, sh, sw)


def saved_activation_bytes_per_image(config, params_abs, lpips_abs) -> int:
  """Bytes the generator's backward keeps from its forward (vjp residuals), per image.

  The generator forward of the train step (UAE with noise, L1 + LPIPS), differenced between
  batch 2 and batch 1 so weights (also residuals of a matmul) cancel. Backend-independent, so
  it shows what remat saves even where XLA:CPU's buffer assignment does not.
  """
  import jax
  import jax.numpy as jnp
  import numpy as np

  from uae_jax.tasks import uae as uae_task
  from uae_jax.losses import reconstruction

  model = uae_task.build_model(config)
  dtype = uae_task.compute_dtype(config)
  strip = lambda t: jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), t)
  params_abs, lpips_abs = strip(params_abs), strip(lpips_abs)

  def loss(params, x, lp):
    out = model.apply({"params": params}, x, train=True, rngs={"noise": jax.random.key(0)})
    return (reconstruction.l1_loss(out["recon"], x)
            + reconstruction.lpips_loss(lp, out["recon"], x, dtype))

  def residual_bytes(batch):
    size = config.input.image_size
    x = jax.ShapeDtypeStruct((batch, size, size, 3), jnp.float32)
    res = jax.eval_shape(lambda p, xx, lp: jax.vjp(lambda q: loss(q, xx, lp), p)[1],
                         params_abs, x, lpips_abs)
    return sum(int(np.prod(r.shape)) * r.dtype.itemsize for r in jax.tree.leaves(res))

  return residual_bytes(2) - residual_bytes(1)


def measure(n_devices: int, data: int, fsdp: int, variant: str, stage: int,
            per_device_batch: int, diffaug_fix: bool = False) -> dict:
  """Lowers and compiles one train step on the current (fake) devices; returns the statistics."""
  import functools
  if diffaug_fix:
    from uae_jax.losses import diffaug
    diffaug.translate = _partitionable_translate

  import flax.linen as nn
  import jax
  import jax.numpy as jnp
  import numpy as np

  from configs import stage1, stage2, stage3
  from uae_jax import sharding as sharding_lib
  from uae_jax.tasks import uae as uae_task
  from uae_jax.models import lpips as lpips_lib

  if jax.device_count() != n_devices:
    raise RuntimeError(f"expected {n_devices} devices, have {jax.device_count()}")
  config = {1: stage1, 2: stage2, 3: stage3}[stage].get_config()
  config.mesh.data, config.mesh.fsdp = data, fsdp
  config.input.global_batch_size = per_device_batch * n_devices
  config.init.allow_random_encoder = True
  for k, v in VARIANTS[variant].items():
    _set(config, k, v)

  mesh = sharding_lib.make_mesh(config.mesh)
  batch_sh = sharding_lib.batch_sharding(mesh)
  repl = sharding_lib.replicated(mesh)
  size = config.input.image_size
  one = jnp.zeros((1, size, size, 3), jnp.float32)
  boxed = jax.eval_shape(functools.partial(uae_task.init_state, config), jax.random.key(0))
  state_sh = sharding_lib.logical_shardings(boxed, mesh, config.sharding_rules)
  sds = lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s)
  state = jax.tree.map(sds, nn.unbox(boxed), state_sh)
  gb = config.input.global_batch_size
  batch = {"image": jax.ShapeDtypeStruct((gb, size, size, 3), jnp.float32, sharding=batch_sh)}
  lpips = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), jnp.float32, sharding=repl),
                       lpips_lib.load_lpips_params("vgg16"))
  frozen = {"lpips": lpips}
  if config.gan.enabled:
    abs_bb = jax.eval_shape(lambda k: uae_task.build_discriminator(config).init(k, one)["params"]
                            ["backbone"], jax.random.key(0))
    bb_sh = sharding_lib.logical_shardings(abs_bb, mesh, config.sharding_rules)
    frozen["disc_backbone"] = jax.tree.map(sds, nn.unbox(abs_bb), bb_sh)

  def shard_bytes(tree):
    return int(sum(np.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize
                   for x in jax.tree.leaves(tree)))

  def total_bytes(tree):
    return int(sum(np.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(tree)))

  act_per_image = saved_activation_bytes_per_image(config, state["params"], lpips)
  n_params = int(sum(np.prod(x.shape) for x in jax.tree.leaves(state["params"])))
  state_bytes = {k: shard_bytes(v) for k, v in state.items()}
  step = jax.jit(uae_task.make_train_step(config),
                 in_shardings=(state_sh, {"image": batch_sh}, None),
                 out_shardings=(state_sh, None), donate_argnums=(0,))
  t0 = time.perf_counter()
  lowered = step.lower(state, batch, frozen)
  t_lower = time.perf_counter() - t0
  t0 = time.perf_counter()
  compiled = lowered.compile()
  t_compile = time.perf_counter() - t0
  mem = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  hlo = compiled.as_text()
  mem_d = {k: int(getattr(mem, k + "_in_bytes", 0) or 0)
           for k in ("argument_size", "output_size", "alias_size", "temp_size", "peak_memory",
                     "generated_code_size")}
  return {
      "devices": n_devices, "mesh": {"data": data, "fsdp": fsdp}, "variant": variant,
      "diffaug_fix": diffaug_fix,
      "stage": stage, "global_batch": gb, "per_device_batch": per_device_batch,
      "overrides": VARIANTS[variant], "params": n_params,
      "state_total_bytes": total_bytes(state),
      "state_bytes_per_device": sum(state_bytes.values()),
      "state_bytes_per_device_by_key": state_bytes,
      "frozen_inputs_bytes_per_device": shard_bytes(frozen),
      "saved_activation_bytes_per_image": act_per_image,
      "saved_activation_bytes_per_device": act_per_image * per_device_batch,
      "memory": mem_d,
      "flops": float(cost.get("flops", -1.0)),
      "bytes_accessed": float(cost.get("bytes accessed", -1.0)),
      "lower_s": round(t_lower, 2), "compile_s": round(t_compile, 2),
      "collectives": count_collectives(hlo), "hlo_chars": len(hlo),
      "roofline": roofline(hlo_op_costs(hlo), per_device_batch),
  }


def measure_dit(n_devices: int, data: int, fsdp: int, per_device_batch: int,
                config_name: str = "dit_xl") -> dict:
  """Lowers and compiles the full-size DiT train step (tokenizer encode inside) on fake devices."""
  import importlib
  import flax.linen as nn
  import jax
  import jax.numpy as jnp

  from uae_jax import sharding as sharding_lib
  from uae_jax.generate import latents
  from uae_jax.tasks import dit as dit_task

  config = importlib.import_module(f"configs.{config_name}").get_config()
  config.mesh.data, config.mesh.fsdp = data, fsdp
  config.input.global_batch_size = gb = per_device_batch * n_devices
  mesh = sharding_lib.make_mesh(config.mesh)
  batch_sh, repl = sharding_lib.batch_sharding(mesh), sharding_lib.replicated(mesh)
  boxed = jax.eval_shape(lambda k: dit_task.init_state(config, k), jax.random.key(0))
  state_sh = sharding_lib.logical_shardings(boxed, mesh, config.sharding_rules)
  sds = lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh)
  state = jax.tree.map(sds, nn.unbox(boxed), state_sh)
  uae_cfg = latents.tokenizer_config(config)
  tok = jax.tree.map(lambda a: sds(a, repl), latents.abstract_tokenizer_params(uae_cfg))
  stat = jax.ShapeDtypeStruct(latents.latent_shape(uae_cfg), jnp.float32, sharding=repl)
  frozen = {"tokenizer": tok, "stats": {"mean": stat, "std": stat}}
  size = config.input.image_size
  batch = {"image": jax.ShapeDtypeStruct((gb, size, size, 3), jnp.float32, sharding=batch_sh),
           "label": jax.ShapeDtypeStruct((gb,), jnp.int32, sharding=batch_sh)}
  step = jax.jit(dit_task.make_train_step(config), in_shardings=(state_sh, batch_sh, None),
                 out_shardings=(state_sh, None), donate_argnums=(0,))
  t0 = time.perf_counter()
  compiled = step.lower(state, batch, frozen).compile()
  t_compile = time.perf_counter() - t0
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  hlo = compiled.as_text()
  n_params = int(sum(np.prod(x.shape) for x in jax.tree.leaves(state["params"])))
  return {"task": config_name, "devices": n_devices, "mesh": {"data": data, "fsdp": fsdp},
          "variant": "base", "global_batch": gb, "per_device_batch": per_device_batch,
          "params": n_params, "flops": float(cost.get("flops", -1.0)),
          "bytes_accessed": float(cost.get("bytes accessed", -1.0)),
          "compile_s": round(t_compile, 2), "collectives": count_collectives(hlo),
          "roofline": roofline(hlo_op_costs(hlo), per_device_batch)}


def _child(args):
  """Runs one case in this process (the parent set XLA_FLAGS) and prints its RESULT line."""
  from absl import flags
  flags.FLAGS.mark_as_parsed()
  sys.path.insert(0, REPO)
  if args.task != "uae":
    r = measure_dit(args.devices, args.data, args.fsdp, args.per_device_batch, args.task)
  else:
    r = measure(args.devices, args.data, args.fsdp, args.variant, args.stage,
                args.per_device_batch, args.diffaug_fix)
  print("RESULT " + json.dumps(r), flush=True)


def run_case(n: int, data: int, fsdp: int, variant: str, stage: int, per_device_batch: int,
             timeout: float, diffaug_fix: bool = False, task: str = "uae") -> dict:
  """One case in a subprocess with N fake CPU devices; the parsed result or an error record."""
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS=f"--xla_force_host_platform_device_count={n}")
  cmd = [sys.executable, "-m", "bench.scale", "--child", "--devices", str(n), "--data", str(data),
         "--fsdp", str(fsdp), "--variant", variant, "--stage", str(stage),
         "--per-device-batch", str(per_device_batch), "--task", task] + (
             ["--diffaug-fix"] if diffaug_fix else [])
  case = {"devices": n, "mesh": {"data": data, "fsdp": fsdp}, "variant": variant,
          "diffaug_fix": diffaug_fix, "task": task}
  t0 = time.perf_counter()
  try:
    p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
  except subprocess.TimeoutExpired:
    return dict(case, error=f"timeout after {timeout:.0f} s")
  for line in p.stdout.splitlines():
    if line.startswith("RESULT "):
      r = json.loads(line[len("RESULT "):])
      r["wall_s"] = round(time.perf_counter() - t0, 1)
      return r
  tail = (p.stderr or "").strip().splitlines()[-5:]
  return dict(case, error=f"exit {p.returncode}: " + " | ".join(tail))


def _gib(b) -> str:
  return f"{b / 2**30:.3f}"


def markdown(results: list) -> str:
  """The results as a markdown table (GiB per device, GFLOP per device, seconds)."""
  head = ("| devices | mesh (data x fsdp) | variant | state/dev GiB | args GiB | temp GiB | "
          "peak GiB | saved act./dev GiB | GFLOP/dev | compile s | all-gather | reduce-scatter | "
          "all-reduce | all-to-all | coll-permute | coll. GiB |")
  rows = [head, "|" + "---|" * (head.count("|") - 1)]
  for r in results:
    if "error" in r:
      rows.append(f"| {r['devices']} | {r['mesh']['data']}x{r['mesh']['fsdp']} | {r['variant']} | "
                  f"error: {r['error'][:80]} |")
      continue
    c = r["collectives"]
    m = r["memory"]
    coll_bytes = sum(v["bytes"] for v in c.values())
    rows.append(
        f"| {r['devices']} | {r['mesh']['data']}x{r['mesh']['fsdp']} | {r['variant']} | "
        f"{_gib(r['state_bytes_per_device'])} | {_gib(m['argument_size'])} | "
        f"{_gib(m['temp_size'])} | {_gib(m['peak_memory']) if m['peak_memory'] else '-'} | "
        f"{_gib(r['saved_activation_bytes_per_device'])} | "
        f"{r['flops'] / 1e9:.0f} | {r['compile_s']:.0f} | "
        + " | ".join(str(c[k]["count"]) for k in COLLECTIVES) + f" | {_gib(coll_bytes)} |")
  return "\n".join(rows)


def roofline_markdown(results: list) -> str:
  """The roofline cases as markdown: per chip, step intensity and per-kind time below ridge."""
  lines = ["| step | chip | ridge FLOP/B | step GFLOP | step GB | intensity FLOP/B | roofline "
           "step ms | MFU bound | matmul time % | below-ridge time % (kinds) |",
           "|" + "---|" * 10]
  for r in results:
    if "error" in r:
      lines.append(f"| {r.get('task', 'uae')} | error: {r['error'][:80]} |")
      continue
    rl = r["roofline"]
    name = f"{r.get('task', 'uae stage ' + str(r.get('stage')))} (batch {r['per_device_batch']})"
    for chip, t in rl["tpus"].items():
      kinds, total = t["kinds"], t["roofline_step_s"]
      below = sum(k["time_below_s"] for k in kinds.values())
      which = ", ".join(f"{n} {100 * k['time_below_s'] / total:.0f}%" for n, k in kinds.items()
                        if k["time_below_s"] > 0.005 * total)
      mm = kinds.get("matmul", {}).get("time_s", 0.0)
      lines.append(f"| {name} | {chip} | {t['ridge']:.0f} | {rl['gflop']:.0f} | {rl['gbytes']:.1f} "
                   f"| {rl['intensity']:.1f} | {1e3 * total:.1f} | {100 * t['mfu_bound']:.0f}% | "
                   f"{100 * mm / total:.0f}% | {100 * below / total:.0f}% ({which}) |")
  return "\n".join(lines)


def report(results: list, table: str, benchmark: str, json_path: str) -> int:
  """Prints the table, writes the cases to `json_path` (when given) and the RESULT line."""
  print(table, flush=True)
  if json_path:
    with open(json_path, "w") as fh:
      json.dump(results, fh, indent=1)
  print("RESULT " + json.dumps({"benchmark": benchmark, "cases": results}), flush=True)
  return 0


def roofline_main(args) -> int:
  """Tokenizer stage 3 and DiT^DH-XL on one fake device; prints the roofline table and RESULT."""
  results = []
  for task, batch in (("uae", args.per_device_batch), ("dit_xl", args.dit_batch)):
    print(f"[scale] roofline: {task}, per-device batch {batch} ...", flush=True)
    r = run_case(1, 1, 1, "base", args.stage, batch, args.timeout, task=task)
    results.append(r)
    print("CASE " + json.dumps(r), flush=True)
  return report(results, roofline_markdown(results), "scale_roofline", args.json)


def main(argv=None):
  """Parent: runs every case in its own subprocess and prints the table and RESULT lines."""
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--sizes", default="1,8,64,256", help="mesh sizes (data=1, fsdp=N)")
  p.add_argument("--extra-meshes", default="2x128",
                 help="more DATAxFSDP meshes, e.g. '2x128' (1152-wide XL layers do not split 256 ways)")
  p.add_argument("--levers", dest="levers", action="store_true", default=True)
  p.add_argument("--no-levers", dest="levers", action="store_false")
  p.add_argument("--lever-devices", type=int, default=8)
  p.add_argument("--variants", default=",".join(v for v in VARIANTS if v != "base"))
  p.add_argument("--stage", type=int, default=3)
  p.add_argument("--per-device-batch", type=int, default=2)
  p.add_argument("--timeout", type=float, default=2400, help="seconds per case")
  p.add_argument("--only", default="", help="run just DEVICES:VARIANT[:DATAxFSDP]")
  p.add_argument("--json", default="", help="write all results to this file")
  p.add_argument("--diffaug-fix", action="store_true",
                 help="measure with the proposed partitionable DiffAug translation (see docs)")
  p.add_argument("--roofline", action="store_true",
                 help="only the TPU roofline of the tokenizer stage-3 and DiT^DH-XL steps (1 device)")
  p.add_argument("--dit-batch", type=int, default=4,
                 help="per-device batch of the DiT roofline case (1024 global / 256 chips = 4)")
  # Child mode (internal).
  p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
  p.add_argument("--devices", type=int, default=1, help=argparse.SUPPRESS)
  p.add_argument("--data", type=int, default=1, help=argparse.SUPPRESS)
  p.add_argument("--fsdp", type=int, default=1, help=argparse.SUPPRESS)
  p.add_argument("--variant", default="base", help=argparse.SUPPRESS)
  p.add_argument("--task", default="uae", help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  if args.child:
    return _child(args)
  if args.roofline:
    return roofline_main(args)

  cases = []
  if args.only:
    parts = args.only.split(":")
    n = int(parts[0])
    d, f = map(int, parts[2].split("x")) if len(parts) > 2 else (1, n)
    cases.append((n, d, f, parts[1] if len(parts) > 1 else "base"))
  else:
    cases += [(n, 1, n, "base") for n in map(int, filter(None, args.sizes.split(",")))]
    for mesh in filter(None, args.extra_meshes.split(",")):
      d, f = map(int, mesh.split("x"))
      cases.append((d * f, d, f, "base"))
    if args.levers:
      n = args.lever_devices
      cases += [(n, 1, n, v) for v in filter(None, args.variants.split(","))]
  results = []
  for n, d, f, variant in cases:
    print(f"[scale] {n} devices, mesh {d}x{f}, {variant} ...", flush=True)
    r = run_case(n, d, f, variant, args.stage, args.per_device_batch, args.timeout,
                 args.diffaug_fix)
    results.append(r)
    print("CASE " + json.dumps(r), flush=True)
  return report(results, markdown(results), "scale", args.json)


if __name__ == "__main__":
  sys.exit(main())
