"""Orbax checkpointing of the train state, the Grain iterator state and run metadata.

Items per step: 'state' (PyTree, restored onto concrete shardings), 'data_iter' (Grain iterator
state, one file per process) and 'meta' (JSON: config, stage, step). Saves are async; the
caller decides when (interval, end of stage, SIGTERM) and calls `wait()` before exiting.

Damage: a restore tries the steps newest -> oldest. A step whose save never finished (no commit
marker), whose metadata is missing or garbled, or whose arrays / iterator state cannot be read
is logged with the reason and skipped; once an older readable step is found, the skipped ones
are moved to `<checkpoints>/unreadable/<step>.<time>` (never deleted) and Orbax re-reads the
directory, so the next save of that step number does not collide. When no step is readable,
nothing is moved and a `CheckpointError` lists every step tried and why it failed.
"""
import contextlib
import gc
import json
import os
import sys
import time
from typing import Any, List, Optional, Tuple

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

from uae_jax.errors import CheckpointError

ITEMS = ("state", "data_iter", "meta")
UNREADABLE = "unreadable"       # sub-directory that receives damaged steps
COMMIT_MARKER = "commit_success.txt"
STEP_METADATA = "_CHECKPOINT_METADATA"


class UnreadableCheckpointError(CheckpointError):
  """One checkpoint step cannot be read (the restore falls back to an older one)."""


def checkpoint_dir(path: str) -> str:
  """The checkpoints directory of a workdir (or the directory itself if it is one), absolute."""
  path = path if "://" in path else os.path.abspath(path)
  return path if epath.Path(path).name == "checkpoints" else str(epath.Path(path) / "checkpoints")


def _restore_args(abstract):
  """Restore args that place every leaf on the sharding of the abstract target."""
  return jax.tree.map(lambda x: ocp.ArrayRestoreArgs(sharding=x.sharding, global_shape=x.shape,
                                                     dtype=x.dtype), abstract)


def _why(e: BaseException) -> str:
  """'Type: first line' of the root cause (Orbax wraps TensorStore's precise error in a vague one)."""
  for _ in range(5):
    inner = e.__cause__ or e.__context__
    if inner is None or not str(inner).strip():
      break
    e = inner
  text = str(e).strip().splitlines()[0] if str(e).strip() else "no detail"
  return f"{type(e).__name__}: {text[:300]}"


@contextlib.contextmanager
def _quiet_abandoned_reads():
  """Keeps the sibling reads Orbax abandons after a failed one from printing tracebacks.

  When one array of a damaged step fails, the other pending read coroutines are dropped and
  Python reports each as 'Exception ignored in <coroutine ...>' with a screenful of TensorStore
  spec; the failure itself is already reported once, so these go to the debug log.
  """
  old = sys.unraisablehook

  def hook(unraisable):
    """Debug-logs exceptions of abandoned coroutines; anything else goes to the usual hook."""
    if type(unraisable.object).__name__ == "coroutine":
      logging.debug("abandoned checkpoint read: %s", _why(unraisable.exc_value))
    else:
      old(unraisable)

  sys.unraisablehook = hook
  try:
    yield
  finally:
    gc.collect()  # finalise the abandoned coroutines while the hook is in place
    sys.unraisablehook = old


def _read_json(path: epath.Path, what: str) -> Any:
  """A JSON file's content, or UnreadableCheckpointError naming it."""
  try:
    return json.loads(path.read_text())
  except FileNotFoundError:
    raise UnreadableCheckpointError(f"{what} {path.name} is missing") from None
  except (ValueError, UnicodeDecodeError, OSError) as e:
    raise UnreadableCheckpointError(f"{what} {path.name} is not valid JSON ({_why(e)})") from None


def check_step_files(step_dir: epath.Path, items=("state",)) -> None:
  """Cheap structural check of a finalized step; raises UnreadableCheckpointError."""
  if not (step_dir / COMMIT_MARKER).exists():
    raise UnreadableCheckpointError(f"no commit marker ({COMMIT_MARKER}): the save did not finish")
  _read_json(step_dir / STEP_METADATA, "step metadata")
  for item in items:
    if not (step_dir / item).is_dir():
      raise UnreadableCheckpointError(f"item '{item}' is missing")
  if "state" in items:
    _read_json(step_dir / "state" / "_METADATA", "state metadata")
  if "data_iter" in items:
    pi, pc = jax.process_index(), jax.process_count()
    if not (step_dir / "data_iter" / f"process_{pi}-of-{pc}.json").exists():
      raise UnreadableCheckpointError(f"data-iterator state process_{pi}-of-{pc}.json is missing")


