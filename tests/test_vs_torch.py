"""bench/vs_torch.py compares like with like: our encoder + decoder forward equals the PyTorch
network it times (transformers' Dinov2WithRegistersModel + ViTMAE decoder layers) given the same
weights, and one L1 + AdamW step moves both decoders to the same weights."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from bench import vs_torch  # noqa: E402

ATOL = 1e-4


def _perturbed_params(model, seed):
  """Random params with every leaf (LayerNorms, CLS, LayerScale too) moved off its init value."""
  params = vs_torch.jax_params(model, 256, seed)
  leaves, tree = jax.tree.flatten(params)
  rng = np.random.default_rng(seed)
  leaves = [(x + 0.05 * rng.standard_normal(x.shape)).astype(np.float32) for x in leaves]
  return jax.tree.unflatten(tree, leaves)


@pytest.fixture(scope="module")
def tiny_pair():
  """(our model, its params, the PyTorch network loaded with them) at the tiny sizes."""
  model = vs_torch.jax_model("tiny", "tiny")
  params = _perturbed_params(model, 3)
  return model, params, vs_torch.torch_from_params(params, "tiny", "tiny", attn="sdpa")


@pytest.mark.torch
def test_forward_matches_pytorch(tiny_pair, photo_batch):
  model, params, tmodel = tiny_pair
  x = np.asarray(photo_batch[:2], np.float32)
  run = lambda method: jax.jit(lambda p, a: model.apply({"params": p}, a, method=method))
  with jax.default_matmul_precision("highest"):
    z = np.array(run("encode")(params, x))
    img = np.asarray(run("decode")(params, z))
  with torch.no_grad():
    z_ref = tmodel.encode(torch.from_numpy(x)).numpy()
    img_ref = tmodel.decoder(torch.from_numpy(z)).numpy()
  assert z.shape == z_ref.shape == (2, 16, 16, 64) and img.shape == img_ref.shape == x.shape
  err_z, err_img = np.abs(z - z_ref).max(), np.abs(img - img_ref).max()
  print(f"latent max abs err {err_z:.2e}, image {err_img:.2e}")
  assert err_z <= ATOL and err_img <= ATOL
  # Not trivially equal: the latent and the image carry signal of order 1.
  assert np.abs(z).mean() > 0.1 and np.abs(img - img.mean()).mean() > 0.1


def _leaf(tree, path):
  """tree[path[0]][path[1]]...['kernel'] as numpy."""
  for k in path:
    tree = tree[k]
  return np.asarray(tree["kernel"])


@pytest.mark.torch
def test_loss_grads_and_step_match_pytorch(tiny_pair, photo_batch):
  """Same L1 loss and decoder gradients; one AdamW step moves both decoders alike."""
  model, params, _ = tiny_pair
  tmodel = vs_torch.torch_from_params(params, "tiny", "tiny", attn="eager")
  x = np.asarray(photo_batch[:2], np.float32)
  dec = jax.tree.map(jnp.asarray, params["decoder"])
  with jax.default_matmul_precision("highest"):
    loss, grads = jax.jit(jax.value_and_grad(lambda d, e, a: vs_torch.jax_loss(model, d, e, a)))(
        dec, params["encoder"], x)
  # The bench step's optimiser update, jitted alone (compiling the step again costs seconds).
  tx = vs_torch.jax_optimizer()
  new_dec = jax.jit(lambda g, d: optax.apply_updates(d, tx.update(g, tx.init(d), d)[0]))(grads, dec)
  layer = tmodel.decoder.decoder_layers[1]
  pairs = {("embed",): tmodel.decoder.decoder_embed.weight,
           ("blocks_1", "mlp", "fc2"): layer.mlp.fc2.weight,
           ("blocks_1", "attn", "query"): layer.attention.q_proj.weight}
  before = {k: w.detach().numpy().T.copy() for k, w in pairs.items()}
  # The PyTorch gradients, read before the step (which recomputes them and applies AdamW).
  xt = torch.from_numpy(x)
  with torch.no_grad():
    z = tmodel.encode(xt)
  (tmodel.decoder(z) - xt).abs().mean().backward()
  grad_ref = {k: w.grad.numpy().T.copy() for k, w in pairs.items()}
  tmodel.decoder.zero_grad(set_to_none=True)
  loss_ref = float(vs_torch.torch_step_fn(tmodel)(xt))
  assert abs(float(loss) - loss_ref) <= 1e-5 * max(1.0, loss_ref)
  for path, w in pairs.items():
    g, g_ref = _leaf(grads, path), grad_ref[path]
    scale = np.abs(g_ref).max()
    assert scale > 0
    np.testing.assert_allclose(g, g_ref, atol=1e-4 * scale, rtol=0, err_msg=str(path))
    # Where the gradient is well above float noise, Adam's first update (about -lr * sign(g))
    # is the same on both sides.
    big = np.abs(g_ref) > 1e-2 * scale
    moved, moved_ref = _leaf(new_dec, path) - before[path], w.detach().numpy().T - before[path]
    assert big.mean() > 0.1 and np.abs(moved_ref[big]).min() > 0.5 * vs_torch.LR
    np.testing.assert_allclose(moved[big], moved_ref[big], atol=1e-6, rtol=0, err_msg=str(path))


def test_attention_implementations_agree(monkeypatch):
  """Every CPU-available attention implementation equals a float64 numpy softmax attention."""
  from uae_jax.models import layers
  monkeypatch.setattr(layers, "GROUP_MIN_WORK", 1)  # so these tiny heads split into groups
  rng = np.random.default_rng(0)
  q, k, v = (rng.standard_normal((2, 9, 32)).astype(np.float32) for _ in range(3))
  split = lambda t: t.astype(np.float64).reshape(2, 9, 4, 8).transpose(0, 2, 1, 3)
  logits = split(q) @ split(k).transpose(0, 1, 3, 2) / np.sqrt(8)
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  ref = (probs @ split(v)).transpose(0, 2, 1, 3).reshape(2, 9, 32)
  for impl in (None, "xla", "einsum", "grouped"):  # 'grouped': 4 heads in 2 groups of 2
    with jax.default_matmul_precision("highest"):
      out = np.asarray(layers.multi_head_attention(q, k, v, 4, impl))
    np.testing.assert_allclose(out, ref, atol=1e-5, rtol=0, err_msg=str(impl))
  # The CPU default's rearranged arithmetic differentiates to the plain form's gradients.
  g = rng.standard_normal(q.shape).astype(np.float32)
  grad = lambda impl: jax.grad(
      lambda *a: jnp.sum(layers.multi_head_attention(*a, 4, impl) * g), argnums=(0, 1, 2))(q, k, v)
  for a, b in zip(grad("grouped"), grad("einsum")):
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)
  with pytest.raises(ValueError, match="attention="):
    layers.multi_head_attention(q, k, v, 4, "splash")


def test_exact_gelu_is_pytorchs_gelu():
  """layers.gelu_exact (the erf form, faster on XLA:CPU than jax.nn.gelu's erfc form) equals
  PyTorch's exact GELU in float64 and float32, and its gradient equals jax.nn.gelu's."""
  import torch
  from uae_jax.models import layers
  x = np.linspace(-12, 12, 20001, dtype=np.float32)
  ref = torch.nn.functional.gelu(torch.from_numpy(x).double()).numpy()
  out = np.asarray(jax.jit(layers.gelu_exact)(x))
  np.testing.assert_allclose(out, ref, atol=1e-6, rtol=1e-6)
  np.testing.assert_allclose(out, torch.nn.functional.gelu(torch.from_numpy(x)).numpy(),
                             atol=2e-6, rtol=0)
  grad = lambda f: np.asarray(jax.jit(jax.grad(lambda a: jnp.sum(f(a))))(x))
  np.testing.assert_allclose(grad(layers.gelu_exact), grad(lambda a: jax.nn.gelu(a, False)),
                             atol=2e-6, rtol=0)
  assert layers.activation_fn("gelu") is layers.gelu_exact
  assert layers.activation_fn(None) is layers.gelu_exact


def test_profile_step_categories_and_busy_time():
  """bench.profile_step: HLO instruction metadata is read from real compiled text, op paths map
  to the right categories, and overlapping thunk intervals count once."""
  from bench import profile_step as ps
  from uae_jax.models import layers
  x = jnp.ones((2, 5, 8), jnp.float32)
  fn = jax.jit(lambda x: layers.gelu_exact(jnp.einsum("bnd,bmd->bnm", x, x)).sum())
  meta = ps.hlo_metadata(fn.lower(x).compile().as_text())
  assert any("erf" in path for _, path in meta.values())
  assert any(kind == "dot" or "dot_general" in path for kind, path in meta.values())
  cases = {
      "jit(step)/transpose(jvp(OfficialUAE.decode))/decoder/blocks_3/mlp/fc1/dot_general": "matmul",
      "jit(step)/jvp(OfficialUAE.encode)/encoder/blocks_0/attn/bqhd,bkhd->bhqk/dot_general":
          "attention",
      "jit(step)/jvp(OfficialUAE.encode)/encoder/blocks_0/attn/query/dot_general": "matmul",
      "jit(step)/jvp(OfficialUAE.decode)/decoder/blocks_2/mlp/erf": "gelu",
      "jit(step)/jvp(OfficialUAE.decode)/decoder/blocks_2/norm1/mul": "layernorm",
      "jit(step)/add": "optimizer",
      "jit(step)/jvp(OfficialUAE.encode)/encoder/encoder.preprocess/div": "resize",
      "jit(step)/jvp(OfficialUAE.decode)/decoder/blocks_1/add": "other",
  }
  for path, want in cases.items():
    assert ps.jax_category("ynn_fusion.1" if want == "matmul" else "fusion.1", "kLoop",
                           path) == want, path
  assert ps.torch_category("aten::addmm") == "matmul"
  assert ps.torch_category("aten::_scaled_dot_product_flash_attention_for_cpu") == "attention"
  assert ps.torch_category("aten::native_layer_norm_backward") == "layernorm"
  assert ps.busy_time([(0.0, 1.0), (0.5, 2.0), (3.0, 4.0)]) == pytest.approx(3.0)
