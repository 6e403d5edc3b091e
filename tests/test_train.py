"""The trainer: per-stage parameter updates, sharded == single device, resume, failure modes."""
import dataclasses
import functools
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from configs import official_stage2
from configs import stage1
from configs import stage2
from configs import stage3
from uae_jax import train
from uae_jax.errors import ConfigError
from uae_jax.checkpoint import manager as ckpt_lib
from uae_jax.data import pipeline

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def apply_overrides(c, overrides):
  """Sets dotted keys ('optim.peak_lr') of a ConfigDict in place; returns it."""
  for k, v in overrides.items():
    node = c
    *path, leaf = k.split(".")
    for p in path:
      node = node[p]
    node[leaf] = v
  return c


def _cfg(module=stage2, steps=4, **overrides):
  """Tiny config with logging/eval off; `overrides` are dotted keys (shared with other tests)."""
  c = module.get_config(f"tiny,steps={steps}")
  c.log_every_steps = 1
  c.image_every_steps = 0
  c.eval_every_steps = 0
  c.ckpt.every_steps = 1000
  return apply_overrides(c, overrides)


def _run_steps(config, workdir, n, devices=None, transform=None):
  """Runs n train steps by hand; returns (trainer, initial host state, final host state, metrics).

  `transform(host_state) -> host_state` replaces the initial state (e.g. stacked for scan).
  """
  tr = train.Trainer(config, str(workdir), devices=devices)
  it = pipeline.make_train_iterator(config.input)
  state, _ = tr.initial_state(it)
  init = jax.device_get(state)
  if transform is not None:
    new = transform(init)
    assert jax.tree.structure(new) == jax.tree.structure(tr.state_abs)
    state = jax.device_put(new, tr.state_sh)
  metrics = []
  for _ in range(n):
    state, m = tr.train_step(state, tr.global_batch(it), tr.frozen)
    metrics.append(jax.device_get(m))
  return tr, init, jax.device_get(state), metrics


def _abstract_batch(tr, config):
  """The trainer's global train batch as sharded ShapeDtypeStructs, for tracing its step."""
  return {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=tr.ctx.batch_sh)
          for k, v in next(pipeline.make_train_iterator(config.input)).items()
          if k in tr.batch_keys}


def _changed(a, b):
  """Per top-level group: did any leaf change?"""
  return {k: any(not np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a[k]), jax.tree.leaves(b[k])))
          for k in a}


# The tiny stage-2 run of the mesh test: L1 + semantic (LPIPS is a frozen, replicated network and
# would only add compile time) at a small learning rate (see that test).
MESH_TEST_OVERRIDES = {"optim.peak_lr": 1e-4, "loss.lpips": 0.0}


# Tests that run the same tiny programs share one xdist worker, so the later ones hit the
# persistent compilation cache instead of compiling the same program on the other worker.
SAME_STAGE2_RUN = pytest.mark.xdist_group("tiny_stage2_run")
SAME_STAGE1_RUN = pytest.mark.xdist_group("tiny_stage1_run")


