"""The one shape check of the package: loaded weights against the tree a model would create.

Every loader (converted DINOv2, discriminator backbone, official UAE checkpoint, LPIPS) compares the
params it produced with the abstract params of the model the config builds (`jax.eval_shape` of
`init`) and reports every difference at once:

    target = jax.eval_shape(model.init, jax.random.key(0), images)["params"]
    check_same_shapes(params, target, "init.encoder /path/to/dinov2")
"""
from typing import Any, Dict, Tuple

import flax.linen as nn
import jax
import numpy as np

from uae_jax.errors import LoadError


def _key_name(entry: Any) -> str:
  """One path entry (dict key, sequence index or attribute) as plain text."""
  for attr in ("key", "idx", "name"):
    if hasattr(entry, attr):
      return str(getattr(entry, attr))
  return str(entry)


def flat_shapes(tree: Any) -> Dict[str, Tuple[int, ...]]:
  """{'a/b/kernel': shape} of every leaf of a (possibly boxed) params tree or abstract tree."""
  leaves = jax.tree_util.tree_leaves_with_path(nn.unbox(tree))
  return {"/".join(_key_name(k) for k in path): tuple(int(s) for s in np.shape(leaf))
          for path, leaf in leaves}


def shape_problems(tree: Any, target: Any) -> list:
  """Every missing key, extra key and shape mismatch of `tree` against `target`, as text."""
  have, want = flat_shapes(tree), flat_shapes(target)
  missing = [f"{k} {want[k]}" for k in sorted(set(want) - set(have))]
  extra = [f"{k} {have[k]}" for k in sorted(set(have) - set(want))]
  problems = []
  if missing:
    problems.append("missing params [" + ", ".join(missing) + "]")
  if extra:
    problems.append("unexpected params [" + ", ".join(extra) + "]")
  problems += [f"{k} has shape {have[k]}, expected {want[k]}"
               for k in sorted(set(have) & set(want)) if have[k] != want[k]]
  return problems


def check_same_shapes(tree: Any, target: Any, what: str, *, error: type = LoadError) -> None:
  """Raises `error` (a LoadError by default) listing every difference between the two trees.

  `what` names the source (e.g. the file path); `target` may hold arrays, ShapeDtypeStructs or
  boxed (logically partitioned) leaves.
  """
  problems = shape_problems(tree, target)
  if problems:
    raise error(f"{what} does not match the model: " + "; ".join(problems))
