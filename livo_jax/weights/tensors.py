"""Tensor files: safetensors and pickled torch state dicts in, safetensors and orbax out.

No torch is needed except for `.bin`/`.pth` files. A Flax checkpoint (what
`tools/convert_weights.py import` writes) keeps its parameters in `flax_params/`, an orbax tree
keyed by Flax parameter path.

Files are read and written a tensor at a time: opening a safetensors file or a Flax checkpoint
reads its keys, shapes and dtypes only, and each `Tensor`'s values are read when asked for
(`np.asarray(t)`); the writers ask for a tensor (orbax's, for a group of WRITE_GROUP_BYTES),
write it and drop it before the next. A conversion (`weights/conversion.py`) so holds a tensor,
or a group, in memory, never the model.
"""

import asyncio
import concurrent.futures
import functools
import json
import math
import os
import struct
import threading
from typing import Any, Callable, Mapping

import ml_dtypes
import numpy as np

from livo_jax.errors import WeightsError

FLAX_PARAMS_DIR = "flax_params"
_ORBAX_TREE = "_METADATA"   # orbax's list of the leaves a checkpoint holds
_TORCH_PICKLE_SUFFIXES = (".bin", ".pth", ".pt")
# The safetensors format: an 8-byte little-endian header size, the JSON header
# ({key: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}, offsets into
# the data that follows it), then the tensors' bytes, C order, little-endian.
_SAFETENSORS_DTYPES = {name: np.dtype(dtype) for name, dtype in (
    ("F64", np.float64), ("F32", np.float32), ("F16", np.float16), ("BF16", ml_dtypes.bfloat16),
    ("F8_E4M3", ml_dtypes.float8_e4m3fn), ("F8_E5M2", ml_dtypes.float8_e5m2),
    ("I64", np.int64), ("I32", np.int32), ("I16", np.int16), ("I8", np.int8),
    ("U64", np.uint64), ("U32", np.uint32), ("U16", np.uint16), ("U8", np.uint8),
    ("BOOL", np.bool_))}
_SAFETENSORS_NAMES = {dtype: name for name, dtype in _SAFETENSORS_DTYPES.items()}
# A Flax checkpoint is written in groups of arrays of about this size (`_save_checkpoint`).
WRITE_GROUP_BYTES = 256 * 2**20


class Tensor:
  """A stored tensor: its shape and dtype, and its values read when asked (`np.asarray(t)`).

  Each ask reads again; nothing is kept. `.T` and `.transpose(...)` give the transposed tensor,
  as lazily, so that `layout`'s rules apply to tensors as to arrays.
  """

  def __init__(self, shape: tuple[int, ...], dtype, read: Callable[[], np.ndarray]):
    self.shape = tuple(shape)
    self.dtype = np.dtype(dtype)
    self._read = read

  @property
  def ndim(self) -> int:
    return len(self.shape)

  @property
  def size(self) -> int:
    return math.prod(self.shape)

  @property
  def nbytes(self) -> int:
    return self.size * self.dtype.itemsize

  @property
  def T(self) -> "Tensor":  # pylint: disable=invalid-name
    return self.transpose(*reversed(range(self.ndim)))

  def transpose(self, *axes: int) -> "Tensor":
    return Tensor(tuple(self.shape[a] for a in axes), self.dtype,
                  lambda: self._read().transpose(axes))

  def __array__(self, dtype=None, copy=None) -> np.ndarray:
    del copy   # every read is a new array
    value = self._read()
    return value if dtype is None else value.astype(dtype, copy=False)

  def __repr__(self) -> str:
    return f"Tensor({self.shape}, {self.dtype})"


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


def open_tensors(path: str) -> dict[str, "np.ndarray | Tensor"]:
  """A safetensors file's `Tensor`s (keys, shapes and dtypes read now, values when asked), or
  a pickled torch state dict's arrays (`.bin`, `.pth`, `.pt`: the file is read whole)."""
  if path.endswith(_TORCH_PICKLE_SUFFIXES):
    return _read_torch_pickle(path)
  try:
    with open(path, "rb") as f:
      file_size = os.fstat(f.fileno()).st_size
      (header_size,) = struct.unpack("<Q", f.read(8))
      if header_size > file_size - 8:
        raise ValueError(f"a header of {header_size:,} bytes in a file of {file_size:,}")
      header = json.loads(f.read(header_size))
    header.pop("__metadata__", None)
    return {key: _stored_tensor(path, 8 + header_size, file_size - 8 - header_size, key, entry)
            for key, entry in header.items()}
  except (OSError, ValueError, TypeError, KeyError, AttributeError, struct.error) as e:
    raise WeightsError(
        f"{path}: unreadable safetensors file ({type(e).__name__}: {e})") from None


