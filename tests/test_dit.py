"""DiT^DH / LightningDiT: parameter counts, fixed tables and a PyTorch reimplementation of the forward.

The PyTorch reference below is written from the specification (docs/generation.md), not from the
JAX code: time embedding, 2-D interleaved RoPE, adaLN blocks, the DDT head's per-token
conditioning and the final layer; weights are copied by path from the Flax params.
"""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from uae_jax.models import dit
from uae_jax.models import scan_utils

TINY = dict(size="tiny", head_size="tiny", in_channels=8, input_size=4, num_classes=10)


def _init(kind, scale=0.05):
  """(model, params with every leaf perturbed so zero-initialised layers matter, inputs, init)."""
  model = dit.build(dict(TINY, kind=kind))
  x = jax.random.normal(jax.random.key(1), (3, 4, 4, 8))
  t = jnp.asarray([0.05, 0.5, 0.97])
  y = jnp.asarray([1, 7, 10])
  # An 'unsafe_rbg' key: the init's random draws then compile in about half the time of the
  # default threefry ones (the init's compile is most of its cost); any key gives a valid init.
  key = jax.random.key(0, impl="unsafe_rbg")
  params = nn.unbox(jax.jit(model.init)(key, x, t, y))["params"]
  leaves, tree = jax.tree.flatten(params)
  # NumPy noise on host arrays: eager jax.random per leaf shape compiled one program per shape.
  rng = np.random.default_rng(2)
  leaves = [np.asarray(l) + np.float32(scale) * rng.standard_normal(l.shape, np.float32)
            for l in leaves]
  return model, jax.tree.unflatten(tree, leaves), (x, t, y), params


def _tiny(kind):
  """_init(kind) and the model's jitted forward `(params, x, t, y) -> (out, intermediates)`."""
  model, params, inputs, raw = _init(kind)
  fwd = jax.jit(lambda p, x, t, y: model.apply({"params": p}, x, t, y, capture_intermediates=True))
  return model, params, inputs, raw, fwd


# One init and one compiled forward per kind, shared by the tests below (compiling them is
# most of this file's time).
@pytest.fixture(scope="module")
def ddt():
  return _tiny("ddt")


@pytest.fixture(scope="module")
def lightning():
  return _tiny("lightning")


# ------------------------------------------------------------------------------ sizes
@pytest.mark.parametrize("kind,size,expected", [
    ("ddt", "XL", 838e6),        # DiT^DH-XL, 768 channels, 16 x 16
    ("ddt", "S", 196e6),         # DiT^DH-S, the autoguidance model
    ("lightning", "XL", 677e6),  # plain DiT-XL
])
def test_param_count(kind, size, expected):
  model = dit.build(dict(kind=kind, size=size, head_size="DH", scan_blocks=True))
  n = dit.count_params(dit.abstract_params(model))  # shapes only, nothing allocated
  assert abs(n - expected) / expected < 0.005, n


def test_swiglu_hidden_widths():
  assert [dit.swiglu_hidden(d) for d in (1152, 2048, 384)] == [3072, 5461, 1024]


