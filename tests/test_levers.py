"""Scale levers: remat policies and nn.scan leave the numbers alone; bf16 keeps fp32 master weights."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import stage1
from configs import stage2
from uae_jax import train
from uae_jax.data import pipeline
from uae_jax.models import decoder as decoder_lib
from uae_jax.models import dinov2
from uae_jax.models import discriminator as disc_lib
from uae_jax.models import scan_utils
from uae_jax.tasks import uae as uae_task
from uae_jax.tasks.uae import DISC_SIZES

from test_train import _abstract_batch  # the step's batch as ShapeDtypeStructs
from test_train import _cfg  # the shared tiny-config helper
from test_train import _run_steps as _run


def _assert_same_losses(a, b, rtol, keys=("loss", "l1", "semantic")):
  """Same losses; after the first update the semantic term (a small difference of two nearly
  equal latents) also sees Adam's sign flips of noise-level gradients, so it gets 1e-3."""
  for step, (ma, mb) in enumerate(zip(a, b)):
    for k in keys:
      tol = 1e-3 if (k == "semantic" and step > 0) else rtol
      assert abs(ma[k] - mb[k]) <= tol * abs(mb[k]) + 1e-12, (step, k, ma[k], mb[k])


def _leaf(tree, path):
  """The leaf of `tree` at a key path from `tree_leaves_with_path`."""
  for k in path:
    tree = tree[k.key]
  return np.asarray(tree)


def _assert_trees_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


# peak_lr 1e-4 as in test_train's sharded-vs-single test: Adam's first updates are ~lr * sign(g),
# so an element whose gradient is at float-noise level may flip by 2 lr whatever the lever.
LR = 1e-4
# L1 + semantic only: the levers act on the encoder and decoder, and the frozen VGG16 of LPIPS
# would only add compile time to every run here.
MESH = {"mesh.data": 2, "mesh.fsdp": 4, "optim.peak_lr": LR, "loss.lpips": 0.0}
LEVERS = {
    "remat_full": {"model.encoder.remat_policy": "full", "model.decoder.remat_policy": "full"},
    "remat_dots": {"model.encoder.remat_policy": "dots", "model.decoder.remat_policy": "dots"},
    "scan": {"model.encoder.scan_blocks": True, "model.decoder.scan_blocks": True},
    "scan_remat_full": {"model.encoder.scan_blocks": True, "model.decoder.scan_blocks": True,
                        "model.encoder.remat_policy": "full", "model.decoder.remat_policy": "full"},
}


def _first_grads(tr, config, init_host):
  """(loss, grads, parts) of the generator's first step from `init_host` (its own rng)."""
  it = pipeline.make_train_iterator(config.input)
  state = jax.device_put(init_host, tr.state_sh)
  step = jax.jit(lambda s, b, f: uae_task.generator_grads(config, s, b, f, jax.random.key(0),
                                                          g_on=False))
  return jax.device_get(step(state, tr.global_batch(it), tr.frozen))


@pytest.fixture(scope="module")
def baseline(tmp_path_factory):
  """Stage-2 tiny model on a 2x4 mesh, no remat, unrolled blocks: initial state, first grads."""
  c = _cfg(**MESH)
  tr = train.Trainer(c, str(tmp_path_factory.mktemp("baseline")))
  state, _ = tr.initial_state(pipeline.make_train_iterator(c.input))
  init = jax.device_get(state)
  return init, _first_grads(tr, c, init)


def _assert_same_grads(grads_l, grads):
  """Every gradient leaf within 1e-3 of its leaf's largest baseline element (plus a noise floor)."""
  assert jax.tree.structure(grads_l) == jax.tree.structure(grads)
  # Leaves whose gradient is zero in exact arithmetic (attention key biases) hold float noise
  # only: they get a floor far below the gradients that matter.
  floor = 1e-6 * max(float(np.max(np.abs(g))) for g in jax.tree.leaves(grads))
  for path, x in jax.tree_util.tree_leaves_with_path(grads_l):
    y = _leaf(grads, path)
    scale = float(np.max(np.abs(y)))
    assert np.max(np.abs(np.asarray(x) - y)) <= 1e-3 * scale + floor, jax.tree_util.keystr(path)


