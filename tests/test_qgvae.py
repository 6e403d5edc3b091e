"""QG-VAE: quantiser, codebook reset, ordering masks, token maps, files; slow: trainer runs."""
import json
import os
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from configs import qgvae as qg_config  # noqa: E402
from uae_jax.errors import LoadError  # noqa: E402
from uae_jax.losses import vq  # noqa: E402
from uae_jax.models import qgvae as qg  # noqa: E402
from uae_jax.tasks import qgvae as task  # noqa: E402


# ------------------------------------------------------------------------------ references
def loop_reset(m, eps=1e-6):
  """The original's sequential reset rule in plain numpy: [(dead u, busy v), ...] per codebook."""
  m = np.array(m, np.float64)
  pairs = []
  for c in range(m.shape[0]):
    row, out = m[c].copy(), []
    while True:
      u = int(np.argmin(row))
      if row[u] > 0:
        break
      v = int(np.argmax(row))
      if row[v] <= eps:
        break
      out.append((u, v))
      row[u] = row[v] = eps
    pairs.append(out)
  return pairs


def tiny_model(kind="global", f=1):
  """A 16 px model small enough to run on CPU in a second."""
  return qg.QuantisedAE(kind=kind, image_size=16, tokens=16, heads=4, code_dim=8,
                        codebook_size=16, f=f, res_blocks=1, ch_min=8, ch_max=16)


# ------------------------------------------------------------------------------ quantiser
def test_quantize_nearest_per_token_codebook_and_ste():
  """Nearest code in the token's OWN codebook (vs brute force), forward = q, gradient identity."""
  rng = np.random.default_rng(0)
  z = rng.standard_normal((5, 6, 4)).astype(np.float32)
  book = rng.standard_normal((6, 9, 4)).astype(np.float32)
  w = rng.standard_normal(z.shape).astype(np.float32)

  @jax.jit
  def run(z, book):
    out = vq.quantize(z, book)
    g_ste = jax.grad(lambda zz, b: jnp.sum(vq.quantize(zz, b)["q_st"] * w), (0, 1))(z, book)
    g_cb = jax.grad(lambda zz, b: vq.quantize(zz, b)["codebook_loss"], (0, 1))(z, book)
    g_cm = jax.grad(lambda zz, b: vq.quantize(zz, b)["commit_loss"], (0, 1))(z, book)
    return out, g_ste, g_cb, g_cm

  out, (gz, gb), (cb_z, cb_b), (cm_z, cm_b) = jax.device_get(run(z, book))
  d = ((z[:, :, None, :] - book[None]) ** 2).sum(-1)                    # (B, T, K)
  np.testing.assert_array_equal(out["indices"], d.argmin(-1))
  want_q = book[np.arange(6)[None, :], d.argmin(-1)]
  np.testing.assert_allclose(out["q_st"], want_q, atol=1e-6)
  np.testing.assert_array_equal(gz, w)                                   # straight through
  assert np.abs(gb).max() == 0.0                                         # no STE path to E
  assert np.abs(cb_z).max() == 0.0 and np.abs(cb_b).max() > 0           # codebook term -> E
  assert np.abs(cm_b).max() == 0.0 and np.abs(cm_z).max() > 0           # commitment -> encoder
  np.testing.assert_allclose(out["commit_loss"], np.mean((z - want_q) ** 2), rtol=1e-5)
  # Token 2's codebook alone is far away: its index changes, no other token's does.
  far = book.copy()
  far[2] += 100.0
  idx2 = np.asarray(jax.jit(lambda a, b: vq.quantize(a, b)["indices"])(z, far))
  d2 = ((z[:, :, None, :] - far[None]) ** 2).sum(-1)
  np.testing.assert_array_equal(idx2, d2.argmin(-1))


