"""Shapes and numerics of the DINOv2 encoder, the resize operators and the pixel decoder."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from uae_jax.models import decoder
from uae_jax.models import dinov2
from uae_jax.models import resize


def _slow_unless(default, cases):
  """Parametrize values: the `default` ones run by default, the rest only under `-m slow`."""
  return [c if c in default else pytest.param(*c, marks=pytest.mark.slow) for c in cases]


# By default the UAE's encoder (B, 4 registers, 224 px) and the other branch of every switch
# (S, no registers, 252 px); the other sizes and combinations only trace more blocks.
@pytest.mark.parametrize("size, registers, input_size", _slow_unless(
    [("B", 4, 224), ("S", 0, 252)],
    [(s, r, i) for s in ("S", "B", "L", "g") for r in (0, 4) for i in (224, 252)]))
def test_encoder_shapes(size, registers, input_size):
  enc = dinov2.DinoV2(size=size, num_registers=registers, input_size=input_size)
  images = jax.ShapeDtypeStruct((2, 256, 256, 3), jnp.float32)
  params = nn.unbox(jax.eval_shape(enc.init, jax.random.key(0), images))
  out = jax.eval_shape(enc.apply, params, images)
  grid = input_size // 14
  assert out.shape == (2, grid, grid, dinov2.SIZES[size].dim)
  p = params["params"]
  assert p["pos_embed"].shape == (1, 1 + 37 * 37, dinov2.SIZES[size].dim)
  assert ("register_tokens" in p) == bool(registers)
  assert "norm" not in p  # UAE's final LayerNorm has no affine parameters
  assert len([k for k in p if k.startswith("blocks_")]) == dinov2.SIZES[size].depth


def test_encoder_tiny_forward_is_normalised_and_row_major():
  enc = dinov2.DinoV2(size="tiny", input_size=224, pos_embed_grid=16)
  x = jax.random.uniform(jax.random.key(1), (2, 256, 256, 3))
  # One jitted program (eager init/apply would compile one program per op).
  grid, blocks = jax.jit(lambda k, x: enc.apply(nn.unbox(enc.init(k, x)), x, return_blocks=True))(
      jax.random.key(0), x)
  assert grid.shape == (2, 16, 16, 64) and len(blocks) == 2
  # Non-affine final LayerNorm: every token has zero mean and unit variance.
  np.testing.assert_allclose(grid.mean(-1), 0.0, atol=1e-5)
  np.testing.assert_allclose(grid.var(-1), 1.0, atol=1e-3)
  # Row-major: token n of the last block (after CLS + 4 registers) is grid[n // 16, n % 16].
  ln = (blocks[-1] - blocks[-1].mean(-1, keepdims=True)) / jnp.sqrt(blocks[-1].var(-1, keepdims=True) + 1e-6)
  np.testing.assert_allclose(grid[:, 3, 7], ln[:, 5 + 3 * 16 + 7], atol=1e-5)


def test_encoder_rejects_input_not_multiple_of_patch():
  enc = dinov2.DinoV2(size="tiny", input_size=None, pos_embed_grid=16)
  with pytest.raises(ValueError, match="multiple of patch"):
    enc.init(jax.random.key(0), jnp.zeros((1, 256, 256, 3)))


def test_input_resize_matches_torch_bicubic():
  torch = pytest.importorskip("torch")
  x = np.random.RandomState(0).rand(2, 3, 256, 256).astype(np.float32)
  ref = torch.nn.functional.interpolate(torch.from_numpy(x), size=(224, 224), mode="bicubic",
                                        align_corners=False).numpy()
  m = resize.torch_bicubic_matrix(256, 224)
  out = np.asarray(resize.resize_2d(jnp.asarray(x.transpose(0, 2, 3, 1)), m, m))
  assert np.abs(out.transpose(0, 3, 1, 2) - ref).max() <= 1e-5


@pytest.mark.parametrize("convention", resize.CONVENTIONS)
@pytest.mark.parametrize("out", [16, 18, 40])
def test_pos_embed_resize_conventions_match_torch(convention, out):
  torch = pytest.importorskip("torch")
  f = torch.nn.functional.interpolate
  p = np.random.RandomState(1).randn(1, 8, 37, 37).astype(np.float32)
  t = torch.from_numpy(p)
  if convention == "torch_bicubic":
    ref = f(t, size=(out, out), mode="bicubic", align_corners=False)
  elif convention == "torch_bicubic_offset":
    ref = f(t, scale_factor=((out + 0.1) / 37,) * 2, mode="bicubic", align_corners=False)
  else:
    ref = f(t, size=(out, out), mode="bicubic", align_corners=False, antialias=True)
  m = resize.resize_matrix(37, out, convention)
  got = np.asarray(resize.resize_2d(jnp.asarray(p.transpose(0, 2, 3, 1)), m, m))
  assert np.abs(got.transpose(0, 3, 1, 2) - ref.numpy()).max() <= 2e-5


def test_resize_matrix_identity_and_rows_sum_to_one():
  for conv in resize.CONVENTIONS[::2]:
    np.testing.assert_allclose(resize.resize_matrix(37, 37, conv), np.eye(37), atol=1e-6)
  np.testing.assert_allclose(resize.torch_bicubic_matrix(256, 224).sum(1), 1.0, atol=1e-6)
  with pytest.raises(ValueError, match="unknown resize convention"):
    resize.resize_matrix(37, 16, "bilinear")


# L and XL only trace more blocks (XL's tree is pinned by test_decoder_xl_parameter_count).
@pytest.mark.parametrize("size", [s if s not in ("L", "XL") else pytest.param(
    s, marks=pytest.mark.slow) for s in sorted(decoder.SIZES)])
def test_decoder_shapes(size):
  dec = decoder.PixelDecoder(size=size)
  z = jax.ShapeDtypeStruct((2, 16, 16, 768), jnp.float32)
  params = nn.unbox(jax.eval_shape(dec.init, jax.random.key(0), z))
  assert jax.eval_shape(dec.apply, params, z).shape == (2, 256, 256, 3)
  assert len([k for k in params["params"] if k.startswith("blocks_")]) == decoder.SIZES[size].depth


def test_decoder_xl_parameter_count():
  dec = decoder.PixelDecoder(size="XL")
  params = nn.unbox(jax.eval_shape(
      dec.init, jax.random.key(0), jax.ShapeDtypeStruct((1, 16, 16, 768), jnp.float32)))
  n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
  assert abs(n - 415.1e6) / 415.1e6 < 0.005, n
  assert params["params"]["blocks_0"]["mlp"]["fc1"]["kernel"].shape == (1152, 4096)


def test_unpatchify_inverts_patchify_on_real_photo(photo_batch):
  x = jnp.asarray(photo_batch)
  tokens = decoder.patchify(x, 16)
  assert tokens.shape == (4, 256, 768)
  np.testing.assert_array_equal(decoder.unpatchify(tokens, 16, 16, 16), x)
  # Token (r, c), entry (p, q, ch) is pixel (16r + p, 16c + q, ch).
  r, c, p, q, ch = 3, 11, 5, 9, 2
  assert tokens[0, r * 16 + c, (p * 16 + q) * 3 + ch] == x[0, 16 * r + p, 16 * c + q, ch]


def test_sincos_first_half_encodes_column():
  emb = decoder.sincos_2d(16, 4, 5)
  assert emb.shape == (1 + 20, 16)
  np.testing.assert_array_equal(emb[0], 0.0)
  grid = emb[1:].reshape(4, 5, 16)
  # First half depends only on the column, second half only on the row.
  np.testing.assert_allclose(grid[0, :, :8], grid[3, :, :8])
  np.testing.assert_allclose(grid[:, 0, 8:], grid[:, 4, 8:])
  np.testing.assert_allclose(grid[0, 2, :4], np.sin(2 * 1e4 ** (-np.arange(4) / 4)), rtol=1e-6)


def test_decoder_tiny_forward_adds_imagenet_stats_at_zero_output():
  dec = decoder.PixelDecoder(size="tiny")
  z = jax.random.normal(jax.random.key(0), (2, 4, 4, 32))

  @jax.jit
  def run(k, z):
    """The initial CLS token and the output with every parameter zeroed."""
    v = nn.unbox(dec.init(k, z))
    return v["params"]["cls_token"], dec.apply(jax.tree.map(jnp.zeros_like, v), z)

  cls_token, out = run(jax.random.key(1), z)
  assert np.all(np.asarray(cls_token) == 0)
  assert out.shape == (2, 64, 64, 3)
  np.testing.assert_allclose(out[0, 0, 0], dinov2.IMAGENET_MEAN, rtol=1e-6)


# ------------------------------------------------------------------------------------------------
# Explicit (custom) sizes and the decoder's weight init.

def test_custom_sizes_match_named_ones_and_are_validated():
  named = dinov2.DinoV2(size="B")
  custom = dinov2.DinoV2(size="custom", dim=768, depth=12, num_heads=12, mlp_hidden=3072)
  assert custom.spec == named.spec
  images = jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.float32)
  shapes = lambda m: jax.tree.map(lambda x: x.shape, nn.unbox(jax.eval_shape(
      m.init, jax.random.key(0), images)))
  assert shapes(custom) == shapes(named)
  odd = dinov2.DinoV2(size="custom", dim=192, depth=4, num_heads=3, mlp_hidden=384, input_size=112)
  assert jax.eval_shape(odd.init_with_output, jax.random.key(0), images)[0].shape == (1, 8, 8, 192)
  with pytest.raises(ValueError, match="needs \\['depth', 'heads', 'mlp_hidden'\\]"):
    _ = dinov2.DinoV2(size="custom", dim=192).spec
  with pytest.raises(ValueError, match="size='B' fixes its dims"):
    _ = dinov2.DinoV2(size="B", dim=192).spec
  with pytest.raises(ValueError, match="192 is not divisible by 5 heads"):
    _ = decoder.PixelDecoder(size="custom", dim=192, depth=1, num_heads=5, mlp_hidden=8).spec
  assert decoder.PixelDecoder(size="custom", dim=1152, depth=28, num_heads=16,
                              mlp_hidden=4096).spec == decoder.SIZES["XL"]


def _decoder_params(weight_init=None, scan=False, seed=0):
  kw = {} if weight_init is None else {"weight_init": weight_init}
  dec = decoder.PixelDecoder(size="custom", dim=128, depth=2, num_heads=2, mlp_hidden=256,
                             patch_size=4, scan_blocks=scan, **kw)
  # Jitted: eager init compiles one program per op (the random draws are the same).
  return jax.jit(dec.init)(jax.random.key(seed), jnp.zeros((1, 2, 2, 96)))["params"]


def test_default_decoder_init_is_unchanged():
  """weight_init='jax' (the default) is bit-identical to not setting it: LeCun-normal kernels
  (truncated normal, std 1/sqrt(fan_in)) and zero biases."""
  default, jax_init = nn.unbox(_decoder_params()), nn.unbox(_decoder_params("jax"))
  jax.tree.map(np.testing.assert_array_equal, default, jax_init)
  k = np.asarray(default["blocks_0"]["mlp"]["fc1"]["kernel"])  # (128, 256)
  assert abs(k.std() * np.sqrt(128) - 1.0) < 0.05
  assert np.all(np.asarray(default["blocks_0"]["mlp"]["fc1"]["bias"]) == 0)


@pytest.mark.parametrize("scan", [False, True])
def test_torch_default_decoder_init_is_uniform_in_fan_in_bounds(scan):
  """Every Linear kernel and bias ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)) as PyTorch's nn.Linear;
  LayerNorms, the CLS token and the logical axis metadata are as with the default init."""
  boxed = _decoder_params("torch_default", scan)
  ref_boxed = _decoder_params(None, scan)
  names = lambda t: jax.tree.map(lambda x: getattr(x, "names", None), t,
                                 is_leaf=lambda x: isinstance(x, nn.Partitioned))
  assert names(boxed) == names(ref_boxed)
  p, ref = nn.unbox(boxed), nn.unbox(ref_boxed)
  flat = {"/".join(str(k.key) for k in path): np.asarray(v)
          for path, v in jax.tree_util.tree_leaves_with_path(p)}
  dense = sorted({k.rsplit("/", 1)[0] for k in flat if k.endswith("kernel")})
  assert len(dense) == 2 + 6 * (1 if scan else 2)  # embed, pred; q, k, v, proj, fc1, fc2
  for layer in dense:
    kernel, bias = flat[layer + "/kernel"], flat[layer + "/bias"]
    bound = 1.0 / np.sqrt(kernel.shape[-2])
    for x in (kernel, bias):
      assert np.all(np.abs(x) <= bound), layer
      u = x.reshape(-1) / bound  # U(-1, 1): mean 0, variance 1/3
      tol = 4.0 / np.sqrt(u.size)
      assert abs(u.mean()) < tol * 0.6 and abs(u.var() - 1 / 3) < tol * 0.3, layer
    assert np.abs(kernel).max() > 0.98 * bound  # the whole interval is used
  for key in ("norm", "cls_token"):
    jax.tree.map(np.testing.assert_array_equal, p[key], ref[key])
  with pytest.raises(ValueError, match="weight_init='xavier'"):
    _decoder_params("xavier")