# Stage 2 runs by default (the encoder trains, the teacher must not); stages 1 and 3 with
# `make test-slow` (stage 3's GAN step also runs in the phase test below).
@pytest.mark.parametrize("module,expect", [
    pytest.param(stage1, {"encoder": False, "decoder": True, "modulator": True},
                 marks=pytest.mark.slow),
    (stage2, {"encoder": True, "decoder": True, "modulator": True}),
    pytest.param(stage3, {"encoder": True, "decoder": True, "modulator": True},
                 marks=pytest.mark.slow),
])
@SAME_STAGE2_RUN
def test_one_step_changes_exactly_the_trained_params(tmp_path, module, expect):
  overrides = {"gan.d_start_frac": 0.0, "gan.g_start_frac": 0.0} if module is stage3 else {}
  devices = None
  steps = 4
  if module is stage2:
    # Default run: which params move does not depend on LPIPS (VGG16 adds ~10 s of compile) or
    # on the mesh (8 fake devices compile ~20 % slower); the slow stages keep both. It is the
    # single-device config of the mesh test below, so the two share their compiled programs.
    overrides, devices, steps = dict(MESH_TEST_OVERRIDES), jax.devices()[:1], 6
  config = _cfg(module, steps=steps, **overrides)
  _, init, state, (m,) = _run_steps(config, tmp_path, 1, devices=devices)
  before = {k: init[k] for k in ("params", "teacher", "ema")}
  disc_before = init.get("disc")
  after = {k: state[k] for k in ("params", "teacher", "ema")}
  assert _changed(before["params"], after["params"]) == expect
  # The teacher never moves; frozen subtrees of the EMA stay bit-identical too.
  assert not any(_changed({"t": before["teacher"]}, {"t": after["teacher"]}).values())
  assert _changed(before["ema"], after["ema"]) == expect
  assert np.isfinite(m["loss"]) and int(state["step"]) == 1
  if module is stage1:
    assert "semantic" not in m and "gan_g" not in m
  else:
    assert m["semantic"] >= 0
  if module is stage3:
    assert m["gan_weight"] > 0 and m["d_on"] == 1.0
    assert _changed({"d": disc_before["params"]}, {"d": state["disc"]["params"]})["d"]


def _forwarded_disc(fn, args):
  """(per output `disc` leaf of `fn(*args) -> (state, metrics)`: is it the input leaf?, shapes).

  Traced only (no compile): a phase that does not train D must pass its parameters straight
  through, which the jaxpr shows as an output variable that is the input variable itself.
  """
  closed, out = jax.make_jaxpr(fn, return_shape=True)(*args)
  ins = list(closed.jaxpr.invars)
  in_paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(args)[0]]
  out_paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(out)[0]]
  assert len(ins) == len(in_paths) and len(closed.jaxpr.outvars) == len(out_paths)
  by_path = dict(zip(in_paths, ins))
  res = []
  for path, var in zip(out_paths, closed.jaxpr.outvars):
    if path.startswith("[0]['disc']"):
      res.append(var is by_path[path])  # state and new state share their key paths
  assert res
  return res, out


@pytest.mark.heavy
def test_stage3_phases_key_one_step_each_traced_only(tmp_path, monkeypatch):
  """Cheap form of the phase test below: the schedule and the per-phase step, traced, not compiled.

  4 steps with D from step 2 and the G term from step 3: `phase_at` gives the phase sequence,
  the trainer keeps one step per distinct phase, and each phase's step emits only its own GAN
  terms and leaves D's parameters untouched before D starts.
  """
  from uae_jax.tasks import uae as uae_task
  config = _cfg(stage3, steps=4, **{"gan.d_start_frac": 0.5, "gan.g_start_frac": 0.75,
                                    "loss.lpips": 0.0})
  phases = [(False, False), (False, False), (True, False), (True, True)]
  assert [uae_task.phase_at(config, s) for s in range(4)] == phases
  # Values of the frozen inputs do not matter to a trace: zeros of their shapes skip the eager
  # random init of the discriminator backbone (most of the Trainer's set-up time).
  zeros = lambda c: jax.tree.map(lambda a: np.zeros(a.shape, a.dtype),
                                 jax.eval_shape(lambda: uae_task.load_frozen(c)))
  monkeypatch.setattr(uae_task, "TASK", dataclasses.replace(uae_task.TASK, load_frozen=zeros))
  tr = train.Trainer(config, str(tmp_path))
  assert tr.task.phase_at is uae_task.phase_at
  batch = _abstract_batch(tr, config)
  fns = [tr.step_fn(s) for s in range(4)]
  assert sorted(tr._steps) == sorted(set(phases))
  assert fns[0] is fns[1] and len({id(f) for f in fns}) == 3
  for fn, (d_on, g_on) in zip(fns[1:], phases[1:]):  # fns[0] is fns[1]
    # The trainer's own step function of the phase, unjitted, so its jaxpr shows the forwarding.
    forwarded, (_, m) = _forwarded_disc(fn.__wrapped__, (tr.state_abs, batch, tr.frozen))
    assert set(forwarded) == {not d_on}
    assert ("gan_d" in m, "gan_g" in m, "adaptive_weight" in m) == (d_on, g_on, g_on)
    assert "d_on" in m and "g_on" in m