def _stored_tensor(path: str, data_start: int, data_size: int, key: str, entry) -> Tensor:
  dtype = _SAFETENSORS_DTYPES[entry["dtype"]]
  shape = tuple(entry["shape"])
  begin, end = entry["data_offsets"]
  if not (all(isinstance(n, int) and n >= 0 for n in (*shape, begin, end))
          and end - begin == math.prod(shape) * dtype.itemsize and end <= data_size):
    raise ValueError(f"{key}: data_offsets {[begin, end]} do not hold {entry['dtype']} "
                     f"{list(shape)} within the {data_size:,} bytes of data")
  return Tensor(shape, dtype, functools.partial(_read_stored, path, key, dtype, shape,
                                                data_start + begin))


def _read_stored(path: str, key: str, dtype: np.dtype, shape: tuple, offset: int) -> np.ndarray:
  try:
    return np.fromfile(path, dtype, math.prod(shape), offset=offset).reshape(shape)
  except (OSError, ValueError) as e:   # the file changed since it was opened
    raise WeightsError(f"{path}: unreadable safetensors file: {key}: {e}") from None


def open_all(paths: list[str]) -> dict[str, "np.ndarray | Tensor"]:
  tensors = {}
  for path in paths:
    tensors.update(open_tensors(path))
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
  return {k: (v.float().numpy().astype(ml_dtypes.bfloat16) if v.dtype == torch.bfloat16
              else v.numpy()) for k, v in state.items()}


def write_safetensors(tensors: Mapping[str, Any], path: str) -> None:
  """Writes arrays or `Tensor`s as one safetensors file, reading each only to write it."""
  header, offset = {"__metadata__": {"format": "pt"}}, 0
  for key, value in tensors.items():
    dtype = np.dtype(value.dtype)
    if dtype not in _SAFETENSORS_NAMES:
      raise ValueError(f"{key}: safetensors has no dtype {dtype}")
    end = offset + math.prod(value.shape) * dtype.itemsize
    header[key] = {"dtype": _SAFETENSORS_NAMES[dtype], "shape": list(value.shape),
                   "data_offsets": [offset, end]}
    offset = end
  text = json.dumps(header, separators=(",", ":")).encode()
  text += b" " * (-len(text) % 8)   # the data 8-byte aligned, as safetensors pads it
  with open(path, "wb") as f:
    f.write(struct.pack("<Q", len(text)) + text)
    for value in tensors.values():
      f.write(np.ascontiguousarray(value).reshape(-1).view(np.uint8))
  # Created with the umask (as every file we write): readers may be other users.
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


def open_flax_params(folder: str) -> dict[str, Tensor]:
  """A Flax checkpoint's parameters as `Tensor`s keyed by Flax path (values read when asked).

  Read with tensorstore from orbax's tree file, not with orbax's `restore` or `metadata`: when
  one read fails (a truncated file) they close their event loop with the other reads still in
  flight, and each of those then prints an "Event loop is closed" traceback. Here there is no
  event loop: every open settles before an error is raised, and each read is waited for.
  """
  path = os.path.abspath(os.path.join(folder, FLAX_PARAMS_DIR))
  try:
    with open(os.path.join(path, _ORBAX_TREE), encoding="utf-8") as f:
      tree = json.load(f)
    keys = [tuple(k["key"] for k in leaf["key_metadata"])
            for leaf in tree["tree_metadata"].values()]
    stores = _open_arrays(path, [".".join(key) for key in keys], tree.get("use_zarr3", False))
  except Exception as e:  # file, JSON, orbax and tensorstore errors
    raise _unreadable_checkpoint(path, e) from None
  return {"/".join(key): Tensor(store.shape, store.dtype.numpy_dtype,
                                functools.partial(_read_array, path, store))
          for key, store in zip(keys, stores)}


def _unreadable_checkpoint(path: str, e: Exception) -> WeightsError:
  return WeightsError(f"{path}: unreadable Flax checkpoint ({type(e).__name__}: {e})")


