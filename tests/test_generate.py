"""Transport, samplers, guidance, latent statistics, the DiT task and the sampling CLI."""
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from uae_jax.generate import latents
from uae_jax.generate import samplers
from uae_jax.generate import sampling
from uae_jax.generate import transport


# ------------------------------------------------------------------------------ transport
def test_time_shift_and_grid_reference_numbers():
  alpha = transport.shift_alpha(16 * 16 * 768)
  assert abs(alpha - 6.928) < 5e-4
  grid = samplers.time_grid(50, alpha)
  assert grid.shape == (50,) and grid[0] == 1.0
  assert abs(grid[-1] - 0.0069) < 5e-5      # not 0: the last state is taken as the sample
  np.testing.assert_allclose(grid[-2:], [0.1317, 0.00689], atol=5e-4)
  assert np.all(np.diff(grid) < 0)


def test_training_times():
  # Jitted: eager sampling compiled one program per op.
  sample_t = jax.jit(transport.sample_t, static_argnums=(1, 2, 3))
  t = np.asarray(sample_t(jax.random.key(0), 20000, "logit_normal"))
  assert t.min() >= 0 and t.max() <= transport.T1
  assert abs(np.median(t) - 0.5) < 0.02   # sigmoid(N(0, 1)) is symmetric about 1/2
  logit = np.log(t / (1 - t))
  assert abs(logit.std() - 1.0) < 0.03
  shifted = np.asarray(sample_t(jax.random.key(0), 20000, "logit_normal", 6.928))
  np.testing.assert_allclose(shifted, 6.928 * t / (1 + 5.928 * t), rtol=1e-5)
  u = np.asarray(sample_t(jax.random.key(1), 20000, "uniform"))
  assert u.max() < transport.T1 and abs(u.mean() - transport.T1 / 2) < 0.01


def test_loss_is_velocity_mse_and_x_prediction_converts():
  x1 = jax.random.normal(jax.random.key(0), (4, 2, 2, 3))
  # An oracle that knows the noise predicts the exact velocity: zero loss.
  k_t, k_n = jax.random.split(jax.random.key(5))
  x0 = jax.random.normal(k_n, x1.shape)
  oracle = lambda x_t, t: x0 - x1
  loss, per, _ = transport.flow_matching_loss(oracle, x1, jax.random.key(5), "uniform", 1.0,
                                              "velocity")
  assert float(loss) < 1e-10 and per.shape == (4,)
  x_oracle = lambda x_t, t: x1
  loss_x, _, _ = transport.flow_matching_loss(x_oracle, x1, jax.random.key(5), "uniform", 1.0, "x")
  assert float(loss_x) < 1e-6
  del k_t


# ------------------------------------------------------------------------------ samplers
MEANS = np.array([[1.5, 0.0], [-1.0, 1.2], [0.0, -1.5]])
STD, WEIGHTS = 0.5, np.array([0.5, 0.3, 0.2])


def gmm_velocity(t, x):
  """Exact velocity E[eps - x1 | x_t] of the linear path for the 2-D Gaussian mixture."""
  var = (1 - t) ** 2 * STD**2 + t**2
  mu = (1 - t) * jnp.asarray(MEANS, x.dtype)                            # (K, 2)
  d = x[:, None, :] - mu[None]                                         # (B, K, 2)
  logp = jnp.log(jnp.asarray(WEIGHTS, x.dtype)) - jnp.sum(d * d, -1) / (2 * var) - jnp.log(var)
  r = jax.nn.softmax(logp, -1)[..., None]
  e_eps = t / var * d
  e_x1 = jnp.asarray(MEANS, x.dtype)[None] + (1 - t) * STD**2 / var * d
  return jnp.sum(r * (e_eps - e_x1), 1)