def test_quantize_shared_codebook():
  """The patch baseline's shared (K, D) codebook: brute-force nearest over all K for every token."""
  rng = np.random.default_rng(1)
  z = rng.standard_normal((3, 7, 5)).astype(np.float32)
  book = rng.standard_normal((11, 5)).astype(np.float32)
  d = ((z[:, :, None, :] - book[None, None]) ** 2).sum(-1)
  idx = jax.jit(lambda a, b: vq.quantize(a, b)["indices"])(z, book)
  np.testing.assert_array_equal(np.asarray(idx), d.argmin(-1))


# ------------------------------------------------------------------------------ reset
def test_reset_constructed_accumulator():
  """Known dead and busy codes: exactly the paired dead codes move, each next to a distinct busy one."""
  m = np.array([[0.0, 5.0, 0.0, 1e-7, 3.0, 0.0, 0.0, 2.0],    # 4 dead, 3 busy (1e-7 is neither)
                [1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0],      # nothing dead
                [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0],      # nothing busy
                [0.0, 4.0, 4.0, 0.0, 1e-6, 9.0, 0.0, 0.0]],    # ties; 1e-6 is not splittable
               np.float32)
  book = np.random.default_rng(3).standard_normal((4, 8, 6)).astype(np.float32)
  new, m_new, stats = jax.jit(vq.reset_codebook)(book, m, jax.random.key(4))
  new, book = np.asarray(new), np.asarray(book)
  want = loop_reset(m)
  assert want[0] == [(0, 1), (2, 4), (5, 7)] and want[1] == [] and want[2] == []
  assert want[3] == [(0, 5), (3, 1), (6, 2)]
  for c, pairs in enumerate(want):
    moved = {u for u, _ in pairs}
    assert len({v for _, v in pairs}) == len(pairs)                 # distinct busy codes
    for u, v in pairs:
      diff = new[c, u] - book[c, v]
      assert np.abs(diff).max() <= 1e-4 and np.abs(diff).max() > 0  # next to it, jittered
    for k in set(range(8)) - moved:
      np.testing.assert_array_equal(new[c, k], book[c, k])          # everything else untouched
  assert float(np.abs(np.asarray(m_new)).max()) == 0.0             # accumulation restarts
  np.testing.assert_allclose(float(stats["moved"]), 6 / 4)
  np.testing.assert_allclose(float(stats["dead"]), (4 + 0 + 8 + 4) / 4)


def test_reset_plan_matches_sequential_loop_on_random_statistics():
  """The vectorised plan equals the original loop on random accumulators with many ties."""
  rng = np.random.default_rng(0)
  m = rng.choice([0.0, 0.0, 1e-7, 1e-6, 0.5, 2.0, 3.0], size=(64, 32)).astype(np.float32)
  m += (rng.random(m.shape) < 0.3) * rng.random(m.shape).astype(np.float32)
  moved, source = (np.asarray(a) for a in vq.reset_plan(jnp.asarray(m)))
  for c, pairs in enumerate(loop_reset(m)):
    assert sorted(np.flatnonzero(moved[c]).tolist()) == sorted(u for u, _ in pairs)
    for u, v in pairs:
      assert source[c, u] == v


def test_accumulate_is_mean_abs_over_code_dim():
  """m += mean_D |g|: zero exactly for codes without gradient."""
  g = np.zeros((2, 3, 4), np.float32)
  g[0, 1] = [1, -2, 3, -4]
  m = np.asarray(vq.accumulate(jnp.ones((2, 3)), jnp.asarray(g)))
  np.testing.assert_allclose(m, [[1, 3.5, 1], [1, 1, 1]])


# ------------------------------------------------------------------------------ ordering, usage
def test_tail_dropout_mask_statistics():
  """Prefix masks; about 1/3 of the samples truncated; r uniform over 1..T-1."""
  t = 8
  mask = np.asarray(jax.jit(vq.tail_dropout_mask, static_argnums=(1, 2))(jax.random.key(5), 6000, t))
  kept = mask.sum(1)
  assert set(np.unique(mask)) <= {0.0, 1.0}
  assert (np.diff(mask, axis=1) <= 0).all()                        # ones then zeros
  truncated = kept < t
  assert abs(truncated.mean() - 1 / 3) < 0.03
  assert kept.min() == 1 and set(np.unique(kept[truncated])) == set(range(1, t))


