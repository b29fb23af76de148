"""PyTorch-layout weights <-> Flax NNX models, and the folders they live in.

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

Three folder formats are read:
- HF/diffusers torch folders: `config.json` + `model.safetensors` /
  `diffusion_pytorch_model.safetensors` (or sharded with an index, or `.bin` when torch is
  installed);
- Flax checkpoints written by `save_flax` (`tools/convert_weights.py import`): the original
  `config.json` + `flax_params/` (orbax), keyed by Flax parameter path;
- whole diffusers SD folders (`model_index.json`, `unet/ vae/ text_encoder/ ...`) by the
  pipeline functions at the bottom.
"""

import dataclasses
import importlib
import json
import os
import shutil
import tempfile
from typing import Any, Callable, Mapping

import jax.numpy as jnp
import numpy as np
from flax import nnx

from livo_jax.errors import ConfigError, WeightsError
from livo_jax.models.configs import config_to_dict, read_json_object

FLAX_PARAMS_DIR = "flax_params"
CONFIG_NAME = "config.json"
_WEIGHT_LEAVES = ("kernel", "scale", "embedding")


# ---------------------------------------------------------------------------------------------
# The parameter rule.

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


def _fill(model: nnx.Module, tensors: Mapping[str, np.ndarray], source: str, *,
          key_fn: Callable, to_model: Callable, file_shape: Callable, dtype=None) -> None:
  """Sets every parameter of `model` (possibly abstract) from `tensors`, all or nothing."""
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
    raise WeightsError(_mismatch_message(source, missing, unexpected, mis_shaped))
  for key, (path, var) in expected.items():
    var.set_value(jnp.asarray(to_model(path, np.asarray(tensors[key])), dtype=dtype))


def fill_from_torch(model: nnx.Module, tensors: Mapping[str, np.ndarray], source: str,
                    dtype=None) -> None:
  """Sets every parameter of `model` from a torch-layout state dict.

  Raises `WeightsError` naming the missing, unexpected and mis-shaped keys; nothing is changed
  unless all keys match. `dtype` casts the parameters (None keeps the stored dtypes).
  """
  _fill(model, tensors, source, key_fn=torch_key, to_model=to_flax_layout,
        file_shape=_torch_shape, dtype=dtype)


def fill_from_checkpoint(model: nnx.Module, tensors: Mapping[str, np.ndarray], source: str,
                         dtype=None) -> None:
  """As `fill_from_torch`, for a Flax checkpoint (`save_flax`) keyed by `flax_key` paths."""
  _fill(model, tensors, source, key_fn=flax_key, to_model=lambda path, value: value,
        file_shape=lambda path, shape: shape, dtype=dtype)


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


def _mismatch_message(source, missing, unexpected, mis_shaped, limit=8):
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


# ---------------------------------------------------------------------------------------------
# The model kinds and how their torch folders differ.

