"""One model's folder: torch (HF/diffusers) or Flax checkpoint in, either layout out.

Every loader takes a folder, a Hub repo id or a `ModelRef` (a folder or id with its subfolder,
revision and variant; `weights/hub.py` fetches what a load needs). Read: a component folder's `config.json` plus `model.safetensors` /
`diffusion_pytorch_model.safetensors` (or sharded with an index, or `.bin` when torch is
installed), or a Flax checkpoint (`config.json` + `flax_params/`). Written: the same folders,
config first, each atomically (`livo_jax.files.atomic_folder`), so that
`transformers.CLIPTextModel` / `diffusers.UNet2DConditionModel` / `diffusers.AutoencoderKL`
`.from_pretrained` load them with no missing and no unexpected keys.

Tensors are read one at a time, when they are needed (`open_model`): a load holds the model and
one tensor, and a conversion (`write_flax`, `write_pretrained` of `open_model`'s tensors) one
tensor, or one group of them, and never the model.
"""

import dataclasses
import os
from typing import Any, Callable, Mapping

import jax.numpy as jnp
import numpy as np
from flax import nnx

from livo_jax import files
from livo_jax import hf_config
from livo_jax.models import AutoencoderKL, CLIPModel, CLIPTextModel, UNet2DConditionModel
from livo_jax.weights import hub
from livo_jax.weights import kinds
from livo_jax.weights import layout
from livo_jax.weights import tensors as tensor_files
from livo_jax.weights.hub import ModelRef
from livo_jax.weights.kinds import ModelKind

CONFIG_NAME = "config.json"


def read_config(model: str | ModelRef) -> dict[str, Any]:
  return files.read_json_object(hub.file_in(model, CONFIG_NAME),
                                missing_hint=" (not a model folder?)")


def kind_of_folder(model: str | ModelRef) -> ModelKind:
  """Which model a component folder (torch or Flax) holds, from its config.json."""
  path = hub.file_in(model, CONFIG_NAME)
  return kinds.kind_of_config(files.read_json_object(path, missing_hint=" (not a model folder?)"),
                              path)


def weights_files(folder: str, kind: ModelKind, variant: str | None = None) -> list[str]:
  return tensor_files.weights_files(folder, kind.weights_name, kind.bin_name, variant)


def load_model(model: str | ModelRef, kind: ModelKind | None = None, *, dtype=jnp.float32,
               param_dtype=None, variant: str | None = None, **model_kwargs) -> nnx.Module:
  """Builds a Flax model from a torch or Flax component folder, or a Hub repo's.

  Args:
    model: HF/diffusers component folder, a Flax checkpoint from `save_flax`, a Hub repo id,
      or a `ModelRef` (with subfolder, revision, variant).
    kind: which model; read from config.json when None.
    dtype: compute dtype.
    param_dtype: storage dtype of the parameters; None keeps the file's dtypes.
    variant: torch weights variant, e.g. "fp16" for `diffusion_pytorch_model.fp16.safetensors`
      (or the ModelRef's).
    **model_kwargs: passed to the model constructor (`remat`, `attention_impl`).
  """
  ref = hub.as_ref(model, variant=variant)
  folder = hub.component_folder(ref, kind)
  net, tensors = open_model(folder, kind or kind_of_folder(folder), ref.variant, dtype=dtype,
                            **model_kwargs)
  layout.fill(net, tensors, dtype=param_dtype)
  return net


def open_model(folder: str, kind: ModelKind, variant: str | None = None,
               **model_kwargs) -> tuple[nnx.Module, dict[tuple, tensor_files.Tensor]]:
  """A component folder's model with shapes but no values, and its parameters' tensors.

  The tensors, {Flax path: tensor}, match the model's parameters (else `WeightsError` naming
  the keys) and are read from the folder's files one by one as they are asked for (each raises
  `WeightsError` then if it holds NaN/inf): what `load_model` fills the model with, and what a
  conversion writes without ever holding the model.
  """
  net = _abstract_model(folder, kind, **model_kwargs)
  return net, _model_tensors(net, kind, read_weights(folder, kind, variant))


@dataclasses.dataclass(frozen=True)
class Weights:
  """A component folder's tensors as stored (read when asked), and what names them in
  messages."""
  tensors: dict[str, "np.ndarray | tensor_files.Tensor"]
  source: str     # the weights file, or the folder of shards or of a Flax checkpoint
  is_flax: bool   # keyed by Flax paths (`save_flax`), not torch keys


def read_weights(folder: str, kind: ModelKind, variant: str | None = None) -> Weights:
  """The folder's tensors: keys, shapes and dtypes read, values not yet."""
  if tensor_files.is_flax_checkpoint(folder):
    return Weights(tensor_files.open_flax_params(folder),
                   os.path.join(folder, tensor_files.FLAX_PARAMS_DIR), is_flax=True)
  paths = weights_files(folder, kind, variant)
  return Weights(tensor_files.open_all(paths), paths[0] if len(paths) == 1 else folder,
                 is_flax=False)


