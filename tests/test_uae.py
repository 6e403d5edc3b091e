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
  model = uae_lib.UAE(encoder=TINY_ENC, decoder=TINY_DEC, recipe=recipe, **kw)
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
  direct = model.apply(v, out["latent"], method=uae_lib.UAE.decode)
  np.testing.assert_allclose(out["recon"], direct, atol=1e-5)
  assert set(v["params"]) == {"encoder", "decoder", "modulator"}


def test_paper_noise_only_in_train_mode_and_not_on_band0():
  model, v, x = _tiny()
  rngs = {"noise": jax.random.key(5)}
  a = model.apply(v, x, train=True, noise_tau=0.8, rngs=rngs)
  b = model.apply(v, x, train=False, noise_tau=0.8)
  assert np.abs(a["recon"] - b["recon"]).max() > 1e-4
  np.testing.assert_array_equal(a["bands"], b["bands"])  # returned bands are the clean ones


def test_official_recipe_masks_in_eval_only_when_asked():
  model, v, x = _tiny("official", dct_enabled=True, dct_count=36)
  assert set(v["params"]) == {"encoder", "decoder"}
  plain = model.apply(v, x, method=uae_lib.UAE.reconstruct)
  masked = model.apply(v, x, True, method=uae_lib.UAE.reconstruct)
  assert np.abs(plain - masked).max() > 1e-4
  out = model.apply(v, x, train=True, noise_tau=0.8, clean_pass=True, rngs={"noise": jax.random.key(3)})
  np.testing.assert_allclose(out["recon_clean"], plain, atol=1e-5)


def test_tiny_gradient_step_under_jit():
  model, v, x = _tiny()
  opt = optax.adamw(1e-3)
  state = opt.init(v["params"])

  @jax.jit
  def step(params, state, key):
    def loss_fn(p):
      out = model.apply({"params": p}, x, train=True, noise_tau=0.8, rngs={"noise": key})
      return jnp.mean(jnp.abs(out["recon"] - x))
    loss, g = jax.value_and_grad(loss_fn)(params)
    upd, state = opt.update(g, state, params)
    return optax.apply_updates(params, upd), state, loss

  p1, state, l0 = step(v["params"], state, jax.random.key(0))
  _, _, l1 = step(p1, state, jax.random.key(0))
  assert np.isfinite(l0) and l1 < l0


@pytest.mark.parametrize("recipe", ["paper", "official"])
def test_full_size_uae_b_xl_forward_and_grad_compile(recipe):
  """UAE with DINOv2-B (registers) and the ViT-XL decoder: abstract evaluation of a grad step."""
  model = uae_lib.UAE(encoder=dict(size="B"), decoder=dict(size="XL"), recipe=recipe,
                      dct_enabled=recipe == "official")
  x = jax.ShapeDtypeStruct((2, 256, 256, 3), jnp.float32)
  init = functools.partial(model.init, train=False)
  v = nn.unbox(jax.eval_shape(init, {"params": jax.random.key(1), "noise": jax.random.key(2)}, x))
  n = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(v))
  assert 500e6 < n < 540e6  # 86.6M encoder + 415.1M decoder (+ 10.6M modulator, paper)

  def loss_fn(p, images, key):
    out = model.apply({"params": p}, images, train=True, noise_tau=0.8, clean_pass=True,
                      rngs={"noise": key})
    return jnp.mean(jnp.abs(out["recon"] - images))

  g = jax.eval_shape(jax.jit(jax.grad(loss_fn)), v["params"], x, jax.random.key(0))
  assert jax.tree.structure(g) == jax.tree.structure(v["params"])


def test_every_parameter_has_logical_axis_names():
  model = uae_lib.UAE(encoder=TINY_ENC, decoder=TINY_DEC)
  x = jax.ShapeDtypeStruct((1, 256, 256, 3), jnp.float32)
  init = functools.partial(model.init, train=False)
  boxed = jax.eval_shape(init, {"params": jax.random.key(1), "noise": jax.random.key(2)}, x)
  leaves = jax.tree_util.tree_leaves_with_path(
      boxed["params"], is_leaf=lambda l: isinstance(l, nn.LogicallyPartitioned))
  unnamed = [jax.tree_util.keystr(k) for k, l in leaves if not isinstance(l, nn.LogicallyPartitioned)]
  assert not unnamed
  assert all(len(l.names) == len(l.value.shape) for _, l in leaves)
