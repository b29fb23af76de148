"""Flax NNX models of SD's CLIP text encoder, UNet and VAE, and of CLIP, with their loaders.

Each loader reads an HF/diffusers torch folder (config.json + safetensors, or `.bin` with torch
installed) or a Flax checkpoint written by `tools/convert_weights.py import`:

  text_encoder = load_clip_text("sd15/text_encoder")          # m(ids) -> (hidden, pooled)
  unet = load_unet("sd15/unet", dtype=jnp.bfloat16)            # unet(latents, t, context)
  vae = load_vae("sd15/vae")                                   # vae.encode / vae.decode
  clip = load_clip("clip-vit-large-patch14")                   # clip(ids, pixels) -> logits

`dtype` is the compute dtype; `param_dtype` (default: as stored) the storage dtype; other keyword
arguments (`remat`, `attention_impl`) go to the model constructor.
"""

import jax.numpy as jnp

from livo_jax import convert
from livo_jax.models.clip import (CLIPConfig, CLIPModel, CLIPTextConfig, CLIPTextModel,
                                  CLIPVisionConfig)
from livo_jax.models.unet import UNet2DConditionModel, UNetConfig
from livo_jax.models.vae import AutoencoderKL, VAEConfig


def load_clip_text(folder: str, dtype=jnp.float32, **kwargs) -> CLIPTextModel:
  return convert.load_model(folder, convert.CLIP_TEXT, dtype=dtype, **kwargs)


def load_clip(folder: str, dtype=jnp.float32, **kwargs) -> CLIPModel:
  return convert.load_model(folder, convert.CLIP, dtype=dtype, **kwargs)


def load_unet(folder: str, dtype=jnp.float32, **kwargs) -> UNet2DConditionModel:
  return convert.load_model(folder, convert.UNET, dtype=dtype, **kwargs)


def load_vae(folder: str, dtype=jnp.float32, **kwargs) -> AutoencoderKL:
  return convert.load_model(folder, convert.VAE, dtype=dtype, **kwargs)


__all__ = [
    "AutoencoderKL", "CLIPConfig", "CLIPModel", "CLIPTextConfig", "CLIPTextModel",
    "CLIPVisionConfig", "UNet2DConditionModel", "UNetConfig", "VAEConfig", "load_clip",
    "load_clip_text", "load_unet", "load_vae",
]