def test_hash_randomness_uniform_and_key_dependent():
  """The step's counter-hash randomness: in range, uniform moments, independent-looking keys."""
  k = jax.random.key(3)
  draw = jax.jit(lambda key: vq.hash_uniform(key, (32, 512, 4), -1e-4, 1e-4))
  u = np.asarray(draw(k), np.float64) / 1e-4
  assert u.min() >= -1 and u.max() < 1 and u.min() < -0.999 and u.max() > 0.999
  assert abs(u.mean()) < 0.01 and abs(u.var() - 1 / 3) < 0.01            # U(-1, 1): 0, 1/3
  assert abs(np.corrcoef(u.reshape(-1)[:-1], u.reshape(-1)[1:])[0, 1]) < 0.01
  k2 = vq.hash_fold_in(k, 1)
  assert jax.random.key_impl(k2) == jax.random.key_impl(k)
  u2 = np.asarray(draw(k2), np.float64) / 1e-4
  assert abs(np.corrcoef(u.reshape(-1), u2.reshape(-1))[0, 1]) < 0.01
  fold = jax.jit(jax.vmap(lambda s: jax.random.key_data(vq.hash_fold_in(k, s))))
  steps = np.asarray(fold(jnp.arange(1000)))
  assert len({tuple(row) for row in steps.tolist()}) == 1000              # distinct step keys


def test_qggan_phases():
  """Plain steps before gan.start_step, then G on even and D on odd steps; no GAN: always plain."""
  c = qg_config.get_config("qggan")
  assert [task.phase_at(c, s) for s in (0, 4999, 5000, 5001, 5002)] == [
      "plain", "plain", "g", "d", "g"]
  c = qg_config.get_config("qggan,nogan")
  assert {task.phase_at(c, s) for s in (0, 5000, 5001)} == {"plain"}


def test_usage_perplexity_against_numpy():
  """Per-token perplexity exp(H) of the batch histogram, averaged over tokens."""
  idx = np.array([[0, 1], [0, 2], [1, 2], [0, 2]])
  u = jax.jit(vq.usage, static_argnums=1)(idx, 4)
  def ppl(col):
    p = np.bincount(col, minlength=4) / len(col)
    p = p[p > 0]
    return np.exp(-(p * np.log(p)).sum())
  np.testing.assert_allclose(float(u["perplexity"]), (ppl(idx[:, 0]) + ppl(idx[:, 1])) / 2,
                             rtol=1e-6)
  assert float(u["codes_used"]) == 2.0


def test_qggan_adaptive_weight_formula():
  """0.75 * ||g_rec|| / ||g_gan + 1e-6|| (eps inside the norm)."""
  a, b = np.array([3.0, 4.0]), np.array([1.0, -1.0])
  want = 0.75 * 5.0 / np.linalg.norm(b + 1e-6)
  np.testing.assert_allclose(float(vq.qggan_adaptive_weight(jnp.asarray(a), jnp.asarray(b))),
                             want, rtol=1e-6)


# ------------------------------------------------------------------------------ model
@pytest.mark.slow
def test_resize_helpers_match_torch():
  """Bilinear x2 / x0.5 and nearest x0.5 equal PyTorch's nn.Upsample (align_corners=False)."""
  torch = pytest.importorskip("torch")
  x = np.random.default_rng(1).standard_normal((2, 8, 8, 3)).astype(np.float32)
  xt = torch.from_numpy(x).permute(0, 3, 1, 2)
  f = torch.nn.functional
  for ours, theirs in ((qg.up2, f.interpolate(xt, scale_factor=2.0, mode="bilinear")),
                       (qg.down2, f.interpolate(xt, scale_factor=0.5, mode="bilinear")),
                       (qg.nearest_down2, f.interpolate(xt, scale_factor=0.5, mode="nearest"))):
    np.testing.assert_allclose(np.asarray(ours(jnp.asarray(x))),
                               theirs.permute(0, 2, 3, 1).numpy(), atol=1e-6)