@pytest.mark.slow  # ~4 min: three stage-3 compiles; the traced form above runs by default
def test_stage3_compiles_one_step_per_gan_phase(tmp_path):
  """4 steps with D from step 2 and the G term from step 3: each phase runs only its own work."""
  # L1 only: the phases are about the GAN terms, and VGG16 LPIPS would triple the three compiles.
  config = _cfg(stage3, steps=4, **{"gan.d_start_frac": 0.5, "gan.g_start_frac": 0.75,
                                    "loss.lpips": 0.0})
  tr = train.Trainer(config, str(tmp_path))
  it = pipeline.make_train_iterator(config.input)
  state, _ = tr.initial_state(it)
  discs, metrics = [jax.device_get(state["disc"]["params"])], []
  for step in range(4):
    state, m = tr.train_step(state, tr.global_batch(it), tr.frozen, step)
    discs.append(jax.device_get(state["disc"]["params"]))
    metrics.append(jax.device_get(m))
  moved = [_changed({"d": a}, {"d": b})["d"] for a, b in zip(discs, discs[1:])]
  assert moved == [False, False, True, True]
  assert [("gan_d" in m, "gan_g" in m) for m in metrics] == [
      (False, False), (False, False), (True, False), (True, True)]
  assert [(m["d_on"], m["g_on"]) for m in metrics] == [(0, 0), (0, 0), (1, 0), (1, 1)]
  assert metrics[3]["adaptive_weight"] > 0
  assert sorted(tr._steps) == [(False, False), (True, False), (True, True)]


@pytest.mark.slow  # ~1 min: the official recipe's GAN + clean-pass step compile
def test_official_recipe_stage2_step_runs_with_clean_pass(tmp_path):
  config = _cfg(official_stage2, steps=4, **{"gan.d_start_frac": 0.0, "gan.g_start_frac": 0.0})
  _, _, state, ms = _run_steps(config, tmp_path, 1)
  m = ms[0]
  for key in ("l1", "lpips", "clean_l1", "clean_lpips", "semantic", "gan_g", "gan_d"):
    assert key in m and np.isfinite(m[key]), key
  assert set(state["params"]) == {"encoder", "decoder"}


@SAME_STAGE2_RUN
def test_single_device_and_2x4_mesh_agree(tmp_path):
  """Same tiny stage-2 run on 1 device and on a 2x4 (data, fsdp) mesh: same losses after 3 steps.

  Reduction order differs between the two, so gradients agree to ~1e-5 relative, and Adam's
  first steps (update ~ lr * sign(g)) flip the few elements whose gradient is at that noise
  level. The run uses peak_lr 1e-4 so the comparison measures the sharding, not that
  amplification; the semantic term (a small difference of two nearly equal latents) is the most
  sensitive to it and gets a looser bound.
  """
  runs = []
  for (d, f), devices in (((2, 4), None), ((1, 1), jax.devices()[:1])):
    config = _cfg(stage2, steps=6, **MESH_TEST_OVERRIDES)
    config.mesh.data, config.mesh.fsdp = d, f
    runs.append(_run_steps(config, tmp_path / f"mesh{d}x{f}", 3, devices=devices)[3])
  sharded, single = runs
  for step, (a, b) in enumerate(zip(sharded, single)):
    for k in ("loss", "l1"):
      assert abs(a[k] - b[k]) <= 1e-4 * abs(b[k]), (step, k, a[k], b[k])
    assert abs(a["semantic"] - b["semantic"]) <= 5e-3 * abs(b["semantic"]) + 1e-9, step