def _padded_grid(n, length=2049):
  """time_grid(n + 1) padded to `length` points by repeating its last time.

  The padding steps have dt = 0 and leave the state exactly as it is, so every step count runs
  through one compiled program per method (the loop's trip count is the grid's length).
  """
  g = samplers.time_grid(n + 1)
  return jnp.asarray(np.concatenate([g, np.full(length - len(g), g[-1])]))


def test_ode_samplers_converge_at_their_order():
  with jax.enable_x64(True):
    x = jax.random.normal(jax.random.key(0), (64, 2), jnp.float64)
    solve = jax.jit(lambda x, g, m: samplers.integrate_ode(gmm_velocity, x, g, m),
                    static_argnums=2)
    ref = solve(x, jnp.asarray(samplers.time_grid(2049)), "rk4")
    # The padding is exact: the unpadded 16-step Euler solve gives the same bits.
    np.testing.assert_array_equal(solve(x, _padded_grid(16, 17), "euler"),
                                  solve(x, _padded_grid(16), "euler"))
    orders = {}
    for method in samplers.ODE_METHODS:
      steps = np.array([16, 32, 64, 128])
      errs = [float(jnp.max(jnp.abs(solve(x, _padded_grid(n), method) - ref))) for n in steps]
      orders[method] = -np.polyfit(np.log(steps), np.log(errs), 1)[0]
  assert 0.8 < orders["euler"] < 1.3, orders
  assert 1.7 < orders["heun"] < 2.4, orders
  assert 3.4 < orders["rk4"] < 4.7, orders


def test_sde_and_ode_reach_the_mixture():
  x = jax.random.normal(jax.random.key(1), (4000, 2))
  grid = jnp.asarray(samplers.time_grid(200), jnp.float32)
  ode = jax.jit(lambda x: samplers.integrate_ode(gmm_velocity, x, grid, "heun"))(x)
  sde = jax.jit(lambda x: samplers.integrate_sde(gmm_velocity, x, grid, jax.random.key(2)))(x)
  mean = WEIGHTS @ MEANS
  cov = STD**2 * np.eye(2) + sum(w * np.outer(m - mean, m - mean) for w, m in zip(WEIGHTS, MEANS))
  for out in (ode, sde):
    out = np.asarray(out, np.float64)
    np.testing.assert_allclose(out.mean(0), mean, atol=0.06)
    np.testing.assert_allclose(np.cov(out.T), cov, atol=0.12)
    # Each sample lands near a component (mixture modes, not the blurred mean).
    d = np.min(np.linalg.norm(out[:, None] - MEANS[None], axis=-1), 1)
    assert np.mean(d < 3 * STD) > 0.97


# ------------------------------------------------------------------------------ guidance
def test_cfg_interval_and_scale_one_are_exact():
  cond = lambda x, t: jnp.sin(x) * t[:, None]
  uncond = lambda x, t: jnp.cos(x) + 0.3
  x = jax.random.normal(jax.random.key(0), (5, 3))
  g = samplers.Guidance("cfg", 2.5, 0.2, 0.7)
  f = jax.jit(samplers.guided_velocity(cond, uncond, g))
  for t in (0.1, 0.9):   # outside: the conditional output, bit for bit
    np.testing.assert_array_equal(f(jnp.float32(t), x), cond(x, jnp.full((5,), t, jnp.float32)))
  t = jnp.float32(0.5)
  tv = jnp.full((5,), t)
  np.testing.assert_allclose(f(t, x), uncond(x, tv) + 2.5 * (cond(x, tv) - uncond(x, tv)),
                             rtol=1e-6)
  one = samplers.guided_velocity(cond, uncond, samplers.Guidance("cfg", 1.0))
  np.testing.assert_array_equal(one(t, x), cond(x, tv))