def test_position_channels_layout():
  """64 channels: [sin r, sin c, cos r, cos c] at frequencies 2^l, l = 0..15, coords i / size."""
  p = qg.position_channels(8)
  assert p.shape == (8, 8, 64)
  np.testing.assert_allclose(p[3, 5, :4], [np.sin(3 / 8), np.sin(5 / 8), np.cos(3 / 8), np.cos(5 / 8)],
                             rtol=1e-6)
  np.testing.assert_allclose(p[3, 5, 60:], [np.sin(2 ** 15 * 3 / 8), np.sin(2 ** 15 * 5 / 8),
                                            np.cos(2 ** 15 * 3 / 8), np.cos(2 ** 15 * 5 / 8)],
                             atol=1e-4)


def _param_count(tree):
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def _abstract_params(config):
  """Unboxed abstract params of a config's model."""
  model = task.build_model(config)
  s = config.input.image_size
  v = jax.eval_shape(lambda k: model.init(k, jnp.zeros((1, s, s, 3))), jax.random.key(0))
  return nn.unbox(v["params"]), nn.unbox(v["vq_stats"])


def test_demo_config_shapes_and_bytes():
  """Demo: 64 tokens x 9 bits = 72 bytes; (64, 512, 64) codebooks; (8, 1024, 64) maps."""
  c = qg_config.get_config("")
  p, stats = _abstract_params(c)
  assert p["codebook"].shape == (64, 512, 64) and p["offset"].shape == (64, 64)
  assert p["encoder"]["kernel"].shape == (8, 1024, 64)
  assert p["decoder"]["kernel"].shape == (8, 64, 1024)
  assert stats["grad_mag"].shape == (64, 512)
  assert qg.bits_per_image(c.model, 32) / 8 == 72
  patch = qg_config.get_config("patch")
  assert qg.bits_per_image(patch.model, 32) == qg.bits_per_image(c.model, 32)


@pytest.mark.slow
def test_qggan_config_parameter_counts():
  """QGGAN setting: ~4.2 M linear-map and ~8.4 M codebook parameters, 288 bytes per image."""
  c = qg_config.get_config("qggan")
  p, _ = _abstract_params(c)
  linear = sum(_param_count(p[k][n]) for k in ("encoder", "decoder") for n in ("kernel", "bias"))
  assert linear == 2 * 128 * (256 * 64 + 64) + 128 * 256 - 128 * 64   # biases: (H, D) and (H, N)
  assert abs(linear - 4.2e6) < 0.05e6
  assert _param_count(p["codebook"]) == 256 * 512 * 64
  assert qg.bits_per_image(c.model, 128) / 8 == 288
  assert qg.bits_per_image(qg_config.get_config("qggan,patch").model, 128) / 8 == 288


@pytest.mark.slow
def test_global_tokens_see_the_whole_image_patch_tokens_do_not():
  """Changing one corner moves every global token's continuous code; patch tokens far from it
  move only through GroupNorm's image-wide statistics (an order of magnitude less)."""
  x = jax.random.uniform(jax.random.key(6), (1, 16, 16, 3))
  x2 = x.at[:, :2, :2, :].set(1.0 - x[:, :2, :2, :])
  for kind, f in (("global", 1), ("patch", 2)):
    model = tiny_model(kind, f)
    v = model.init(jax.random.key(7), x)
    z1, z2 = (np.asarray(model.apply(v, xx, method="encode")) for xx in (x, x2))
    change = np.abs(z1 - z2).max(-1)[0]                               # (T,)
    if kind == "global":
      assert change.min() > 0.1 * change.max()
    else:
      # 4 x 4 grid of 4 px patches: the corner token moves most, the opposite corner barely.
      assert change.argmax() == 0 and change[15] < 0.1 * change[0]