class _IteratorStateReader:
  """Stands in for the Grain iterator during a restore: keeps the saved state, applies nothing.

  Grain's handler calls `set_state` on the object it is given; restoring into this stand-in
  first means a step that turns out to be unreadable never leaves the real iterator half-restored.
  """

  def __init__(self):
    self.raw = None

  def set_state(self, state):
    """Keeps the raw saved state (bytes: Grain only json-decodes for its own iterator class)."""
    self.raw = state

  def start_prefetch(self):
    """Nothing to prefetch."""


def _apply_iterator_state(data_iter: Any, raw: Any) -> None:
  """Sets the saved state on the real iterator, or leaves it untouched and raises."""
  try:
    text = raw.decode() if isinstance(raw, bytes) else raw
    state = json.loads(text) if isinstance(data_iter, grain.DatasetIterator) else text.encode()
  except (ValueError, UnicodeDecodeError, AttributeError) as e:
    raise UnreadableCheckpointError(f"data-iterator state is not valid JSON ({_why(e)})") from None
  before = data_iter.get_state()
  try:
    data_iter.set_state(state)
  except Exception as e:  # pylint: disable=broad-except  # any failure: put the iterator back
    data_iter.set_state(before)
    raise UnreadableCheckpointError(f"data-iterator state does not fit ({_why(e)})") from None


def _all_processes_agree(ok: bool) -> bool:
  """True only if `ok` holds on every process (one host's unreadable shard fails them all)."""
  if jax.process_count() == 1:
    return ok
  from jax.experimental import multihost_utils
  return bool(np.all(multihost_utils.process_allgather(np.int32(ok))))


def move_aside(directory: str, step: int) -> str:
  """Moves step `step` to `<directory>/unreadable/<step>.<time>` (process 0); returns the path."""
  target = epath.Path(directory) / UNREADABLE / f"{step}.{time.strftime('%Y%m%d-%H%M%S')}"
  if jax.process_index() == 0:
    target.parent.mkdir(parents=True, exist_ok=True)
    n = 1
    while target.exists():  # two moves within one second
      target = target.with_name(f"{step}.{time.strftime('%Y%m%d-%H%M%S')}.{n}")
      n += 1
    (epath.Path(directory) / str(step)).rename(target)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(f"uae_jax.checkpoint.move_aside.{step}")
  return str(target)


def restore_with_fallback(mgr: ocp.CheckpointManager, directory: str, read_step, *,
                          steps=None, move: bool = True) -> Tuple[Any, int]:
  """(read_step(step), step) of the newest readable step, moving newer unreadable ones aside.

  `read_step(step)` raises UnreadableCheckpointError (or anything else: treated the same) for a
  damaged step. Raises CheckpointError listing every attempt when no step is readable.
  """
  steps = sorted(mgr.all_steps(), reverse=True) if steps is None else list(steps)
  tried: List[Tuple[int, str]] = []
  for step in steps:
    try:
      out, reason = read_step(step), ""
    except Exception as e:  # pylint: disable=broad-except  # damage shows up as many types
      out, reason = None, (str(e) if isinstance(e, UnreadableCheckpointError) else _why(e))
    if not _all_processes_agree(not reason):
      reason = reason or "unreadable on another process"
      logging.error("checkpoint step %d in %s is unreadable: %s", step, directory, reason)
      tried.append((step, reason))
      continue
    if tried:
      _set_aside(mgr, directory, tried, step, move)
    return out, step
  if tried:
    raise CheckpointError(
        f"no readable checkpoint in {directory}; tried " +
        "; ".join(f"step {s}: {r}" for s, r in tried) +
        ". Nothing was moved: inspect the steps, then move them away to start afresh.")
  raise CheckpointError(f"{directory} holds no complete checkpoint")


