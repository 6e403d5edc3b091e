"""Our stage-1 train step against the same network in PyTorch, timed side by side in one process.

    python -m bench.vs_torch                       # (enc B, dec B, batch 4), (enc B, dec XL, batch 2)
    python -m bench.vs_torch --shapes B:B:4 --steps 3 --rounds 2
    python -m bench.vs_torch --host_malloc system  # glibc's malloc (default: tcmalloc if installed)
    python -m bench.vs_torch --attention xla       # our attention implementation (see docs/speed.md)
    python -m bench.vs_torch --shapes B:XL/7:2     # XL width, heads and MLP with 7 of its 28 blocks

The PyTorch side is built from `transformers` classes, as the official UAE code is:
`Dinov2WithRegistersModel` for the frozen encoder (its final LayerNorm set to the identity affine,
UAE's final LayerNorm has none) and `ViTMAELayer` blocks for the decoder, around the official
decoder's embed / CLS / fixed sin-cos table / norm / pred layers. Both sides get the same weights
(ours, exported with `uae_jax.convert.uae.uae_to_state_dict`), the same 256 px images (resized to
224 px by bicubic interpolation inside the step), and run the same step: the frozen encoder
forward, the decoder forward and backward on an L1 loss, and one AdamW update (betas 0.9/0.95,
eps 1e-8, no weight decay; PyTorch's fused AdamW, as the official trainer uses). float32 on both
sides; PyTorch attention uses SDPA (its default fast path) unless `--torch_attention eager`.

Timing: `--rounds` rounds, each timing `--steps` of ours then `--steps` of PyTorch, so a change
in machine load hits both sides alike, after `--warmup_rounds` untimed rounds of the same (the
host allocator settles only once both sides' steps have interleaved; docs/speed.md). Every round
prints its own ratio, each side's kernel (system) CPU seconds per step and the load average.
Shapes whose decoder is in `--sequential` (default XL: ~7 GB of weights, gradients and AdamW state
per side) keep only one side in memory at a time and rebuild each side per round. FLOPs per step
are counted two ways: XLA's cost analysis of our compiled step (all HLO FLOPs), and PyTorch's
`FlopCounterMode` on its step (matmuls, convolutions and attention only); achieved FLOP/s uses the
matmul count for both sides (same work) and is compared with the float32 matmul peak each framework
reaches on a 2048^3 product on this machine.
"""
import argparse
import dataclasses
import gc
import json
import os
import resource
import statistics
import sys
import time

from absl import flags

flags.FLAGS.mark_as_parsed()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
import torch  # noqa: E402

from bench.common import compiled_cost, matmul_peak  # noqa: E402
from uae_jax import host_malloc  # noqa: E402
from uae_jax.convert import uae as convert_uae  # noqa: E402
from uae_jax.models import decoder as decoder_lib  # noqa: E402
from uae_jax.models import dinov2 as dinov2_lib  # noqa: E402
from uae_jax.models import encoders  # noqa: E402
from uae_jax.models import uae as uae_lib  # noqa: E402

LR, BETAS, EPS = 2e-4, (0.9, 0.95), 1e-8
# transformers 5 in-memory names of a ViTMAELayer vs the official (transformers-4) state-dict names.
_MAE_RENAME = (("attention.attention.query", "attention.q_proj"),
               ("attention.attention.key", "attention.k_proj"),
               ("attention.attention.value", "attention.v_proj"),
               ("attention.output.dense", "attention.o_proj"),
               ("intermediate.dense", "mlp.fc1"), ("output.dense", "mlp.fc2"))


# ------------------------------------------------------------------------------------------ ours
def decoder_spec(name: str) -> decoder_lib.DecoderSize:
  """A decoder size name, or 'NAME/D': that size's width, heads and MLP with only D blocks."""
  base, _, depth = name.partition("/")
  spec = decoder_lib.SIZES[base]
  return dataclasses.replace(spec, depth=int(depth)) if depth else spec