# The default run keeps the combined lever (scan + remat 'full'); each lever alone and remat
# 'dots' (the same mechanism with another policy) run with `make test-slow`.
@pytest.mark.parametrize("lever", [k if k == "scan_remat_full" else pytest.param(k, marks=pytest.mark.slow)
                                   for k in sorted(LEVERS)])
def test_lever_leaves_tiny_run_losses_unchanged(tmp_path, baseline, lever):
  """Same initial values (scanned runs get the baseline's init stacked): same losses, gradients.

  Adam's first updates are ~lr * sign(g) whatever |g|, so comparing parameters after two steps
  cannot tell a correct lever from a broken one; the gradients themselves can. The losses after
  an optimiser update are compared by the slow two-step run below.
  """
  init, (loss, grads, parts) = baseline
  scanned = "scan" in lever
  c = _cfg(**MESH, **LEVERS[lever])
  tr = train.Trainer(c, str(tmp_path))
  if scanned:  # the baseline's init, stacked; the trainer's own init would only cost a compile
    own_init = scan_utils.stack_blocks(init)
    assert jax.tree.structure(own_init) == jax.tree.structure(tr.state_abs)
  else:  # remat changes neither the parameter tree nor its initial values
    own_init = jax.device_get(tr.initial_state(pipeline.make_train_iterator(c.input))[0])
    _assert_trees_equal(own_init["params"], init["params"])
  loss_l, grads_l, parts_l = _first_grads(tr, c, own_init)
  _assert_same_losses([dict(parts_l, loss=loss_l)], [dict(parts, loss=loss)], 1e-5)
  _assert_same_grads(scan_utils.unstack_blocks(grads_l) if scanned else grads_l, grads)
  if scanned:  # stacked params: the layer axis is replicated, the width still FSDP-sharded
    q = tr.state_sh["params"]["decoder"]["blocks"]["attn"]["query"]["kernel"]
    assert q.spec == jax.sharding.PartitionSpec(None, "fsdp", None)


@pytest.fixture(scope="module")
def baseline_run(tmp_path_factory):
  """The baseline model's two-step run: (initial host state, per-step metrics)."""
  _, init, _, metrics = _run(_cfg(**MESH), tmp_path_factory.mktemp("baseline_run"), 2)
  return init, metrics


# Slow: the same guarantee over two optimiser steps of the real train step (the default test
# above compares the first step's losses and gradients, which is where a broken lever shows).
@pytest.mark.slow
@pytest.mark.parametrize("lever", sorted(LEVERS))
def test_lever_two_step_run_losses_unchanged(tmp_path, baseline_run, lever):
  init, metrics = baseline_run
  transform = (lambda own: scan_utils.stack_blocks(init)) if "scan" in lever else None
  _, _, _, metrics_l = _run(_cfg(**MESH, **LEVERS[lever]), tmp_path, 2, transform=transform)
  _assert_same_losses(metrics_l, metrics, 1e-5)


def test_stack_unstack_round_trip_is_bit_exact():
  rng = np.random.default_rng(0)
  enc = dinov2.DinoV2(size="tiny", input_size=56, pos_embed_grid=4)
  x = jnp.asarray(rng.uniform(size=(1, 56, 56, 3)), jnp.float32)
  params = jax.tree.map(lambda a: rng.standard_normal(a.shape).astype(np.float32),
                        nn.unbox(jax.eval_shape(enc.init, jax.random.key(0), x))["params"])
  stacked = scan_utils.stack_blocks(params)
  assert "blocks" in stacked and "blocks_0" not in stacked
  scanned = dinov2.DinoV2(size="tiny", input_size=56, pos_embed_grid=4, scan_blocks=True)
  want = nn.unbox(jax.eval_shape(scanned.init, jax.random.key(0), x))["params"]
  assert jax.tree.map(np.shape, stacked) == jax.tree.map(lambda a: a.shape, want)
  _assert_trees_equal(scan_utils.unstack_blocks(stacked), params)
  # Also through optimiser-state-like containers (tuples of params-shaped dicts) and jax arrays.
  tree = ({"mu": params, "count": np.int32(3)}, [jax.device_put(params)])
  _assert_trees_equal(scan_utils.unstack_blocks(scan_utils.stack_blocks(tree)), tree)
  # Same forward with the stacked params in the scanned model (up to XLA's fusion choices).
  # atol 5e-5: XLA fuses the scanned body differently; one element 1.5e-5 off was seen.
  np.testing.assert_allclose(jax.jit(enc.apply)({"params": params}, x),
                             jax.jit(scanned.apply)({"params": stacked}, x), rtol=1e-5, atol=5e-5)
  with pytest.raises(ValueError, match="contiguous"):
    scan_utils.stack_blocks({"blocks_0": {"w": np.zeros(1)}, "blocks_2": {"w": np.zeros(1)}})