def _open_arrays(path: str, names: list[str], use_zarr3: bool) -> list:
  """orbax's arrays `names` (dotted Flax paths), opened; the first failure once all settled."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  import tensorstore as ts  # pylint: disable=g-import-not-at-top
  from etils import epath  # pylint: disable=g-import-not-at-top
  handlers = ocp.type_handlers
  ocdbt = handlers.is_ocdbt_checkpoint(epath.Path(path))
  context = handlers.get_ts_context(use_ocdbt=ocdbt)
  opening = []
  for name in names:
    info = handlers.ParamInfo(name=name, parent_dir=epath.Path(path), is_ocdbt_checkpoint=ocdbt,
                              use_zarr3=use_zarr3, ts_context=context)
    opening.append(ts.open(handlers.get_json_tspec_read(info, use_ocdbt=ocdbt), open=True,
                           context=context))
  for future in opening:
    future.exception()   # waits for it
  return [future.result() for future in opening]


def _read_array(path: str, store) -> np.ndarray:
  try:
    return store.read().result()
  except Exception as e:  # tensorstore's errors (a truncated file)
    raise _unreadable_checkpoint(path, e) from None


def _finish_in_thread(fn, *args, on_interrupt: Callable[[], None]):
  """fn(*args) in a thread of its own, waited for to the end even when interrupted.

  Ctrl-C or SIGTERM reach the main thread, which calls `on_interrupt` (that asks `fn` to stop
  early) and then waits here until every orbax and tensorstore operation has settled: none is
  left in flight to print an "Event loop is closed" traceback, or to write into a partial
  folder that the interrupt is removing. (In a thread, orbax's event loops also work where the
  caller already runs one, as in a notebook.)
  """
  with concurrent.futures.ThreadPoolExecutor(1) as pool:
    future = pool.submit(fn, *args)
    try:
      return future.result()
    except KeyboardInterrupt:
      on_interrupt()
      raise


def write_flax_params(tensors: Mapping[str, Any], folder: str) -> None:
  """Writes arrays or `Tensor`s keyed by Flax path as `folder/flax_params/` (orbax), a group
  of WRITE_GROUP_BYTES at a time."""
  nested: dict[str, Any] = {}
  for key, value in tensors.items():
    *parents, leaf = key.split("/")
    node = nested
    for name in parents:
      node = node.setdefault(name, {})
    node[leaf] = value
  stop = threading.Event()
  _finish_in_thread(_save_checkpoint, os.path.abspath(os.path.join(folder, FLAX_PARAMS_DIR)),
                    nested, stop, on_interrupt=stop.set)


def _save_checkpoint(path: str, nested: dict[str, Any], stop: threading.Event) -> None:
  """orbax's checkpoint of `nested`, its leaves read and written a group at a time until `stop`.

  orbax's own numpy handler copies every array first and then writes them all at once (the
  whole model in memory twice). Ours reads leaves (`np.asarray`, which reads a `Tensor`) until
  they hold WRITE_GROUP_BYTES, writes them and drops them before reading the next group; each
  array is written by orbax's handler as before, so the checkpoint is the same. (Writing one
  array at a time would make each its own OCDBT commit, and every commit rewrites the tree of
  all keys so far: the 686 commits of a UNet add ~180 MB to its checkpoint, and time; the
  medium UNet of bench/presets.py took 309 MB instead of 130 MB.) A read's error is raised
  here once orbax has finished, not in orbax's threads, which log it as an ERROR traceback.
  """
  import jax  # pylint: disable=g-import-not-at-top
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  failed = []

  class InGroups(ocp.type_handlers.NumpyHandler):
    async def _background_serialize(self, values, infos, args):   # orbax 0.12's hook
      write = super()._background_serialize
      group, group_bytes = [], 0
      for value, info, arg in zip(values, infos, args):
        if stop.is_set():
          break
        try:
          array = np.asarray(value)
        except Exception as e:  # pylint: disable=broad-except
          failed.append(e)
          break
        group.append(asyncio.ensure_future(write([array], [info], [arg])))
        group_bytes += array.nbytes
        if group_bytes >= WRITE_GROUP_BYTES:
          await asyncio.gather(*group)
          group, group_bytes = [], 0
      await asyncio.gather(*group)

  handler = InGroups(deepcopy_host_arrays=False)
  registry = ocp.type_handlers.create_type_handler_registry(
      (np.ndarray, handler), (Tensor, handler),
      # orbax warns that it keeps no array metadata without a jax.Array handler.
      (jax.Array, ocp.type_handlers.get_type_handler(jax.Array)))
  ocp.Checkpointer(ocp.PyTreeCheckpointHandler(type_handler_registry=registry)).save(path,
                                                                                     nested)
  if failed:
    raise failed[0]