def jax_model(enc_size: str, dec_size: str, attention=None) -> uae_lib.OfficialUAE:
  """Our DINOv2-with-registers encoder + pixel decoder (no band path), as in stage 1."""
  enc = dict(encoders.DEFAULTS["dinov2"], size=enc_size)
  d = decoder_spec(dec_size)
  dec = dict(size="custom", dim=d.dim, depth=d.depth, num_heads=d.heads, mlp_hidden=d.mlp_hidden,
             patch_size=16)
  if attention is not None:
    enc["attention"], dec["attention"] = attention, attention
  return uae_lib.OfficialUAE(encoder=enc, decoder=dec)


def jax_params(model, image_size: int, seed: int = 0) -> dict:
  """Random float32 params {'encoder', 'decoder'} of `model`, drawn in numpy.

  Shapes come from `jax.eval_shape` (compiling or running the init costs more than the tiny
  parity test may spend): kernels N(0, 1/fan_in), norm scales and LayerScale 1, biases 0,
  tokens and position tables N(0, 0.02^2).
  """
  import flax.linen as nn
  x = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)
  shapes = nn.unbox(jax.eval_shape(lambda k, images: model.init(k, images, train=False)["params"],
                                    jax.random.key(0), x))
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    name = path[-1].key
    if name in ("scale", "gamma"):
      return np.ones(leaf.shape, np.float32)
    if name == "bias":
      return np.zeros(leaf.shape, np.float32)
    std = 1.0 / np.sqrt(np.prod(leaf.shape[:-1])) if name == "kernel" else 0.02
    return (std * rng.standard_normal(leaf.shape)).astype(np.float32)

  return jax.tree_util.tree_map_with_path(draw, shapes)


def jax_loss(model, dec, enc, x):
  """L1 reconstruction loss of the decoder on the frozen encoder's latent."""
  z = jax.lax.stop_gradient(model.apply({"params": {"encoder": enc}}, x, method="encode"))
  recon = model.apply({"params": {"decoder": dec}}, z, method="decode")
  return jnp.mean(jnp.abs(recon - x))


def jax_optimizer() -> optax.GradientTransformation:
  """AdamW with the PyTorch side's hyper-parameters."""
  return optax.adamw(LR, b1=BETAS[0], b2=BETAS[1], eps=EPS, weight_decay=0.0)


def jax_step_fn(model):
  """(jitted step(dec, opt, enc, x) -> (dec, opt, loss), the AdamW transform); dec/opt donated."""
  tx = jax_optimizer()

  def step(dec, opt, enc, x):
    loss, grads = jax.value_and_grad(lambda d: jax_loss(model, d, enc, x))(dec)
    updates, opt = tx.update(grads, opt, dec)
    return optax.apply_updates(dec, updates), opt, loss

  return jax.jit(step, donate_argnums=(0, 1)), tx