@pytest.mark.heavy
def test_scanned_decoder_and_disc_backbone_match_unrolled():
  rng = np.random.default_rng(1)
  dec, dec_s = (decoder_lib.PixelDecoder(size="tiny", patch_size=8, scan_blocks=s)
                for s in (False, True))
  z = jnp.asarray(rng.standard_normal((2, 4, 4, 64)), jnp.float32)
  # Jitted: op-by-op (eager) application compiled one tiny program per op and shape.
  # 'unsafe_rbg' keys: the inits' random draws compile in about half the time of threefry ones.
  p = nn.unbox(jax.jit(dec.init)(jax.random.key(0, impl="unsafe_rbg"), z))["params"]
  np.testing.assert_allclose(jax.jit(dec.apply)({"params": p}, z),
                             jax.jit(dec_s.apply)({"params": scan_utils.stack_blocks(p)}, z),
                             rtol=1e-6, atol=1e-6)
  # The discriminator's backbone alone: `scan_blocks` reaches nothing else (the heads would only
  # add compile time). Every feature map it hands the heads is compared.
  kw = dict(DISC_SIZES["tiny"])
  d, d_s = disc_lib.DinoViTBackbone(**kw), disc_lib.DinoViTBackbone(**kw, scan_blocks=True)
  img = jnp.asarray(rng.uniform(-1, 1, (2, 32, 32, 3)), jnp.float32)
  v = nn.unbox(jax.jit(d.init)(jax.random.key(1, impl="unsafe_rbg"), img))["params"]
  a = jax.jit(d.apply)({"params": v}, img)
  b = jax.jit(d_s.apply)({"params": scan_utils.stack_blocks(v)}, img)
  assert len(a) == len(b) == 5
  for x, y in zip(a, b):
    np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-5 * float(np.abs(x).max()))


@pytest.mark.slow  # ~40 s: two short trainer runs
def test_scanned_run_checkpoints_chains_and_refuses_unscanned_successor(tmp_path):
  scan = {"model.encoder.scan_blocks": True, "model.decoder.scan_blocks": True}
  s1 = _cfg(stage1, steps=2, **scan)
  s1.ckpt.every_steps = 2
  train.train_and_evaluate(s1, str(tmp_path / "s1"))
  # Stage chaining with the same layout restores the stacked EMA.
  s2 = _cfg(stage2, steps=2, **scan, **{"init.from_stage": str(tmp_path / "s1"),
                                         "init.allow_random_encoder": False})
  tr = train.Trainer(s2, str(tmp_path / "s2"))
  state, _ = tr.initial_state(pipeline.make_train_iterator(s2.input))
  assert state["params"]["decoder"]["blocks"]["mlp"]["fc1"]["kernel"].shape[0] == 2
  # An unscanned successor gets a clear error naming the option.
  s2u = _cfg(stage2, steps=2, **{"init.from_stage": str(tmp_path / "s1"),
                                 "init.allow_random_encoder": False})
  tr = train.Trainer(s2u, str(tmp_path / "s2u"))
  with pytest.raises(train.ConfigError, match="scan_blocks"):
    tr.initial_state(pipeline.make_train_iterator(s2u.input))


