"""The device mesh, the partition rules (config data), and host-local batches -> global arrays.

The mesh has two axes: `data` (pure data parallelism) and `fsdp` (data parallelism whose devices
also split parameters). Batches are split over both. Parameters are placed by rules, in
big_vision's style: pairs (regex on the parameter path, rule), the first full match wins, where
the path reads "encoder/layers/0/mlp/fc1/kernel" and the rule is
  "fsdp"         split the largest axis that the `fsdp` size divides (replicate if none does),
  "replicated"   a full copy on every device,
  (None, "fsdp") an explicit PartitionSpec, one entry per leading axis.
The rule sets live in the config (`sharding.rules`, name -> pairs) and are chosen by name:
`sharding.trainable` for the value encoder and its optimizer state, `sharding.frozen` for the
frozen nets. Multi-slice runs add a DCN factor to the data axis (`mesh.dcn_data`).
"""

import re
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from livo_jax.errors import ConfigError

MESH_AXES = ("data", "fsdp")
BATCH_AXES = MESH_AXES          # the batch dimension is split over every device
FSDP, REPLICATED = "fsdp", "replicated"

# The shipped rule sets. Matrices and conv kernels (projections, embeddings) are split over
# `fsdp`; vectors (biases, norm scales) and scalars (step counts) are small and stay replicated.
PRESETS = {
    FSDP: ((r".*(kernel|embedding)$", FSDP), (r".*", REPLICATED)),
    REPLICATED: ((r".*", REPLICATED),),
}


def make_mesh(data: int, fsdp: int, dcn_data: int = 1,
              devices: Sequence[Any] | None = None) -> Mesh:
  """A `data` x `fsdp` mesh over all devices.

  `data` and `fsdp` are the sizes within one slice (one size may be -1: the remaining devices);
  `dcn_data` slices (TPU slices, or processes where devices have no slice) multiply the data
  axis, so that only data-parallel traffic crosses the slower network between them.
  """
  devices = list(jax.devices() if devices is None else devices)
  if dcn_data < 1 or len(devices) % dcn_data:
    raise ConfigError(f"mesh.dcn_data = {dcn_data}: must be a positive divisor of the "
                      f"{len(devices)} devices")
  data, fsdp = _slice_sizes(data, fsdp, len(devices) // dcn_data)
  auto = (AxisType.Auto,) * len(MESH_AXES)
  if dcn_data == 1:
    return jax.make_mesh((data, fsdp), MESH_AXES, axis_types=auto, devices=devices)
  # The granules are TPU slices where the devices span several, else processes (GPU hosts).
  slices = {getattr(device, "slice_index", 0) for device in devices}
  grid = mesh_utils.create_hybrid_device_mesh((data, fsdp), (dcn_data, 1), devices,
                                              process_is_granule=len(slices) == 1)
  return Mesh(grid, MESH_AXES, axis_types=auto)


def _slice_sizes(data: int, fsdp: int, n: int) -> tuple[int, int]:
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
                      f"does not use the {n} devices (of a slice)")
  return sizes["mesh.data"], sizes["mesh.fsdp"]


def rules_named(name: str, rule_sets: Mapping[str, Any], key: str) -> tuple:
  """The rule set `name` of `rule_sets` (the config's `sharding.rules`), checked."""
  if name not in rule_sets:
    raise ConfigError(f"{key} = {name!r}: expected one of sharding.rules' "
                      f"{sorted(rule_sets)}")
  rules = tuple(tuple(pair) for pair in rule_sets[name])
  for pair in rules:
    if len(pair) != 2:
      raise ConfigError(f"sharding.rules.{name}: {pair!r} is not a (regex, rule) pair")
    pattern, rule = pair
    try:
      re.compile(pattern)
    except (re.error, TypeError) as e:
      raise ConfigError(f"sharding.rules.{name}: bad regex {pattern!r}: {e}") from None
    if not (rule in (FSDP, REPLICATED) or isinstance(rule, (tuple, list))):
      raise ConfigError(f"sharding.rules.{name}: rule {rule!r} for {pattern!r}: expected "
                        f"{FSDP!r}, {REPLICATED!r} or a PartitionSpec tuple")
  return rules


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


def _spec(name: str, rule, shape: tuple, mesh: Mesh) -> P:
  fsdp_size = mesh.shape[FSDP]
  if rule == REPLICATED or (rule == FSDP and fsdp_size == 1):
    return P()
  if rule == FSDP:
    # The largest axis that splits evenly; replicate when none does.
    for axis in sorted(range(len(shape)), key=lambda a: -shape[a]):
      if shape[axis] % fsdp_size == 0:
        return P(*([None] * axis + [FSDP]))
    return P()
  spec = tuple(rule)
  splits = [(size, axis) for size, axis in zip(shape, spec) if axis is not None]
  if len(spec) > len(shape) or any(size % mesh.shape[axis] for size, axis in splits):
    raise ConfigError(f"sharding rule {rule!r} does not fit {name} of shape {shape} on mesh "
                      f"{dict(mesh.shape)}")
  return P(*spec)


def tree_shardings(mesh: Mesh, tree, rules=PRESETS[FSDP]):
  """NamedShardings for every leaf of `tree` (arrays or ShapeDtypeStructs), by `rules`."""
  compiled = [(re.compile(pattern), rule) for pattern, rule in rules]

  def leaf_sharding(path, leaf):
    name = path_name(path)
    for pattern, rule in compiled:
      if pattern.fullmatch(name):
        return NamedSharding(mesh, _spec(name, rule, np.shape(leaf), mesh))
    raise ConfigError(f"no sharding rule matches {name} (end a rule set with ('.*', ...))")

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