@pytest.mark.slow
def test_index_file_round_trip_and_bad_files(tmp_path):
  """Indices -> .npz -> decode gives identical reconstructions; bad files raise LoadError."""
  c = qg_config.get_config("tiny")
  c.model.update(code_dim=8, codebook_size=16)
  model = task.build_model(c)
  x = jax.random.uniform(jax.random.key(8), (3, 16, 16, 3))
  params = model.init(jax.random.key(9), x)["params"]
  idx = np.asarray(model.apply({"params": params}, x, method="indices"))
  path = str(tmp_path / "codes.npz")
  task.write_indices(path, idx, c, source="test", step=0)
  back, meta = task.read_indices(path)
  assert back.dtype == np.uint16 and np.array_equal(back, idx) and meta["step"] == 0
  assert json.loads(meta["config"])["model"]["codebook_size"] == 16
  recon = model.apply({"params": params}, x, method="reconstruct")
  np.testing.assert_allclose(task.decode_file_indices(c, params, back), np.asarray(recon), atol=1e-5)
  np.testing.assert_array_equal(task.decode_file_indices(c, params, back),
                                task.decode_file_indices(c, params, idx.astype(np.uint16)))
  (tmp_path / "junk.npz").write_bytes(b"not a zip file")
  with pytest.raises(LoadError, match="junk.npz"):
    task.read_indices(str(tmp_path / "junk.npz"))
  with pytest.raises(LoadError, match="do not fit"):
    task.decode_file_indices(c, params, np.full((1, 16), 40, np.uint16))


# ------------------------------------------------------------------------------ trainer (slow)
def _tiny_config(arg="tiny", **model):
  c = qg_config.get_config(arg)
  c.model.update(**model)
  c.ckpt.async_save = False
  return c


def _steps(tr, state, it, n):
  """n train steps; returns (state, list of host metrics)."""
  out = []
  for _ in range(n):
    state, m = tr.train_step(state, tr.global_batch(it), tr.frozen)
    out.append(jax.device_get(m))
  return state, out


@pytest.mark.slow
def test_tiny_run_dead_codes_fall_after_resets(tmp_path):
  """Reset every 10 steps: clearly fewer dead codes (of 32) at the sixth reset than at the first."""
  from uae_jax import train
  from uae_jax.data import pipeline
  c = _tiny_config(steps=60)
  tr = train.Trainer(c, str(tmp_path))
  it = pipeline.make_train_iterator(c.input)
  state, _ = tr.initial_state(it)
  state, ms = _steps(tr, state, it, 60)
  first, sixth = ms[9]["vq/dead_at_reset"], ms[59]["vq/dead_at_reset"]
  assert ms[9]["vq/moved_at_reset"] > 0
  assert sixth < first - 2, (first, sixth)
  assert ms[59]["vq/perplexity"] > ms[0]["vq/perplexity"]
  assert float(jax.device_get(state["vq_stats"]["grad_mag"]).max()) == 0.0   # restarted
  tr.close()


@pytest.mark.slow
def test_resume_across_a_reset_is_bit_exact(tmp_path):
  """6 steps + checkpoint + restore + 6 steps (reset after step 10) == 12 straight steps."""
  from uae_jax import train
  from uae_jax.data import pipeline
  c = _tiny_config(steps=12)
  tr = train.Trainer(c, str(tmp_path / "a"))
  it = pipeline.make_train_iterator(c.input)
  state, _ = tr.initial_state(it)
  straight, _ = _steps(tr, state, it, 12)
  straight = jax.device_get(straight)
  tr.close()
  tr = train.Trainer(c, str(tmp_path / "b"))
  it = pipeline.make_train_iterator(c.input)
  state, _ = tr.initial_state(it)
  state, _ = _steps(tr, state, it, 6)
  tr.ckpt.save(6, state, it, {"config": c.to_json_best_effort()})
  tr.ckpt.wait()
  tr.close()
  tr = train.Trainer(c, str(tmp_path / "b"))
  it = pipeline.make_train_iterator(c.input)
  state, start = tr.initial_state(it)
  assert start == 6
  resumed, _ = _steps(tr, state, it, 6)
  resumed = jax.device_get(resumed)
  for a, b in zip(jax.tree.leaves(straight), jax.tree.leaves(resumed)):
    np.testing.assert_array_equal(a, b)
  tr.close()


