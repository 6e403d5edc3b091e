"""The UAE composition: init identities, train/eval behaviour, and full-size compilation."""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from uae_jax.models import uae as uae_lib

TINY_ENC = dict(size="tiny", num_registers=4, input_size=224, pos_embed_grid=16)
TINY_DEC = dict(size="tiny")


def _tiny(recipe="paper", **kw):
  """A tiny UAE of the recipe, its unboxed variables (jitted init) and two 256 px images.

  Init is compiled once per recipe (cached): the variables do not depend on the forward-pass
  knobs (noise_tau, k_base, dct_*), only on the recipe's parameter tree.
  """
  model = uae_lib.RECIPES[recipe](encoder=TINY_ENC, decoder=TINY_DEC, **kw)
  return (model, *_tiny_variables(recipe))


@functools.cache
def _tiny_variables(recipe):
  """Unboxed variables of the tiny UAE of a recipe and the input images.

  One jitted init of the paper recipe; the official recipe's tree is the paper one without the
  modulator (checked against its own abstract init), which saves a second init compile.
  """
  model = uae_lib.RECIPES[recipe](encoder=TINY_ENC, decoder=TINY_DEC)
  x = jax.random.uniform(jax.random.key(0), (2, 256, 256, 3))
  init = lambda k1, k2: nn.unbox(model.init({"params": k1, "noise": k2}, x, train=False))
  if recipe == "paper":
    return jax.jit(init)(jax.random.key(1), jax.random.key(2)), x
  paper, _ = _tiny_variables("paper")
  v = {"params": {k: p for k, p in paper["params"].items() if k != "modulator"}}
  want = jax.eval_shape(init, jax.random.key(1), jax.random.key(2))
  assert jax.tree.map(lambda a: (a.shape, a.dtype), v) == jax.tree.map(
      lambda a: (a.shape, a.dtype), want)
  return v, x


@pytest.mark.heavy
def test_paper_forward_at_init_decodes_the_plain_latent():
  model, v, x = _tiny()

  @jax.jit
  def run(v, x):
    """The eval forward and the decoder applied to its latent directly."""
    out = model.apply(v, x, train=False)
    return out, model.apply(v, out["latent"], method="decode")

  out, direct = run(v, x)
  assert out["bands"].shape == (4, 2, 16, 16, 64)
  assert out["recon"].shape == (2, 256, 256, 3)
  # Zero-initialised modulator: the fused latent equals the encoder latent, so the reconstruction
  # equals decoding z directly.
  np.testing.assert_allclose(out["recon"], direct, atol=1e-5)
  assert set(v["params"]) == {"encoder", "decoder", "modulator"}


def test_paper_noise_only_in_train_mode_and_not_on_band0():
  model, v, x = _tiny(noise_tau=0.8)
  # With every band semantic (k_base = K) training adds no noise anywhere.
  model_all, _, _ = _tiny(noise_tau=0.8, k_base=4)

  @jax.jit
  def run(v, x, key):
    """Train and eval forwards of the model, and the train forward with k_base = K."""
    rngs = {"noise": key}
    return (model.apply(v, x, train=True, rngs=rngs), model.apply(v, x, train=False),
            model_all.apply(v, x, train=True, rngs=rngs))

  a, b, c = run(v, x, jax.random.key(5))
  assert np.abs(a["recon"] - b["recon"]).max() > 1e-4
  np.testing.assert_array_equal(b["noised_bands"], b["bands"])  # eval mode: no noise at all
  # Train mode: the semantic band 0 is bit-identical, every higher band is perturbed.
  np.testing.assert_array_equal(a["noised_bands"][0], a["bands"][0])
  for k in range(1, 4):
    assert np.abs(a["noised_bands"][k] - a["bands"][k]).max() > 1e-3, k
  np.testing.assert_array_equal(c["recon"], b["recon"])


