"""Tensor files: safetensors and pickled torch state dicts in, safetensors and orbax out.

No torch is needed except for `.bin`/`.pth` files; safetensors are read with
`safetensors.numpy`. A Flax checkpoint (what `tools/convert_weights.py import` writes) keeps its
parameters in `flax_params/`, an orbax tree keyed by Flax parameter path.
"""

import asyncio
import concurrent.futures
import json
import os
from typing import Any, Mapping

import numpy as np

from livo_jax.errors import WeightsError

FLAX_PARAMS_DIR = "flax_params"
_ORBAX_TREE = "_METADATA"   # orbax's list of the leaves a checkpoint holds
_TORCH_PICKLE_SUFFIXES = (".bin", ".pth", ".pt")


def weights_names(weights_name: str, bin_name: str,
                  variant: str | None = None) -> tuple[str, str, str]:
  """The file names a torch component may keep its weights in, in the order they are
  preferred: one safetensors file, a shard index, a pickled `.bin`.

  `weights_name`/`bin_name` are the file stems (`diffusion_pytorch_model`, `model`, ...). A
  `variant` ("fp16") goes where transformers and diffusers put it:
  `model.fp16.safetensors`, `model.safetensors.index.fp16.json`, `pytorch_model.fp16.bin`.
  """
  suffix = f".{variant}" if variant else ""
  return (f"{weights_name}{suffix}.safetensors",
          f"{weights_name}.safetensors.index{suffix}.json", f"{bin_name}{suffix}.bin")


def weights_files(folder: str, weights_name: str, bin_name: str,
                  variant: str | None = None) -> list[str]:
  """The torch weights file(s) of a component folder, preferring safetensors
  (`weights_names`)."""
  single, index, binary = (os.path.join(folder, name) for name in
                           weights_names(weights_name, bin_name, variant))
  if os.path.isfile(single):
    return [single]
  if os.path.isfile(index):
    return [os.path.join(folder, shard) for shard in shard_names(index)]
  if os.path.isfile(binary):
    return [binary]
  raise WeightsError(f"{folder}: no weights file (looked for {os.path.basename(single)}, "
                     f"{os.path.basename(index)}, {os.path.basename(binary)})")


def shard_names(index: str) -> list[str]:
  """The shard files a `*.safetensors.index*.json` names, sorted."""
  try:
    with open(index) as f:
      return sorted(set(json.load(f)["weight_map"].values()))
  except (OSError, ValueError, KeyError, AttributeError) as e:
    raise WeightsError(f"{index}: unreadable shard index: {e!r}") from None


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
  # safetensors creates the file 0600; readers may be other users (the umask decides, as for
  # every file we write).
  os.chmod(path, 0o666 & ~_umask())


def _umask() -> int:
  """The process's umask, read without setting it (`os.umask` would, racing other threads)."""
  try:
    with open("/proc/self/status") as f:
      for line in f:
        if line.startswith("Umask:"):
          return int(line.split()[1], 8)
  except OSError:
    pass
  return 0o022


def is_flax_checkpoint(folder: str) -> bool:
  return os.path.isdir(os.path.join(folder, FLAX_PARAMS_DIR))


def read_flax_params(folder: str) -> dict[str, np.ndarray]:
  """A Flax checkpoint's parameters, keyed by Flax path.

  Read with tensorstore from orbax's tree file, not with orbax's `restore` or `metadata`: when
  one read fails (a truncated file) they close their event loop with the other reads still in
  flight, and each of those then prints an "Event loop is closed" traceback. Here every read
  settles first.
  """
  path = os.path.abspath(os.path.join(folder, FLAX_PARAMS_DIR))
  try:
    with open(os.path.join(path, _ORBAX_TREE), encoding="utf-8") as f:
      tree = json.load(f)
    keys = [tuple(k["key"] for k in leaf["key_metadata"])
            for leaf in tree["tree_metadata"].values()]
    arrays = _finish_in_thread(asyncio.run, _read_arrays(
        path, [".".join(key) for key in keys], tree.get("use_zarr3", False)))
  except Exception as e:  # file, JSON, orbax and tensorstore errors
    raise WeightsError(f"{path}: unreadable Flax checkpoint ({type(e).__name__}: {e})") from None
  return {"/".join(key): array for key, array in zip(keys, arrays)}


async def _read_arrays(path: str, names: list[str], use_zarr3: bool) -> list[np.ndarray]:
  """orbax's arrays `names` (dotted Flax paths); the first failure once all reads settled."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  import tensorstore as ts  # pylint: disable=g-import-not-at-top
  from etils import epath  # pylint: disable=g-import-not-at-top
  handlers = ocp.type_handlers
  ocdbt = handlers.is_ocdbt_checkpoint(epath.Path(path))
  context = handlers.get_ts_context(use_ocdbt=ocdbt)

  async def read(name):
    info = handlers.ParamInfo(name=name, parent_dir=epath.Path(path), is_ocdbt_checkpoint=ocdbt,
                              use_zarr3=use_zarr3, ts_context=context)
    store = await ts.open(handlers.get_json_tspec_read(info, use_ocdbt=ocdbt), open=True,
                          context=context)
    return await store.read()

  arrays = await asyncio.gather(*map(read, names), return_exceptions=True)
  for array in arrays:
    if isinstance(array, BaseException):
      raise array
  return arrays


def _finish_in_thread(fn, *args):
  """fn(*args) in a thread of its own, waited for to the end even when interrupted.

  Ctrl-C or SIGTERM reach the main thread, which then waits here until every orbax and
  tensorstore operation has settled: none is left in flight to print an "Event loop is closed"
  traceback, or to write into a partial folder that the interrupt is removing. (In a thread,
  `asyncio.run` also works where the caller already runs a loop, as in a notebook.)
  """
  with concurrent.futures.ThreadPoolExecutor(1) as pool:
    return pool.submit(fn, *args).result()


def write_flax_params(tensors: Mapping[str, np.ndarray], folder: str) -> None:
  nested: dict[str, Any] = {}
  for key, value in tensors.items():
    *parents, leaf = key.split("/")
    node = nested
    for name in parents:
      node = node.setdefault(name, {})
    node[leaf] = value
  _finish_in_thread(_save_checkpoint, os.path.abspath(os.path.join(folder, FLAX_PARAMS_DIR)),
                    nested)


def _save_checkpoint(path: str, nested: dict[str, Any]) -> None:
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(path, nested)
  checkpointer.wait_until_finished()