def _main(workdir, config_arg, *overrides, env=None):
  cmd = [sys.executable, "-m", "uae_jax.main", f"--config={config_arg}", f"--workdir={workdir}",
         *overrides]
  e = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1", **(env or {}))
  return subprocess.run(cmd, cwd=REPO, env=e, capture_output=True, text=True, timeout=900)


def _final_params(workdir):
  mgr = ckpt_lib.CheckpointManager(os.path.join(workdir, "checkpoints"))
  step = mgr.latest_step()
  import orbax.checkpoint as ocp
  state = mgr._mgr.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore()))["state"]
  mgr.close()
  return step, state


def _kill_after_first_checkpoint(workdir, *args):
  """Starts a run and SIGKILLs it (as a preempted VM dies) once its first checkpoint is committed."""
  cmd = [sys.executable, "-m", "uae_jax.main", f"--config={args[0]}", f"--workdir={workdir}",
         *args[1:]]
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")
  proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)
  ckpts = workdir / "checkpoints"
  deadline = time.time() + 600
  # Orbax commits a step by renaming its temporary directory to the bare step number.
  while proc.poll() is None and time.time() < deadline:
    if ckpts.is_dir() and any(p.name.isdigit() for p in ckpts.iterdir()):
      proc.kill()
      break
    time.sleep(0.01)
  return proc.wait()


def _stage1_run_on_one_device(monkeypatch, on_batch=None):
  """(config, fetch log) of the tiny stage-1 run the trainer-loop tests share (L1 only, 4 steps).

  `train.Trainer` is patched onto 1 device (the loop does not depend on the mesh, and 1 device
  compiles faster); `on_batch(n, batch) -> batch` sees the n-th batch the loop fetches.
  """
  trainer_cls, calls = train.Trainer, []
  real_batch = trainer_cls.global_batch

  def hooked(self, data_iter):
    calls.append(1)
    batch = real_batch(self, data_iter)
    return on_batch(len(calls), batch) if on_batch else batch

  monkeypatch.setattr(trainer_cls, "global_batch", hooked)
  monkeypatch.setattr(train, "Trainer", functools.partial(trainer_cls, devices=jax.devices()[:1]))
  return _cfg(stage1, steps=4, **{"loss.lpips": 0.0}), calls


# Slow: ~1 min in the suite, no cheaper than the three-process SIGKILL test below, which covers
# bit-exact resume by default (this one adds the graceful SIGTERM path).
@pytest.mark.slow
@SAME_STAGE1_RUN
def test_sigterm_then_resume_is_bit_exact(tmp_path, monkeypatch):
  """SIGTERM (as a preempted TPU VM gets) during step 2 of 4: the run saves step 2 and stops; a
  new Trainer resumes there and ends bit-identical to an uninterrupted run (in-process)."""
  preemptions, real_enter = [], train._Preemption.__enter__

  def enter(self):
    preemptions.append(self)
    return real_enter(self)

  def sigterm_at_second_batch(n, batch):
    if n == 2 and interrupt:
      preemptions[-1]._handler(signal.SIGTERM, None)  # what the signal calls
    return batch

  monkeypatch.setattr(train._Preemption, "__enter__", enter)
  config, calls = _stage1_run_on_one_device(monkeypatch, sigterm_at_second_batch)
  interrupt = False
  assert train.train_and_evaluate(config, str(tmp_path / "full"))["final_step"] == 4
  interrupt, calls[:] = True, []
  first = train.train_and_evaluate(config, str(tmp_path / "preempted"))
  assert first["preempted_at"] == first["final_step"] == 2
  interrupt = False
  second = train.train_and_evaluate(config, str(tmp_path / "preempted"))
  assert second["start_step"] == 2 and second["final_step"] == 4
  (s_full, a), (s_res, b) = _final_params(tmp_path / "full"), _final_params(tmp_path / "preempted")
  assert s_full == s_res == 4
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(x, y)