# --------------------------------------------------------------------------------------- PyTorch
class TorchDecoder(torch.nn.Module):
  """The official UAE pixel decoder: embed, CLS, fixed sin-cos table, ViTMAE layers, norm, pred."""

  def __init__(self, channels, dim, depth, heads, mlp, grid=16, patch=16, attn="sdpa"):
    super().__init__()
    from transformers import ViTMAEConfig
    from transformers.models.vit_mae.modeling_vit_mae import ViTMAELayer
    cfg = ViTMAEConfig(hidden_size=dim, num_attention_heads=heads, intermediate_size=mlp,
                       layer_norm_eps=1e-12, hidden_act="gelu", qkv_bias=True)
    cfg._attn_implementation = attn
    self.grid, self.patch = grid, patch
    self.decoder_embed = torch.nn.Linear(channels, dim)
    self.trainable_cls_token = torch.nn.Parameter(torch.zeros(1, 1, dim))
    self.register_buffer("decoder_pos_embed",
                         torch.from_numpy(decoder_lib.sincos_2d(dim, grid, grid))[None])
    self.decoder_layers = torch.nn.ModuleList([ViTMAELayer(cfg) for _ in range(depth)])
    self.decoder_norm = torch.nn.LayerNorm(dim, eps=1e-12)
    self.decoder_pred = torch.nn.Linear(dim, patch * patch * 3)
    self.register_buffer("mean", torch.tensor(dinov2_lib.IMAGENET_MEAN).view(1, 1, 1, 3))
    self.register_buffer("std", torch.tensor(dinov2_lib.IMAGENET_STD).view(1, 1, 1, 3))

  def forward(self, z):
    """Latent (B, g, g, C) -> image (B, 16g, 16g, 3) channels-last, like ours."""
    b = z.shape[0]
    x = self.decoder_embed(z.reshape(b, self.grid * self.grid, -1))
    x = torch.cat([self.trainable_cls_token.expand(b, -1, -1), x], 1) + self.decoder_pos_embed
    for layer in self.decoder_layers:
      x = layer(x)
    x = self.decoder_pred(self.decoder_norm(x))[:, 1:]
    g, p = self.grid, self.patch
    x = x.reshape(b, g, g, p, p, 3).permute(0, 1, 3, 2, 4, 5).reshape(b, g * p, g * p, 3)
    return x * self.std + self.mean


class TorchUAE(torch.nn.Module):
  """HF DINOv2-with-registers encoder (frozen) + the official decoder, channels-last images."""

  def __init__(self, enc_size, dec_size, attn="sdpa", input_size=224):
    super().__init__()
    from transformers import Dinov2WithRegistersConfig, Dinov2WithRegistersModel
    e, d = dinov2_lib.SIZES[enc_size], decoder_spec(dec_size)
    cfg = Dinov2WithRegistersConfig(
        hidden_size=e.dim, num_hidden_layers=e.depth, num_attention_heads=e.heads,
        mlp_ratio=e.mlp_hidden // e.dim, image_size=518, patch_size=14, num_register_tokens=4,
        layer_norm_eps=1e-6, layerscale_value=1.0, hidden_act="gelu")
    cfg._attn_implementation = attn
    self.input_size = input_size
    grid = input_size // 14
    self.encoder = Dinov2WithRegistersModel(cfg)
    self.decoder = TorchDecoder(e.dim, d.dim, d.depth, d.heads, d.mlp_hidden, grid, attn=attn)
    self.register_buffer("mean", torch.tensor(dinov2_lib.IMAGENET_MEAN).view(1, 3, 1, 1))
    self.register_buffer("std", torch.tensor(dinov2_lib.IMAGENET_STD).view(1, 3, 1, 1))

  def encode(self, images):
    """[0,1] images (B, S, S, 3) -> latent (B, 16, 16, C): bicubic to 224, normalise, encode."""
    x = images.permute(0, 3, 1, 2)
    x = torch.nn.functional.interpolate(x, size=(self.input_size,) * 2, mode="bicubic",
                                        align_corners=False)
    h = self.encoder(pixel_values=(x - self.mean) / self.std).last_hidden_state
    b, g = h.shape[0], self.input_size // 14
    return h[:, 1 + 4:].reshape(b, g, g, -1)

  def forward(self, images):
    """Reconstruction of `images` (B, S, S, 3) through the encoder and decoder."""
    return self.decoder(self.encode(images))


