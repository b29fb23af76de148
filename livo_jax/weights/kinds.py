"""The four model kinds we read and write, and how their torch folders and configs differ.

  kind = kind_of_config(raw_config, where)         # UNET, VAE, CLIP_TEXT or CLIP
  config = kind.config_from_dict(raw_config, source="sd15/unet/config.json")
  model = kind.model_class(config, rngs=nnx.Rngs(0))
"""

import dataclasses
from typing import Any, Callable, Mapping

import numpy as np

from livo_jax import hf_config
from livo_jax.errors import ConfigError
from livo_jax.models import clip, unet, vae


@dataclasses.dataclass(frozen=True)
class ModelKind:
  name: str
  model_class: type
  config_from_dict: Callable[..., Any]   # (raw config.json dict, source=path) -> config
  weights_name: str                 # file stem of the torch safetensors weights
  bin_name: str                     # file stem of the pickled torch weights
  class_tags: Mapping[str, Any]     # written into config.json so the torch classes accept it
  save_prefix: str = ""             # prefix of the torch keys we write
  strip_prefixes: tuple[str, ...] = ()   # accepted on read
  buffers: tuple[str, ...] = ()     # non-parameter tensors some files hold; dropped on read
  renames: tuple[tuple[str, str], ...] = ()  # legacy key fragments -> current ones

  def normalise_keys(self, tensors: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A file's keys as this model names its parameters (prefixes, buffers, legacy names)."""
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


def _parser(cls, **tables) -> Callable[..., Any]:
  def config_from_dict(raw: Mapping[str, Any], source: str = "config.json"):
    return hf_config.parse(cls, raw, source=source, **tables)
  return config_from_dict


clip_text_config = _parser(clip.CLIPTextConfig, ignored=clip.HF_IGNORED_TEXT)
clip_vision_config = _parser(clip.CLIPVisionConfig, ignored=clip.HF_IGNORED_VISION)


def clip_config(raw: Mapping[str, Any], source: str = "config.json") -> clip.CLIPConfig:
  """An HF `CLIPConfig`, its two towers parsed as their own configs."""
  raw = dict(raw)
  raw["text_config"] = _tower(raw, "text_config", clip_text_config, source)
  raw["vision_config"] = _tower(raw, "vision_config", clip_vision_config, source)
  return hf_config.parse(clip.CLIPConfig, raw, ignored=clip.HF_IGNORED_CLIP, source=source)


def _tower(raw: dict, name: str, parse: Callable, source: str):
  """Pops `raw[name]` (and its legacy `{name}_dict`) and parses it.

  Old files (openai/clip-vit-large-patch14) hold both `text_config` and `text_config_dict`.
  transformers builds a config from the `_dict` alone, defaults included, and lets every one of
  its fields override the other (so a legacy `eos_token_id: 2` there gives way to the default).
  """
  fields = dict(raw.pop(name, None) or {})
  legacy = raw.pop(f"{name}_dict", None)
  if legacy is not None:
    fields.update(hf_config.to_dict(parse(legacy, source=f"{source} ({name}_dict)")))
  return parse(fields, source=f"{source} ({name})")


CLIP_TEXT = ModelKind(
    name="clip_text", model_class=clip.CLIPTextModel, config_from_dict=clip_text_config,
    weights_name="model", bin_name="pytorch_model",
    class_tags={"architectures": ["CLIPTextModel"], "model_type": "clip_text_model"},
    # transformers 4.x nests the model under `text_model.`; 5.x reads both, so we write it.
    save_prefix="text_model.", strip_prefixes=("text_model.",),
    buffers=("embeddings.position_ids",))
CLIP = ModelKind(
    name="clip", model_class=clip.CLIPModel, config_from_dict=clip_config,
    weights_name="model", bin_name="pytorch_model",
    class_tags={"architectures": ["CLIPModel"], "model_type": "clip"},
    # No prefix to strip: `text_model.` and `vision_model.` name the towers here.
    buffers=("text_model.embeddings.position_ids", "vision_model.embeddings.position_ids"))
UNET = ModelKind(
    name="unet", model_class=unet.UNet2DConditionModel,
    config_from_dict=_parser(unet.UNetConfig, fixed=unet.HF_FIXED, ignored=unet.HF_IGNORED),
    weights_name="diffusion_pytorch_model", bin_name="diffusion_pytorch_model",
    class_tags={"_class_name": "UNet2DConditionModel"})
VAE = ModelKind(
    name="vae", model_class=vae.AutoencoderKL,
    config_from_dict=_parser(vae.VAEConfig, fixed=vae.HF_FIXED, ignored=vae.HF_IGNORED),
    weights_name="diffusion_pytorch_model", bin_name="diffusion_pytorch_model",
    class_tags={"_class_name": "AutoencoderKL"},
    # diffusers < 0.15 named the VAE attention projections differently (SD 1.5's file does).
    renames=tuple((f".attentions.0.{old}.", f".attentions.0.{new}.") for old, new in
                  (("query", "to_q"), ("key", "to_k"), ("value", "to_v"),
                   ("proj_attn", "to_out.0"))))
KINDS = {kind.name: kind for kind in (CLIP_TEXT, CLIP, UNET, VAE)}


def kind_of_config(raw: Mapping[str, Any], where: str) -> ModelKind:
  """Which model a component's config.json (at `where`) describes."""
  architectures = raw.get("architectures") or ()
  if raw.get("_class_name") == "UNet2DConditionModel":
    return UNET
  if raw.get("_class_name") == "AutoencoderKL":
    return VAE
  if raw.get("model_type") == "clip_text_model" or "CLIPTextModel" in architectures:
    return CLIP_TEXT
  if raw.get("model_type") == "clip" or "CLIPModel" in architectures:
    return CLIP
  raise ConfigError(
      f"{where}: cannot tell the model kind (expected `_class_name` "
      "UNet2DConditionModel/AutoencoderKL, or `model_type` clip_text_model/clip)")


def kind_of_model(model) -> ModelKind:
  for kind in KINDS.values():
    if isinstance(model, kind.model_class):
      return kind
  raise TypeError(f"no folder format for {type(model).__name__}")
