"""A whole Stable Diffusion folder as one bundle, what training, sampling and evaluation load.

  sd = load_sd("sd15", value_encoder="livo/value_encoder", dtype=jnp.bfloat16)
  sd.tokenizer, sd.text_encoder, sd.unet, sd.vae, sd.scheduler_config, sd.value_encoder

  sd = load_sd(ModelRef("stable-diffusion-v1-5/stable-diffusion-v1-5", variant="fp16"),
               value_encoder=ModelRef("ORG/LIVO", subfolder="value_encoder"))   # Hub ids

The folder is diffusers' layout (`scheduler/ text_encoder/ tokenizer/ unet/ vae/`), in torch
layout or as the Flax checkpoint `tools/convert_weights.py import` writes; a Hub repo id is
fetched (only those parts) by `weights/hub.py`.
"""

import dataclasses
import os
from typing import Any

import jax.numpy as jnp
from flax import nnx

from livo_jax import files
from livo_jax import schedulers
from livo_jax.weights import folders
from livo_jax.weights import hub
from livo_jax.weights.hub import ModelRef


@dataclasses.dataclass
class StableDiffusion:
  """The frozen SD parts, plus an optional LiVO value encoder."""
  tokenizer: Any
  text_encoder: nnx.Module
  unet: nnx.Module
  vae: nnx.Module
  scheduler_config: schedulers.SchedulerConfig
  value_encoder: nnx.Module | None = None
  value_encoder_config: dict | None = None   # its config.json, kept when it is saved again
  folder: str | None = None   # the SD folder read (for a Hub id: its cached snapshot's)

  @property
  def vae_scale_factor(self) -> int:
    return 2 ** (len(self.vae.config.block_out_channels) - 1)

  @property
  def default_size(self) -> int:
    """The image size the UNet was trained at (512 for SD 1.5)."""
    return (self.unet.config.sample_size or 64) * self.vae_scale_factor


def load_tokenizer(model: str | ModelRef):
  """SD's CLIP tokenizer from a `tokenizer/` folder (or a Hub repo's)."""
  from transformers import CLIPTokenizer  # pylint: disable=g-import-not-at-top
  return CLIPTokenizer.from_pretrained(hub.tokenizer_folder(model))


def load_scheduler_config(model: str | ModelRef) -> schedulers.SchedulerConfig:
  """Reads `scheduler_config.json` of a diffusers pipeline's `scheduler/` folder."""
  path = hub.file_in(model, schedulers.CONFIG_NAME)
  raw = files.read_json_object(path, missing_hint=" (not a diffusers scheduler folder?)")
  return schedulers.SchedulerConfig.from_dict(raw, source=path)


def load_sd(model: str | ModelRef, *, value_encoder: str | ModelRef | None = None,
            dtype=jnp.float32, param_dtype=None, value_encoder_param_dtype=None,
            remat: str = "none", attention_impl: str | None = None) -> StableDiffusion:
  """Loads a diffusers SD folder and, optionally, a value encoder (an HF CLIPTextModel folder).

  Args:
    model: the SD folder, or its Hub repo id, or a `ModelRef` (its revision and weights
      variant apply to every part).
    value_encoder: a value encoder folder, repo id or `ModelRef` (the trainer passes its
      initialisation, by default the SD text encoder), or None.
    dtype: compute dtype of every net.
    param_dtype: storage dtype of the frozen nets' parameters (None: as stored).
    value_encoder_param_dtype: the value encoder's (None: as stored; training keeps float32
      master weights).
    remat: the UNet's rematerialisation policy (`models.layers.REMAT_POLICIES`).
    attention_impl: attention implementation of every net (None: per platform).
  """
  ref = hub.as_ref(model)
  folder = hub.pipeline_folder(ref)
  frozen = dict(dtype=dtype, param_dtype=param_dtype, attention_impl=attention_impl,
                variant=ref.variant)
  part = lambda name: os.path.join(folder, name)
  encoder = folders.load_clip_text(
      value_encoder, dtype=dtype, param_dtype=value_encoder_param_dtype,
      attention_impl=attention_impl) if value_encoder else None
  return StableDiffusion(
      tokenizer=load_tokenizer(part("tokenizer")),
      text_encoder=folders.load_clip_text(part("text_encoder"), **frozen),
      unet=folders.load_unet(part("unet"), remat=remat, **frozen),
      vae=folders.load_vae(part("vae"), **frozen),
      scheduler_config=load_scheduler_config(part("scheduler")),
      value_encoder=encoder,
      value_encoder_config=folders.read_config(value_encoder) if value_encoder else None,
      folder=folder)
