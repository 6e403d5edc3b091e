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
  model = uae_lib.RECIPES[recipe](encoder=TINY_ENC, decoder=TINY_DEC, **kw)
  x = jax.random.uniform(jax.random.key(0), (2, 256, 256, 3))
  variables = nn.unbox(model.init({"params": jax.random.key(1), "noise": jax.random.key(2)}, x,
                                  train=False))
  return model, variables, x


def test_paper_forward_at_init_decodes_the_plain_latent():
  model, v, x = _tiny()
  out = model.apply(v, x, train=False)
  assert out["bands"].shape == (4, 2, 16, 16, 64)
  assert out["recon"].shape == (2, 256, 256, 3)
  # Zero-initialised modulator: the fused latent equals the encoder latent, so the reconstruction
  # equals decoding z directly.
  direct = model.apply(v, out["latent"], method="decode")
  np.testing.assert_allclose(out["recon"], direct, atol=1e-5)
  assert set(v["params"]) == {"encoder", "decoder", "modulator"}


def test_paper_noise_only_in_train_mode_and_not_on_band0():
  model, v, x = _tiny(noise_tau=0.8)
  rngs = {"noise": jax.random.key(5)}
  a = model.apply(v, x, train=True, rngs=rngs)
  b = model.apply(v, x, train=False)
  assert np.abs(a["recon"] - b["recon"]).max() > 1e-4
  np.testing.assert_array_equal(b["noised_bands"], b["bands"])  # eval mode: no noise at all
  # Train mode: the semantic band 0 is bit-identical, every higher band is perturbed.
  np.testing.assert_array_equal(a["noised_bands"][0], a["bands"][0])
  for k in range(1, 4):
    assert np.abs(a["noised_bands"][k] - a["bands"][k]).max() > 1e-3, k
  # With every band semantic (k_base = K) training adds no noise anywhere.
  model_all, _, _ = _tiny(noise_tau=0.8, k_base=4)
  c = model_all.apply(v, x, train=True, rngs=rngs)
  np.testing.assert_array_equal(c["recon"], b["recon"])


def test_official_recipe_masks_in_eval_only_when_asked():
  model, v, x = _tiny("official", dct_enabled=True, dct_count=36, noise_tau=0.8, clean_pass=True)
  assert set(v["params"]) == {"encoder", "decoder"}
  plain = model.apply(v, x, method="reconstruct")
  masked = model.apply(v, x, True, method="reconstruct")
  assert np.abs(plain - masked).max() > 1e-4
  out = model.apply(v, x, train=True, rngs={"noise": jax.random.key(3)})
  np.testing.assert_allclose(out["recon_clean"], plain, atol=1e-5)


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


@pytest.mark.parametrize("recipe", ["paper", "official"])
def test_full_size_uae_b_xl_forward_and_grad_trace(recipe):
  """UAE with DINOv2-B (registers) and the ViT-XL decoder: abstract evaluation (a trace, not a
  compile) of a grad step; `bench/scale.py` compiles the full-size steps."""
  extra = dict(dct_enabled=True, clean_pass=True) if recipe == "official" else {}
  model = uae_lib.RECIPES[recipe](encoder=dict(size="B"), decoder=dict(size="XL"), noise_tau=0.8,
                                  **extra)
  x = jax.ShapeDtypeStruct((2, 256, 256, 3), jnp.float32)
  init = functools.partial(model.init, train=False)
  v = nn.unbox(jax.eval_shape(init, {"params": jax.random.key(1), "noise": jax.random.key(2)}, x))
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
