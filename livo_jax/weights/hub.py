"""Model folders by local path or Hugging Face Hub repo id, resolved to a folder on disk.

  ref = ModelRef("ORG/LIVO", subfolder="value_encoder", revision="v1.0")
  folder = component_folder(ref, kinds.CLIP_TEXT)     # config.json + the weights, nothing else
  folder = pipeline_folder(ModelRef("stable-diffusion-v1-5/stable-diffusion-v1-5",
                                    variant="fp16"))  # what load_sd reads, no safety checker

A path that exists on disk wins over a repo id of the same spelling, and is used as it is.
Anything else that reads as a repo id ("ORG/NAME" or "NAME") goes through `huggingface_hub`:
only the files the load needs are fetched (the config, one variant's weights - safetensors, or
the pickled `.bin` where a folder has no safetensors - the tokenizer, the scheduler config),
into the Hugging Face cache (`HF_HUB_CACHE`, `HF_HOME`). With `HF_HUB_OFFLINE=1` nothing is
fetched: the cache answers, or a one-line `HubError` says what is not in it.
"""

import dataclasses
import os
import posixpath

from livo_jax import files
from livo_jax.errors import WeightsError
from livo_jax.weights import kinds as kinds_lib
from livo_jax.weights import tensors as tensor_files
from livo_jax.weights.kinds import ModelKind

CONFIG_NAME = "config.json"
PIPELINE_INDEX = "model_index.json"
SCHEDULER_CONFIG = "scheduler_config.json"
# What a tokenizer folder may hold; CLIPTokenizer needs vocab.json and merges.txt.
TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json",
                   "special_tokens_map.json", "added_tokens.json")
SD_COMPONENTS = {"text_encoder": kinds_lib.CLIP_TEXT, "unet": kinds_lib.UNET,
                 "vae": kinds_lib.VAE}


class HubError(FileNotFoundError):
  """A repo id that the Hub (or, offline, the cache) cannot give: the message says which."""


@dataclasses.dataclass(frozen=True)
class ModelRef:
  """Where a model lives: a local folder or a Hub repo id, as `from_pretrained` takes it.

  Attributes:
    name: a local folder, or a Hub repo id ("ORG/NAME").
    subfolder: the model's folder inside `name` ("" = `name` itself), e.g. "value_encoder".
    revision: a branch, tag or commit of the repo (None: "main"); refused for a local folder.
    variant: weights file variant, e.g. "fp16" for `model.fp16.safetensors` (None: the plain
      files).
  """
  name: str
  subfolder: str = ""
  revision: str | None = None
  variant: str | None = None

  def __str__(self) -> str:
    where = posixpath.join(self.name, self.subfolder) if self.subfolder else self.name
    extras = [f"{k} {v}" for k, v in (("revision", self.revision), ("variant", self.variant))
              if v]
    return f"{where} ({', '.join(extras)})" if extras else where

  def child(self, subfolder: str) -> "ModelRef":
    """The same repo and revision, one folder down."""
    return dataclasses.replace(
        self, subfolder=posixpath.join(self.subfolder, subfolder) if self.subfolder
        else subfolder)


def as_ref(model: "str | ModelRef", **fields) -> ModelRef:
  """`model` as a ModelRef; `fields` (subfolder, revision, variant) fill what it leaves unset."""
  if isinstance(model, ModelRef):
    unset = {k: v for k, v in fields.items() if v and not getattr(model, k)}
    return dataclasses.replace(model, **unset)
  if not isinstance(model, str) or not model:
    raise ValueError(f"a model is a folder or a Hub repo id, got {model!r}")
  return ModelRef(model, **{k: v for k, v in fields.items() if v})


def record_name(model: "str | ModelRef | None") -> str | None:
  """How a settings record names a model: a folder by its absolute path, a repo id as it is,
  each with its subfolder, revision and variant."""
  if not model:
    return None
  ref = as_ref(model)
  if is_local(ref):
    ref = dataclasses.replace(ref, name=os.path.abspath(os.path.expanduser(ref.name)))
  return str(ref)