def torch_from_params(params, enc_size, dec_size, attn="sdpa") -> TorchUAE:
  """The PyTorch network holding exactly our params (exported to the official layout)."""
  sd = convert_uae.uae_to_state_dict(params, key_style="hf5")
  model = TorchUAE(enc_size, dec_size, attn)
  enc = {k[len("encoder.encoder."):]: torch.from_numpy(v) for k, v in sd.items()
         if k.startswith("encoder.encoder.")}
  res = model.encoder.load_state_dict(enc, strict=False)
  if sorted(res.missing_keys) != ["layernorm.bias", "layernorm.weight"] or res.unexpected_keys:
    raise RuntimeError(f"encoder keys: missing {res.missing_keys}, extra {res.unexpected_keys}")
  with torch.no_grad():  # UAE's final LayerNorm has no affine: the identity one is the same
    model.encoder.layernorm.weight.fill_(1.0)
    model.encoder.layernorm.bias.zero_()
  dec = {}
  for k, v in sd.items():
    if k.startswith("decoder."):
      k = k[len("decoder."):]
      for old, new in _MAE_RENAME:
        k = k.replace(old, new)
      dec[k] = torch.from_numpy(v)
  dec.update(mean=model.decoder.mean, std=model.decoder.std)
  model.decoder.load_state_dict(dec, strict=True)
  model.encoder.requires_grad_(False)
  return model.eval()  # eval: no dropout anywhere (all rates are 0 anyway)


def torch_step_fn(model):
  """step(x) -> loss: frozen encoder forward, decoder forward/backward on L1, fused AdamW."""
  opt = torch.optim.AdamW(model.decoder.parameters(), lr=LR, betas=BETAS, eps=EPS,
                          weight_decay=0.0, fused=True)

  def step(x):
    with torch.no_grad():
      z = model.encode(x)
    loss = (model.decoder(z) - x).abs().mean()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss.detach()

  return step


def torch_matmul_peak(n: int = 2048, reps: int = 10) -> float:
  """Measured float32 matmul FLOP/s of PyTorch on this machine (best of `reps`)."""
  a = torch.randn(n, n)
  a @ a
  best = float("inf")
  for _ in range(reps):
    t = time.perf_counter()
    a @ a
    best = min(best, time.perf_counter() - t)
  return 2 * n**3 / best


def torch_step_flops(step, x) -> float:
  """Matmul/conv/attention FLOPs of one PyTorch step (torch.utils.flop_counter)."""
  from torch.utils.flop_counter import FlopCounterMode
  counter = FlopCounterMode(display=False)
  with counter:
    step(x)
  return float(counter.get_total_flops())


# ----------------------------------------------------------------------------- per-op profile
def _best(fn, reps):
  """Best wall time of fn() over `reps` calls after one warm-up call."""
  fn()
  best = float("inf")
  for _ in range(reps):
    t = time.perf_counter()
    fn()
    best = min(best, time.perf_counter() - t)
  return best


def _jax_fwd_bwd(f, *args):
  """A jitted forward + backward of f (cotangent: ones) on args; returns a no-arg timer call."""
  def fb(*a):
    out, vjp = jax.vjp(f, *a)
    return vjp(jnp.ones_like(out))
  g = jax.jit(fb)
  return lambda: jax.block_until_ready(g(*args))


def _torch_fwd_bwd(f, *args):
  """PyTorch forward + backward of f (cotangent: ones) on leaf copies of args."""
  leaves = [a.detach().clone().requires_grad_(True) for a in args]

  def run():
    out = f(*leaves)
    out.backward(torch.ones_like(out))
    for a in leaves:
      a.grad = None
  return run


