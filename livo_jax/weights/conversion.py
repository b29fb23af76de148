"""Whole folders between layouts: what `tools/convert_weights.py` runs.

  import_folder("stable-diffusion-v1-5", "sd15-flax")   # torch -> Flax checkpoint
  import_folder(ModelRef("stable-diffusion-v1-5/stable-diffusion-v1-5", variant="fp16"),
                "sd15-flax")                             # from the Hub (or its cache)
  export_folder("sd15-flax", "sd15-torch")              # Flax checkpoint -> torch layout
  describe_folder("sd15-flax/unet")                      # keys, shapes, dtypes

A folder is one component (`unet/`, `vae/`, `text_encoder/`) or a whole diffusers SD folder
(`model_index.json`); other entries of an SD folder (tokenizer, scheduler, ...) are copied along.
A source may be a Hub repo id (a `ModelRef`): what a load reads is fetched, and converted with
the variant it names. `import` then `export` reproduces every tensor bit for bit.

A conversion streams: the model is built abstract (shapes, no values) to check the source's
keys and shapes against, then tensors are read from their files, laid out, checked finite and
written, each (into orbax, each group of 256 MB) before the next is read (`folders.open_model`,
`weights/tensors.py`). Its memory is a group of tensors and the libraries, not the model: SD
1.5's folder (4.3 GB of weights) imports with a peak RSS of 1.5 GB and exports with 0.7 GB
(`bench/conversion_memory.py`). The destination is written beside itself and renamed when
complete: a failed or interrupted conversion leaves nothing half-written, and what a killed one
left there (`files.remove_leftovers`) is removed, and logged, by the next conversion into the
same folder.
"""

import os
import shutil
from typing import Any, Callable

from livo_jax import files
from livo_jax.errors import WeightsError
from livo_jax.weights import folders
from livo_jax.weights import hub
from livo_jax.weights.hub import ModelRef
from livo_jax.weights import tensors as tensor_files

PIPELINE_COMPONENTS = ("text_encoder", "unet", "vae")


def is_pipeline_folder(folder: str) -> bool:
  return os.path.isfile(os.path.join(folder, "model_index.json"))


def import_folder(src: str | ModelRef, dst: str,
                  log: Callable[[str], None] = print) -> list[str]:
  """Torch folder or Hub repo (component or whole SD) -> Flax checkpoint folder. Returns what
  it wrote."""
  ref = hub.as_ref(src)
  return _convert_folder(source_folder(ref), dst,
                         lambda s, d: _import_component(s, d, ref.variant), log)


def export_folder(src: str, dst: str, log: Callable[[str], None] = print) -> list[str]:
  """Flax checkpoint folder (component or whole SD) -> torch folder. Returns what it wrote."""
  return _convert_folder(src, dst, _export_component, log)


def source_folder(src: str | ModelRef) -> str:
  """A local folder as it is; a Hub repo's SD pipeline (it has model_index.json) or component,
  fetched."""
  ref = hub.as_ref(src)
  if hub.is_local(ref):
    return hub.fetch(ref, ())
  try:
    hub.file_in(ref, hub.PIPELINE_INDEX)
  except hub.HubError:
    return hub.component_folder(ref)    # a component's repo (or the error again, if not there)
  return hub.pipeline_folder(ref)


def _import_component(src: str, dst: str, variant: str | None = None) -> str:
  kind = folders.kind_of_folder(src)
  model, tensors = folders.open_model(src, kind, variant)
  folders.write_flax(dst, _config(model, kind, src), tensors)
  return f"{dst} ({kind.name}, Flax)"


def _export_component(src: str, dst: str) -> str:
  if not tensor_files.is_flax_checkpoint(src):
    raise WeightsError(f"{src}: not a Flax checkpoint (no {tensor_files.FLAX_PARAMS_DIR}/); "
                       "`export` takes what `import` wrote")
  kind = folders.kind_of_folder(src)
  model, tensors = folders.open_model(src, kind)
  folders.write_pretrained(dst, kind, _config(model, kind, src), tensors)
  return f"{dst} ({kind.name}, torch layout)"


def _config(model, kind, src: str) -> dict[str, Any]:
  """The config.json to write: the source's, through the (abstract) model's config."""
  return folders.export_config(model, kind, base_config=folders.read_config(src))


def _convert_folder(src: str, dst: str, convert_component, log) -> list[str]:
  if not os.path.isdir(src):
    raise FileNotFoundError(f"{src}: no such folder")
  dst = os.path.abspath(dst)
  # A killed conversion leaves its partial folder (gigabytes for SD) beside the destination.
  removed = files.remove_leftovers(os.path.dirname(dst))
  if removed:
    log(f"removed {len(removed)} leftover(s) of killed writes from {os.path.dirname(dst)}: "
        + ", ".join(removed))
  with files.atomic_folder(dst) as partial:
    if is_pipeline_folder(src):
      written = [_convert_entry(src, partial, name, convert_component)
                 for name in sorted(os.listdir(src))]
    else:   # the component's files go straight into `partial` (empty, so taken over)
      written = [convert_component(src, partial)]
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


def describe_folder(model: str | ModelRef) -> dict[str, dict[str, Any]]:
  """Keys, shapes and dtypes per component: {component: {"kind", "format", "tensors", "problem"}}.

  `model` is a folder or Hub repo (the variant it names is described). "problem" is the
  one-line error that loading the component would raise (a missing, unexpected, mis-shaped or
  non-finite tensor), or None.
  """
  ref = hub.as_ref(model)
  folder = source_folder(ref)
  if is_pipeline_folder(folder):
    return {name: _describe_component(os.path.join(folder, name), ref.variant)
            for name in PIPELINE_COMPONENTS if os.path.isdir(os.path.join(folder, name))}
  name = os.path.basename(os.path.normpath(folder)) if hub.is_local(ref) else str(ref)
  return {name: _describe_component(folder, ref.variant)}


def _describe_component(folder: str, variant: str | None) -> dict[str, Any]:
  kind = folders.kind_of_folder(folder)
  weights = folders.read_weights(folder, kind, variant)
  try:
    folders.check_weights(folder, kind, weights)
    problem = None
  except WeightsError as e:
    problem = " ".join(str(e).split())
  tensors = {k: (tuple(v.shape), str(v.dtype)) for k, v in sorted(weights.tensors.items())}
  return {"kind": kind.name, "format": "flax" if weights.is_flax else "torch",
          "tensors": tensors, "problem": problem}