def is_local(ref: ModelRef) -> bool:
  return os.path.exists(os.path.expanduser(ref.name))


def is_repo_id(name: str) -> bool:
  """Whether `name` reads as a Hub repo id ("ORG/NAME" or "NAME"), not as a path."""
  if not name or name.startswith((".", "/", "~")) or name.count("/") > 1:
    return False
  from huggingface_hub.utils import HFValidationError, validate_repo_id  # pylint: disable=g-import-not-at-top
  try:
    validate_repo_id(name)
  except HFValidationError:
    return False
  return True


def is_folder_or_repo_id(name: str) -> bool:
  """Whether `name` can name a model: a path here, or a Hub repo id."""
  return os.path.exists(os.path.expanduser(name)) or is_repo_id(name)


def check_name(name: str) -> None:
  """Raises FileNotFoundError for a name that is neither a folder here nor a repo id."""
  if not is_folder_or_repo_id(name):
    raise FileNotFoundError(f"{name}: no such folder (nor a Hub repo id: ORG/NAME)")


def fetch(ref: ModelRef, patterns: tuple[str, ...]) -> str:
  """The folder `ref` names, with the files matching `patterns` (relative to it) in it.

  A local folder is returned as it is (nothing to fetch); a repo id's files are fetched into
  the cache, or found there when offline.
  """
  if is_local(ref):
    if ref.revision:
      raise ValueError(f"{ref}: a revision applies to a Hub repo id, and {ref.name} is a local "
                       "folder")
    folder = os.path.join(os.path.expanduser(ref.name), ref.subfolder)
    if not os.path.isdir(folder):
      raise FileNotFoundError(f"{folder}: no such folder")
    return folder
  check_name(ref.name)
  snapshot = _snapshot_download(ref, [posixpath.join(ref.subfolder, p) for p in patterns])
  folder = os.path.join(snapshot, ref.subfolder)
  if not os.path.isdir(folder):
    raise HubError(f"{ref}: the repo has no such folder{_offline_hint()}")
  return folder


def component_folder(model: "str | ModelRef", kind: ModelKind | None = None) -> str:
  """A component's folder with its config.json and the weights of `model.variant` in it."""
  ref = as_ref(model)
  folder = fetch(ref, (CONFIG_NAME,))
  if is_local(ref):
    return folder
  config = os.path.join(folder, CONFIG_NAME)
  if not os.path.isfile(config):
    raise HubError(f"{ref}: no {CONFIG_NAME} in the repo{_offline_hint()}")
  if kind is None:
    kind = kinds_lib.kind_of_config(files.read_json_object(config), config)
  if tensor_files.is_flax_checkpoint(folder):
    return folder   # a Flax checkpoint fetched whole before: nothing else to get
  single, index, binary = tensor_files.weights_names(kind.weights_name, kind.bin_name,
                                                     ref.variant)
  fetch(ref, (single, index))
  if not os.path.isfile(os.path.join(folder, single)) and os.path.isfile(
      os.path.join(folder, index)):
    fetch(ref, tuple(tensor_files.shard_names(os.path.join(folder, index))))
  elif not os.path.isfile(os.path.join(folder, single)):
    fetch(ref, (binary,))
  try:
    tensor_files.weights_files(folder, kind.weights_name, kind.bin_name, ref.variant)
  except WeightsError as e:
    raise HubError(f"{ref}: {e}{_offline_hint()}") from None
  return folder


def tokenizer_folder(model: "str | ModelRef") -> str:
  """A CLIP tokenizer's folder (vocab.json, merges.txt, its configs)."""
  ref = as_ref(model)
  folder = fetch(ref, TOKENIZER_FILES)
  if not os.path.isfile(os.path.join(folder, "vocab.json")):
    if is_local(ref):
      raise FileNotFoundError(f"{folder}: no tokenizer (vocab.json) there")
    raise HubError(f"{ref}: no tokenizer (vocab.json) in the repo{_offline_hint()}")
  return folder


