"""The one trainer: mesh -> data -> abstract state -> shardings -> init/restore -> loop.

It runs the task named by `config.task` (`uae_jax/tasks/`): the task owns the model, the state
layout, the step and the evaluation; this file owns placement, data, checkpoints and metrics.
"""
import functools
import json
import math
import signal
import time

import flax.linen as nn
import jax
import ml_collections
from absl import logging
from etils import epath

from uae_jax import sharding as sharding_lib
from uae_jax import tasks as tasks_lib
from uae_jax.checkpoint import manager as ckpt_lib
from uae_jax.data import pipeline
from uae_jax.errors import ConfigError
from uae_jax.metric_writers import MetricWriter, ProgressLine
from uae_jax.tasks import common


class NonFiniteLossError(FloatingPointError):
  """The loss became NaN or infinite; the last good checkpoint is left intact."""


def validate_config(config: ml_collections.ConfigDict, num_devices=None) -> tasks_lib.Task:
  """Checks the run-level config and the task's before any compute; returns the task."""
  task = tasks_lib.get(config.get("task", "uae"))
  task.validate(config)
  n_dev = num_devices or jax.device_count()
  if config.input.global_batch_size % n_dev:
    raise ConfigError(f"input.global_batch_size={config.input.global_batch_size} is not divisible "
                      f"by the {n_dev} devices")
  if common.total_steps(config) <= 0:
    raise ConfigError("train.total_steps (or num_epochs * num_train_examples) must be positive")
  return task


# Below this many state elements the init program's run time is negligible next to its compile.
_FAST_INIT_MAX_ELEMENTS = 20_000_000


def init_compiler_options(abstract_state):
  """XLA options for the one-shot init program: LLVM -O0 for small states on CPU, else none.

  The init program (a random draw per parameter) runs once. For the tiny configs of tests and
  `make demo` on CPU, -O0 halves its compile (9.0 -> 4.4 s for the tiny UAE) and its run time
  stays in milliseconds; values differ from -O2 in the last bits (at most 6e-8 measured there).
  Large states keep the default: there the unoptimised random draws would cost real time.
  """
  size = sum(x.size for x in jax.tree.leaves(nn.unbox(abstract_state)))
  if jax.default_backend() != "cpu" or size > _FAST_INIT_MAX_ELEMENTS:
    return None
  return {"xla_backend_optimization_level": 0}


class _Preemption:
  """Turns SIGTERM into a flag checked between steps, so the loop can save before exiting."""

  def __init__(self):
    self.requested = False
    self._old = None

  def __enter__(self):
    try:
      self._old = signal.signal(signal.SIGTERM, self._handler)
    except ValueError:  # not the main thread (e.g. inside some test runners)
      self._old = None
    return self

  def _handler(self, signum, frame):
    logging.warning("SIGTERM received: saving a checkpoint before exiting")
    self.requested = True

  def __exit__(self, *exc):
    if self._old is not None:
      signal.signal(signal.SIGTERM, self._old)