# ------------------------------------------------------------------------------ fixed tables
def test_rope_tables_match_independent_loops():
  hd, g = 8, 3
  cos, sin = dit.rope_tables(hd, g)
  half = hd // 2
  for r in range(g):
    for c in range(g):
      for ch in range(hd):
        pos, j = (r, ch) if ch < half else (c, ch - half)
        freq = 10000.0 ** (-(2 * (j // 2)) / half)
        np.testing.assert_allclose(cos[r * g + c, ch], np.cos(pos * freq), atol=1e-6)
        np.testing.assert_allclose(sin[r * g + c, ch], np.sin(pos * freq), atol=1e-6)


def test_rope_rotates_interleaved_pairs():
  x = jnp.arange(8.0).reshape(1, 1, 1, 8)
  cos, sin = jnp.zeros((1, 8)), jnp.ones((1, 8))  # a 90 degree turn of every pair
  np.testing.assert_array_equal(dit.apply_rope(x, cos, sin)[0, 0, 0],
                                [-1, 0, -3, 2, -5, 4, -7, 6])


# ------------------------------------------------------------------------------ torch reference
def _t(a):
  """numpy/jax -> float64 torch tensor."""
  return torch.tensor(np.asarray(a, np.float64))


def _lin(p, x):
  """x @ kernel + bias with a Flax Dense param dict."""
  return x @ _t(p["kernel"]) + _t(p["bias"])


def _rms(p, x, eps=1e-6):
  """RMSNorm with weight."""
  return x * torch.rsqrt((x * x).mean(-1, keepdim=True) + eps) * _t(p["weight"])


def _rope_torch(x, grid):
  """EVA-style 2-D RoPE written from the spec: rows on the first half, columns on the second."""
  hd = x.shape[-1]
  d = hd // 2
  freqs = 1.0 / 10000 ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
  f = torch.einsum("i,f->if", torch.arange(grid, dtype=torch.float64), freqs)
  f = f.repeat_interleave(2, -1)                                    # (grid, d)
  f = torch.cat([f[:, None, :].expand(grid, grid, d), f[None, :, :].expand(grid, grid, d)], -1)
  f = f.reshape(grid * grid, hd)
  x2 = x.reshape(*x.shape[:-1], -1, 2)
  rot = torch.stack([-x2[..., 1], x2[..., 0]], -1).reshape(x.shape)
  return x * f.cos() + rot * f.sin()


def _block_torch(p, x, cond, heads, grid):
  """adaLN block: six vectors from Linear(SiLU(cond)), RMSNorm, RoPE attention, SwiGLU."""
  sh1, sc1, g1, sh2, sc2, g2 = _lin(p["adaLN"], torch.nn.functional.silu(cond)).chunk(6, -1)
  b, n, dim = x.shape
  h = _rms(p["norm1"], x) * (1 + sc1) + sh1
  qkv = _lin(p["attn"]["qkv"], h).reshape(b, n, 3, heads, dim // heads).permute(2, 0, 3, 1, 4)
  q, k, v = _rope_torch(qkv[0], grid), _rope_torch(qkv[1], grid), qkv[2]
  a = torch.nn.functional.scaled_dot_product_attention(q, k, v)
  x = x + g1 * _lin(p["attn"]["proj"], a.transpose(1, 2).reshape(b, n, dim))
  h = _rms(p["norm2"], x) * (1 + sc2) + sh2
  x1, x2 = _lin(p["mlp"]["w12"], h).chunk(2, -1)
  return x + g2 * _lin(p["mlp"]["w3"], torch.nn.functional.silu(x1) * x2)


def _sincos_torch(dim, grid):
  """DiT 2-D sin-cos table (first half encodes the column)."""
  def one(d, pos):
    om = 1.0 / 10000 ** (torch.arange(d // 2, dtype=torch.float64) / (d / 2.0))
    o = pos.reshape(-1)[:, None] * om[None]
    return torch.cat([o.sin(), o.cos()], 1)
  r, c = torch.meshgrid(torch.arange(grid, dtype=torch.float64),
                        torch.arange(grid, dtype=torch.float64), indexing="ij")
  return torch.cat([one(dim // 2, c), one(dim // 2, r)], 1)


def _torch_forward(kind, p, x, t, y, body_heads, head_heads, collect):
  """The whole DiT in float64 torch; appends every block's output to `collect`."""
  x = _t(x)
  b, g, _, ch = x.shape
  tok = x.reshape(b, g * g, ch)
  w = _t(p["t_embedder"]["freqs"])
  arg = 2 * np.pi * _t(t)[:, None] * w[None]
  te = torch.cat([arg.sin(), arg.cos()], -1)
  te = _lin(p["t_embedder"]["mlp_2"], torch.nn.functional.silu(_lin(p["t_embedder"]["mlp_0"], te)))
  ye = _t(p["y_embedder"]["embedding_table"])[torch.as_tensor(np.array(y))]
  if kind == "lightning":
    c = (te + ye)[:, None]
    h = _lin(p["x_embedder"], tok) + _sincos_torch(te.shape[-1], g)
    for i in range(2):
      h = _block_torch(p[f"blocks_{i}"], h, c, body_heads, g)
      collect.append(h)
    cond = c
  else:
    c = torch.nn.functional.silu(te + ye)[:, None]
    s = _lin(p["s_embedder"], tok) + _sincos_torch(te.shape[-1], g)
    for i in range(2):
      s = _block_torch(p[f"blocks_{i}"], s, c, body_heads, g)
      collect.append(s)
    s = _lin(p["s_projector"], torch.nn.functional.silu(te[:, None] + s))
    h = _lin(p["x_embedder"], tok)
    h = _block_torch(p["head_blocks_0"], h, s, head_heads, g)
    collect.append(h)
    cond = s
  shift, scale = _lin(p["final_layer"]["adaLN"], torch.nn.functional.silu(cond)).chunk(2, -1)
  out = _lin(p["final_layer"]["linear"], _rms(p["final_layer"]["norm"], h) * (1 + scale) + shift)
  return out.reshape(b, g, g, ch)


@pytest.mark.parametrize("kind", ["ddt", "lightning"])
def test_forward_matches_torch_reference(kind, request):
  _, params, (x, t, y), _, fwd = request.getfixturevalue(kind)
  out, inter = fwd(params, x, t, y)
  collect = []
  ref = _torch_forward(kind, params, x, t, y, 4, 4, collect)
  names = ["blocks_0", "blocks_1"] + (["head_blocks_0"] if kind == "ddt" else [])
  for name, r in zip(names, collect):
    got = np.asarray(inter["intermediates"][name]["__call__"][0])
    np.testing.assert_allclose(got, r.numpy(), atol=1e-4, rtol=0, err_msg=name)
  np.testing.assert_allclose(np.asarray(out), ref.numpy(), atol=1e-4, rtol=0)
  assert float(jnp.abs(out).mean()) > 1e-2  # the comparison is not between zeros


# ------------------------------------------------------------------------------ properties
def test_zero_init_output_is_zero(ddt):
  _, _, (x, t, y), raw, fwd = ddt  # the initial params, before the fixture's perturbation
  out, inter = fwd(raw, x, t, y)
  assert float(jnp.abs(out).max()) == 0
  assert float(jnp.abs(inter["intermediates"]["head_blocks_0"]["__call__"][0]).max()) > 0


def _apply(model, params, x, t, y):
  """Jitted forward."""
  return jax.jit(lambda p: model.apply({"params": p}, x, t, y))(params)


def test_scan_remat_same_function(ddt):
  _, params, (x, t, y), _, fwd = ddt
  ref = fwd(params, x, t, y)[0]
  scanned = dit.build(dict(TINY, kind="ddt", scan_blocks=True, remat_policy="full"))
  p = scan_utils.stack_blocks(scan_utils.stack_blocks(params), "head_blocks")
  np.testing.assert_allclose(_apply(scanned, p, x, t, y), ref, atol=1e-5)


@pytest.mark.slow
def test_bf16_close_to_float32():
  model, params, (x, t, y), _ = _init("ddt")
  ref = _apply(model, params, x, t, y)
  bf16 = dit.build(dict(TINY, kind="ddt", remat_policy="dots"), dtype=jnp.bfloat16)
  np.testing.assert_allclose(_apply(bf16, params, x, t, y), ref, atol=0.1)


def test_label_dropout_all_means_null_class(lightning):
  _, params, (x, t, y), _, fwd = lightning
  model = dit.build(dict(TINY, kind="lightning", class_dropout_prob=1.0))
  dropped = jax.jit(lambda p: model.apply({"params": p}, x, t, y, train=True,
                                          rngs={"label_dropout": jax.random.key(3)}))(params)
  null = fwd(params, x, t, jnp.full_like(y, 10))[0]  # eval mode: no dropout
  np.testing.assert_array_equal(dropped, null)
  assert float(jnp.abs(null - fwd(params, x, t, y)[0]).max()) > 1e-4  # the labels matter


def test_every_param_has_logical_axes():
  model = dit.build(dict(TINY, kind="ddt", scan_blocks=True))
  boxed = dit.abstract_params(model)
  leaves = jax.tree.leaves(boxed, is_leaf=lambda l: isinstance(l, nn.LogicallyPartitioned))
  assert leaves and all(isinstance(l, nn.LogicallyPartitioned) for l in leaves)
