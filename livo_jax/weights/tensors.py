"""Tensor files: safetensors and pickled torch state dicts in, safetensors and orbax out.

No torch is needed except for `.bin`/`.pth` files; safetensors are read with
`safetensors.numpy`. A Flax checkpoint (what `tools/convert_weights.py import` writes) keeps its
parameters in `flax_params/`, an orbax tree keyed by Flax parameter path.
"""

import json
import os
from typing import Any, Mapping

import numpy as np

from livo_jax.errors import WeightsError

FLAX_PARAMS_DIR = "flax_params"
_TORCH_PICKLE_SUFFIXES = (".bin", ".pth", ".pt")


def weights_files(folder: str, weights_name: str, bin_name: str,
                  variant: str | None = None) -> list[str]:
  """The torch weights file(s) of a component folder, preferring safetensors.

  `weights_name`/`bin_name` are the file stems (`diffusion_pytorch_model`, `model`, ...);
  `variant` picks e.g. `diffusion_pytorch_model.fp16.safetensors`.
  """
  suffix = f".{variant}" if variant else ""
  single = os.path.join(folder, f"{weights_name}{suffix}.safetensors")
  index = single + ".index.json"
  binary = os.path.join(folder, f"{bin_name}{suffix}.bin")
  if os.path.isfile(single):
    return [single]
  if os.path.isfile(index):
    try:
      with open(index) as f:
        shards = sorted(set(json.load(f)["weight_map"].values()))
    except (OSError, ValueError, KeyError, AttributeError) as e:
      raise WeightsError(f"{index}: unreadable shard index: {e!r}") from None
    return [os.path.join(folder, shard) for shard in shards]
  if os.path.isfile(binary):
    return [binary]
  raise WeightsError(f"{folder}: no weights file (looked for {os.path.basename(single)}, "
                     f"{os.path.basename(index)}, {os.path.basename(binary)})")


def read_tensors(path: str) -> dict[str, np.ndarray]:
  """One safetensors file, or a pickled torch state dict (`.bin`, `.pth`, `.pt`), as numpy."""
  if path.endswith(_TORCH_PICKLE_SUFFIXES):
    return _read_torch_pickle(path)
  from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
  try:
    return load_file(path)
  except Exception as e:  # safetensors raises several types for corrupt files
    raise WeightsError(f"{path}: unreadable safetensors file: {e}") from None


def read_all(paths: list[str]) -> dict[str, np.ndarray]:
  tensors = {}
  for path in paths:
    tensors.update(read_tensors(path))
  return tensors


def _read_torch_pickle(path: str) -> dict[str, np.ndarray]:
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise WeightsError(f"{path}: reading .bin weights needs torch (pip install torch), or "
                       "convert the folder to safetensors first") from None
  try:
    state = torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:  # pickle, zip and torch errors alike
    raise WeightsError(f"{path}: unreadable torch file: {e}") from None
  # numpy has no bfloat16 view through torch, so go through float32 and back exactly.
  import ml_dtypes  # pylint: disable=g-import-not-at-top
  return {k: (v.float().numpy().astype(ml_dtypes.bfloat16) if v.dtype == torch.bfloat16
              else v.numpy()) for k, v in state.items()}


def write_safetensors(tensors: Mapping[str, np.ndarray], path: str) -> None:
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  save_file(dict(tensors), path, metadata={"format": "pt"})


def is_flax_checkpoint(folder: str) -> bool:
  return os.path.isdir(os.path.join(folder, FLAX_PARAMS_DIR))


def read_flax_params(folder: str) -> dict[str, np.ndarray]:
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  path = os.path.abspath(os.path.join(folder, FLAX_PARAMS_DIR))
  try:
    nested = ocp.StandardCheckpointer().restore(path)
  except Exception as e:  # orbax/tensorstore errors
    raise WeightsError(f"{path}: unreadable Flax checkpoint: {e}") from None
  return dict(_flatten(nested))


def write_flax_params(tensors: Mapping[str, np.ndarray], folder: str) -> None:
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  nested: dict[str, Any] = {}
  for key, value in tensors.items():
    *parents, leaf = key.split("/")
    node = nested
    for name in parents:
      node = node.setdefault(name, {})
    node[leaf] = value
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(os.path.abspath(os.path.join(folder, FLAX_PARAMS_DIR)), nested)
  checkpointer.wait_until_finished()


def _flatten(nested, prefix=""):
  for name, value in nested.items():
    key = f"{prefix}/{name}" if prefix else str(name)
    if isinstance(value, Mapping):
      yield from _flatten(value, key)
    else:
      yield key, np.asarray(value)
