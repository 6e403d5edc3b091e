"""Damaged checkpoints: fall back to the newest readable step, move the damaged one aside, resume.

Kinds of damage, as a crash mid-copy, a bad disk or an interrupted save leave them: a truncated
array file, a missing commit marker, deleted or garbled metadata, a truncated data-iterator
state, an empty step directory. The manager-level tests use a small pytree and a real Grain
iterator (seconds); the trainer-level tests resume a tiny stage-1 run and compare its final
parameters bit for bit with an uninterrupted run that saved at the same steps.
"""
import glob
import logging
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from uae_jax.checkpoint import manager as ckpt_lib
from uae_jax.errors import CheckpointError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ------------------------------------------------------------------------------------------------
# Damage.


def _truncate_largest_array_file(step_dir):
  """Halves the biggest OCDBT data file of the 'state' item (what the issue's OUT_OF_RANGE hit)."""
  files = [f for f in glob.glob(os.path.join(step_dir, "state", "**", "d", "*"), recursive=True)
           if os.path.isfile(f)]
  biggest = max(files, key=os.path.getsize)
  os.truncate(biggest, os.path.getsize(biggest) // 2)


def _rm(*parts):
  """Deletes one file of the step."""
  return lambda step_dir: os.remove(os.path.join(step_dir, *parts))


def _empty_step_dir(step_dir):
  """Leaves only the step directory itself."""
  shutil.rmtree(step_dir)
  os.makedirs(step_dir)


DAMAGE = {
    "truncated array file": _truncate_largest_array_file,
    "missing commit marker": _rm(ckpt_lib.COMMIT_MARKER),
    "deleted step metadata": _rm(ckpt_lib.STEP_METADATA),
    "deleted state metadata": _rm("state", "_METADATA"),
    "deleted OCDBT manifest": _rm("state", "manifest.ocdbt"),
    "truncated iterator state": lambda d: os.truncate(
        os.path.join(d, "data_iter", "process_0-of-1.json"), 5),
    "empty step directory": _empty_step_dir,
}


# ------------------------------------------------------------------------------------------------
# Manager level: a small state and a real Grain iterator.


def _iterator():
  return iter(grain.MapDataset.range(1000).batch(2).to_iter_dataset())


def _state(step):
  """A different state per step (big enough for several OCDBT chunks)."""
  return {"w": jnp.arange(20_000, dtype=jnp.float32) + step, "b": {"c": jnp.full((8, 8), step)}}


def _abstract():
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                      _state(0))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
  """Pristine checkpoints of steps 1, 2, 3 (one batch drawn per step) and the batch after each."""
  d = str(tmp_path_factory.mktemp("ckpt") / "checkpoints")
  mgr = ckpt_lib.CheckpointManager(d, keep=10)
  it, after = _iterator(), {}
  for step in (1, 2, 3):
    next(it)
    mgr.save(step, _state(step), it, {"step": step, "total_steps": 3})
    mgr.wait()
    probe = _iterator()
    probe.set_state(it.get_state())
    after[step] = next(probe)
  mgr.close()
  return d, after


def _copy(saved, tmp_path):
  d = str(tmp_path / "checkpoints")
  shutil.copytree(saved[0], d)
  return d


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_restore_latest_falls_back_and_moves_the_damaged_step_aside(saved, tmp_path, damage,
                                                                    caplog):
  d = _copy(saved, tmp_path)
  DAMAGE[damage](os.path.join(d, "3"))
  mgr = ckpt_lib.CheckpointManager(d, keep=10)
  it = _iterator()
  with caplog.at_level(logging.WARNING):
    state, step = mgr.restore_latest(_abstract(), it)
  assert step == 2
  for got, want in zip(jax.tree.leaves(state), jax.tree.leaves(_state(2))):
    np.testing.assert_array_equal(got, want)
  # The iterator resumes where step 2 left it, not step 3.
  np.testing.assert_array_equal(next(it), saved[1][2])
  log = caplog.text
  assert "step 3" in log and "unreadable" in log, log
  moved = os.listdir(os.path.join(d, ckpt_lib.UNREADABLE))
  assert len(moved) == 1 and moved[0].startswith("3."), moved
  assert not os.path.exists(os.path.join(d, "3"))
  # Orbax forgot the step: saving step 3 again works and is what the next restore finds.
  assert mgr.all_steps() == [1, 2]
  mgr.save(3, _state(30), it, {"step": 3})
  mgr.close()
  mgr = ckpt_lib.CheckpointManager(d, keep=10)
  state, step = mgr.restore_latest(_abstract(), _iterator())
  mgr.close()
  assert step == 3 and float(state["w"][0]) == 30.0


