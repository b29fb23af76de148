"""Flax NNX models of Stable Diffusion's CLIP text encoder, UNet and VAE, and their loaders.

Each loader reads an HF/diffusers torch folder (config.json + safetensors, or `.bin` with torch
installed) or a Flax checkpoint written by `tools/convert_weights.py import`:

  text_encoder = load_clip_text("sd15/text_encoder")          # m(ids) -> (hidden, pooled)
  unet = load_unet("sd15/unet", dtype=jnp.bfloat16)            # unet(latents, t, context)
  vae = load_vae("sd15/vae")                                   # vae.encode / vae.decode

`dtype` is the compute dtype; `param_dtype` (default: as stored) the storage dtype; other keyword
arguments (`remat`, `attention_impl`) go to the model constructor.
"""

import jax.numpy as jnp

from livo_jax import convert
from livo_jax.models.clip import CLIPTextConfig, CLIPTextModel
from livo_jax.models.unet import UNet2DConditionModel, UNetConfig
from livo_jax.models.vae import AutoencoderKL, VAEConfig


def load_clip_text(folder: str, dtype=jnp.float32, **kwargs) -> CLIPTextModel:
  return convert.load_model(folder, convert.CLIP_TEXT, dtype=dtype, **kwargs)


def load_unet(folder: str, dtype=jnp.float32, **kwargs) -> UNet2DConditionModel:
  return convert.load_model(folder, convert.UNET, dtype=dtype, **kwargs)


def load_vae(folder: str, dtype=jnp.float32, **kwargs) -> AutoencoderKL:
  return convert.load_model(folder, convert.VAE, dtype=dtype, **kwargs)


__all__ = [
    "AutoencoderKL", "CLIPTextConfig", "CLIPTextModel", "UNet2DConditionModel", "UNetConfig",
    "VAEConfig", "load_clip_text", "load_unet", "load_vae",
]