@dataclasses.dataclass(frozen=True)
class ModelKind:
  name: str
  module: str                       # the livo_jax.models module defining the classes
  model_class: str
  config_class: str
  weights_name: str                 # file stem of the torch safetensors weights
  bin_name: str                     # file stem of the pickled torch weights
  class_tags: Mapping[str, Any]     # written into config.json so the torch classes accept it
  save_prefix: str = ""             # prefix of the torch keys we write
  strip_prefixes: tuple[str, ...] = ()   # accepted on read
  buffers: tuple[str, ...] = ()     # non-parameter tensors some files hold; dropped on read
  renames: tuple[tuple[str, str], ...] = ()  # legacy key fragments -> current ones

  # Imported on first use, so that the parameter rule above needs no model module.
  @property
  def model_cls(self) -> type:
    return getattr(importlib.import_module(self.module), self.model_class)

  @property
  def config_cls(self) -> type:
    return getattr(importlib.import_module(self.module), self.config_class)

  def normalise_keys(self, tensors: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    out = {}
    for key, value in tensors.items():
      for prefix in self.strip_prefixes:
        if key.startswith(prefix):
          key = key[len(prefix):]
          break
      if key in self.buffers:
        continue
      for old, new in self.renames:
        key = key.replace(old, new)
      out[key] = value
    return out


CLIP_TEXT = ModelKind(
    name="clip_text", module="livo_jax.models.clip", model_class="CLIPTextModel",
    config_class="CLIPTextConfig",
    weights_name="model", bin_name="pytorch_model",
    class_tags={"architectures": ["CLIPTextModel"], "model_type": "clip_text_model"},
    # transformers 4.x nests the model under `text_model.`; 5.x reads both, so we write it.
    save_prefix="text_model.", strip_prefixes=("text_model.",),
    buffers=("embeddings.position_ids",))
CLIP = ModelKind(
    name="clip", module="livo_jax.models.clip", model_class="CLIPModel",
    config_class="CLIPConfig",
    weights_name="model", bin_name="pytorch_model",
    class_tags={"architectures": ["CLIPModel"], "model_type": "clip"},
    # No prefix to strip: `text_model.` and `vision_model.` name the towers here.
    buffers=("text_model.embeddings.position_ids", "vision_model.embeddings.position_ids"))
UNET = ModelKind(
    name="unet", module="livo_jax.models.unet", model_class="UNet2DConditionModel",
    config_class="UNetConfig",
    weights_name="diffusion_pytorch_model", bin_name="diffusion_pytorch_model",
    class_tags={"_class_name": "UNet2DConditionModel"})
VAE = ModelKind(
    name="vae", module="livo_jax.models.vae", model_class="AutoencoderKL",
    config_class="VAEConfig",
    weights_name="diffusion_pytorch_model", bin_name="diffusion_pytorch_model",
    class_tags={"_class_name": "AutoencoderKL"},
    # diffusers < 0.15 named the VAE attention projections differently (SD 1.5's file does).
    renames=tuple((f".attentions.0.{old}.", f".attentions.0.{new}.") for old, new in
                  (("query", "to_q"), ("key", "to_k"), ("value", "to_v"),
                   ("proj_attn", "to_out.0"))))
KINDS = {kind.name: kind for kind in (CLIP_TEXT, CLIP, UNET, VAE)}


def kind_of_folder(folder: str) -> ModelKind:
  """Which model a component folder (torch or Flax) holds, from its config.json."""
  raw = read_config(folder)
  if raw.get("_class_name") == "UNet2DConditionModel":
    return UNET
  if raw.get("_class_name") == "AutoencoderKL":
    return VAE
  if (raw.get("model_type") == "clip_text_model"
      or "CLIPTextModel" in (raw.get("architectures") or ())):
    return CLIP_TEXT
  if raw.get("model_type") == "clip" or "CLIPModel" in (raw.get("architectures") or ()):
    return CLIP
  raise ConfigError(
      f"{os.path.join(folder, CONFIG_NAME)}: cannot tell the model kind (expected `_class_name` "
      "UNet2DConditionModel/AutoencoderKL, or `model_type` clip_text_model/clip)")


# ---------------------------------------------------------------------------------------------
# Reading and writing files.

def read_config(folder: str) -> dict[str, Any]:
  return read_json_object(os.path.join(folder, CONFIG_NAME),
                          missing_hint=" (not a model folder?)")


def weights_files(folder: str, kind: ModelKind, variant: str | None = None) -> list[str]:
  """The torch weights file(s) of a component folder, preferring safetensors."""
  suffix = f".{variant}" if variant else ""
  single = os.path.join(folder, f"{kind.weights_name}{suffix}.safetensors")
  index = single + ".index.json"
  binary = os.path.join(folder, f"{kind.bin_name}{suffix}.bin")
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


_TORCH_PICKLE_SUFFIXES = (".bin", ".pth", ".pt")


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


# ---------------------------------------------------------------------------------------------
# Loading and saving one model.

def load_model(folder: str, kind: ModelKind | None = None, *, dtype=jnp.float32,
               param_dtype=None, variant: str | None = None, **model_kwargs) -> nnx.Module:
  """Builds a Flax model from a torch or Flax component folder.

  Args:
    folder: HF/diffusers component folder, or a Flax checkpoint from `save_flax`.
    kind: which model; read from config.json when None.
    dtype: compute dtype.
    param_dtype: storage dtype of the parameters; None keeps the file's dtypes.
    variant: torch weights variant, e.g. "fp16" for `diffusion_pytorch_model.fp16.safetensors`.
    **model_kwargs: passed to the model constructor (`remat`, `attention_impl`).
  """
  kind = kind or kind_of_folder(folder)
  config = kind.config_cls.from_dict(read_config(folder),
                                     source=os.path.join(folder, CONFIG_NAME))
  model = nnx.eval_shape(lambda: kind.model_cls(config, rngs=nnx.Rngs(0), dtype=dtype,
                                                **model_kwargs))
  if is_flax_checkpoint(folder):
    fill_from_checkpoint(model, read_flax_params(folder),
                         os.path.join(folder, FLAX_PARAMS_DIR), dtype=param_dtype)
  else:
    files = weights_files(folder, kind, variant)
    tensors = {}
    for path in files:
      tensors.update(read_tensors(path))
    source = files[0] if len(files) == 1 else folder
    fill_from_torch(model, kind.normalise_keys(tensors), source, dtype=param_dtype)
  return model


def export_config(model: nnx.Module, kind: ModelKind,
                  base_config: Mapping[str, Any] | None = None) -> dict[str, Any]:
  """The config.json to write for `model`: its config over `base_config`, plus class tags."""
  raw = dict(base_config or {})
  raw.update(config_to_dict(model.config))
  raw.update(kind.class_tags)
  return raw


def save_pretrained(model: nnx.Module, folder: str, kind: ModelKind | None = None, *,
                    base_config: Mapping[str, Any] | None = None) -> None:
  """Writes a torch-layout folder (config.json + safetensors) that transformers/diffusers load.

  `base_config` is an original config.json to keep fields we do not model (pipeline hints,
  library versions); the model's own config fields always win.
  """
  kind = kind or kind_for_model(model)
  tensors = {kind.save_prefix + k: v for k, v in torch_state_dict(model).items()}
  os.makedirs(folder, exist_ok=True)
  _write_json(export_config(model, kind, base_config), os.path.join(folder, CONFIG_NAME))
  write_safetensors(tensors, os.path.join(folder, f"{kind.weights_name}.safetensors"))


def save_flax(model: nnx.Module, folder: str, kind: ModelKind | None = None, *,
              base_config: Mapping[str, Any] | None = None) -> None:
  """Writes a Flax checkpoint folder: config.json + `flax_params/` (orbax)."""
  kind = kind or kind_for_model(model)
  os.makedirs(folder, exist_ok=True)
  _write_json(export_config(model, kind, base_config), os.path.join(folder, CONFIG_NAME))
  write_flax_params(flax_state_dict(model), folder)


def kind_for_model(model: nnx.Module) -> ModelKind:
  for kind in KINDS.values():
    if isinstance(model, kind.model_cls):
      return kind
  raise TypeError(f"no folder format for {type(model).__name__}")


def _write_json(obj, path: str) -> None:
  with open(path, "w") as f:
    json.dump(obj, f, indent=2, sort_keys=False)
    f.write("\n")


# ---------------------------------------------------------------------------------------------
# Whole diffusers SD folders and the import/export tool.

PIPELINE_COMPONENTS = ("text_encoder", "unet", "vae")


def is_pipeline_folder(folder: str) -> bool:
  return os.path.isfile(os.path.join(folder, "model_index.json"))


def import_folder(src: str, dst: str) -> list[str]:
  """Torch folder (component or whole SD) -> Flax checkpoint folder. Returns what it wrote."""
  return _convert_folder(src, dst, _import_component)


def export_folder(src: str, dst: str) -> list[str]:
  """Flax checkpoint folder (component or whole SD) -> torch folder. Returns what it wrote."""
  return _convert_folder(src, dst, _export_component)


def _import_component(src: str, dst: str) -> str:
  kind = kind_of_folder(src)
  save_flax(load_model(src, kind), dst, kind, base_config=read_config(src))
  return f"{dst} ({kind.name}, Flax)"


def _export_component(src: str, dst: str) -> str:
  if not is_flax_checkpoint(src):
    raise WeightsError(f"{src}: not a Flax checkpoint (no {FLAX_PARAMS_DIR}/); "
                       "`export` takes what `import` wrote")
  kind = kind_of_folder(src)
  save_pretrained(load_model(src, kind), dst, kind, base_config=read_config(src))
  return f"{dst} ({kind.name}, torch layout)"


def _convert_folder(src: str, dst: str, convert_component) -> list[str]:
  """Converts into a temporary sibling of `dst`, renamed on success: no half-written output."""
  if not os.path.isdir(src):
    raise FileNotFoundError(f"{src}: no such folder")
  if os.path.exists(dst) and (not os.path.isdir(dst) or os.listdir(dst)):
    raise FileExistsError(f"{dst}: exists and is not empty; choose a new destination")
  dst = os.path.abspath(dst)
  os.makedirs(os.path.dirname(dst), exist_ok=True)
  partial = tempfile.mkdtemp(prefix=os.path.basename(dst) + ".partial-",
                             dir=os.path.dirname(dst))
  try:
    if is_pipeline_folder(src):
      written = [_convert_entry(src, partial, name, convert_component)
                 for name in sorted(os.listdir(src))]
    else:
      written = [convert_component(src, partial)]
    if os.path.isdir(dst):
      os.rmdir(dst)  # empty, checked above
    os.rename(partial, dst)
  finally:
    shutil.rmtree(partial, ignore_errors=True)
  return [line.replace(partial, dst) for line in written]


def _convert_entry(src: str, dst: str, name: str, convert_component) -> str:
  source, target = os.path.join(src, name), os.path.join(dst, name)
  if name in PIPELINE_COMPONENTS and os.path.isdir(source):
    return convert_component(source, target)
  if os.path.isdir(source):
    shutil.copytree(source, target)
  else:
    shutil.copy2(source, target)
  return f"{target} (copied)"


def describe_folder(folder: str) -> dict[str, dict[str, Any]]:
  """Keys, shapes and dtypes per component: {component: {"kind", "format", "tensors"}}."""
  if is_pipeline_folder(folder):
    return {name: _describe_component(os.path.join(folder, name))
            for name in PIPELINE_COMPONENTS if os.path.isdir(os.path.join(folder, name))}
  return {os.path.basename(os.path.normpath(folder)): _describe_component(folder)}


def _describe_component(folder: str) -> dict[str, Any]:
  kind = kind_of_folder(folder)
  if is_flax_checkpoint(folder):
    fmt, tensors = "flax", read_flax_params(folder)
  else:
    tensors = {}
    for path in weights_files(folder, kind):
      tensors.update(read_tensors(path))
    fmt = "torch"
  return {"kind": kind.name, "format": fmt,
          "tensors": {k: (tuple(v.shape), str(v.dtype)) for k, v in sorted(tensors.items())}}