@pytest.mark.heavy
def test_resume_after_sigkill_is_bit_exact(tmp_path):
  # L1 only (no VGG16 compile in each of the three processes): resume is about the state.
  # 12 steps, a checkpoint every 4: the kill must still land before the end (asserted below).
  args = ("configs/stage1.py:tiny,steps=12", "--config.loss.lpips=0", "--config.ckpt.every_steps=4",
          "--config.ckpt.keep=100", "--config.eval_every_steps=0", "--config.image_every_steps=0")
  full = _main(tmp_path / "full", *args)
  assert full.returncode == 0, full.stderr[-3000:]
  assert _kill_after_first_checkpoint(tmp_path / "killed", *args) == -9
  saved = sorted(int(p) for p in os.listdir(tmp_path / "killed" / "checkpoints") if p.isdigit())
  assert saved and saved[-1] < 12, saved
  resumed = _main(tmp_path / "killed", *args)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert f"resumed from {tmp_path / 'killed' / 'checkpoints'} step {saved[-1]}" in resumed.stderr
  s_full, a = _final_params(tmp_path / "full")
  s_res, b = _final_params(tmp_path / "killed")
  assert s_full == s_res == 12
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(x, y)


@SAME_STAGE1_RUN
def test_non_finite_loss_stops_cleanly_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
  """A NaN loss at step 3 (a NaN image) stops the run before saving; the step-2 checkpoint stays.

  One run, one compile: the NaN comes through the data, so the step program is the ordinary one.
  """
  poison_third = lambda n, batch: ({k: v * np.float32("nan") for k, v in batch.items()}
                                   if n == 3 else batch)
  config, calls = _stage1_run_on_one_device(monkeypatch, poison_third)
  config.ckpt.every_steps = 1
  expected = r"non-finite \[.*'loss'.*\] at step 3 .*checkpoint \(step 2\)"
  with pytest.raises(train.NonFiniteLossError, match=expected):
    train.train_and_evaluate(config, str(tmp_path))
  step, state = _final_params(tmp_path)
  assert step == 2 and len(calls) == 3
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(state["params"]))


def test_config_typo_fails_before_training(tmp_path):
  r = _main(tmp_path, "configs/stage1.py:tiny", "--config.optim.peak_lrr=1e-3")
  assert r.returncode != 0 and "peak_lrr" in r.stderr
  assert not (tmp_path / "checkpoints").exists()
  r = _main(tmp_path, "configs/stage1.py:tiny,stepz=3")
  assert r.returncode != 0 and "stepz" in r.stderr
  c = _cfg(stage2)
  c.init.from_stage = str(tmp_path / "missing")
  with pytest.raises(ConfigError, match="init.from_stage"):
    train.Trainer(c, str(tmp_path))
  c = _cfg(stage1)
  c.input.image_size = 96
  with pytest.raises(ConfigError, match="image_size"):
    train.validate_config(c)


@pytest.mark.slow  # ~2 min: two CLI runs; `make demo` chains the three stages too
def test_stage_chaining_starts_from_previous_ema(tmp_path):
  s1 = _cfg(stage1, steps=2)
  s1.ckpt.every_steps = 2
  train.train_and_evaluate(s1, str(tmp_path / "s1"))
  _, prev = _final_params(tmp_path / "s1")
  s2 = _cfg(stage2, steps=2)
  s2.init.from_stage = str(tmp_path / "s1")
  s2.init.allow_random_encoder = False
  tr = train.Trainer(s2, str(tmp_path / "s2"))
  state, start = tr.initial_state(pipeline.make_train_iterator(s2.input))
  assert start == 0
  for x, y in zip(jax.tree.leaves(prev["ema"]), jax.tree.leaves(jax.device_get(state["params"]))):
    np.testing.assert_array_equal(x, y)
  for x, y in zip(jax.tree.leaves(prev["teacher"]), jax.tree.leaves(jax.device_get(state["teacher"]))):
    np.testing.assert_array_equal(x, y)
  summary = json.load(open(tmp_path / "s1" / "summary.json"))
  assert summary["final_step"] == 2
  # A previous stage that stopped before its last step is refused unless explicitly allowed.
  s1u = _cfg(stage1, steps=4)
  s1u.ckpt.every_steps = 2
  train.train_and_evaluate(s1u, str(tmp_path / "s1u"))
  shutil.rmtree(tmp_path / "s1u" / "checkpoints" / "4")
  s2.init.from_stage = str(tmp_path / "s1u")
  with pytest.raises(ConfigError, match="stopped at step 2 of 4.*allow_unfinished"):
    train.Trainer(s2, str(tmp_path / "s2u")).initial_state(pipeline.make_train_iterator(s2.input))
  s2.init.allow_unfinished = True
  _, start = train.Trainer(s2, str(tmp_path / "s2v")).initial_state(
      pipeline.make_train_iterator(s2.input))
  assert start == 0