def test_cfg_scale_one_sampler_equals_unguided_with_dit():
  from uae_jax.models import dit
  import flax.linen as nn
  model = dit.build(dict(kind="lightning", size="tiny", in_channels=4, input_size=2,
                         num_classes=3))
  x = jax.random.normal(jax.random.key(0), (2, 2, 2, 4))
  y = jnp.asarray([0, 2])
  # Jitted (an eager init compiles one program per op), with an 'unsafe_rbg' key: its random
  # draws compile in about half the time of threefry ones; any key gives a valid init.
  key = jax.random.key(1, impl="unsafe_rbg")
  params = nn.unbox(jax.jit(model.init)(key, x, jnp.zeros(2), y))["params"]
  # + 0.1: the zero-initialised layers must matter.
  params = jax.tree.map(lambda p: np.asarray(p) + np.float32(0.1), params)
  outs = {}
  for mode, scale in (("none", 1.0), ("cfg", 1.0)):
    spec = sampling.SamplerSpec("euler", 4, 1.0, samplers.Guidance(mode, scale))
    fn = sampling.make_latent_sampler(model, "velocity", spec, 3)
    outs[(mode, scale)] = np.asarray(jax.jit(fn)(params, None, x, y, jax.random.key(0)))
  np.testing.assert_array_equal(outs[("none", 1.0)], outs[("cfg", 1.0)])
  assert np.abs(outs[("none", 1.0)] - np.asarray(x)).max() > 1e-3  # the sampler moved


def test_labels_equal_and_uint8_truncation():
  lab = sampling.labels_for(100, 10, "equal", 42)
  assert np.all(np.bincount(lab) == 10) and not np.all(lab[:10] == np.arange(10))
  np.testing.assert_array_equal(sampling.to_uint8(jnp.asarray([-0.1, 0.0, 0.5, 0.999, 1.2])),
                                [0, 0, 127, 254, 255])


# ------------------------------------------------------------------------------ statistics
def test_combined_moments_equal_numpy_float64():
  rng = np.random.default_rng(0)
  z = rng.normal(3.0, 0.01, (37, 2, 2, 3)).astype(np.float32) + rng.normal(0, 1, (1, 2, 2, 3))
  acc = None
  for chunk in np.split(z, [5, 6, 20, 37]):   # uneven chunks, one empty
    if len(chunk) == 0:
      acc = latents.combine_moments(acc, 0, np.zeros(z.shape[1:]), np.zeros(z.shape[1:]))
      continue
    m = chunk.astype(np.float64).mean(0)
    acc = latents.combine_moments(acc, len(chunk), m, ((chunk - m) ** 2).sum(0))
  np.testing.assert_allclose(acc["mean"], z.astype(np.float64).mean(0), rtol=1e-12)
  np.testing.assert_allclose(acc["m2"] / acc["n"], z.astype(np.float64).var(0), rtol=1e-9)


def test_stats_file_round_trip_and_bad_files(tmp_path):
  from uae_jax.errors import LoadError
  path = str(tmp_path / "s.npz")
  stats = {"mean": np.ones((2, 2, 3), np.float32), "var": np.full((2, 2, 3), 4.0, np.float32),
           "count": np.int64(10)}
  latents.save_stats(path, stats, {"split": "train"})
  s = latents.load_stats(path, (2, 2, 3))
  np.testing.assert_allclose(s["std"], math.sqrt(4.0 + 1e-5), rtol=1e-6)
  z = np.random.default_rng(0).normal(size=(3, 2, 2, 3)).astype(np.float32)
  np.testing.assert_allclose(latents.denormalise(latents.normalise(z, s), s), z, atol=1e-6)
  with pytest.raises(LoadError, match="shape"):
    latents.load_stats(path, (4, 4, 3))
  (tmp_path / "bad.npz").write_bytes(b"garbage")
  with pytest.raises(LoadError, match="bad.npz"):
    latents.load_stats(str(tmp_path / "bad.npz"), (2, 2, 3))


# ------------------------------------------------------------------------------ task and CLI
def _toy_config(steps=3, batch=8):
  """The tiny DiT config on a random tokenizer (no UAE run needed)."""
  from configs import dit as dit_cfg
  c = dit_cfg.get_config(f"tiny,steps={steps}")
  c.tokenizer.allow_random = True
  c.input.global_batch_size = batch
  c.input.eval_global_batch_size = batch
  c.ckpt.async_save = False
  return c