def test_official_recipe_masks_in_eval_only_when_asked():
  model, v, x = _tiny("official", dct_enabled=True, dct_count=36, noise_tau=0.8, clean_pass=True)
  assert set(v["params"]) == {"encoder", "decoder"}

  @jax.jit
  def run(v, x, key):
    """Eval reconstruction without and with the band mask, and a train forward."""
    return (model.apply(v, x, method="reconstruct"), model.apply(v, x, True, method="reconstruct"),
            model.apply(v, x, train=True, rngs={"noise": key}))

  plain, masked, out = run(v, x, jax.random.key(3))
  assert np.abs(plain - masked).max() > 1e-4
  np.testing.assert_allclose(out["recon_clean"], plain, atol=1e-5)


@pytest.mark.heavy
def test_tiny_gradient_step_under_jit():
  model, v, x = _tiny(noise_tau=0.8)
  opt = optax.adamw(1e-3)
  state = opt.init(v["params"])

  @jax.jit
  def step(params, state, key):
    def loss_fn(p):
      out = model.apply({"params": p}, x, train=True, rngs={"noise": key})
      return jnp.mean(jnp.abs(out["recon"] - x))
    loss, g = jax.value_and_grad(loss_fn)(params)
    upd, state = opt.update(g, state, params)
    return optax.apply_updates(params, upd), state, loss

  p1, state, l0 = step(v["params"], state, jax.random.key(0))
  _, _, l1 = step(p1, state, jax.random.key(0))
  assert np.isfinite(l0) and l1 < l0


def _full_size(recipe):
  """UAE with DINOv2-B (registers) and the ViT-XL decoder, its abstract params and input."""
  extra = dict(dct_enabled=True, clean_pass=True) if recipe == "official" else {}
  model = uae_lib.RECIPES[recipe](encoder=dict(size="B"), decoder=dict(size="XL"), noise_tau=0.8,
                                  **extra)
  x = jax.ShapeDtypeStruct((2, 256, 256, 3), jnp.float32)
  init = functools.partial(model.init, train=False)
  v = nn.unbox(jax.eval_shape(init, {"params": jax.random.key(1), "noise": jax.random.key(2)}, x))
  return model, v, x


def test_full_size_uae_b_xl_parameter_count():
  """The full-size paper UAE's parameter tree by abstract init (the grad trace is slow-only:
  test_full_size_uae_b_xl_forward_and_grad_trace)."""
  _, v, _ = _full_size("paper")
  n = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(v))
  assert 500e6 < n < 540e6  # 86.6M encoder + 415.1M decoder + 10.6M modulator
  assert set(v["params"]) == {"encoder", "decoder", "modulator"}


# Slow: the default suite pins the full-size tree (test_full_size_uae_b_xl_parameter_count) and
# traces the forward and gradient of both recipes at tiny size (the tests above).
@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["paper", "official"])
def test_full_size_uae_b_xl_forward_and_grad_trace(recipe):
  """UAE with DINOv2-B (registers) and the ViT-XL decoder: abstract evaluation (a trace, not a
  compile) of a grad step; `bench/scale.py` compiles the full-size steps."""
  model, v, x = _full_size(recipe)
  n = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(v))
  assert 500e6 < n < 540e6  # 86.6M encoder + 415.1M decoder (+ 10.6M modulator, paper)

  def loss_fn(p, images, key):
    out = model.apply({"params": p}, images, train=True, rngs={"noise": key})
    return jnp.mean(jnp.abs(out["recon"] - images))

  g = jax.eval_shape(jax.jit(jax.grad(loss_fn)), v["params"], x, jax.random.key(0))
  assert jax.tree.structure(g) == jax.tree.structure(v["params"])


def test_every_parameter_has_logical_axis_names():
  model = uae_lib.PaperUAE(encoder=TINY_ENC, decoder=TINY_DEC)
  x = jax.ShapeDtypeStruct((1, 256, 256, 3), jnp.float32)
  init = functools.partial(model.init, train=False)
  boxed = jax.eval_shape(init, {"params": jax.random.key(1), "noise": jax.random.key(2)}, x)
  leaves = jax.tree_util.tree_leaves_with_path(
      boxed["params"], is_leaf=lambda l: isinstance(l, nn.LogicallyPartitioned))
  unnamed = [jax.tree_util.keystr(k) for k, l in leaves if not isinstance(l, nn.LogicallyPartitioned)]
  assert not unnamed
  assert all(len(l.names) == len(l.value.shape) for _, l in leaves)