def op_profile(dim=768, heads=12, mlp=3072, batch=4, tokens=257, reps=5) -> list:
  """Forward+backward time of the block's non-matmul ops in both frameworks at one shape."""
  from uae_jax.models import layers
  rng = np.random.default_rng(0)
  arr = lambda *s: rng.standard_normal(s).astype(np.float32)
  x, h = arr(batch, tokens, dim), arr(batch, tokens, mlp)
  qkv = [arr(batch, tokens, dim) for _ in range(3)]
  w, b = 1 + 0.1 * arr(dim), 0.1 * arr(dim)
  ln_j = lambda a, s, c: (a - a.mean(-1, keepdims=True)) * jax.lax.rsqrt(
      a.var(-1, keepdims=True) + 1e-12) * s + c
  tt = lambda a: torch.from_numpy(a)
  sdpa = torch.nn.functional.scaled_dot_product_attention
  split = lambda t: t.view(batch, tokens, heads, dim // heads).transpose(1, 2)
  eager = lambda q, k, v: (torch.softmax(split(q) @ split(k).transpose(-1, -2) * (dim // heads)**-0.5,
                                         -1) @ split(v))
  cases = [
      ("matmul D->MLP (reference)", _jax_fwd_bwd(lambda a, m: a @ m, x, arr(dim, mlp)),
       _torch_fwd_bwd(lambda a, m: a @ m, tt(x), tt(arr(dim, mlp)))),
      ("GELU exact (B,N,MLP)", _jax_fwd_bwd(lambda a: jax.nn.gelu(a, approximate=False), h),
       _torch_fwd_bwd(torch.nn.functional.gelu, tt(h))),
      ("LayerNorm (B,N,D)", _jax_fwd_bwd(ln_j, x, w, b),
       _torch_fwd_bwd(lambda a, s, c: torch.nn.functional.layer_norm(a, (dim,), s, c, 1e-12),
                      tt(x), tt(w), tt(b))),
  ]
  for impl in ("einsum", "xla"):
    cases.append((f"attention ours={impl} / torch=" + ("eager" if impl == "einsum" else "sdpa"),
                  _jax_fwd_bwd(lambda q, k, v, i=impl: layers.multi_head_attention(q, k, v, heads, i),
                               *qkv),
                  _torch_fwd_bwd(eager if impl == "einsum" else
                                 (lambda q, k, v: sdpa(split(q), split(k), split(v))),
                                 *map(tt, qkv))))
  rows = []
  for name, fj, ft in cases:
    tj, tt_ = _best(fj, reps), _best(ft, reps)
    rows.append(dict(op=name, jax_ms=tj * 1e3, torch_ms=tt_ * 1e3))
    print(f"  {name:42s} ours {tj * 1e3:8.2f} ms | PyTorch {tt_ * 1e3:8.2f} ms | ours/PyTorch "
          f"time {tj / tt_:.2f} | {_load()}", flush=True)
  return rows


# --------------------------------------------------------------------------------------- timing
def _load() -> str:
  """The 1-minute load average and the core count, for every timing line."""
  return f"load {os.getloadavg()[0]:.2f}/{os.cpu_count()} cores"


def _per_step(steps_fn, steps: int) -> tuple:
  """(wall seconds, kernel CPU seconds) per step of `steps_fn()`, which runs `steps` steps.

  Kernel time is mostly page faults: XLA:CPU allocates a step's temporaries afresh on every
  call (1.14 GB at B/B), PyTorch reuses its memory (docs/speed.md)."""
  r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
  steps_fn()
  wall, r1 = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF)
  return wall / max(steps, 1), (r1.ru_stime - r0.ru_stime) / max(steps, 1)


class JaxSide:
  """Our step at one shape: built from numpy params, timed with `run(steps)`, freed by `close`."""

  def __init__(self, model, params, x_np):
    self.step, self.tx = jax_step_fn(model)  # jit caches the executable across rebuilds
    self.enc = jax.device_put(params["encoder"])
    self.dec = jax.device_put(params["decoder"])
    self.opt = self.tx.init(self.dec)
    self.x = jnp.asarray(x_np)

  def compile(self):
    """(compile seconds, XLA FLOPs of the step)."""
    t0 = time.perf_counter()
    compiled = self.step.lower(self.dec, self.opt, self.enc, self.x).compile()
    return time.perf_counter() - t0, float(compiled_cost(compiled).get("flops", 0.0))

  def run(self, steps: int) -> float:
    """Seconds per step over `steps` steps (kernel seconds per step in `self.kernel_s`)."""
    def steps_fn():
      for _ in range(steps):
        self.dec, self.opt, loss = self.step(self.dec, self.opt, self.enc, self.x)
      jax.block_until_ready(loss)
    wall, self.kernel_s = _per_step(steps_fn, steps)
    return wall

  def close(self):
    """Drops the arrays (the compiled step stays in jit's cache)."""
    del self.dec, self.opt, self.enc, self.x


class TorchSide:
  """The PyTorch step at one shape, same interface as JaxSide."""

  def __init__(self, params, enc_size, dec_size, attn, x_np):
    self.model = torch_from_params(params, enc_size, dec_size, attn)
    self.step = torch_step_fn(self.model)
    self.x = torch.from_numpy(x_np)

  def flops(self) -> float:
    """Matmul FLOPs of one step (runs one step)."""
    return torch_step_flops(self.step, self.x)

  def run(self, steps: int) -> float:
    """Seconds per step over `steps` steps (kernel seconds per step in `self.kernel_s`)."""
    def steps_fn():
      for _ in range(steps):
        self.step(self.x)
    wall, self.kernel_s = _per_step(steps_fn, steps)
    return wall

  def close(self):
    """Drops the model and its optimiser state."""
    del self.model, self.step


def _round_line(r, batch, t_jax, t_torch, kernel_jax, kernel_torch):
  """One printed round and its record."""
  print(f"  round {r}: ours {t_jax:6.2f} s/step ({batch / t_jax:5.2f} img/s) | PyTorch "
        f"{t_torch:6.2f} s/step ({batch / t_torch:5.2f} img/s) | ours/PyTorch img/s "
        f"{t_torch / t_jax:.3f} | kernel s/step ours {kernel_jax:.2f}, PyTorch "
        f"{kernel_torch:.2f} | {_load()}", flush=True)
  return dict(jax_s=t_jax, torch_s=t_torch, ratio=t_torch / t_jax, load=os.getloadavg()[0],
              jax_kernel_s=kernel_jax, torch_kernel_s=kernel_torch)


def bench_shape(enc_size, dec_size, batch, steps, rounds, attention, torch_attn, peaks,
                sequential: bool = False, warmup_rounds: int = 1) -> dict:
  """Times both steps at one shape; prints per-round lines; returns the summary row.

  `warmup_rounds` untimed rounds come first: the two sides' steps interleave, and the host
  allocator (tcmalloc in particular) takes a round or two to hold memory for both patterns.

  `sequential`: only one side's weights and optimiser state exist at a time (each round
  rebuilds both sides from the same numpy weights), for shapes whose two states together do
  not fit in memory (decoder XL: about 7 GB per side).
  """
  size = 256
  model = jax_model(enc_size, dec_size, attention)
  params = jax_params(model, size)
  x_np = np.random.default_rng(0).uniform(size=(batch, size, size, 3)).astype(np.float32)
  make_j = lambda: JaxSide(model, params, x_np)
  make_t = lambda: TorchSide(params, enc_size, dec_size, torch_attn, x_np)
  js = make_j()
  compile_s, xla_flops = js.compile()
  js.run(1)  # warm-up
  if sequential:
    js.close()
  ts = make_t()
  mm_flops = ts.flops()  # also the PyTorch warm-up step
  rows = []
  for r in range(-warmup_rounds, rounds):
    if sequential:
      ts.close()
      js = make_j()
      js.run(1)
    t_jax, kernel_jax = js.run(steps), js.kernel_s
    if sequential:
      js.close()
      ts = make_t()
      ts.run(1)
    t_torch = ts.run(steps)
    if r >= 0:
      rows.append(_round_line(r, batch, t_jax, t_torch, kernel_jax, ts.kernel_s))
  ts.close()
  if not sequential:
    js.close()
  gc.collect()
  t_jax = statistics.median(r["jax_s"] for r in rows)
  t_torch = statistics.median(r["torch_s"] for r in rows)
  return dict(encoder=enc_size, decoder=dec_size, batch=batch, image=size, steps=steps,
              sequential=sequential, rounds=rows, compile_s=round(compile_s, 1),
              xla_gflop=xla_flops / 1e9, matmul_gflop=mm_flops / 1e9, jax_img_s=batch / t_jax,
              torch_img_s=batch / t_torch, ratio=statistics.median(r["ratio"] for r in rows),
              jax_frac_peak=mm_flops / t_jax / peaks["jax"],
              torch_frac_peak=mm_flops / t_torch / peaks["torch"],
              jax_gflops=mm_flops / t_jax / 1e9, torch_gflops=mm_flops / t_torch / 1e9)


def main(argv=None):
  """Parses the shapes, measures both matmul peaks, benchmarks each shape, prints RESULT."""
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--shapes", default="B:B:4,B:XL:2", help="ENC:DEC:BATCH,... at 256 px")
  p.add_argument("--steps", type=int, default=3, help="timed steps per side per round")
  p.add_argument("--rounds", type=int, default=2)
  p.add_argument("--warmup_rounds", type=int, default=1,
                 help="untimed rounds first, so both sides' memory use reaches its steady state")
  p.add_argument("--attention", default=None, help="our attention implementation (None: default)")
  p.add_argument("--torch_attention", default="sdpa", choices=("sdpa", "eager"))
  p.add_argument("--sequential", default="XL",
                 help="comma list of decoder sizes timed with one side in memory at a time "
                      "(XL: ~7 GB per side); '' = never")
  p.add_argument("--ops", action="store_true",
                 help="only the per-op profile (GELU, LayerNorm, attention) at the B decoder shape")
  a = p.parse_args(argv)
  if a.ops:
    print(f"forward+backward, best of 5, decoder B shape (4, 257, 768), {_load()}:")
    print("RESULT " + json.dumps({"benchmark": "vs_torch_ops", "ops": op_profile()}))
    return
  torch.manual_seed(0)
  peaks = {"jax": matmul_peak(), "torch": torch_matmul_peak()}
  print(f"jax {jax.__version__} ({jax.devices()[0].platform}), torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), {os.cpu_count()} cores, {_load()}, "
        f"{host_malloc.active()} malloc")
  print(f"float32 matmul peak 2048^3: JAX {peaks['jax'] / 1e9:.1f} GFLOP/s, PyTorch "
        f"{peaks['torch'] / 1e9:.1f} GFLOP/s")
  out = []
  for shape in a.shapes.split(","):
    enc_size, dec_size, batch = shape.split(":")
    print(f"encoder {enc_size} (frozen) + decoder {dec_size}, batch {batch}, 256 px, fp32, "
          f"L1 + AdamW:", flush=True)
    seq = dec_size in a.sequential.split(",")
    r = bench_shape(enc_size, dec_size, int(batch), a.steps, a.rounds, a.attention,
                    a.torch_attention, peaks, sequential=seq, warmup_rounds=a.warmup_rounds)
    out.append(r)
    print(f"  => ours {r['jax_img_s']:.3f} img/s, PyTorch {r['torch_img_s']:.3f} img/s, ratio "
          f"{r['ratio']:.3f} (median of rounds) | step {r['matmul_gflop']:.0f} GFLOP matmul "
          f"(XLA counts {r['xla_gflop']:.0f}) | ours {r['jax_gflops']:.1f} GFLOP/s = "
          f"{100 * r['jax_frac_peak']:.0f}% of JAX peak, PyTorch {r['torch_gflops']:.1f} GFLOP/s "
          f"= {100 * r['torch_frac_peak']:.0f}% of PyTorch peak | compile {r['compile_s']:.0f} s",
          flush=True)
  print("RESULT " + json.dumps({"benchmark": "vs_torch", "attention": a.attention,
                                "torch_attention": a.torch_attention,
                                "host_malloc": host_malloc.active(),
                                "peak_gflops": {k: v / 1e9 for k, v in peaks.items()},
                                "shapes": out}))


if __name__ == "__main__":
  main(host_malloc.use_from_argv(sys.argv[1:]))