def test_config_errors_name_the_key():
  from uae_jax.errors import ConfigError
  from uae_jax.tasks import dit as dit_task
  c = _toy_config()
  c.model.in_channels = 32
  with pytest.raises(ConfigError, match="model.in_channels"):
    dit_task.validate(c)
  c = _toy_config()
  c.sample.method = "dopri5"
  with pytest.raises(ConfigError, match="dopri5"):
    dit_task.validate(c)
  c = _toy_config()
  c.tokenizer.allow_random = False
  with pytest.raises(ConfigError, match="tokenizer.workdir"):
    dit_task.validate(c)


def _steps(config, workdir, n, devices=None):
  """n trainer steps; (trainer, initial host state, final state, metrics)."""
  from uae_jax import train
  from uae_jax.data import pipeline
  tr = train.Trainer(config, str(workdir), devices=devices)
  it = pipeline.make_train_iterator(config.input)
  state, _ = tr.initial_state(it)
  init = jax.device_get(state)
  ms = []
  for _ in range(n):
    state, m = tr.train_step(state, tr.global_batch(it), tr.frozen)
    ms.append(jax.device_get(m))
  return tr, init, state, ms


@pytest.mark.slow
def test_train_steps_one_vs_eight_devices_and_frozen_buffer(tmp_path):
  c = _toy_config()
  _, init, s8, m8 = _steps(c, tmp_path / "a", 3)
  _, _, s1, m1 = _steps(c, tmp_path / "b", 3, devices=jax.devices()[:1])
  np.testing.assert_allclose(m1[-1]["loss"], m8[-1]["loss"], rtol=1e-4)
  s8 = jax.device_get(s8)
  freqs = lambda s, k: s[k]["t_embedder"]["freqs"]
  np.testing.assert_array_equal(freqs(s8, "params"), freqs(init, "params"))
  np.testing.assert_array_equal(freqs(s8, "ema"), freqs(init, "params"))
  assert not np.array_equal(s8["params"]["x_embedder"]["kernel"],
                            init["params"]["x_embedder"]["kernel"])
  assert all(np.isfinite(m["loss"]) for m in m8)


@pytest.mark.slow
def test_sample_cli_resumes_to_the_same_npz(tmp_path):
  from uae_jax.generate import cli
  c = _toy_config(steps=1)
  tr, _, state, _ = _steps(c, tmp_path / "run", 1)
  tr.ckpt.save(1, state, None, {"config": c.to_json_best_effort(), "total_steps": 1})
  tr.close()
  base = ["sample", "--workdir", str(tmp_path / "run"), "--num", "20", "--batch", "8",
          "--steps", "4", "--cfg-scale", "2.0", "--cfg-interval", "0.1,1.0"]
  run = lambda out, *extra: cli.sample(cli.parser().parse_args(base + ["--out", out, *extra]))
  run(str(tmp_path / "full.npz"))
  first = run(str(tmp_path / "resumed.npz"), "--max-chunks", "1")
  assert first["new_samples"] == 8 and not os.path.exists(tmp_path / "resumed.npz")
  second = run(str(tmp_path / "resumed.npz"))
  assert second["resumed_chunks"] == 1 and second["new_samples"] == 12
  with np.load(tmp_path / "full.npz") as a, np.load(tmp_path / "resumed.npz") as b:
    assert a["arr_0"].dtype == np.uint8 and a["arr_0"].shape == (20, 64, 64, 3)
    np.testing.assert_array_equal(a["arr_0"], b["arr_0"])
    np.testing.assert_array_equal(a["arr_1"], b["arr_1"])
    assert np.bincount(a["arr_1"]).tolist() == [2] * 10
  assert os.path.exists(tmp_path / "full_grid.png")