def _set_aside(mgr, directory: str, tried, fallback: int, move: bool) -> None:
  """Logs the fallback and moves the unreadable steps aside (then Orbax re-reads the dir)."""
  for step, _ in tried:
    where = move_aside(directory, step) if move else None
    logging.warning("restored step %d of %s instead of unreadable step %d%s", fallback, directory,
                    step, f" (moved to {where})" if where else "")
  if move:
    mgr.reload()


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
    """The newest finalized checkpoint step (readable or not), or None."""
    return self._mgr.latest_step()

  def all_steps(self) -> List[int]:
    """Every finalized step, oldest first."""
    return list(self._mgr.all_steps())

  def save(self, step: int, state: Any, data_iter: Any = None, meta: Optional[dict] = None):
    """Starts an (async) save of `state`, the iterator state and metadata at `step`."""
    args = {"state": ocp.args.PyTreeSave(state), "meta": ocp.args.JsonSave(meta or {})}
    if data_iter is not None:
      args["data_iter"] = grain.checkpoint.CheckpointSave(data_iter)
    self._mgr.save(step, args=ocp.args.Composite(**args), force=True)
    logging.info("checkpoint: saving step %d to %s", step, self.directory)

  def _read(self, step: int, abstract_state: Any, data_iter: Any = None) -> Any:
    """The state of `step` (and its iterator state applied to `data_iter`), or raises."""
    items = ("state", "data_iter") if data_iter is not None else ("state",)
    check_step_files(epath.Path(self.directory) / str(step), items)
    args = {"state": ocp.args.PyTreeRestore(item=abstract_state,
                                            restore_args=_restore_args(abstract_state))}
    reader = _IteratorStateReader()
    if data_iter is not None:
      args["data_iter"] = grain.checkpoint.CheckpointRestore(reader)
    try:
      with _quiet_abandoned_reads():
        out = self._mgr.restore(step, args=ocp.args.Composite(**args))
    except Exception as e:  # pylint: disable=broad-except  # TensorStore raises bare Exception
      raise UnreadableCheckpointError(f"cannot read its arrays ({_why(e)})") from None
    if data_iter is not None:
      _apply_iterator_state(data_iter, reader.raw)
    return out["state"]

  def restore(self, step: int, abstract_state: Any, data_iter: Any = None) -> Any:
    """Restores `step` onto the shardings of `abstract_state` (and the iterator); no fallback."""
    try:
      return self._read(step, abstract_state, data_iter)
    except UnreadableCheckpointError as e:
      raise CheckpointError(f"cannot restore step {step} from {self.directory}: {e}") from None

  def restore_latest(self, abstract_state: Any, data_iter: Any = None):
    """(state, step) of the newest readable checkpoint (state and iterator from the same step).

    None if there is no checkpoint; unreadable newer steps are logged and moved aside.
    """
    if self.latest_step() is None:
      return None
    return restore_with_fallback(
        self._mgr, self.directory, lambda s: self._read(s, abstract_state, data_iter))

  def meta(self, step: int) -> dict:
    """The JSON metadata saved with `step`."""
    try:
      return self._mgr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    except Exception as e:  # pylint: disable=broad-except
      raise CheckpointError(f"cannot read the metadata of step {step} in {self.directory}: "
                            f"{_why(e)}") from None

  def wait(self):
    """Blocks until pending async saves are on disk (call before exit)."""
    self._mgr.wait_until_finished()

  def close(self):
    """Waits for pending saves and releases the manager."""
    self._mgr.wait_until_finished()
    self._mgr.close()


def _read_subtrees(mgr, ckpt_dir: str, abstract_subtrees: dict, step: int,
                   with_progress: bool):
  """(subtrees, total_steps or None) of one step by a partial restore, or raises."""
  check_step_files(epath.Path(ckpt_dir) / str(step), ("state",))
  args = ocp.args.PyTreeRestore(item=abstract_subtrees,
                                restore_args=_restore_args(abstract_subtrees),
                                partial_restore=True)
  try:
    with _quiet_abandoned_reads():
      out = mgr.restore(step, args=ocp.args.Composite(state=args))["state"]
  except Exception as e:  # pylint: disable=broad-except  # TensorStore raises bare Exception
    raise UnreadableCheckpointError(
        f"cannot read {sorted(abstract_subtrees)} ({_why(e)})") from None
  total = None
  if with_progress:
    try:
      meta = mgr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
      total = meta.get("total_steps")
    except Exception:  # pylint: disable=broad-except  # progress is informational only
      total = None
  return out, total


def restore_subtrees(directory: str, abstract_subtrees: dict, step: Optional[int] = None,
                     with_progress: bool = False, move: bool = True):
  """Partial restore of some top-level entries of a saved 'state' (e.g. {'ema', 'teacher'}).

  Used to start a stage from the previous stage's workdir; only the named subtrees are read.
  Without `step`, the newest readable step is used (unreadable newer ones are logged and, with
  `move`, moved aside). With `with_progress`, returns (subtrees, step, total_steps of that run or
  None if unrecorded).
  """
  ckpt_dir = checkpoint_dir(directory)
  if not epath.Path(ckpt_dir).is_dir():
    raise CheckpointError(f"no checkpoints directory at {ckpt_dir}")
  mgr = ocp.CheckpointManager(ckpt_dir, item_names=ITEMS)
  try:
    if step is not None and step not in mgr.all_steps():
      raise CheckpointError(f"{ckpt_dir} has no step {step} (steps: {list(mgr.all_steps())})")
    (out, total), used = restore_with_fallback(
        mgr, ckpt_dir,
        lambda s: _read_subtrees(mgr, ckpt_dir, abstract_subtrees, s, with_progress),
        steps=None if step is None else [step], move=move and step is None)
  finally:
    mgr.close()
  return (out, used, total) if with_progress else out
