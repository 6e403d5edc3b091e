"""The seam between the one trainer and the kinds of model it trains.

A task is one module here exporting `TASK`, a `Task` of pure functions of the config. The trainer
(`uae_jax/train.py`) owns the mesh, data, checkpoints, metrics and the loop; a task owns its model,
state layout, step and evaluation. A new model kind is a new module and a config naming it in
`config.task`; it never edits the trainer or another task.
"""
import dataclasses
import importlib
from typing import Any, Callable, Optional

from uae_jax.errors import ConfigError

# config.task -> module path; modules are imported on demand so a task's dependencies stay its own.
REGISTRY = {
    "uae": "uae_jax.tasks.uae",
    "qgvae": "uae_jax.tasks.qgvae",
    "kl_vae": "uae_jax.tasks.kl_vae",
    "dit": "uae_jax.tasks.dit",
}


@dataclasses.dataclass(frozen=True)
class Task:
  """What the trainer needs from a kind of model; every function is pure unless it says I/O.

  validate(config)                      raise ConfigError for anything wrong before any compute.
  batch_spec(config)                    {key: ShapeDtypeStruct} of ONE example of a train batch
                                        (the pipeline's keys the step reads, leading dim 1).
  init_state(config, rng)               fresh train state (a dict with 'step', 'params', ...),
                                        boxed with logical axis names for sharding inference.
  frozen_spec(config, rng)              boxed abstract-able init of the frozen, non-donated inputs
                                        of the step (LPIPS, a discriminator backbone, a frozen
                                        tokenizer), or None when there are none.
  load_frozen(config, frozen_abs)       I/O through the models' `load(...)`: host arrays for the
                                        frozen inputs, or None to keep the random init of
                                        `frozen_spec` (toy runs; announce it).
  initialize(config, state, ctx)        I/O: start-of-run weights (pretrained encoder, previous
                                        stage...) put into a freshly initialised, placed state.
  make_train_step(config[, phase])      `(state, batch, frozen) -> (state, metrics)`, jittable.
  phase_at(config, step)                optional: a hashable naming the phase of a schedule the
                                        host step number is in (e.g. which GAN parts are on).
                                        The trainer compiles one step per phase, built with
                                        `make_train_step(config, phase)`, instead of paying for
                                        every phase's work behind a traced `lax.cond`.
  make_evaluator(config, ctx, frozen)   an object with `evaluate(state) -> {name: float}` and
                                        `images(state) -> {name: (N, H, W, 3) array}`.
`ctx` is the trainer's `sharding.Placement` (mesh, state shardings, abstract state, `place`).
  """
  validate: Callable[..., None]
  batch_spec: Callable[..., dict]
  init_state: Callable[..., dict]
  make_train_step: Callable[..., Callable]
  make_evaluator: Callable[..., Any]
  initialize: Callable[..., dict]
  frozen_spec: Optional[Callable[..., Any]] = None
  load_frozen: Optional[Callable[..., Any]] = None
  phase_at: Optional[Callable[..., Any]] = None


def get(name: str) -> Task:
  """The `Task` registered under `name` (config.task)."""
  if name not in REGISTRY:
    raise ConfigError(f"task={name!r}: expected one of {sorted(REGISTRY)}")
  return importlib.import_module(REGISTRY[name]).TASK
