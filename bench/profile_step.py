"""Where the stage-1 step's time goes, ours against PyTorch: one profiled step each, by category.

    python -m bench.profile_step                        # enc B + dec B, batch 4 (the vs_torch step)
    python -m bench.profile_step --shape S:small:2      # a quick look at small sizes
    python -m bench.profile_step --host_malloc system   # glibc's malloc (default: tcmalloc)

Ours: one step of `bench.vs_torch`'s jitted step under `jax.profiler.trace`; the trace has one
event per XLA:CPU thunk, named after its HLO instruction, and the compiled HLO text gives each
instruction's opcode and `op_name` metadata (the Flax module path and the jax primitive), which
decide its category. PyTorch: one step under `torch.profiler`, each aten op's self time
(so nested calls are not counted twice) put into the same categories by op name.

Categories: `matmul` (the dense layers' dots, forward and backward), `attention` (the q k^T and
probs @ v dots and the softmax between them, without the q/k/v/out projections), `layernorm`,
`gelu`, `optimizer` (the AdamW update), `resize` (the bicubic 256 -> 224 px), `other` (residual
adds, LayerScale, patch embedding, loss, layout copies). XLA:CPU runs independent thunks at the
same time on the thread pool, so our column sums to more than the wall time when they overlap
(the `wall` line says for how long at least one thunk ran); some thunks (plain XLA dots, Eigen)
return when their work is queued, and their time shows up in the next thunk, so a per-category
split of ours is indicative to a few percent.
"""
import argparse
import collections
import glob
import gzip
import json
import re
import sys
import tempfile

import jax
import numpy as np

from bench import vs_torch
from uae_jax import host_malloc

CATEGORIES = ("matmul", "attention", "layernorm", "gelu", "optimizer", "resize", "other")


def hlo_metadata(hlo_text: str) -> dict:
  """{instruction name: (opcode or fusion kind, op_name metadata)} for the entry computation's
  instructions and every fusion's (the thunks are named after top-level instructions)."""
  out = {}
  for line in hlo_text.splitlines():
    m = re.match(r"\s*(?:ROOT\s+)?%?([^\s=]+)\s*=\s", line)
    op = re.search(r"\s([a-z][\w\-]*)\(", line)
    if m and op:
      kind = re.search(r"kind=(k\w+)", line)
      op_name = re.search(r'op_name="([^"]*)"', line)
      out[m.group(1)] = ((kind or op).group(1), op_name.group(1) if op_name else "")
  return out


def jax_category(name: str, opcode: str, op_name: str) -> str:
  """The category of one of our thunks from its opcode and metadata."""
  path = op_name.lower()
  if re.fullmatch(r"jit\(\w+\)/\w+|reduce_\w+", path):
    return "optimizer"  # outside the model's jvp/transpose: the AdamW update (and the loss mean)
  if "preprocess" in path or "grid_pos_embed" in path:
    return "resize"  # the image and the position table, both bicubic by matmul
  if re.search(r"/attn/(?!(query|key|value|proj|out_proj)/)", path):
    return "attention"
  if re.search(r"/norm\d?/", path):
    return "layernorm"
  if re.search(r"/mlp/(?!fc\d/)", path):
    return "gelu"
  if "dot" in opcode or "convolution" in opcode or name.startswith("ynn_fusion"):
    return "matmul"
  return "other"


def trace_events(trace_dir: str) -> list:
  """(name, duration seconds, start seconds) of every complete event in the trace."""
  path = glob.glob(f"{trace_dir}/**/*.trace.json.gz", recursive=True)[0]
  with gzip.open(path) as f:
    events = json.load(f)["traceEvents"]
  return [(e["name"], e["dur"] * 1e-6, e["ts"] * 1e-6) for e in events
          if e.get("ph") == "X" and "dur" in e]


def busy_time(intervals) -> float:
  """Seconds during which at least one of the (start, end) intervals runs."""
  total, end = 0.0, -np.inf
  for s, e in sorted(intervals):
    if e > end:
      total += e - max(s, end)
      end = e
  return total


