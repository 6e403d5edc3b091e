"""DoG-REPA in the DiT trainer: off = the plain step, the term against numpy, the DoG target,
where the gradient goes, and that a few steps lower it."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import dit as dit_cfg
from uae_jax.errors import ConfigError
from uae_jax.generate import sampling
from uae_jax.generate import transport
from uae_jax.losses import spectrum
from uae_jax.models import dit as dit_lib
from uae_jax.models import scan_utils
from uae_jax.tasks import dit as dit_task

B = 2


def _config(weight=0.5, **repa):
  """The tiny DiT (8 x 8 x 64 latents, 2 body blocks) on a random tiny UAE, REPA at block 1."""
  c = dit_cfg.get_config(f"tiny,repa={weight}")
  c.tokenizer.allow_random = True
  c.repa.update(repa)
  return c


@pytest.fixture(scope="module")
def setup():
  """(config, model, perturbed params with projector, x1, labels, target, rng)."""
  c = _config()
  # Random values on the abstract train-state tree (no init compile): norm scales around 1, every
  # other leaf around 0. Every leaf is perturbed: the zero-initialised adaLN gates would otherwise
  # make the blocks the identity and leave their attention/MLP weights without gradient.
  shapes = jax.eval_shape(lambda k: nn.unbox(dit_task.init_state(c, k)["params"]),
                          jax.random.key(0))
  rs = np.random.default_rng(0)
  params = jax.tree_util.tree_map_with_path(
      lambda path, a: (float(path[-1].key == "scale")
                       + 0.05 * rs.standard_normal(a.shape)).astype(a.dtype), shapes)
  m = c.model
  x1 = jnp.asarray(rs.standard_normal((B, m.input_size, m.input_size, m.in_channels)), jnp.float32)
  target = jnp.asarray(rs.standard_normal((B, m.input_size**2, m.in_channels)), jnp.float32)
  labels = jnp.asarray([3, 7], jnp.int32)
  return c, dit_task.build_model(c), params, x1, labels, target, jax.random.key(5)


def _old_loss_fn(config, model, params, x1, labels, rng, train=True):
  """The DiT task's loss_fn before REPA existed (verbatim), the reference for 'off'."""
  k_t, k_drop = jax.random.split(rng)
  apply = lambda x_t, t: model.apply({"params": params}, x_t, t, labels, train=train,
                                     rngs={"label_dropout": k_drop})
  loss, per, t = transport.flow_matching_loss(
      apply, x1, k_t, config.transport.time_dist, sampling.time_shift_alpha(config),
      config.transport.prediction)
  return loss, (per, t)


def test_repa_off_is_the_plain_step(setup):
  c_on, model, params, x1, labels, target, rng = setup
  off = _config(weight=0.0)
  shapes = lambda c: jax.eval_shape(lambda k: nn.unbox(dit_task.init_state(c, k)),
                                    jax.random.key(0))
  s_off, s_on = shapes(off), shapes(c_on)
  assert dit_task.REPA_KEY not in s_off["params"] and dit_task.REPA_KEY in s_on["params"]
  boxed = jax.eval_shape(lambda k: dit_task.init_state(c_on, k), jax.random.key(0))["params"]
  proj = jax.tree.leaves(boxed[dit_task.REPA_KEY], is_leaf=lambda a: isinstance(a, nn.Partitioned))
  assert len(proj) == 6 and all(isinstance(a, nn.Partitioned) for a in proj)  # logical axes
  # The DiT's own params are the same tree with REPA on (the projector is an extra entry).
  assert jax.tree.structure(s_off["params"]) == \
      jax.tree.structure(dit_task.dit_params(s_on["params"]))
  params = dit_task.dit_params(params)
  new = lambda p: dit_task.loss_fn(off, model, p, x1, labels, rng, target=target)[0]
  old = lambda p: _old_loss_fn(off, model, p, x1, labels, rng)[0]
  # The same program (so the same loss and, differentiated, the same gradients, bit for bit).
  assert str(jax.make_jaxpr(new)(params)) == str(jax.make_jaxpr(old)(params))
  out = jax.eval_shape(lambda p: dit_task.loss_fn(off, model, p, x1, labels, rng, target=target),
                       params)
  assert out[1][2] == {}


def _np_mlp(p, h):
  """REPA projector in numpy float64: Linear -> SiLU -> Linear -> SiLU -> Linear."""
  silu = lambda u: u / (1 + np.exp(-u))
  lin = lambda q, u: u @ np.float64(q["kernel"]) + np.float64(q["bias"])
  return lin(p["fc3"], silu(lin(p["fc2"], silu(lin(p["fc1"], np.float64(h))))))


