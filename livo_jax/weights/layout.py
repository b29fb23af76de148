"""The one rule between Flax parameter paths and PyTorch state-dict keys, and filling models by it.

The Flax models name their sub-modules exactly as the torch ones (see `models/layers.py`), so
one rule maps every parameter:

  flax path `a/0/b/kernel`    <-> torch key `a.0.b.weight`   (Linear: transposed;
                                                              Conv: [kh,kw,in,out] <-> [out,in,kh,kw])
  flax path `a/b/scale`       <-> torch key `a.b.weight`     (LayerNorm / GroupNorm)
  flax path `a/b/embedding`   <-> torch key `a.b.weight`     (Embedding)
  flax path `a/b/bias`        <-> torch key `a.b.bias`
  flax path `a/b/name`        <-> torch key `a.b.name`     (any other name: a bare parameter,
                                                              e.g. CLIP's `class_embedding`)

Transposes are exact and dtypes are kept as stored, so conversions are bit-exact both ways.
The rule applies to arrays and to `tensors.Tensor`s alike (lazy: read from their file when
asked), so that a conversion reads, lays out and writes one tensor at a time. Filling is all or
nothing: a missing, unexpected or mis-shaped key, or one holding NaN/inf, is a `WeightsError`
naming it, never a silently random parameter nor, later, a black image.
"""

from typing import Any, Callable, Mapping

import jax.numpy as jnp
import numpy as np
from flax import nnx

from livo_jax.errors import WeightsError
from livo_jax.weights.tensors import Tensor

_WEIGHT_LEAVES = ("kernel", "scale", "embedding")


def torch_key(path: tuple) -> str:
  """The torch state-dict key of a Flax parameter path."""
  *module, leaf = path
  if leaf in _WEIGHT_LEAVES:
    path = (*module, "weight")
  return ".".join(map(str, path))  # `bias` and bare parameters keep their names


def flax_key(path: tuple) -> str:
  """The key of a Flax parameter path in a Flax checkpoint."""
  return "/".join(map(str, path))


def to_torch_layout(path: tuple, value: np.ndarray) -> np.ndarray:
  if path[-1] != "kernel":
    return value
  return value.T if value.ndim == 2 else value.transpose(3, 2, 0, 1)


def to_flax_layout(path: tuple, value: np.ndarray) -> np.ndarray:
  if path[-1] != "kernel":
    return value
  return value.T if value.ndim == 2 else value.transpose(2, 3, 1, 0)


def _torch_shape(path: tuple, shape: tuple) -> tuple:
  return to_torch_layout(path, Tensor(shape, np.uint8, read=None)).shape


# How a file names and lays out each parameter: torch state dicts, and our Flax checkpoints.
_TORCH = dict(key_fn=torch_key, to_model=to_flax_layout, file_shape=_torch_shape)
_CHECKPOINT = dict(key_fn=flax_key, to_model=lambda path, value: value,
                   file_shape=lambda path, shape: shape)


def _parameters(model: nnx.Module):
  return nnx.to_flat_state(nnx.state(model, nnx.Param))


def _match(model: nnx.Module, tensors: Mapping[str, Any], source: str, *, key_fn: Callable,
           to_model: Callable, file_shape: Callable) -> dict[tuple, Tensor]:
  """{path: tensor in the model's layout} of `model`'s parameters, once `tensors` (arrays or
  `Tensor`s, so nothing is read) match them all; each is checked finite when it is read."""
  expected = {key_fn(path): (path, var) for path, var in _parameters(model)}
  missing = sorted(set(expected) - set(tensors))
  unexpected = sorted(set(tensors) - set(expected))
  mis_shaped = []
  for key, (path, var) in expected.items():
    shape = tuple(file_shape(path, tuple(var.shape)))
    if key in tensors and tuple(tensors[key].shape) != shape:
      mis_shaped.append(f"{key}: file {tuple(tensors[key].shape)}, model expects {shape}")
  if missing or unexpected or mis_shaped:
    raise WeightsError(mismatch_message(source, missing, unexpected, mis_shaped))
  return {path: _finite_when_read(to_model(path, tensors[key]), key, source)
          for key, (path, var) in expected.items()}