def test_nothing_readable_is_a_clear_error_and_nothing_moves(saved, tmp_path):
  d = _copy(saved, tmp_path)
  kinds = ("truncated array file", "missing commit marker", "deleted state metadata")
  for step, kind in zip((3, 2, 1), kinds):
    DAMAGE[kind](os.path.join(d, str(step)))
  mgr = ckpt_lib.CheckpointManager(d, keep=10)
  it = _iterator()
  next(it)
  before = it.get_state()
  with pytest.raises(CheckpointError) as e:
    mgr.restore_latest(_abstract(), it)
  mgr.close()
  msg = str(e.value)
  assert "no readable checkpoint" in msg and d in msg
  for step, why in ((3, "OUT_OF_RANGE"), (2, "commit marker"), (1, "_METADATA")):
    assert f"step {step}: " in msg and why in msg, msg
  assert it.get_state() == before  # the iterator was never half-restored
  assert sorted(os.listdir(d)) == ["1", "2", "3"]


def test_iterator_state_that_does_not_fit_leaves_the_iterator_untouched(saved, tmp_path):
  """A step whose iterator state is valid JSON but not this pipeline's: skipped, iterator intact."""
  d = _copy(saved, tmp_path)
  with open(os.path.join(d, "3", "data_iter", "process_0-of-1.json"), "w") as f:
    f.write('{"parents": "nonsense"}')
  mgr = ckpt_lib.CheckpointManager(d, keep=10)
  it = _iterator()
  _, step = mgr.restore_latest(_abstract(), it)
  mgr.close()
  assert step == 2
  np.testing.assert_array_equal(next(it), saved[1][2])


def test_restore_subtrees_falls_back_too(saved, tmp_path):
  """The start-of-stage restore from a previous stage's workdir (partial, with progress)."""
  d = _copy(saved, tmp_path)
  _truncate_largest_array_file(os.path.join(d, "3"))
  target = {"w": _abstract()["w"]}
  with pytest.raises(CheckpointError, match=r"step 3: cannot read \['w'\]"):
    ckpt_lib.restore_subtrees(str(tmp_path), target, step=3)  # an explicit step: no fallback
  assert os.path.isdir(os.path.join(d, "3"))
  out, step, total = ckpt_lib.restore_subtrees(str(tmp_path), target, with_progress=True)
  assert (step, total) == (2, 3)
  np.testing.assert_array_equal(out["w"], _state(2)["w"])
  assert os.listdir(os.path.join(d, ckpt_lib.UNREADABLE))[0].startswith("3.")


_SIGTERM_CHILD = textwrap.dedent("""
    import os, sys, time
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=1"
    import jax.numpy as jnp
    from uae_jax.checkpoint import manager as ckpt_lib
    mgr = ckpt_lib.CheckpointManager(sys.argv[1], keep=5)
    mgr.save(1, {"w": jnp.full((4_000_000,), 1.0)})
    mgr.wait()
    mgr.save(2, {"w": jnp.full((4_000_000,), 2.0)})  # async: returns while writing
    print("saving", flush=True)
    time.sleep(60)
""")


