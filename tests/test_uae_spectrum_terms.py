"""ESM and DSM as options of the UAE stages (`loss.esm`, `loss.dsm` in configs/common.py).

References: the ESM value recomputed from the tokenizer's own `tokenize` latent, the DSM mask
with scipy block DCTs, the reconstruction loss written out from the plain forward.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import stage1
from tests.numpy_references import np_block_lowpass, random_uae_params
from uae_jax.errors import ConfigError
from uae_jax.losses import spectrum
from uae_jax.tasks import uae as task


@pytest.fixture(scope="module")
def setup():
  """Tiny paper-recipe UAE (8 x 8 x 64 latent), params, two 64 px images (LPIPS off), the plain
  loss and the `tokenize` latent."""
  config = stage1.get_config("tiny,steps=4")
  config.loss.lpips = 0.0
  model = task.build_model(config)
  x = jnp.asarray(np.random.default_rng(0).random((2, 64, 64, 3)), jnp.float32)
  params = random_uae_params(config, 0)

  @jax.jit
  def plain(p, x):
    """(generator_losses total, plain-forward L1 written out, tokenize latent)."""
    total, _, parts = task.generator_losses(config, model, p, p["encoder"], x, None, KEY)
    recon = model.apply({"params": p}, x, train=True, rngs={"noise": KEY})["recon"]
    return total, parts, jnp.mean(jnp.abs(recon - x)), model.apply({"params": p}, x,
                                                                    method="tokenize")

  return config, model, params, x, plain(params, x)


KEY = jax.random.key(1)


def losses_fn(config, model):
  """jit(params, x) -> (total, parts) of `generator_losses` for this config."""
  return jax.jit(lambda p, x: task.generator_losses(config, model, p, p["encoder"], x, None,
                                                    KEY)[::2])


def test_defaults_off_and_unchanged(setup):
  config, model, params, x, (total, parts, l1, _) = setup
  assert config.loss.esm == 0.0 and config.loss.dsm is False
  assert "esm" not in parts and "dsm_k" not in parts
  # The plain forward's L1, written out: nothing else enters the stage-1 loss.
  np.testing.assert_allclose(float(total), float(l1), rtol=1e-6)
  # A config saved before these keys existed traces to the very same computation.
  old = config.copy_and_resolve_references()
  with old.unlocked():
    for key in ("esm", "esm_delta", "esm_loss_type", "esm_center", "esm_blur_skip_height", "dsm",
                "dsm_choices"):
      del old.loss[key]
  trace = lambda c: str(jax.make_jaxpr(lambda p, x: task.generator_losses(
      c, model, p, p["encoder"], x, None, KEY)[0])(params, x))
  assert trace(old) == trace(config)


def test_esm_term_in_metrics_and_gradient_reaches_encoder(setup):
  config, model, params, x, (base, _, _, z) = setup
  c = config.copy_and_resolve_references()
  c.loss.esm = 0.5
  task.validate(c)

  def esm_of(p):
    """The ESM term as a function of all params (the forward's clean bands recomputed)."""
    bands = model.apply({"params": p}, model.apply({"params": p}, x, method="encode"),
                        method="split")
    return task.esm_term(c, model, p, {"bands": bands}, x)

  total, parts, g = jax.jit(lambda p: (*losses_fn(c, model)(p, x), jax.grad(esm_of)(p)))(params)
  ref = float(spectrum.esm_loss(2.0 * x - 1.0, z, 1.0))
  np.testing.assert_allclose(float(parts["esm"]), ref, rtol=1e-5)
  assert ref > 1e-3
  np.testing.assert_allclose(float(total), float(base) + 0.5 * ref, rtol=1e-5)
  norm = lambda t: float(sum(jnp.sum(jnp.square(a)) for a in jax.tree.leaves(t)))
  assert norm(g["encoder"]) > 0 and norm(g["modulator"]) > 0
  assert norm(g["decoder"]) == 0.0  # the latent's spectrum does not depend on the decoder


def test_dsm_masks_decoder_latent_and_target(setup):
  config, model, params, x, (_, _, _, z) = setup
  c = config.copy_and_resolve_references()
  c.loss.update(dsm=True, dsm_choices=(10,))
  task.validate(c)
  z_bar = jnp.asarray(np_block_lowpass(np.asarray(z, np.float64), 10), jnp.float32)
  (total, parts), dec = jax.jit(lambda p: (
      losses_fn(c, model)(p, x), model.apply({"params": p}, z_bar, method="decode")))(params)
  assert float(parts["dsm_k"]) == 10.0
  x_bar = np_block_lowpass(np.asarray(x, np.float64), 10)
  np.testing.assert_allclose(float(total), float(np.mean(np.abs(np.asarray(dec) - x_bar))),
                             rtol=1e-4)


def test_validation_names_the_key():
  config = stage1.get_config("tiny,steps=4")
  for update, match in ((dict(esm=-1.0), "loss.esm"), (dict(esm=0.1, esm_loss_type="l1"),
                                                       "loss.esm_loss_type"),
                        (dict(dsm=True, dsm_choices=(16,)), "loss.dsm_choices")):
    c = config.copy_and_resolve_references()
    c.loss.update(update)
    with pytest.raises(ConfigError, match=match):
      task.validate(c)
  c = config.copy_and_resolve_references()
  c.recipe, c.loss.dsm = "official", True
  with pytest.raises(ConfigError, match="loss.dsm needs recipe='paper'"):
    task.validate(c)
