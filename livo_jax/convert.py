"""PyTorch-layout state dicts <-> Flax NNX state, and the folders they live in.

The Flax models name their sub-modules exactly as the torch ones (see `models/layers.py`), so
one rule maps every parameter:

  flax path `a/0/b/kernel`    <-> torch key `a.0.b.weight`   (Linear: transposed;
                                                              Conv: [kh,kw,in,out] <-> [out,in,kh,kw])
  flax path `a/b/scale`       <-> torch key `a.b.weight`     (LayerNorm / GroupNorm)
  flax path `a/b/embedding`   <-> torch key `a.b.weight`     (Embedding)
  flax path `a/b/bias`        <-> torch key `a.b.bias`

Transposes are exact, and dtypes are kept as stored, so conversions are bit-exact both ways.
"""

from typing import Mapping

import numpy as np
from flax import nnx

from livo_jax.errors import WeightsError

_WEIGHT_LEAVES = ("kernel", "scale", "embedding")


def torch_key(path: tuple) -> str:
  """The torch state-dict key of a Flax parameter path."""
  *module, leaf = path
  if leaf not in _WEIGHT_LEAVES + ("bias",):
    raise ValueError(f"unexpected Flax parameter name {leaf!r} at {'/'.join(map(str, path))}")
  return ".".join(map(str, module)) + (".bias" if leaf == "bias" else ".weight")


def to_torch_layout(path: tuple, value: np.ndarray) -> np.ndarray:
  if path[-1] != "kernel":
    return value
  return value.T if value.ndim == 2 else value.transpose(3, 2, 0, 1)


def to_flax_layout(path: tuple, value: np.ndarray) -> np.ndarray:
  if path[-1] != "kernel":
    return value
  return value.T if value.ndim == 2 else value.transpose(2, 3, 1, 0)


def fill_from_torch(model: nnx.Module, tensors: Mapping[str, np.ndarray], source: str) -> None:
  """Sets every parameter of `model` (possibly abstract) from a torch-layout state dict.

  Raises `WeightsError` naming the missing, unexpected and mis-shaped keys; nothing is changed
  unless all keys match.
  """
  params = nnx.to_flat_state(nnx.state(model, nnx.Param))
  expected = {torch_key(path): (path, var) for path, var in params}
  missing = sorted(set(expected) - set(tensors))
  unexpected = sorted(set(tensors) - set(expected))
  mis_shaped = []
  converted = {}
  for key, (path, var) in expected.items():
    if key not in tensors:
      continue
    value = to_flax_layout(path, np.asarray(tensors[key]))
    if value.shape != tuple(var.shape):
      mis_shaped.append(f"{key}: file {tuple(tensors[key].shape)}, model expects "
                        f"{tuple(to_torch_layout(path, np.empty(var.shape, np.uint8)).shape)}")
    converted[key] = value
  if missing or unexpected or mis_shaped:
    raise WeightsError(_mismatch_message(source, missing, unexpected, mis_shaped))
  for key, (path, var) in expected.items():
    var.value = converted[key]


def torch_state_dict(model: nnx.Module) -> dict[str, np.ndarray]:
  """The model's parameters as a torch-layout state dict of numpy arrays (dtypes kept)."""
  return {torch_key(path): np.ascontiguousarray(to_torch_layout(path, np.asarray(var.value)))
          for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def _mismatch_message(source, missing, unexpected, mis_shaped, limit=8):
  def listing(title, keys):
    more = f" ... and {len(keys) - limit} more" if len(keys) > limit else ""
    return f"\n  {title} ({len(keys)}): " + ", ".join(keys[:limit]) + more
  parts = [f"{source}: weights do not match the model built from its config.json"]
  if missing:
    parts.append(listing("missing keys", missing))
  if unexpected:
    parts.append(listing("unexpected keys", unexpected))
  if mis_shaped:
    parts.append(listing("mis-shaped keys", mis_shaped))
  return "".join(parts)
