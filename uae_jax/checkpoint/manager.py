"""Orbax checkpointing of the train state, the Grain iterator state and run metadata.

Items per step: 'state' (PyTree, restored onto concrete shardings), 'data_iter' (Grain iterator
state, one file per process) and 'meta' (JSON: config, stage, step). Saves are async; the
caller decides when (interval, end of stage, SIGTERM) and calls `wait()` before exiting.
"""
import os
from typing import Any, Optional

import grain
import jax
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

from uae_jax.errors import CheckpointError

ITEMS = ("state", "data_iter", "meta")


def checkpoint_dir(path: str) -> str:
  """The checkpoints directory of a workdir (or the directory itself if it is one), absolute."""
  path = path if "://" in path else os.path.abspath(path)
  return path if epath.Path(path).name == "checkpoints" else str(epath.Path(path) / "checkpoints")


def _restore_args(abstract):
  """Restore args that place every leaf on the sharding of the abstract target."""
  return jax.tree.map(lambda x: ocp.ArrayRestoreArgs(sharding=x.sharding, global_shape=x.shape,
                                                     dtype=x.dtype), abstract)


class CheckpointManager:
  """Thin wrapper over `ocp.CheckpointManager` so a later Orbax API change touches one file."""

  def __init__(self, directory: str, keep: int = 3, async_save: bool = True):
    # Object-store paths (gs://...) go to Orbax as they are; local ones are made absolute.
    self.directory = directory if "://" in directory else os.path.abspath(directory)
    self._mgr = ocp.CheckpointManager(
        self.directory, item_names=ITEMS,
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                             enable_async_checkpointing=async_save))

  def latest_step(self) -> Optional[int]:
    """The newest complete checkpoint step, or None."""
    return self._mgr.latest_step()

  def save(self, step: int, state: Any, data_iter: Any = None, meta: Optional[dict] = None):
    """Starts an (async) save of `state`, the iterator state and metadata at `step`."""
    args = {"state": ocp.args.PyTreeSave(state), "meta": ocp.args.JsonSave(meta or {})}
    if data_iter is not None:
      args["data_iter"] = grain.checkpoint.CheckpointSave(data_iter)
    self._mgr.save(step, args=ocp.args.Composite(**args), force=True)
    logging.info("checkpoint: saving step %d to %s", step, self.directory)

  def restore(self, step: int, abstract_state: Any, data_iter: Any = None) -> Any:
    """Restores the state onto the shardings of `abstract_state` (and the iterator in place)."""
    args = {"state": ocp.args.PyTreeRestore(item=abstract_state,
                                            restore_args=_restore_args(abstract_state))}
    if data_iter is not None:
      args["data_iter"] = grain.checkpoint.CheckpointRestore(data_iter)
    try:
      out = self._mgr.restore(step, args=ocp.args.Composite(**args))
    except (ValueError, KeyError, FileNotFoundError) as e:
      raise CheckpointError(f"cannot restore step {step} from {self.directory}: {e}") from e
    return out["state"]

  def restore_latest(self, abstract_state: Any, data_iter: Any = None):
    """(state, step) of the newest checkpoint, restored like `restore`; None if there is none."""
    step = self.latest_step()
    if step is None:
      return None
    return self.restore(step, abstract_state, data_iter), step

  def meta(self, step: int) -> dict:
    """The JSON metadata saved with `step`."""
    return self._mgr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

  def wait(self):
    """Blocks until pending async saves are on disk (call before exit)."""
    self._mgr.wait_until_finished()

  def close(self):
    """Waits for pending saves and releases the manager."""
    self._mgr.wait_until_finished()
    self._mgr.close()


def restore_subtrees(directory: str, abstract_subtrees: dict, step: Optional[int] = None,
                     with_progress: bool = False):
  """Partial restore of some top-level entries of a saved 'state' (e.g. {'ema', 'teacher'}).

  Used to start a stage from the previous stage's workdir; only the named subtrees are read.
  With `with_progress`, returns (subtrees, step, total_steps of that run or None if unrecorded).
  """
  ckpt_dir = checkpoint_dir(directory)
  if not epath.Path(ckpt_dir).is_dir():
    raise CheckpointError(f"no checkpoints directory at {ckpt_dir}")
  mgr = ocp.CheckpointManager(ckpt_dir, item_names=ITEMS)
  step = mgr.latest_step() if step is None else step
  if step is None:
    raise CheckpointError(f"{ckpt_dir} holds no complete checkpoint")
  args = ocp.args.PyTreeRestore(item=abstract_subtrees,
                                restore_args=_restore_args(abstract_subtrees),
                                partial_restore=True)
  try:
    out = mgr.restore(step, args=ocp.args.Composite(state=args))["state"]
  except (ValueError, KeyError) as e:
    raise CheckpointError(f"cannot read {sorted(abstract_subtrees)} from {ckpt_dir} step {step}: "
                          f"{e}") from e
  total = None
  if with_progress:
    try:
      meta = mgr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
      total = meta.get("total_steps")
    except (ValueError, KeyError, FileNotFoundError):
      total = None
  mgr.close()
  return (out, step, total) if with_progress else out