def jax_profile(side, hlo_text: str) -> dict:
  """Seconds per category of one traced step of our side (`vs_torch.JaxSide`)."""
  meta = hlo_metadata(hlo_text)
  with tempfile.TemporaryDirectory() as d:
    with jax.profiler.trace(d, create_perfetto_trace=False):
      wall = side.run(1)
    events = trace_events(d)
  per = collections.Counter()
  intervals = []
  for name, dur, start in events:
    if name not in meta:
      continue  # the runtime's own spans (executor, waits), which enclose the thunks
    opcode, op_name = meta[name]
    per[jax_category(name, opcode, op_name)] += dur
    intervals.append((start, start + dur))
  busy = busy_time(intervals)
  return dict(wall=wall, per=dict(per), thunk_sum=sum(per.values()), busy=busy)


def torch_category(op: str) -> str:
  """The category of one aten op by name."""
  op = op.lower()
  if "adam" in op:
    return "optimizer"
  if "attention" in op or "softmax" in op:
    return "attention"
  if "layer_norm" in op:
    return "layernorm"
  if "gelu" in op:
    return "gelu"
  if "upsample" in op:
    return "resize"
  if op.split("::")[-1] in ("addmm", "mm", "bmm", "matmul", "linear", "baddbmm"):
    return "matmul"
  return "other"


def torch_profile(side) -> dict:
  """Seconds per category of one profiled step of the PyTorch side (`vs_torch.TorchSide`)."""
  from torch.profiler import ProfilerActivity, profile
  with profile(activities=[ProfilerActivity.CPU]) as prof:
    wall = side.run(1)
  per = collections.Counter()
  for ev in prof.key_averages():
    per[torch_category(ev.key)] += ev.self_cpu_time_total * 1e-6
  return dict(wall=wall, per=dict(per), thunk_sum=sum(per.values()))


def main(argv=None):
  """Profiles one step of each side at one shape and prints the per-category table."""
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--shape", default="B:B:4", help="ENC:DEC:BATCH at 256 px (as in vs_torch)")
  p.add_argument("--attention", default=None, help="our attention implementation")
  p.add_argument("--repeats", type=int, default=2, help="profiled steps per side (best kept)")
  a = p.parse_args(argv)
  enc_size, dec_size, batch = a.shape.split(":")
  model = vs_torch.jax_model(enc_size, dec_size, a.attention)
  params = vs_torch.jax_params(model, 256)
  x_np = np.random.default_rng(0).uniform(size=(int(batch), 256, 256, 3)).astype(np.float32)
  js = vs_torch.JaxSide(model, params, x_np)
  hlo = js.step.lower(js.dec, js.opt, js.enc, js.x).compile().as_text()
  js.run(1)
  ts = vs_torch.TorchSide(params, enc_size, dec_size, "sdpa", x_np)
  ts.run(1)
  jp = min((jax_profile(js, hlo) for _ in range(a.repeats)), key=lambda r: r["wall"])
  tp = min((torch_profile(ts) for _ in range(a.repeats)), key=lambda r: r["wall"])
  print(f"encoder {enc_size} + decoder {dec_size}, batch {batch}, one profiled step each, "
        f"{vs_torch._load()}, {host_malloc.active()} malloc")
  print(f"{'category':<10} {'ours s':>8} {'PyTorch s':>10} {'ours - PyTorch':>15}")
  for c in CATEGORIES:
    o, t = jp["per"].get(c, 0.0), tp["per"].get(c, 0.0)
    print(f"{c:<10} {o:8.3f} {t:10.3f} {o - t:15.3f}")
  print(f"{'sum':<10} {jp['thunk_sum']:8.3f} {tp['thunk_sum']:10.3f}")
  print(f"{'wall':<10} {jp['wall']:8.3f} {tp['wall']:10.3f}   (ours: some thunk running "
        f"{jp['busy']:.3f} s of it)")
  print("RESULT " + json.dumps({"benchmark": "profile_step", "shape": a.shape,
                                "ours": jp, "torch": tp}))


if __name__ == "__main__":
  main(host_malloc.use_from_argv(sys.argv[1:]))
