"""The device mesh, the partition rules, and host-local batches -> global arrays.

The mesh has two axes: `data` (pure data parallelism) and `fsdp` (data parallelism whose devices
also split the trainable parameters and optimizer state). Batches are split over both axes.
Parameters are placed by a few named rules, matched in order against the parameter's path
("encoder/layers/0/mlp/fc1/kernel"); the first match wins.
"""

import re
from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from livo_jax.errors import ConfigError

MESH_AXES = ("data", "fsdp")
BATCH_AXES = MESH_AXES          # the batch dimension is split over every device

FSDP = "fsdp"                   # rule value: split the largest axis that `fsdp` divides
REPLICATED = "replicated"

# Matrices and conv kernels (projections, embeddings) are split over `fsdp`; vectors (biases,
# norm scales) and scalars (step counts) are small and stay replicated. The value encoder and its
# optimizer state always follow these rules; the frozen nets do with `model.shard_frozen`.
FSDP_RULES = (
    (r".*(kernel|embedding)$", FSDP),
    (r".*", REPLICATED),
)
REPLICATED_RULES = ((r".*", REPLICATED),)


def make_mesh(data: int, fsdp: int, devices: Sequence[Any] | None = None) -> Mesh:
  """A `data` x `fsdp` mesh over all devices; one size may be -1 (the remaining devices)."""
  devices = list(jax.devices() if devices is None else devices)
  n = len(devices)
  sizes = {"mesh.data": data, "mesh.fsdp": fsdp}
  unknown = [k for k, v in sizes.items() if v == -1]
  if len(unknown) > 1:
    raise ConfigError("only one of mesh.data and mesh.fsdp can be -1")
  for key, value in sizes.items():
    if value != -1 and value < 1:
      raise ConfigError(f"{key} = {value}: must be a positive size or -1")
  known = int(np.prod([v for v in sizes.values() if v != -1]))
  if unknown:
    if n % known:
      raise ConfigError(f"{n} devices cannot be split into a mesh with "
                        f"{' x '.join(f'{k}={v}' for k, v in sizes.items())}")
    sizes[unknown[0]] = n // known
  if sizes["mesh.data"] * sizes["mesh.fsdp"] != n:
    raise ConfigError(f"mesh.data x mesh.fsdp = {sizes['mesh.data']} x {sizes['mesh.fsdp']} "
                      f"does not use the {n} devices")
  grid = np.asarray(devices).reshape(sizes["mesh.data"], sizes["mesh.fsdp"])
  return Mesh(grid, MESH_AXES)


def path_name(path) -> str:
  """A pytree key path as "a/b/0/c" (without the `value` leaf key of nnx Variables)."""
  parts = []
  for key in path:
    for attr in ("key", "name", "idx"):
      if hasattr(key, attr):
        parts.append(str(getattr(key, attr)))
        break
    else:
      parts.append(str(key))
  if parts and parts[-1] == "value":
    parts.pop()
  return "/".join(parts)


def _spec(rule: str, shape: tuple, fsdp_size: int) -> P:
  if rule == REPLICATED or fsdp_size == 1:
    return P()
  if rule == FSDP:
    # The largest axis that splits evenly; replicate when none does.
    for axis in sorted(range(len(shape)), key=lambda a: -shape[a]):
      if shape[axis] % fsdp_size == 0:
        return P(*([None] * axis + [FSDP]))
    return P()
  raise ValueError(f"unknown partition rule {rule!r}")


def tree_shardings(mesh: Mesh, tree, rules=FSDP_RULES):
  """NamedShardings for every leaf of `tree` (arrays or ShapeDtypeStructs), by `rules`."""
  fsdp_size = mesh.shape[FSDP]
  compiled = [(re.compile(pattern), rule) for pattern, rule in rules]

  def leaf_sharding(path, leaf):
    name = path_name(path)
    for pattern, rule in compiled:
      if pattern.fullmatch(name):
        return NamedSharding(mesh, _spec(rule, np.shape(leaf), fsdp_size))
    raise ValueError(f"no partition rule matches {name}")

  return jax.tree_util.tree_map_with_path(leaf_sharding, tree)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def to_host(mesh: Mesh, tree):
  """A full numpy copy of a (possibly sharded, multi-host) tree on every process.

  Every process must call it (it gathers over the mesh).
  """
  gathered = jax.jit(lambda t: t, out_shardings=replicated(mesh))(tree)
  return jax.tree.map(lambda x: np.asarray(x.addressable_data(0)), gathered)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over every device of the mesh."""
  return NamedSharding(mesh, P(BATCH_AXES))


def global_batch(mesh: Mesh, local_batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
  """This process's rows of a batch -> global arrays split over the mesh's batch axes."""
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local_batch.items()}