def file_in(model: "str | ModelRef", name: str) -> str:
  """One file of a folder or repo (the scheduler's config, a pipeline index)."""
  ref = as_ref(model)
  path = os.path.join(fetch(ref, (name,)), name)
  if not is_local(ref) and not os.path.isfile(path):
    raise HubError(f"{ref}: no {name} in the repo{_offline_hint()}")
  return path


def pipeline_folder(model: "str | ModelRef") -> str:
  """A diffusers SD folder holding what `weights.load_sd` reads: the text encoder, UNet and
  VAE (in `model.variant`), the tokenizer and the scheduler config; never the safety checker."""
  ref = as_ref(model)
  if is_local(ref):
    folder = fetch(ref, ())
    for name in (*SD_COMPONENTS, "tokenizer", "scheduler"):
      if not os.path.isdir(os.path.join(folder, name)):
        raise FileNotFoundError(f"{folder}: not a diffusers SD folder (no {name}/)")
    return folder
  folder = os.path.dirname(file_in(ref, PIPELINE_INDEX))
  for name, kind in SD_COMPONENTS.items():
    component_folder(ref.child(name), kind)
  tokenizer_folder(ref.child("tokenizer"))
  file_in(ref.child("scheduler"), SCHEDULER_CONFIG)
  return folder


def _snapshot_download(ref: ModelRef, patterns: list[str]) -> str:
  """huggingface_hub's snapshot of `ref`'s repo, fetching only `patterns`; its errors as one
  HubError line that names the repo, revision and what to do."""
  import huggingface_hub  # pylint: disable=g-import-not-at-top
  from huggingface_hub import errors  # pylint: disable=g-import-not-at-top
  repo = ModelRef(ref.name, revision=ref.revision)   # what these errors are about
  try:
    return huggingface_hub.snapshot_download(ref.name, revision=ref.revision,
                                             allow_patterns=patterns)
  except errors.GatedRepoError:
    raise HubError(f"{repo}: a gated repo: accept its licence on huggingface.co and log in "
                   "(`hf auth login`, or HF_TOKEN)") from None
  except errors.RepositoryNotFoundError:
    raise HubError(f"{repo}: no such folder, nor a repo on the Hub (a private one needs "
                   "`hf auth login`, or HF_TOKEN)") from None
  except errors.RevisionNotFoundError:
    raise HubError(f"{repo}: the repo has no revision {ref.revision!r}") from None
  except errors.IncompleteSnapshotError as e:   # an interrupted download, offline now
    raise HubError(f"{repo}: {_first_line(e)}") from None
  except errors.LocalEntryNotFoundError as e:
    offline = huggingface_hub.constants.is_offline_mode()
    raise HubError(
        f"{repo}: no such folder, and as a Hub repo id not in the Hugging Face cache "
        f"({huggingface_hub.constants.HF_HUB_CACHE})"
        + (", and HF_HUB_OFFLINE=1 forbids downloads: fetch it where there is a connection "
           f"(`hf download {ref.name}{_revision_flag(ref)}`) or point HF_HUB_CACHE at a "
           "cache that holds it" if offline
           else f", and the Hub did not answer: {_first_line(e)}")) from None
  except errors.HfHubHTTPError as e:
    raise HubError(f"{repo}: the Hub refused the request: {_first_line(e)}") from None


def _revision_flag(ref: ModelRef) -> str:
  return f" --revision {ref.revision}" if ref.revision else ""


def _offline_hint() -> str:
  import huggingface_hub  # pylint: disable=g-import-not-at-top
  if huggingface_hub.constants.is_offline_mode():
    return (" (HF_HUB_OFFLINE=1: the cache answered, and it does not hold it; fetch it where "
            "there is a connection)")
  return ""


def _first_line(error: BaseException) -> str:
  return (str(error).strip().splitlines() or [type(error).__name__])[0]
