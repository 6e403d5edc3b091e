"""Block layout (scanned or unrolled) of a saved training state, read from Orbax metadata.

Models never touch Orbax: `uae_jax.models.scan_utils` converts layouts, this module only reads
which layout a previous run saved, so that starting a stage from it (init.from_stage) with the
other `model.*.scan_blocks` fails with a clear message instead of a deep Orbax tree mismatch.
"""
from typing import Any, Mapping, Optional

from etils import epath

from uae_jax.checkpoint import manager as ckpt_lib
from uae_jax.models import scan_utils


def saved_state_tree(directory: str) -> Optional[Any]:
  """Orbax metadata tree of the newest readable saved 'state' under a workdir or checkpoints dir."""
  import orbax.checkpoint as ocp
  ckpt_dir = ckpt_lib.checkpoint_dir(directory)
  if not epath.Path(ckpt_dir).is_dir():
    return None
  mgr = ocp.CheckpointManager(ckpt_dir, item_names=ckpt_lib.ITEMS,
                              item_handlers={"state": ocp.PyTreeCheckpointHandler()})
  try:
    # Damaged steps are skipped here; the restore itself reports and moves them aside.
    for step in sorted(mgr.all_steps(), reverse=True):
      try:
        ckpt_lib.check_step_files(epath.Path(ckpt_dir) / str(step))
        meta = mgr.item_metadata(step)["state"]
      except Exception:  # pylint: disable=broad-except  # any damage: try an older step
        continue
      return getattr(meta, "tree", meta)
    return None
  finally:
    mgr.close()


def checkpoint_layout_error(directory: str, target_params: Mapping,
                            subtree: str = "ema") -> Optional[str]:
  """A message if the saved `state[subtree]` and `target_params` differ in block layout, else None."""
  saved = saved_state_tree(directory)
  if not saved or subtree not in saved:
    return None  # nothing to compare; the restore itself reports missing checkpoints
  problems = []
  for comp in scan_utils.COMPONENTS:
    if comp not in saved[subtree] or comp not in target_params:
      continue
    have = scan_utils.is_stacked(saved[subtree][comp])
    want = scan_utils.is_stacked(target_params[comp])
    if None not in (have, want) and have != want:
      problems.append(f"model.{comp}.scan_blocks: checkpoint was saved with "
                      f"scan_blocks={have}, this config has scan_blocks={want}")
  if not problems:
    return None
  return (f"init.from_stage={directory!r} has a different block layout: " + "; ".join(problems)
          + ". Use the same model.*.scan_blocks as the previous stage, or convert its params "
          "with uae_jax.models.scan_utils.stack_blocks / unstack_blocks.")