def test_sigterm_during_async_save_leaves_a_readable_checkpoint(tmp_path):
  d = str(tmp_path / "checkpoints")
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  proc = subprocess.Popen([sys.executable, "-c", _SIGTERM_CHILD, d], cwd=REPO, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
  try:
    assert proc.stdout.readline().strip() == "saving"
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == -signal.SIGTERM
  finally:
    proc.kill()
  mgr = ckpt_lib.CheckpointManager(d)
  abstract = {"w": jax.ShapeDtypeStruct((4_000_000,), jnp.float32,
                                        sharding=jax.sharding.SingleDeviceSharding(jax.devices()[0]))}
  state, step = mgr.restore_latest(abstract)
  mgr.close()
  assert step in (1, 2)
  assert float(state["w"].min()) == float(state["w"].max()) == float(step)


# ------------------------------------------------------------------------------------------------
# Trainer level: a tiny stage-1 run resumed over a damaged newest checkpoint.


def _cfg(steps=4):
  from configs import stage1
  c = stage1.get_config(f"tiny,steps={steps}")
  c.log_every_steps = 1
  c.image_every_steps = 0
  c.eval_every_steps = 0
  c.ckpt.every_steps = 2
  c.ckpt.keep = 100
  return c


def _steps(tr, state, it, first, last):
  """Trains steps first..last with the trainer's compiled step, saving every 2 like the loop."""
  for step in range(first, last + 1):
    state, _ = tr.train_step(state, tr.global_batch(it), tr.frozen)
    if step % 2 == 0:
      tr.ckpt.save(step, state, it, {"step": step, "total_steps": last})
  tr.ckpt.wait()
  return state


def _resume_over(tmp_path, damage):
  """Trains 4 steps (saving at 2 and 4), damages step 4, resumes through the trainer's own
  resume path (`initial_state` -> restore_latest) and trains to 4 again: the final state must
  equal the uninterrupted one bit for bit, from the same compiled step."""
  from uae_jax import train
  from uae_jax.data import pipeline
  tr = train.Trainer(_cfg(), str(tmp_path))
  try:
    it = pipeline.make_train_iterator(tr.config.input)
    state, start = tr.initial_state(it)
    assert start == 0
    reference = jax.device_get(_steps(tr, state, it, 1, 4))
    ckpts = tmp_path / "checkpoints"
    DAMAGE[damage](str(ckpts / "4"))
    it = pipeline.make_train_iterator(tr.config.input)  # a fresh process would build a new one
    state, start = tr.initial_state(it)
    assert start == 2
    resumed = jax.device_get(_steps(tr, state, it, 3, 4))
  finally:
    tr.close()
  assert [p.split(".")[0] for p in os.listdir(ckpts / ckpt_lib.UNREADABLE)] == ["4"]
  assert sorted(p for p in os.listdir(ckpts) if p.isdigit()) == ["2", "4"]
  assert jax.tree.structure(reference) == jax.tree.structure(resumed)
  for a, b in zip(jax.tree.leaves(reference), jax.tree.leaves(resumed)):
    np.testing.assert_array_equal(a, b)


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["truncated array file", "missing commit marker",
                                    "deleted step metadata", "truncated iterator state"])
def test_trainer_resumes_over_damage_bit_exact(tmp_path, damage):
  _resume_over(tmp_path, damage)


_TRAIN_CHILD = textwrap.dedent("""
    import sys
    from absl import flags
    flags.FLAGS.mark_as_parsed()
    from configs import stage1
    from uae_jax import train
    c = stage1.get_config("tiny,steps=200")
    c.log_every_steps = 1
    c.image_every_steps = 0
    c.eval_every_steps = 0
    c.ckpt.every_steps = 1
    c.ckpt.keep = 2
    print(train.train_and_evaluate(c, sys.argv[1]).get("preempted_at"), flush=True)
""")


@pytest.mark.slow
def test_sigterm_during_a_training_save_leaves_a_readable_checkpoint(tmp_path):
  """SIGTERM lands while the trainer's async save is writing; the run saves, stops, and resumes."""
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1", JAX_PLATFORMS="cpu")
  proc = subprocess.Popen([sys.executable, "-c", _TRAIN_CHILD, str(tmp_path)], cwd=REPO, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
  ckpts = tmp_path / "checkpoints"
  deadline = time.time() + 900
  try:
    while proc.poll() is None and time.time() < deadline:
      # Orbax writes into '<step>.orbax-checkpoint-tmp-*' and renames it when the save commits.
      if ckpts.is_dir() and any("tmp" in p.name for p in ckpts.iterdir()):
        proc.send_signal(signal.SIGTERM)
        break
      time.sleep(0.005)
    out, _ = proc.communicate(timeout=600)
  finally:
    proc.kill()
  assert proc.returncode == 0
  stopped = int(out.strip().splitlines()[-1])
  assert 0 < stopped < 200
  from uae_jax import train
  tr = train.Trainer(_cfg(200), str(tmp_path))
  try:
    from uae_jax.data import pipeline
    _, step = tr.initial_state(pipeline.make_train_iterator(tr.config.input))
  finally:
    tr.close()
  assert step == stopped