def check_weights(folder: str, kind: ModelKind, weights: Weights) -> None:
  """Raises the `WeightsError` that loading `weights` into the folder's model would."""
  for tensor in _model_tensors(_abstract_model(folder, kind), kind, weights).values():
    np.asarray(tensor)   # reads it, and so checks it is finite


def _model_tensors(model: nnx.Module, kind: ModelKind,
                   weights: Weights) -> dict[tuple, tensor_files.Tensor]:
  if weights.is_flax:
    return layout.from_checkpoint(model, weights.tensors, weights.source)
  return layout.from_torch(model, kind.normalise_keys(weights.tensors), weights.source)


def _abstract_model(folder: str, kind: ModelKind, **model_kwargs) -> nnx.Module:
  """The folder's model with shapes but no values (nothing allocated) yet."""
  config = kind.config_from_dict(read_config(folder), source=os.path.join(folder, CONFIG_NAME))
  return nnx.eval_shape(lambda: kind.model_class(config, rngs=nnx.Rngs(0), **model_kwargs))


def load_clip_text(model: str | ModelRef, dtype=jnp.float32, **kwargs) -> CLIPTextModel:
  """An HF `CLIPTextModel` folder: `m(input_ids) -> (last_hidden_state, pooled)`."""
  return load_model(model, kinds.CLIP_TEXT, dtype=dtype, **kwargs)


def load_clip(model: str | ModelRef, dtype=jnp.float32, **kwargs) -> CLIPModel:
  """An HF `CLIPModel` folder: `m(input_ids, pixel_values) -> logits_per_image`."""
  return load_model(model, kinds.CLIP, dtype=dtype, **kwargs)


def load_unet(model: str | ModelRef, dtype=jnp.float32, **kwargs) -> UNet2DConditionModel:
  """A diffusers `UNet2DConditionModel` folder: `unet(latents, t, context)`."""
  return load_model(model, kinds.UNET, dtype=dtype, **kwargs)


def load_vae(model: str | ModelRef, dtype=jnp.float32, **kwargs) -> AutoencoderKL:
  """A diffusers `AutoencoderKL` folder: `vae.encode(images)`, `vae.decode(latents)`."""
  return load_model(model, kinds.VAE, dtype=dtype, **kwargs)


def export_config(model: nnx.Module, kind: ModelKind,
                  base_config: Mapping[str, Any] | None = None) -> dict[str, Any]:
  """The config.json to write for `model`: its config over `base_config`, plus class tags."""
  raw = dict(base_config or {})
  raw.update(hf_config.to_dict(model.config))
  raw.update(kind.class_tags)
  return raw


def save_pretrained(model: nnx.Module, folder: str, kind: ModelKind | None = None, *,
                    base_config: Mapping[str, Any] | None = None, overwrite: bool = False,
                    add_files: Callable[[str], None] | None = None) -> None:
  """Writes a torch-layout folder (config.json + safetensors) that transformers/diffusers load.

  `base_config` is an original config.json to keep fields we do not model (pipeline hints,
  library versions); the model's own config fields always win. `add_files(tmp)` writes more
  files into the folder before it appears (a tokenizer, a model card). The folder appears
  complete or not at all; an existing non-empty one is replaced (once the new one is complete)
  only with `overwrite`, else `FileExistsError`.
  """
  kind = kind or kinds.kind_of_model(model)
  write_pretrained(folder, kind, export_config(model, kind, base_config),
                   layout.parameters(model), replace=overwrite, add_files=add_files)


def write_pretrained(folder: str, kind: ModelKind, config: Mapping[str, Any],
                     tensors: Mapping[tuple, Any], *, replace: bool = False,
                     add_files: Callable[[str], None] | None = None) -> None:
  """`save_pretrained` of a model's config.json and its parameters' tensors, {Flax path:
  tensor} (arrays, or `Tensor`s read one at a time as they are written)."""
  state = {kind.save_prefix + k: v for k, v in layout.to_torch(tensors).items()}
  with files.atomic_folder(folder, replace=replace) as tmp:
    files.write_json(config, os.path.join(tmp, CONFIG_NAME))
    tensor_files.write_safetensors(state, os.path.join(tmp, f"{kind.weights_name}.safetensors"))
    if add_files:
      add_files(tmp)


def save_flax(model: nnx.Module, folder: str, kind: ModelKind | None = None, *,
              base_config: Mapping[str, Any] | None = None) -> None:
  """Writes a Flax checkpoint folder: config.json + `flax_params/` (orbax), atomically.

  Only this project reads it (`load_model`); `export_folder` turns it back into torch layout.
  """
  kind = kind or kinds.kind_of_model(model)
  write_flax(folder, export_config(model, kind, base_config), layout.parameters(model))


def write_flax(folder: str, config: Mapping[str, Any], tensors: Mapping[tuple, Any]) -> None:
  """`save_flax` of a model's config.json and its parameters' tensors, {Flax path: tensor}."""
  with files.atomic_folder(folder) as tmp:
    files.write_json(config, os.path.join(tmp, CONFIG_NAME))
    tensor_files.write_flax_params(layout.to_checkpoint(tensors), tmp)