def _assert_bf16_matmuls(c, params):
  """Every dot_general of the UAE forward (lowered, not compiled) takes bf16 operands."""
  # At least six per transformer block (q, k, v, scores, weighted sum, out; MLP 2).
  model = uae_task.build_model(c)
  x = jnp.zeros((2, 64, 64, 3), jnp.float32)
  hlo = jax.jit(lambda p: model.apply({"params": p}, x, train=False)).lower(params).as_text()
  dots = [line for line in hlo.splitlines() if "stablehlo.dot_general" in line]
  operand_types = [line.rsplit(":", 1)[1].split("->")[0] for line in dots]
  # float32 by design: the fixed image-resize matrices (64 -> 112 px) and the band operator.
  by_design = lambda t: "112x64" in t or "4x64x64" in t
  assert all(("bf16" in t and "f32" not in t) or by_design(t) for t in operand_types), operand_types
  assert sum(map(by_design, operand_types)) <= 3
  blocks = dinov2.SIZES["tiny"].depth + decoder_lib.SIZES["tiny"].depth
  assert len(dots) >= 6 * blocks, len(dots)


def _assert_float32_state(state):
  """Params, EMA, teacher and optimiser state hold float32 floats only."""
  for key in ("params", "ema", "teacher", "opt"):
    dtypes = {x.dtype for x in jax.tree.leaves(state[key]) if jnp.issubdtype(x.dtype, jnp.floating)}
    assert dtypes == {np.dtype(np.float32)}, (key, dtypes)


def test_bfloat16_compute_keeps_float32_master_params(tmp_path):
  """Traced and lowered only: the step's output state dtypes and the forward's HLO operand types."""
  c = _cfg(compute_dtype="bfloat16", **{"loss.lpips": 0.0})  # LPIPS is float32 by design
  tr = train.Trainer(c, str(tmp_path), devices=jax.devices()[:1])
  batch = _abstract_batch(tr, c)
  _assert_float32_state(tr.state_abs)
  state, _ = jax.eval_shape(tr.step_fn(0), tr.state_abs, batch, tr.frozen)
  _assert_float32_state(state)
  _assert_bf16_matmuls(c, tr.state_abs["params"])


@pytest.mark.slow  # ~1 min: compiles and runs the bf16 train step (the traced form runs by default)
def test_bfloat16_run_keeps_float32_master_params_and_finite_losses(tmp_path):
  c = _cfg(compute_dtype="bfloat16", **{"loss.lpips": 0.0})
  _, _, state, metrics = _run(c, tmp_path, 2, devices=jax.devices()[:1])
  _assert_float32_state(state)
  assert all(np.isfinite(m["loss"]) for m in metrics)
  _assert_bf16_matmuls(c, state["params"])


def _saved_activation_bytes(module, params, batch: int, grid: int) -> int:
  """Bytes the backward pass keeps from the forward (vjp residuals) for `batch` latent grids."""
  z = jax.ShapeDtypeStruct((batch, grid, grid, 64), jnp.float32)
  loss = lambda p, x: jnp.mean(jnp.square(module.apply(p, x)))
  res = jax.eval_shape(lambda p, x: jax.vjp(lambda q: loss(q, x), p)[1], params, z)
  return sum(int(np.prod(r.shape)) * r.dtype.itemsize for r in jax.tree.leaves(res))


def test_remat_cuts_saved_activations_scan_or_not():
  """Activation memory the backward needs, per image (residuals at batch 4 minus batch 2).

  XLA:CPU's memory_analysis() does not reflect remat (its scheduler is not memory-aware, see
  docs/scaling.md), so this counts the vjp residuals, which is what remat trades for compute.
  """
  per_image = {}
  for policy in ("none", "full", "dots"):
    for scan in (False, True):
      dec = decoder_lib.PixelDecoder(size="small", patch_size=8, remat_policy=policy,
                                     scan_blocks=scan)
      params = jax.eval_shape(lambda: nn.unbox(dec.init(jax.random.key(0),
                                                        jnp.zeros((1, 8, 8, 64)))))
      per_image[policy, scan] = (_saved_activation_bytes(dec, params, 4, 8)
                                 - _saved_activation_bytes(dec, params, 2, 8)) / 2
  for scan in (False, True):
    assert per_image["full", scan] * 2 <= per_image["none", scan], per_image
    assert per_image["dots", scan] < per_image["none", scan], per_image
    assert per_image["none", scan] == per_image["none", False], per_image