def test_repa_term_matches_numpy(setup):
  c, model, params, x1, labels, target, rng = setup
  dit = dit_task.dit_params(params)

  @jax.jit
  def run(params, dit):
    """The loss with REPA, the old loss, and the block-1 hidden state two independent ways."""
    on = dit_task.loss_fn(c, model, params, x1, labels, rng, train=False, target=target)
    fm_off, _ = _old_loss_fn(c, model, dit, x1, labels, rng, train=False)
    # x_t as flow_matching_loss draws it (same key splits); then the hidden state through
    # Flax's intermediate capture of body block 1 (`blocks_0`) and through return_hidden=1.
    k_tt, k_noise = jax.random.split(jax.random.split(rng)[0])
    t = transport.sample_t(k_tt, B, c.transport.time_dist, sampling.time_shift_alpha(c))
    x_t = transport.interpolate(x1, jax.random.normal(k_noise, x1.shape), t)
    v, inter = model.apply({"params": dit}, x_t, t, labels, capture_intermediates=True,
                           mutable=["intermediates"])
    v2, hidden2 = model.apply({"params": dit}, x_t, t, labels, return_hidden=1)
    return on, fm_off, v, inter["intermediates"]["blocks_0"]["__call__"][0], v2, hidden2

  (total, (_, _, extra)), fm_off, v, hidden, v2, hidden2 = jax.device_get(run(params, dit))
  np.testing.assert_allclose(extra["fm_loss"], fm_off, rtol=1e-6)
  np.testing.assert_allclose(total, fm_off + 0.5 * extra["repa_loss"], rtol=1e-6)
  np.testing.assert_allclose(v2, v, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(hidden2, hidden, rtol=1e-6, atol=1e-6)
  proj = _np_mlp(params[dit_task.REPA_KEY], hidden)
  tgt = np.float64(target)
  cos = np.sum(proj * tgt, -1) / (np.linalg.norm(proj, axis=-1) * np.linalg.norm(tgt, axis=-1))
  np.testing.assert_allclose(float(extra["repa_loss"]), 1.0 - cos.mean(), rtol=1e-5)


def test_scanned_body_hidden_state_equals_unrolled(setup):
  c, model, params, x1, labels, _, _ = setup
  scanned = dit_lib.build({**dict(c.model), "scan_blocks": True})
  dit = dit_task.dit_params(params)
  stacked = scan_utils.stack_blocks(scan_utils.stack_blocks(dit), "head_blocks")
  t = jnp.asarray([0.3, 0.8])
  # Block 1 of 2: the scan's carried copy, not its final output.
  both = jax.jit(lambda p, q: (scanned.apply({"params": p}, x1, t, labels, return_hidden=1)[1],
                               model.apply({"params": q}, x1, t, labels, return_hidden=1)[1]))
  h_scan, h_loop = both(stacked, dit)
  np.testing.assert_allclose(np.asarray(h_scan), np.asarray(h_loop), rtol=1e-5, atol=1e-5)


def test_dog_equal_sigmas_zero_the_target(setup):
  c, _, params, _, _, target, _ = setup
  g = c.model.input_size
  grid = target.reshape(B, g, g, -1)
  np.testing.assert_array_equal(np.asarray(spectrum.dog_filter(grid, 1.0, 1.0)), 0.0)
  hidden = jnp.ones((B, g * g, dit_lib.SIZES["tiny"].dim))
  c.repa.dog_sigmas = (1.0, 1.0)
  try:  # a zero target: cosine 0 (guarded denominator), loss exactly 1, no gradient
    term = lambda p: dit_task.repa_term(c, p, hidden, target)
    val, grads = jax.jit(jax.value_and_grad(term))(params[dit_task.REPA_KEY])
  finally:
    c.repa.dog_sigmas = None
  assert float(val) == 1.0
  assert all(float(jnp.abs(g_).max()) == 0.0 for g_ in jax.tree.leaves(grads))


def _norms(tree):
  """{'a/b/c': max |leaf|} of a param tree."""
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {"/".join(str(getattr(k, "key", k)) for k in path): float(jnp.abs(v).max())
          for path, v in flat}


class _ToyTokenizer(nn.Module):
  """A trainable stand-in tokenizer (Dense encoder) to check the frozen side gets no gradient."""

  def setup(self):
    self.enc = nn.Dense(64)

  def encode(self, images):
    """(B, 64, 64, 3) -> (B, 8, 8, 64)."""
    b = images.shape[0]
    return self.enc(images.reshape(b, 8, 8, -1)[..., :16])

  def tokenize(self, images):
    """The latent: the features themselves."""
    return self.encode(images)

  def __call__(self, images):
    return self.encode(images)


def test_gradient_reaches_body_up_to_depth_and_projector_only(setup):
  c, model, params, _, labels, _, rng = setup
  tok = _ToyTokenizer()
  images = jnp.asarray(np.random.default_rng(1).uniform(size=(B, 64, 64, 3)), jnp.float32)
  tok_params = tok.init(jax.random.key(0), images)["params"]
  stats = {"mean": jnp.zeros((8, 8, 64)), "std": jnp.ones((8, 8, 64))}

  def repa(p, tp):
    """The REPA term of the DiT params `p` and the tokenizer params `tp` (latent and target)."""
    x1, target = dit_task.encode_with_target(c, tok, {"tokenizer": tp, "stats": stats}, images,
                                             rng, target=True)
    return dit_task.loss_fn(c, model, p, x1, labels, rng, target=target)[1][2]["repa_loss"]

  val, (g_dit, g_tok) = jax.jit(jax.value_and_grad(repa, argnums=(0, 1)))(params, tok_params)
  assert 0 < float(val) < 2
  norms = _norms(g_dit)
  first = [k for k in norms if k.startswith(("blocks_0/", "s_embedder/"))]
  assert first and all(norms[k] > 0 for k in first), {k: norms[k] for k in first}
  proj = [k for k in norms if k.startswith(dit_task.REPA_KEY)]
  assert len(proj) == 6 and all(norms[k] > 0 for k in proj)
  later = [k for k in norms if k.startswith(("blocks_1/", "head_blocks", "final_layer",
                                             "x_embedder", "s_projector"))]
  assert later and all(norms[k] == 0 for k in later), {k: norms[k] for k in later if norms[k]}
  assert all(v == 0 for v in _norms(g_tok).values())  # the frozen encoder gets nothing


def test_target_pooled_to_the_token_grid():
  c = _config(weight=0.5)
  c.model.patch_size = 2
  feats = np.random.default_rng(2).standard_normal((1, 8, 8, 3)).astype(np.float32)
  out = np.asarray(dit_task.tokens_on_grid(jnp.asarray(feats), c))
  want = feats.reshape(1, 4, 2, 4, 2, 3).mean((2, 4)).reshape(1, 16, 3)
  np.testing.assert_allclose(out, want, rtol=1e-6, atol=1e-7)


def test_config_errors_name_the_repa_key():
  for key, value, match in (("depth", 3, "repa.depth"), ("target", "pixels", "repa.target"),
                            ("dog_sigmas", (2.0, 1.0), "repa.dog_sigmas"),
                            ("weight", -1.0, "repa.weight")):
    c = _config()
    c.repa[key] = value
    with pytest.raises(ConfigError, match=match):
      dit_task.validate(c)
  dit_task.validate(_config(dog_sigmas=dit_cfg.DOG_SIGMAS))
  off = _config(weight=0.0, depth=99)  # off: the other repa keys are not looked at
  dit_task.validate(off)


@pytest.mark.slow
def test_few_steps_lower_the_repa_loss(setup):
  c, model, params, x1, labels, target, rng = setup
  c = _config(dog_sigmas=dit_cfg.DOG_SIGMAS)
  tx = optax.adam(3e-3)

  @jax.jit
  def step(p, opt, i):
    """One Adam step on the full (flow matching + REPA) loss; returns the REPA term before it."""
    (_, (_, _, extra)), g = jax.value_and_grad(
        lambda q: dit_task.loss_fn(c, model, q, x1, labels, jax.random.fold_in(rng, i),
                                   target=target), has_aux=True)(p)
    upd, opt = tx.update(g, opt, p)
    return optax.apply_updates(p, upd), opt, extra["repa_loss"]

  opt, hist = tx.init(params), []
  for i in range(15):
    params, opt, r = step(params, opt, i)
    hist.append(float(r))
  assert hist[-1] < 0.9 * hist[0], hist


@pytest.mark.slow
def test_trainer_steps_with_dog_repa(tmp_path):
  from uae_jax import train
  from uae_jax.data import pipeline
  c = _config(weight=1.0, dog_sigmas=dit_cfg.DOG_SIGMAS)
  c.input.global_batch_size = 8
  c.ckpt.async_save = False
  c.optim.peak_lr = 3e-3
  tr = train.Trainer(c, str(tmp_path), devices=jax.devices())
  it = pipeline.make_train_iterator(c.input)
  state, _ = tr.initial_state(it)
  ms = []
  for _ in range(12):
    state, m = tr.train_step(state, tr.global_batch(it), tr.frozen)
    ms.append(jax.device_get(m))
  r = [float(m["repa_loss"]) for m in ms]
  assert np.mean(r[-3:]) < np.mean(r[:3]), r
  for m in ms:
    np.testing.assert_allclose(m["loss"], m["fm_loss"] + m["repa_loss"], rtol=1e-5)
  assert dit_task.REPA_KEY in jax.device_get(state["ema"])
  tr.close()