def test_metric_writer_handles_remote_style_workdirs(tmp_path, monkeypatch):
  """gs:// workdirs: no abspath mangling, JSONL rewritten on flush (object stores cannot append)."""
  from uae_jax import metric_writers
  monkeypatch.setattr(metric_writers, "is_remote", lambda p: True)
  w = metric_writers.MetricWriter(str(tmp_path / "remote"), tensorboard=False)
  w.write_scalars(1, {"loss": 2.0})
  w.write_scalars(2, {"loss": 1.0})
  w.write_images(2, {"grid": np.zeros((4, 4, 3), np.uint8)})
  w.close()
  rows = [json.loads(l) for l in open(tmp_path / "remote" / "metrics.jsonl")]
  assert [r["loss"] for r in rows] == [2.0, 1.0]
  # A resumed run keeps the earlier lines (an object store cannot append).
  w = metric_writers.MetricWriter(str(tmp_path / "remote"), tensorboard=False)
  w.write_scalars(3, {"loss": 0.5})
  w.close()
  rows = [json.loads(l) for l in open(tmp_path / "remote" / "metrics.jsonl")]
  assert [r["loss"] for r in rows] == [2.0, 1.0, 0.5]
  assert (tmp_path / "remote" / "images" / "grid_latest.png").exists()


def test_metric_writer_does_not_import_torch(tmp_path):
  """tensorboardX would import PyTorch (~4 s per training process) when it is installed."""
  code = ("import sys; from uae_jax.metric_writers import MetricWriter; "
          f"w = MetricWriter({str(tmp_path)!r}); w.write_scalars(1, {{'loss': 0.5}}); w.close(); "
          "print('torch' in sys.modules)")
  r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                     timeout=300)
  assert r.returncode == 0 and r.stdout.strip() == "False", r.stderr[-2000:]
  assert os.listdir(tmp_path / "tensorboard") and (tmp_path / "metrics.jsonl").exists()


@SAME_STAGE1_RUN
def test_log_lines_show_the_newest_value_of_every_metric(tmp_path, monkeypatch):
  """Steps that alternate their metric keys (G / D) both reach every log line, even at an even
  interval; the step itself is faked (no compile): this is about the loop's logging."""
  import jax.numpy as jnp

  def fake_step(self, state, batch, frozen, step=None):
    kind = {"gan_d": jnp.float32(step)} if step % 2 else {"gan_g": jnp.float32(step)}
    return state, {"loss": jnp.float32(step), **kind}

  monkeypatch.setattr(train.Trainer, "train_step", fake_step)
  config, _ = _stage1_run_on_one_device(monkeypatch)  # the NaN test's run: same init program
  config.log_every_steps = 2
  tr = train.Trainer(config, str(tmp_path))
  try:
    tr.run()
  finally:
    tr.close()
  rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
  # Logged after steps 2 and 4 (0-based steps 1 and 3 are D steps; 0 and 2 are G steps).
  assert [(r["step"], r["loss"], r["gan_d"], r["gan_g"]) for r in rows] == [(2, 1, 1, 0),
                                                                              (4, 3, 3, 2)]
