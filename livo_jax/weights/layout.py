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
Filling is all or nothing: a missing, unexpected or mis-shaped key, or one holding NaN/inf, is a
`WeightsError` naming it, never a silently random parameter nor, later, a black image.
"""

from typing import Callable, Mapping

import jax.numpy as jnp
import numpy as np
from flax import nnx

from livo_jax.errors import WeightsError

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
  return to_torch_layout(path, np.empty(shape, np.uint8)).shape


# How a file names and lays out each parameter: torch state dicts, and our Flax checkpoints.
_TORCH = dict(key_fn=torch_key, to_model=to_flax_layout, file_shape=_torch_shape)
_CHECKPOINT = dict(key_fn=flax_key, to_model=lambda path, value: value,
                   file_shape=lambda path, shape: shape)


def _check(model: nnx.Module, tensors: Mapping[str, np.ndarray], source: str, *,
           key_fn: Callable, to_model: Callable, file_shape: Callable) -> dict:
  """{key: (path, var)} of `model`'s parameters, once `tensors` match them all and are finite."""
  params = nnx.to_flat_state(nnx.state(model, nnx.Param))
  expected = {key_fn(path): (path, var) for path, var in params}
  missing = sorted(set(expected) - set(tensors))
  unexpected = sorted(set(tensors) - set(expected))
  mis_shaped = [
      f"{key}: file {tuple(tensors[key].shape)}, model expects "
      f"{tuple(file_shape(path, tuple(var.shape)))}"
      for key, (path, var) in expected.items()
      if key in tensors and to_model(path, tensors[key]).shape != tuple(var.shape)]
  if missing or unexpected or mis_shaped:
    raise WeightsError(mismatch_message(source, missing, unexpected, mis_shaped))
  for key in expected:
    _require_finite(tensors[key], key, source)
  return expected


def _require_finite(value: np.ndarray, key: str, source: str) -> None:
  """A NaN or inf weight (what a diverged training run writes) would only make black images."""
  value = np.asarray(value)
  if jnp.issubdtype(value.dtype, jnp.floating) and not np.isfinite(value).all():
    bad = np.count_nonzero(~np.isfinite(value))
    raise WeightsError(f"{source}: non-finite weights in {key} ({bad:,} of {value.size:,} "
                       "values are NaN or inf)")


def _fill(model: nnx.Module, tensors: Mapping[str, np.ndarray], source: str, rule: dict,
          dtype=None) -> None:
  """Sets every parameter of `model` (possibly abstract) from `tensors`, all or nothing."""
  for key, (path, var) in _check(model, tensors, source, **rule).items():
    var.set_value(jnp.asarray(rule["to_model"](path, np.asarray(tensors[key])), dtype=dtype))


def check_torch(model: nnx.Module, tensors: Mapping[str, np.ndarray], source: str) -> None:
  """Raises the `WeightsError` that `fill_from_torch` would, and changes nothing."""
  _check(model, tensors, source, **_TORCH)


def check_checkpoint(model: nnx.Module, tensors: Mapping[str, np.ndarray], source: str) -> None:
  """Raises the `WeightsError` that `fill_from_checkpoint` would, and changes nothing."""
  _check(model, tensors, source, **_CHECKPOINT)


def fill_from_torch(model: nnx.Module, tensors: Mapping[str, np.ndarray], source: str,
                    dtype=None) -> None:
  """Sets every parameter of `model` from a torch-layout state dict.

  Raises `WeightsError` naming the missing, unexpected and mis-shaped keys, or a key holding
  NaN/inf; nothing is changed unless all keys pass. `dtype` casts the parameters (None keeps
  the stored dtypes).
  """
  _fill(model, tensors, source, _TORCH, dtype)


def fill_from_checkpoint(model: nnx.Module, tensors: Mapping[str, np.ndarray], source: str,
                         dtype=None) -> None:
  """As `fill_from_torch`, for a Flax checkpoint keyed by `flax_key` paths."""
  _fill(model, tensors, source, _CHECKPOINT, dtype)


def torch_state_dict(model: nnx.Module) -> dict[str, np.ndarray]:
  """The model's parameters as a torch-layout state dict of numpy arrays (dtypes kept)."""
  # `order="C"` rather than `np.ascontiguousarray`, which makes a scalar (`logit_scale`) 1-D.
  return {torch_key(path): np.asarray(to_torch_layout(path, np.asarray(var.get_value())),
                                      order="C")
          for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def flax_state_dict(model: nnx.Module) -> dict[str, np.ndarray]:
  """The model's parameters keyed by `flax_key` paths (dtypes kept)."""
  return {flax_key(path): np.asarray(var.get_value())
          for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param))}


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