def _finite_when_read(value, key: str, source: str) -> Tensor:
  """A NaN or inf weight (what a diverged training run writes) would only make black images."""
  def read():
    array = np.asarray(value)
    if jnp.issubdtype(array.dtype, jnp.floating) and not np.isfinite(array).all():
      bad = np.count_nonzero(~np.isfinite(array))
      raise WeightsError(f"{source}: non-finite weights in {key} ({bad:,} of {array.size:,} "
                         "values are NaN or inf)")
    return array
  return Tensor(value.shape, value.dtype, read)


def from_torch(model: nnx.Module, tensors: Mapping[str, Any], source: str) -> dict[tuple, Tensor]:
  """A torch-layout state dict's tensors as `model`'s parameters: {Flax path: tensor}.

  Raises `WeightsError` naming the missing, unexpected and mis-shaped keys; reads nothing. Each
  tensor is read (from its file, if a `Tensor`) and laid out as the model's parameter when it
  is asked for (`np.asarray`), and raises `WeightsError` then if it holds NaN/inf.
  """
  return _match(model, tensors, source, **_TORCH)


def from_checkpoint(model: nnx.Module, tensors: Mapping[str, Any],
                    source: str) -> dict[tuple, Tensor]:
  """As `from_torch`, for a Flax checkpoint keyed by `flax_key` paths."""
  return _match(model, tensors, source, **_CHECKPOINT)


def fill(model: nnx.Module, tensors: Mapping[tuple, Any], dtype=None) -> None:
  """Sets every parameter of `model` (possibly abstract) from {path: tensor}, all or nothing.

  Every tensor is read (and so checked, from `from_torch`) before any parameter is set. `dtype`
  casts the parameters (None keeps the stored dtypes).
  """
  values = {path: jnp.asarray(np.asarray(value), dtype=dtype) for path, value in tensors.items()}
  for path, var in _parameters(model):
    var.set_value(values[path])


def fill_from_torch(model: nnx.Module, tensors: Mapping[str, Any], source: str,
                    dtype=None) -> None:
  """Sets every parameter of `model` from a torch-layout state dict.

  Raises `WeightsError` naming the missing, unexpected and mis-shaped keys, or a key holding
  NaN/inf; nothing is changed unless all keys pass. `dtype` casts the parameters (None keeps
  the stored dtypes).
  """
  fill(model, from_torch(model, tensors, source), dtype)


def parameters(model: nnx.Module) -> dict[tuple, np.ndarray]:
  """The model's parameters, {Flax path: value} (dtypes kept)."""
  return {path: np.asarray(var.get_value()) for path, var in _parameters(model)}


def to_torch(tensors: Mapping[tuple, Any]) -> dict[str, Any]:
  """{Flax path: tensor} as a torch-layout state dict (a `Tensor` stays one, read when asked)."""
  return {torch_key(path): to_torch_layout(path, value) for path, value in tensors.items()}


def to_checkpoint(tensors: Mapping[tuple, Any]) -> dict[str, Any]:
  """{Flax path: tensor} keyed by `flax_key` paths, as a Flax checkpoint holds them."""
  return {flax_key(path): value for path, value in tensors.items()}


def torch_state_dict(model: nnx.Module) -> dict[str, np.ndarray]:
  """The model's parameters as a torch-layout state dict of numpy arrays (dtypes kept)."""
  return to_torch(parameters(model))


def flax_state_dict(model: nnx.Module) -> dict[str, np.ndarray]:
  """The model's parameters keyed by `flax_key` paths (dtypes kept)."""
  return to_checkpoint(parameters(model))


def mismatch_message(source: str, missing, unexpected=(), mis_shaped=(), limit: int = 8) -> str:
  """"<source>: weights do not match the model" and the key lists (the first `limit` of each)."""
  def listing(title, keys):
    more = f" ... and {len(keys) - limit} more" if len(keys) > limit else ""
    return f"\n  {title} ({len(keys)}): " + ", ".join(keys[:limit]) + more
  parts = [f"{source}: weights do not match the model"]
  if missing:
    parts.append(listing("missing keys", missing))
  if unexpected:
    parts.append(listing("unexpected keys", unexpected))
  if mis_shaped:
    parts.append(listing("mis-shaped keys", mis_shaped))
  return "".join(parts)