class Trainer:
  """Holds the compiled step, the placement and the state of one run; `run()` trains to the end."""

  def __init__(self, config: ml_collections.ConfigDict, workdir: str, devices=None):
    self.task = validate_config(config, len(devices) if devices is not None else None)
    self.config = config
    self.workdir = workdir
    self.is_main = jax.process_index() == 0
    self.total = common.total_steps(config)
    mesh = sharding_lib.make_mesh(config.mesh, devices)

    # Abstract state first: the full state never exists unsharded on one host.
    init_fn = functools.partial(self.task.init_state, config)
    boxed = jax.eval_shape(init_fn, jax.random.key(0))
    state_sh = sharding_lib.logical_shardings(boxed, mesh, config.sharding_rules)
    self.ctx = sharding_lib.Placement(
        mesh, state_sh, sharding_lib.abstract_with_shardings(nn.unbox(boxed), state_sh))
    self._init = jax.jit(lambda k: nn.unbox(init_fn(k)), out_shardings=state_sh,
                         compiler_options=init_compiler_options(boxed))
    # Frozen inputs of the step (e.g. LPIPS): not donated, not checkpointed, replicated.
    self.frozen = self.ctx.place(self.task.load_frozen(config), self.ctx.replicated)

    self.batch_keys = tuple(self.task.batch_spec(config))
    self._steps = {}  # phase -> jitted step; a task without phases has the one phase None
    # Runs on every process (evaluators gather per-example results across hosts).
    self.evaluator = self.task.make_evaluator(config, self.ctx, self.frozen)
    self.ckpt = ckpt_lib.CheckpointManager(ckpt_lib.checkpoint_dir(workdir),
                                           keep=config.ckpt.keep, async_save=config.ckpt.async_save)
    self.writer = MetricWriter(workdir, enabled=self.is_main)

  @property
  def state_sh(self):
    """NamedSharding per state leaf."""
    return self.ctx.state_sh

  @property
  def state_abs(self):
    """Abstract state carrying its shardings."""
    return self.ctx.state_abs

  def step_fn(self, step: int):
    """The jitted train step for the schedule phase host step `step` is in (built once each)."""
    phase = self.task.phase_at(self.config, step) if self.task.phase_at else None
    if phase not in self._steps:
      make = self.task.make_train_step
      fn = make(self.config, phase) if self.task.phase_at else make(self.config)
      self._steps[phase] = jax.jit(
          fn, in_shardings=(self.state_sh, {k: self.ctx.batch_sh for k in self.batch_keys}, None),
          out_shardings=(self.state_sh, None), donate_argnums=(0,))
    return self._steps[phase]

  def train_step(self, state, batch, frozen, step=None):
    """One update; `step` is the state's step number (read from the state when not given)."""
    step = int(jax.device_get(state["step"])) if step is None else step
    return self.step_fn(step)(state, batch, frozen)

  def initial_state(self, data_iter) -> tuple:
    """(state, start_step): resume from this workdir, else initialise as the task says."""
    restored = self.ckpt.restore_latest(self.state_abs, data_iter)
    if restored is not None:
      state, step = restored
      logging.info("resumed from %s step %d", self.ckpt.directory, step)
      return state, step
    state = self._init(jax.random.key(self.config.seed))
    return self.task.initialize(self.config, state, self.ctx), 0

  def global_batch(self, data_iter) -> dict:
    """The next host batch as global arrays of the keys the task's step reads."""
    batch = next(data_iter)
    return pipeline.to_global_array({k: batch[k] for k in self.batch_keys}, self.ctx.batch_sh)

  # ------------------------------------------------------------------ the loop
  def run(self) -> dict:
    """Trains to `total_steps`, checkpointing, logging and evaluating; returns a summary."""
    c = self.config
    data_iter = pipeline.make_train_iterator(c.input)
    state, start = self.initial_state(data_iter)
    summary = {"task": c.get("task", "uae"), "stage": c.get("stage"), "recipe": c.get("recipe"),
               "start_step": start, "total_steps": self.total}
    summary.update(self._start_of_run(start, state))
    progress = ProgressLine(self.total, c.input.global_batch_size, start)
    meta = {"task": summary["task"], "stage": c.get("stage"), "recipe": c.get("recipe"),
            "total_steps": self.total, "config": c.to_json_best_effort()}
    step = start
    # The newest value of every metric (device arrays, fetched only when logged): tasks that
    # alternate step kinds (G / D) report different keys per step, and a log line shows both.
    latest = {}
    with _Preemption() as preempt:
      while step < self.total:
        batch = self.global_batch(data_iter)
        t0 = time.time()
        state, metrics = self.train_step(state, batch, self.frozen, step)
        latest.update(metrics)
        step += 1
        if step == start + 1:
          jax.block_until_ready(metrics["loss"])
          summary["first_step_seconds"] = time.time() - t0
        last = step == self.total
        must_save = last or preempt.requested or step % c.ckpt.every_steps == 0
        if step % c.log_every_steps == 0 or last or must_save:
          self._log(step, latest, progress, write=step % c.log_every_steps == 0 or last)
        if must_save:
          self.ckpt.save(step, state, data_iter, dict(meta, step=step))
        if c.image_every_steps and (step % c.image_every_steps == 0 or last):
          self.writer.write_images(step, self.evaluator.images(state))
        if c.eval_every_steps and (step % c.eval_every_steps == 0 or last):
          summary["eval_end"] = self._eval_and_log(step, state)
        if preempt.requested and not last:
          self.ckpt.wait()
          logging.warning("stopped by SIGTERM at step %d after saving", step)
          summary["preempted_at"] = step
          break
    self.ckpt.wait()
    self.writer.flush()
    summary.update(final_step=step, images_per_sec=progress.images_per_sec)
    if self.is_main:
      (epath.Path(self.workdir) / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary

  def _start_of_run(self, start: int, state) -> dict:
    """Start-of-run eval and images on a fresh start; the first run's numbers on a resume."""
    start_file = epath.Path(self.workdir) / "eval_start.json"
    if not self.config.eval_every_steps:  # evaluation off: no start-of-run eval either
      return {}
    if start == 0:
      out = {"eval_start": self._eval_and_log(0, state)}
      if self.config.image_every_steps:
        self.writer.write_images(0, self.evaluator.images(state))
      if self.is_main:
        start_file.write_text(json.dumps(out["eval_start"]))
      return out
    return {"eval_start": json.loads(start_file.read_text())} if start_file.exists() else {}

  def _log(self, step: int, metrics, progress: ProgressLine, write: bool):
    """Fetches the step's metrics; stops on a non-finite value; writes them when `write`."""
    scalars = {k: float(v) for k, v in jax.device_get(metrics).items()}
    bad = [k for k, v in scalars.items() if not math.isfinite(v)]
    if bad:
      self.ckpt.wait()
      raise NonFiniteLossError(
          f"non-finite {bad} at step {step} (loss={scalars.get('loss')}); stopping. The last "
          f"good checkpoint (step {self.ckpt.latest_step()}) in {self.ckpt.directory} is intact.")
    if write:
      progress.update(step, scalars)
      scalars["images_per_sec"] = progress.images_per_sec or 0.0
      self.writer.write_scalars(step, scalars)

  def _eval_and_log(self, step: int, state) -> dict:
    """The task's evaluation, written as scalars and logged."""
    out = self.evaluator.evaluate(state)
    self.writer.write_scalars(step, out)
    logging.info("step %d eval: %s", step, " ".join(f"{k}={v:.4f}" for k, v in out.items()))
    return out

  def close(self):
    """Flushes writers and waits for checkpoints."""
    self.ckpt.close()
    self.writer.close()


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Runs one config in `workdir` (resuming if it holds checkpoints); returns its summary."""
  trainer = Trainer(config, workdir)
  try:
    return trainer.run()
  finally:
    trainer.close()
