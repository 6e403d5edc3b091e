"""DINO discriminator: backbone layout and features, spectral norm, BatchNormLocal, heads."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from uae_jax.models import discriminator as disc
from uae_jax.models import resize

# Tiny sizes for speed: 32 px resize target, patch 8 -> 16 tokens, width 32, three blocks of
# which two are read (block 1 is skipped, so the key-depth selection is checked too): three heads.
TINY = dict(dim=32, depth=3, num_heads=2, mlp_hidden=64, patch_size=8, image_size=32,
            key_depths=(0, 2))


def _images(key, shape):
  """Uniform [-1, 1) float32 images from NumPy (an eager jax.random call compiles per shape)."""
  return np.random.default_rng(key).uniform(-1.0, 1.0, shape).astype(np.float32)


def _random_variables(module, *args, seed=0):
  """Variables with the shapes of `module.init(*args)`, random values from NumPy.

  The init itself is only traced (jax.eval_shape): compiling it costs as much as a forward and
  its values are not what these tests check. Spectral-norm u, v are unit vectors, as at init.
  """
  rng = np.random.default_rng(seed)
  abstract = nn.unbox(jax.eval_shape(module.init, jax.random.key(0), *args))
  fill = lambda a: 0.1 * rng.standard_normal(a.shape).astype(np.float32)
  v = jax.tree.map(fill, abstract)
  if "spectral" in v:
    v["spectral"] = jax.tree.map(lambda a: a / np.linalg.norm(a), v["spectral"])
  return v


@pytest.fixture(scope="module")
def tiny_disc():
  """A tiny Discriminator, random variables and its jitted apply (shared: compiles are slow)."""
  d = disc.Discriminator(**TINY)
  v = _random_variables(d, jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32))
  return d, v, jax.jit(d.apply, static_argnames=("train", "mutable"))


def test_full_size_param_tree_and_shapes():
  d = disc.Discriminator()
  x = jax.ShapeDtypeStruct((2, 256, 256, 3), jnp.float32)
  v = nn.unbox(jax.eval_shape(d.init, jax.random.key(0), x))
  assert set(v) == {"params", "spectral"}
  bb, heads = v["params"]["backbone"], v["params"]["heads"]
  expected = {"patch_embed", "cls_token", "pos_embed", "norm"} | {f"blocks_{i}" for i in range(12)}
  assert set(bb) == expected
  assert bb["patch_embed"]["kernel"].shape == (8, 8, 3, 384)
  assert bb["patch_embed"]["bias"].shape == (384,)
  assert bb["cls_token"].shape == (1, 1, 384)
  assert bb["pos_embed"].shape == (1, 785, 384)
  assert set(bb["norm"]) == {"scale", "bias"}
  blk = bb["blocks_0"]
  assert set(blk) == {"norm1", "attn", "norm2", "mlp"}
  assert set(blk["attn"]) == {"query", "key", "value", "proj"}
  assert set(blk["mlp"]) == {"fc1", "fc2"}
  assert blk["mlp"]["fc1"]["kernel"].shape == (384, 1536)
  assert set(heads) == {f"head_{j}" for j in range(5)}
  h = heads["head_0"]
  assert h["conv_in"]["weight"].shape == (1, 384, 384)
  assert h["res_conv"]["weight"].shape == (9, 384, 384)
  assert h["conv_out"]["weight"].shape == (1, 384, 1)
  assert set(h["norm_in"]) == {"scale", "bias"}
  n_head = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(heads))
  assert n_head == 5 * (384 * 385 + 9 * 384 * 384 + 384 + 385 + 4 * 384)  # 7,386,245 ~ 7.4M
  sn = v["spectral"]["heads"]["head_0"]
  assert sn["res_conv"]["u"].shape == (384,) and sn["res_conv"]["v"].shape == (9 * 384,)
  assert sn["conv_out"]["u"].shape == (1,) and sn["conv_out"]["v"].shape == (384,)
  out = jax.eval_shape(d.apply, v, x)
  assert out.shape == (2, 3920) and d.num_logits == 3920
  feats = jax.eval_shape(disc.DinoViTBackbone().apply, {"params": bb}, x)
  assert [f.shape for f in feats] == [(2, 784, 384)] * 5


def test_backbone_feature_order(tiny_disc):
  bb = disc.DinoViTBackbone(**TINY)
  x = _images(1, (2, 40, 40, 3))
  v = {"params": tiny_disc[1]["params"]["backbone"]}  # the tiny discriminator's backbone
  feats, state = jax.jit(lambda v, x: bb.apply(v, x, capture_intermediates=True,
                                               mutable=["intermediates"]))(v, x)
  blocks = [state["intermediates"][f"blocks_{i}"]["__call__"][0] for i in range(3)]
  assert len(feats) == 3 and all(f.shape == (2, 16, 32) for f in feats)
  np.testing.assert_array_equal(feats[0], blocks[2][:, 1:])  # final output first, CLS dropped
  for j, i in enumerate(TINY["key_depths"]):
    np.testing.assert_array_equal(feats[1 + j], blocks[i][:, 1:])
  assert float(jnp.abs(blocks[1] - blocks[0]).max()) > 1e-3  # the skipped block is not a no-op
  # The final norm exists but is never applied: features are not token-normalised.
  assert float(jnp.abs(feats[0].mean(-1)).max()) > 1e-2


def test_default_key_depths_repeat_final_output():
  bb = disc.DinoViTBackbone(dim=32, depth=12, num_heads=2, mlp_hidden=64, image_size=32)
  x = _images(2, (1, 32, 32, 3))
  feats = jax.jit(bb.apply)(_random_variables(bb, x), x)
  assert len(feats) == 5
  np.testing.assert_array_equal(feats[0], feats[4])  # block 11 twice (reference quirk)
  assert float(jnp.abs(feats[0] - feats[3]).max()) > 1e-3


@pytest.mark.torch
@pytest.mark.parametrize("src,dst", [(256, 224), (40, 32), (16, 32), (21, 224), (224, 224),
                                     (297, 224)])
def test_bilinear_resize_matches_torch(src, dst):
  torch = pytest.importorskip("torch")
  x = np.random.RandomState(src).uniform(-1, 1, (2, 3, src, src + 3)).astype(np.float32)
  ref = torch.nn.functional.interpolate(torch.from_numpy(x), size=(dst, dst), mode="bilinear",
                                        align_corners=False).numpy()
  my = disc.torch_bilinear_matrix(src, dst)
  mx = disc.torch_bilinear_matrix(src + 3, dst)
  np.testing.assert_allclose(my.sum(1), 1.0, atol=1e-6)
  # The matrix itself is PyTorch's operator (resizing the identity), to float32 rounding.
  eye = torch.eye(src + 3).reshape(1, 1, src + 3, src + 3)
  m_ref = torch.nn.functional.interpolate(eye, size=(dst, src + 3), mode="bilinear",
                                          align_corners=False)[0, 0].numpy()
  assert np.abs(mx - m_ref).max() <= 1e-7
  out = np.asarray(resize.resize_2d(jnp.asarray(x.transpose(0, 2, 3, 1)), my, mx))
  assert np.abs(out.transpose(0, 3, 1, 2) - ref).max() <= 1e-5


@pytest.mark.torch
def test_backbone_matches_torch_reference_forward():
  """Tiny DINO ViT in PyTorch (the reference's block code), weights copied, same 5 feature maps."""
  torch = pytest.importorskip("torch")
  tnn, F = torch.nn, torch.nn.functional
  dim, heads, depth, patch, size = 32, 2, 4, 8, 32
  torch.manual_seed(0)

  class Block(tnn.Module):
    def __init__(self):
      super().__init__()
      self.norm1, self.norm2 = tnn.LayerNorm(dim, eps=1e-6), tnn.LayerNorm(dim, eps=1e-6)
      self.qkv, self.proj = tnn.Linear(dim, 3 * dim), tnn.Linear(dim, dim)
      self.fc1, self.fc2 = tnn.Linear(dim, 64), tnn.Linear(64, dim)

    def forward(self, x):
      b, n, c = x.shape
      q, k, v = self.qkv(self.norm1(x)).view(b, n, 3, heads, c // heads).permute(2, 0, 3, 1, 4)
      a = ((q * (c // heads) ** -0.5) @ k.transpose(-2, -1)).softmax(-1) @ v
      x = x + self.proj(a.transpose(1, 2).reshape(b, n, c))
      return x + self.fc2(F.gelu(self.fc1(self.norm2(x)), approximate="tanh"))

  conv = tnn.Conv2d(3, dim, patch, patch)
  cls, pos = torch.randn(1, 1, dim) * 0.02, torch.randn(1, 17, dim) * 0.02
  blocks = tnn.ModuleList(Block() for _ in range(depth))
  x = np.random.RandomState(0).uniform(-1, 1, (2, 3, 48, 48)).astype(np.float32)
  mean, std = torch.tensor((0.485, 0.456, 0.406)), torch.tensor((0.229, 0.224, 0.225))
  with torch.no_grad():
    t = F.interpolate(torch.from_numpy(x), size=(size, size), mode="bilinear", align_corners=False)
    t = t * (0.5 / std).view(1, 3, 1, 1) + ((0.5 - mean) / std).view(1, 3, 1, 1)
    t = torch.cat([cls.expand(2, -1, -1), conv(t).flatten(2).transpose(1, 2)], 1) + pos
    acts = []
    for i, blk in enumerate(blocks):
      t = blk(t)
      if i in (1, 3):
        acts.append(t[:, 1:])
    acts.insert(0, t[:, 1:])

  n = lambda a: a.detach().numpy()
  lin = lambda w, b: {"kernel": n(w).T, "bias": n(b)}
  ln = lambda m: {"scale": n(m.weight), "bias": n(m.bias)}
  p = {"patch_embed": {"kernel": n(conv.weight).transpose(2, 3, 1, 0), "bias": n(conv.bias)},
       "cls_token": n(cls), "pos_embed": n(pos),
       "norm": {"scale": np.ones(dim), "bias": np.zeros(dim)}}
  for i, blk in enumerate(blocks):
    qw, kw, vw = blk.qkv.weight.chunk(3)
    qb, kb, vb = blk.qkv.bias.chunk(3)
    p[f"blocks_{i}"] = {"norm1": ln(blk.norm1), "norm2": ln(blk.norm2),
                        "attn": {"query": lin(qw, qb), "key": lin(kw, kb), "value": lin(vw, vb),
                                 "proj": lin(blk.proj.weight, blk.proj.bias)},
                        "mlp": {"fc1": lin(blk.fc1.weight, blk.fc1.bias),
                                "fc2": lin(blk.fc2.weight, blk.fc2.bias)}}
  bb = disc.DinoViTBackbone(dim=dim, depth=depth, num_heads=heads, mlp_hidden=64, patch_size=patch,
                            image_size=size, key_depths=(1, 3))
  feats = jax.jit(bb.apply)({"params": p}, jnp.asarray(x.transpose(0, 2, 3, 1)))
  assert len(feats) == 3
  for f, a in zip(feats, acts):
    assert np.abs(np.asarray(f) - a.numpy()).max() <= 1e-5


def _sn_conv_weight(k, c_in, c_out, singular_values):
  """A (k, in, out) kernel whose PyTorch-layout (out, in*k) matrix has the given singular values."""
  rs = np.random.RandomState(3)
  u, _ = np.linalg.qr(rs.randn(c_out, c_out))
  v, _ = np.linalg.qr(rs.randn(c_in * k, c_out))
  w_mat = (u * np.asarray(singular_values)) @ v.T  # (out, in*k)
  return w_mat.reshape(c_out, c_in, k).transpose(2, 1, 0).astype(np.float32), w_mat


def _sigma(weight, u, v):
  k, c_in, c_out = weight.shape
  w_mat = np.asarray(weight).transpose(2, 1, 0).reshape(c_out, c_in * k)
  return float(np.asarray(u) @ w_mat @ np.asarray(v))


def test_spectral_norm_converges_to_largest_singular_value():
  conv = disc.SpectralNormConv1d(features=6, kernel_size=3)
  x = _images(4, (2, 10, 5))
  v = nn.unbox(jax.jit(conv.init)(jax.random.key(0), x))
  weight, w_mat = _sn_conv_weight(3, 5, 6, [3.0, 1.5, 1.0, 0.7, 0.4, 0.1])
  params = {"weight": jnp.asarray(weight), "bias": v["params"]["bias"]}
  state = v["spectral"]
  step = jax.jit(lambda s: conv.apply({"params": params, "spectral": s}, x, True,
                                      mutable=["spectral"])[1]["spectral"])
  for _ in range(50):
    state = step(state)
  s_max = np.linalg.svd(w_mat, compute_uv=False)[0]
  sigma = _sigma(weight, state["u"], state["v"])
  assert abs(sigma - s_max) / s_max < 1e-3, (sigma, s_max)
  # The eval-mode output is the conv with the kernel divided by that sigma.
  y = jax.jit(conv.apply)({"params": params, "spectral": state}, x)
  xp = np.pad(np.asarray(x), ((0, 0), (1, 1), (0, 0)), mode="wrap")
  ref = sum(np.einsum("bnc,co->bno", xp[:, t:t + 10], weight[t]) for t in range(3)) / sigma
  np.testing.assert_allclose(y, ref + np.asarray(params["bias"]), atol=1e-5)


def test_spectral_norm_eval_mode_keeps_state():
  conv = disc.SpectralNormConv1d(features=4, kernel_size=9)
  x = _images(5, (2, 12, 3))
  v = nn.unbox(jax.jit(conv.init)(jax.random.key(0), x))
  apply = jax.jit(conv.apply, static_argnums=2, static_argnames="mutable")
  y, upd = apply(v, x, False, mutable=("spectral",))
  for name in ("u", "v"):
    np.testing.assert_array_equal(upd["spectral"][name], v["spectral"][name])
  np.testing.assert_array_equal(y, apply(v, x, False))  # no mutable collection needed in eval
  _, upd = apply(v, x, True, mutable=("spectral",))
  assert float(np.abs(upd["spectral"]["v"] - v["spectral"]["v"]).max()) > 1e-3
  with pytest.raises(Exception):  # train mode must be told it may update u, v
    conv.apply(v, x, True)


@pytest.mark.torch
def test_spectral_norm_matches_torch_over_train_calls():
  torch = pytest.importorskip("torch")
  torch.manual_seed(0)
  c_in, c_out, k, n = 8, 6, 9, 20
  ref = torch.nn.utils.spectral_norm(
      torch.nn.Conv1d(c_in, c_out, k, padding=k // 2, padding_mode="circular"),
      n_power_iterations=1, dim=0, eps=1e-12)
  ref.train()
  t = lambda a: a.detach().numpy().copy()
  variables = {"params": {"weight": t(ref.weight_orig).transpose(2, 1, 0), "bias": t(ref.bias)},
               "spectral": {"u": t(ref.weight_u), "v": t(ref.weight_v)}}
  conv = disc.SpectralNormConv1d(features=c_out, kernel_size=k)
  apply = jax.jit(conv.apply, static_argnums=2, static_argnames="mutable")
  rs = np.random.RandomState(0)
  for call in range(3):
    x = rs.randn(2, c_in, n).astype(np.float32)
    y_ref = t(ref(torch.from_numpy(x)))
    y, upd = apply(variables, jnp.asarray(x.transpose(0, 2, 1)), True, mutable=("spectral",))
    variables = {"params": variables["params"], "spectral": upd["spectral"]}
    assert np.abs(np.asarray(y).transpose(0, 2, 1) - y_ref).max() <= 1e-5, call
    np.testing.assert_allclose(upd["spectral"]["u"], t(ref.weight_u), atol=1e-6)
    np.testing.assert_allclose(upd["spectral"]["v"], t(ref.weight_v), atol=1e-6)
  ref.eval()
  x = rs.randn(2, c_in, n).astype(np.float32)
  y_ref = t(ref(torch.from_numpy(x)))
  y = apply(variables, jnp.asarray(x.transpose(0, 2, 1)), False)
  assert np.abs(np.asarray(y).transpose(0, 2, 1) - y_ref).max() <= 1e-5


@pytest.mark.torch
def test_head_matches_torch_reference():
  """One head against the reference's nn.Sequential (SN convs, BatchNormLocal, residual/sqrt2)."""
  torch = pytest.importorskip("torch")
  tnn = torch.nn
  torch.manual_seed(1)
  c, n = 16, 20

  class BNLocal(tnn.Module):
    def __init__(self):
      super().__init__()
      self.weight, self.bias = tnn.Parameter(torch.rand(c) + 0.5), tnn.Parameter(torch.randn(c))

    def forward(self, x):
      m, var = x.mean(2, keepdim=True), x.var(2, keepdim=True, unbiased=False)
      x = (x - m) / torch.sqrt(var + 1e-6)
      return x * self.weight[None, :, None] + self.bias[None, :, None]

  sn = lambda ci, co, k: tnn.utils.spectral_norm(
      tnn.Conv1d(ci, co, k, padding=k // 2, padding_mode="circular"), eps=1e-12)
  block0 = tnn.Sequential(sn(c, c, 1), BNLocal(), tnn.LeakyReLU(0.2))
  block1 = tnn.Sequential(sn(c, c, 9), BNLocal(), tnn.LeakyReLU(0.2))
  out = sn(c, 1, 1)

  def ref(x):
    h = block0(x)
    return out((block1(h) + h) / np.sqrt(2)).view(x.shape[0], -1)

  t = lambda a: a.detach().numpy().copy()
  conv_p = lambda m: {"weight": t(m.weight_orig).transpose(2, 1, 0), "bias": t(m.bias)}
  conv_s = lambda m: {"u": t(m.weight_u), "v": t(m.weight_v)}
  bn_p = lambda m: {"scale": t(m.weight), "bias": t(m.bias)}
  variables = {
      "params": {"conv_in": conv_p(block0[0]), "norm_in": bn_p(block0[1]),
                 "res_conv": conv_p(block1[0]), "res_norm": bn_p(block1[1]),
                 "conv_out": conv_p(out)},
      "spectral": {"conv_in": conv_s(block0[0]), "res_conv": conv_s(block1[0]),
                   "conv_out": conv_s(out)}}
  head = disc.DiscHead()
  apply = jax.jit(head.apply, static_argnums=2, static_argnames="mutable")
  rs = np.random.RandomState(1)
  for call in range(2):
    x = rs.randn(3, c, n).astype(np.float32) * 2
    y_ref = t(ref(torch.from_numpy(x)))  # modules are in train mode
    y, upd = apply(variables, jnp.asarray(x.transpose(0, 2, 1)), True, mutable=("spectral",))
    variables = {"params": variables["params"], "spectral": upd["spectral"]}
    assert y.shape == (3, n)
    assert np.abs(np.asarray(y) - y_ref).max() <= 1e-5, call


def test_batchnorm_local_per_sample_statistics():
  bn = disc.BatchNormLocal()
  apply = jax.jit(bn.apply)
  rs = np.random.RandomState(0)
  x = rs.randn(3, 50, 4) * np.array([0.1, 1.0, 10.0, 3.0]) + np.array([5.0, -2.0, 0.0, 1.0])
  x = (x * np.array([1.0, 4.0, 0.5])[:, None, None]).astype(np.float32)
  v = jax.jit(bn.init)(jax.random.key(0), x)
  y = np.asarray(apply(v, x))
  np.testing.assert_allclose(y.mean(axis=1), 0.0, atol=1e-5)
  # Unit variance up to the eps: var / (var + 1e-6) of the biased variance (0.9996 at std 0.05).
  var = np.asarray(x, np.float64).var(axis=1)
  np.testing.assert_allclose(y.var(axis=1), var / (var + 1e-6), atol=1e-5)
  # Affine: per-channel scale and bias applied after normalisation.
  p = {"params": {"scale": np.array([1.0, 2.0, 3.0, 4.0], np.float32),
                  "bias": np.array([0.0, 1.0, 2.0, 3.0], np.float32)}}
  np.testing.assert_allclose(apply(p, x), y * p["params"]["scale"] + p["params"]["bias"],
                             atol=1e-5)
  # Independent of the other samples in the batch.
  x2 = x.copy()
  x2[1:] = rs.randn(2, 50, 4).astype(np.float32) * 100
  np.testing.assert_array_equal(np.asarray(apply(v, x2))[0], y[0])
  np.testing.assert_allclose(np.asarray(apply(v, x[:1]))[0], y[0], atol=1e-6)


def test_discriminator_logits_and_frozen_backbone_grads(tiny_disc):
  d, v, apply = tiny_disc
  x = _images(6, (2, 48, 48, 3))
  logits = apply(v, x)
  assert logits.shape == (2, 3 * 16) and logits.dtype == jnp.float32

  def loss(params, x):
    return jnp.mean(d.apply({"params": params, "spectral": v["spectral"]}, x) ** 2)

  g_params, g_x = jax.jit(jax.grad(loss, argnums=(0, 1)))(v["params"], x)
  for leaf in jax.tree.leaves(g_params["backbone"]):
    assert float(jnp.abs(leaf).max()) == 0.0
  for j in range(3):
    norms = [float(jnp.abs(l).max()) for l in jax.tree.leaves(g_params["heads"][f"head_{j}"])]
    assert min(norms) > 0.0, (j, norms)
  # The gradient still reaches the image (the generator's GAN term needs it), so it flows
  # through the backbone's activations: its zero weight gradients are the freeze, not a
  # disconnected graph (the slow test below shows an unfrozen backbone's are not zero).
  assert float(jnp.abs(g_x).max()) > 0.0


# Slow: a second full backward; the default test above covers the freeze (zero backbone weight
# gradients while the image gradient, which passes through the backbone, is not zero).
@pytest.mark.slow
def test_unfrozen_backbone_gets_gradients(tiny_disc):
  _, v, _ = tiny_disc
  x = _images(6, (2, 48, 48, 3))
  d_open = disc.Discriminator(**TINY, freeze_backbone=False)
  loss_open = lambda p: jnp.mean(d_open.apply({"params": p, "spectral": v["spectral"]}, x) ** 2)
  g_open = jax.jit(jax.grad(loss_open))(v["params"])
  assert float(jnp.abs(g_open["backbone"]["blocks_0"]["attn"]["query"]["kernel"]).max()) > 0.0


def test_discriminator_train_mode_updates_spectral_state(tiny_disc):
  _, v, apply = tiny_disc
  x = _images(7, (2, 48, 48, 3))  # the logits test's shape: its compiled eval forward is reused
  y_eval = apply(v, x)
  y_train, upd = apply(v, x, train=True, mutable=("spectral",))
  assert set(upd) == {"spectral"}
  diffs = jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()), v["spectral"], upd["spectral"])
  assert max(jax.tree.leaves(diffs)) > 1e-3
  # Train mode normalises by the sigma of the updated u, v, so the logits differ from eval mode.
  assert float(jnp.abs(y_train - y_eval).max()) > 1e-6
  v2 = {"params": v["params"], "spectral": upd["spectral"]}
  np.testing.assert_allclose(apply(v2, x), y_train, atol=1e-6)


def test_load_backbone_converts_lays_out_and_checks(tmp_path):
  """`load_backbone` reads a DINO ViT file for the configured (here tiny) backbone, in the
  scanned layout when asked, and refuses a file of another architecture, naming it."""
  from uae_jax.convert import torch_io
  from uae_jax.errors import LoadError
  rng = np.random.default_rng(0)
  d, h, n = TINY["dim"], TINY["mlp_hidden"], (TINY["image_size"] // 8) ** 2
  sd = {"cls_token": (1, 1, d), "pos_embed": (1, 1 + n, d), "patch_embed.proj.weight": (d, 3, 8, 8),
        "patch_embed.proj.bias": (d,), "norm.weight": (d,), "norm.bias": (d,)}
  for i in range(TINY["depth"]):
    for name, shape in {"attn.qkv": (3 * d, d), "attn.proj": (d, d), "mlp.fc1": (h, d),
                        "mlp.fc2": (d, h), "norm1": None, "norm2": None}.items():
      sd[f"blocks.{i}.{name}.weight"] = shape or (d,)
      sd[f"blocks.{i}.{name}.bias"] = (shape or (d,))[:1]
  sd = {k: rng.normal(size=s).astype(np.float32) for k, s in sd.items()}
  path = str(tmp_path / "dino_tiny.safetensors")
  torch_io.write_safetensors(sd, path)
  params = disc.load_backbone(path, TINY)
  np.testing.assert_array_equal(params["blocks_1"]["attn"]["value"]["kernel"],
                                sd["blocks.1.attn.qkv.weight"][2 * d:].T)
  scanned = disc.load_backbone(path, dict(TINY, scan_blocks=True))
  np.testing.assert_array_equal(scanned["blocks"]["attn"]["value"]["kernel"][1],
                                params["blocks_1"]["attn"]["value"]["kernel"])
  with pytest.raises(LoadError, match=f"architecture mismatch in converting {path}.*dim 32, "
                                      "expected 384"):
    disc.load_backbone(path, {})  # the default ViT-S/8
