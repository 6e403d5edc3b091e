"""Attention on CPU: our implementations against PyTorch SDPA, alone and inside the B/B step.

  python -m bench.attention                  # ops at three shapes, then the in-step A/B
  python -m bench.attention --no-step        # ops only (~1 min)
  python -m bench.attention --step_rounds 6

Ops: `layers.multi_head_attention` forward and forward + backward (jitted) for each
`--implementations` entry, and PyTorch's `scaled_dot_product_attention` on the same values, best
of 7 per round. Step: the `vs_torch` B/B stage-1 step built once per implementation in this
process, the steps alternating round by round (so machine load hits them alike); prints each
round's seconds per step and the speed-up of the last implementation over the first.
"""
import argparse
import json
import statistics

import jax
import jax.numpy as jnp
import numpy as np
import torch

from bench import vs_torch
from uae_jax.models import layers

# (name, batch, tokens, heads, head dim): the stage-1 step's three attention shapes.
SHAPES = (("DINOv2-B encoder", 4, 261, 12, 64), ("decoder B", 4, 257, 12, 64),
          ("decoder XL", 2, 257, 16, 72))


def op_times(batch, tokens, heads, head_dim, implementations, reps=7) -> dict:
  """{name: (forward ms, forward+backward ms)} for ours and 'sdpa', best of `reps`."""
  rng = np.random.default_rng(0)
  q, k, v = (jnp.asarray(rng.standard_normal((batch, tokens, heads * head_dim)), jnp.float32)
             for _ in range(3))
  out = {}
  for impl in implementations:
    f = lambda q, k, v, impl=impl: layers.multi_head_attention(q, k, v, heads, impl)
    fwd = jax.jit(f)
    out[impl] = (vs_torch._best(lambda: jax.block_until_ready(fwd(q, k, v)), reps) * 1e3,
                 vs_torch._best(vs_torch._jax_fwd_bwd(f, q, k, v), reps) * 1e3)
  to_torch = lambda t: torch.tensor(np.asarray(t)).reshape(
      batch, tokens, heads, head_dim).permute(0, 2, 1, 3).contiguous()
  tq, tk, tv = to_torch(q), to_torch(k), to_torch(v)
  sdpa = torch.nn.functional.scaled_dot_product_attention

  def torch_fwd():
    with torch.no_grad():
      sdpa(tq, tk, tv)
  out["sdpa"] = (vs_torch._best(torch_fwd, reps) * 1e3,
                 vs_torch._best(vs_torch._torch_fwd_bwd(sdpa, tq, tk, tv), reps) * 1e3)
  return out


def step_ab(implementations, rounds: int, steps: int = 2) -> list:
  """Seconds per B/B stage-1 step of each implementation, alternating, one dict per round."""
  x = np.random.default_rng(0).uniform(-1, 1, (4, 256, 256, 3)).astype(np.float32)
  sides = {}
  for impl in implementations:
    model = vs_torch.jax_model("B", "B", impl)
    sides[impl] = vs_torch.JaxSide(model, vs_torch.jax_params(model, 256), x)
    print(f"  {impl}: step compiled in {sides[impl].compile()[0]:.1f} s", flush=True)
    sides[impl].run(1)
  rows = []
  for r in range(rounds):
    rows.append({impl: side.run(steps) for impl, side in sides.items()})
    first, last = implementations[0], implementations[-1]
    print(f"  round {r}: " + ", ".join(f"{i} {t:.2f} s/step" for i, t in rows[-1].items())
          + f" | {last} speed-up over {first} {rows[-1][first] / rows[-1][last]:.3f}"
          + f" | {vs_torch._load()}", flush=True)
  return rows


def main(argv=None):
  """Runs the op comparison at each shape, then the in-step A/B; prints RESULT."""
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--implementations", default="einsum,grouped")
  p.add_argument("--rounds", type=int, default=3, help="op-timing rounds per shape")
  p.add_argument("--step_rounds", type=int, default=4)
  p.add_argument("--no-step", dest="step", action="store_false", help="skip the in-step A/B")
  a = p.parse_args(argv)
  impls = a.implementations.split(",")
  result = {"benchmark": "attention", "ops": [], "step": []}
  for name, *shape in SHAPES:
    for r in range(a.rounds):
      t = op_times(*shape, impls)
      result["ops"].append({"shape": name, "round": r, **t})
      print(f"{name} {tuple(shape)} round {r}, ms forward / forward+backward: "
            + " | ".join(f"{k} {f:.0f} / {fb:.0f}" for k, (f, fb) in t.items())
            + f" | {vs_torch._load()}", flush=True)
  if a.step:
    print("B/B stage-1 step (vs_torch), implementations alternating:", flush=True)
    result["step"] = step_ab(impls, a.step_rounds)
    speedups = [r[impls[0]] / r[impls[-1]] for r in result["step"]]
    print(f"  => median speed-up of {impls[-1]} over {impls[0]}: "
          f"{statistics.median(speedups):.3f}", flush=True)
  print("RESULT " + json.dumps(result))


if __name__ == "__main__":
  main()
