"""Mesh construction and the mapping from logical parameter axes to mesh shardings."""
import dataclasses
from typing import Any, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

BATCH_AXES = ("data", "fsdp")


def make_mesh(mesh_config, devices: Sequence[Any] = None) -> jax.sharding.Mesh:
  """A ('data', 'fsdp') mesh from the config; one axis may be -1 (fill with what is left)."""
  devices = list(devices if devices is not None else jax.devices())
  shape = {name: int(mesh_config[name]) for name in BATCH_AXES}
  fill = [k for k, v in shape.items() if v == -1]
  if len(fill) > 1:
    raise ValueError(f"mesh: at most one axis may be -1, got {shape}")
  known = int(np.prod([v for v in shape.values() if v != -1]))
  if fill:
    if len(devices) % known:
      raise ValueError(f"mesh {shape}: {len(devices)} devices not divisible by {known}")
    shape[fill[0]] = len(devices) // known
  if int(np.prod(list(shape.values()))) != len(devices):
    raise ValueError(f"mesh {shape} needs {int(np.prod(list(shape.values())))} devices, "
                     f"have {len(devices)}")
  dev = np.asarray(devices).reshape([shape[n] for n in BATCH_AXES])
  # Auto axes: with_sharding_constraint must not act as an assert (jax 0.10 defaults to Explicit).
  return jax.sharding.Mesh(dev, BATCH_AXES, axis_types=(AxisType.Auto,) * len(BATCH_AXES))


def batch_sharding(mesh) -> NamedSharding:
  """Batch dimension split over every mesh axis (data parallel + FSDP)."""
  return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh) -> NamedSharding:
  """Fully replicated sharding."""
  return NamedSharding(mesh, P())


def _leaf_sharding(leaf, mesh, rules: dict):
  """Sharding of one (possibly LogicallyPartitioned) abstract leaf, replicating indivisible dims."""
  if not isinstance(leaf, nn.LogicallyPartitioned):
    return replicated(mesh)
  shape = leaf.value.shape
  spec = []
  for dim, name in zip(shape, leaf.names):
    axis = rules.get(name) if name is not None else None
    # Uneven shards are not allowed for jit arguments: fall back to replication for that dim.
    if axis is not None and dim % mesh.shape[axis] == 0:
      spec.append(axis)
    else:
      spec.append(None)
  return NamedSharding(mesh, P(*spec))


def logical_shardings(boxed_tree, mesh, rules) -> Any:
  """Concrete NamedShardings for a boxed (LogicallyPartitioned) abstract tree."""
  rules = dict(rules)
  return jax.tree.map(lambda x: _leaf_sharding(x, mesh, rules), boxed_tree,
                      is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))


@dataclasses.dataclass(frozen=True)
class Placement:
  """Where a run's arrays live: the mesh, the batch sharding and the state's shardings."""
  mesh: jax.sharding.Mesh
  state_sh: Any          # NamedSharding per state leaf
  state_abs: Any         # ShapeDtypeStructs of the state carrying those shardings

  @property
  def batch_sh(self) -> NamedSharding:
    """Batch dimension over every mesh axis."""
    return batch_sharding(self.mesh)

  @property
  def replicated(self) -> NamedSharding:
    """Fully replicated."""
    return replicated(self.mesh)

  def place(self, tree, shardings):
    """Host arrays -> global arrays with the given shardings (one sharding or a matching tree)."""
    if isinstance(shardings, jax.sharding.Sharding):
      return jax.tree.map(lambda x: jax.device_put(np.asarray(x), shardings), tree)
    return jax.tree.map(lambda x, s: jax.device_put(np.asarray(x), s), tree, shardings)


def abstract_with_shardings(abstract_tree, shardings):
  """ShapeDtypeStructs carrying concrete shardings (what Orbax needs to restore in place)."""
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      abstract_tree, shardings)