@pytest.mark.slow
def test_one_device_equals_eight_devices(tmp_path):
  """Three steps on 1 device and on 8 fake devices (codebooks sharded by token) agree."""
  from uae_jax import train
  from uae_jax.data import pipeline
  c = _tiny_config(steps=3)
  c.vq.reset_every = 2                         # a reset inside the three steps
  outs, logs = [], []
  for n in (1, 8):
    tr = train.Trainer(c, str(tmp_path / str(n)), devices=jax.devices()[:n])
    it = pipeline.make_train_iterator(c.input)
    state, _ = tr.initial_state(it)
    state, ms = _steps(tr, state, it, 3)
    outs.append(jax.device_get(state))
    logs.append(ms)
    tr.close()
  for m1, m8 in zip(*logs):                    # losses, usage and reset counts of every step
    for k in ("loss", "mse", "codebook", "commit", "vq/perplexity", "vq/dead_at_reset",
              "vq/moved_at_reset"):
      np.testing.assert_allclose(m1[k], m8[k], rtol=1e-4, atol=1e-6, err_msg=k)
  # The sharded state (codebooks, offsets, per-head maps, reset statistic) must agree closely.
  # The replicated U-Net leaves get a looser bound: AdamW moves a parameter by about lr = 1e-3
  # per step whatever its gradient's size, and some gradients are zero up to float noise (a conv
  # bias right before a GroupNorm with one channel per group), so the 8-device sums' different
  # float order can flip such an update's sign (seen: 1.8e-4 after 3 steps). Bound: one update.
  flat0 = jax.tree_util.tree_flatten_with_path(outs[0])[0]
  for (path, a), b in zip(flat0, jax.tree.leaves(outs[1])):
    name = jax.tree_util.keystr(path)
    sharded = "unet" not in name and "residual" not in name
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 if sharded else c.optim.lr,
                               err_msg=name)


@pytest.mark.slow
def test_qggan_alternates_generator_and_discriminator(tmp_path):
  """GAN on from step 1: odd steps move only D, even steps move only G with lambda > 0."""
  from uae_jax import train
  from uae_jax.data import pipeline
  c = _tiny_config("tiny,qggan", steps=3)
  c.gan.start_step = 1
  tr = train.Trainer(c, str(tmp_path))
  it = pipeline.make_train_iterator(c.input)
  state, _ = tr.initial_state(it)
  before = jax.device_get(state)
  state, ms = _steps(tr, state, it, 2)
  after = jax.device_get(state)
  assert ms[0]["d_step"] == 0 and ms[0]["gan_lambda"] == 0 and ms[0]["mse"] > 0
  assert ms[1]["d_step"] == 1 and ms[1]["gan_d"] > 0
  state, ms3 = _steps(tr, state, it, 1)
  assert ms3[0]["d_step"] == 0 and ms3[0]["gan_lambda"] > 0 and ms3[0]["lpips"] > 0
  changed = lambda a, b: any(not np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a),
                                                                       jax.tree.leaves(b)))
  assert changed(before["disc"], after["disc"])
  tr.close()


def test_gan_variant_starts_halfway():
  """`gan,total=N`: QGGAN losses on at the demo size, GAN from N / 2 (or `gan_start`). (That a
  log line shows both the G and the D step's metrics is the trainer's job: tests/test_train.py.)"""
  c = qg_config.get_config("gan,total=100")
  assert c.gan.enabled and c.gan.start_step == 50 and c.input.image_size == 32
  assert qg_config.get_config("gan,total=100,gan_start=7").gan.start_step == 7
  assert not qg_config.get_config("total=100").gan.enabled
  assert not qg_config.get_config("qggan,nogan").gan.enabled
